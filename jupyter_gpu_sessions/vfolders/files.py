"""File operations inside one vfolder, every path component opened relative to a directory fd
with O_NOFOLLOW: a symlink a kernel plants inside is never followed out of the vfolder.

The storage backends write through these (with their ``chown``); nothing else writes into a
vfolder."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator

from ..core.errors import Conflict, InvalidRequest, NotFound
from ..core.vfolders import FileEntry

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_PATH_HINT = "give a path relative to the vfolder's root, such as 'results/model.pt'"
MAX_COMPONENT_BYTES = 255  # NAME_MAX on Linux file systems
MAX_PATH_BYTES = 4095  # PATH_MAX on Linux, less the NUL: what other tools can open
MAX_DEPTH = 256  # folders are opened one fd per level


def split_path(path: object) -> list[str]:
    """The components of a path inside a vfolder; ``""``, ``"."`` and ``"/"``-free forms of
    the root give ``[]``. Refuses absolute paths, NUL and ``..``."""
    if path is None:
        return []
    if not isinstance(path, str):
        raise InvalidRequest(f"path {path!r} is not a string: {_PATH_HINT}")
    if "\x00" in path:
        raise InvalidRequest(f"path {path!r} contains a NUL character: {_PATH_HINT}")
    if path.startswith("/"):
        raise InvalidRequest(f"path {path!r} is absolute: {_PATH_HINT}")
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise InvalidRequest(
            f"path {path[:80]!r}… is longer than {MAX_PATH_BYTES} bytes: use a shorter path"
        )
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if len(parts) > MAX_DEPTH:
        raise InvalidRequest(
            f"path {path[:80]!r}… is {len(parts)} folders deep; at most {MAX_DEPTH} are allowed"
        )
    if ".." in parts:
        raise InvalidRequest(
            f"path {path!r} contains '..': paths cannot leave the vfolder; {_PATH_HINT}"
        )
    for part in parts:
        if len(os.fsencode(part)) > MAX_COMPONENT_BYTES:
            raise InvalidRequest(
                f"path {path!r} has a component longer than {MAX_COMPONENT_BYTES} bytes: use "
                "shorter names"
            )
    return parts


def shown(parts: list[str]) -> str:
    return "/".join(parts) or "."


@contextlib.contextmanager
def open_root(path: str) -> Iterator[int]:
    fd = os.open(path, DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_dir(root_fd: int, parts: list[str], where: str) -> Iterator[int]:
    """An fd of the directory ``parts`` under ``root_fd``, opened component by component
    without following links. ``where`` names the vfolder in messages."""
    fds: list[int] = []
    current = root_fd
    try:
        for i in range(len(parts)):
            current = open_child(current, parts[: i + 1], where)
            fds.append(current)
        yield current
    finally:
        for fd in fds:
            os.close(fd)


def open_child(dir_fd: int, parts: list[str], where: str) -> int:
    """An fd (the caller closes it) of the directory ``parts[-1]`` inside ``dir_fd``;
    ``parts`` is its whole path, for messages."""
    try:
        return os.open(parts[-1], DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        raise _path_error(exc, dir_fd, parts[-1], parts, where, "a directory") from None


def _path_error(
    exc: OSError, parent_fd: int, name: str, parts: list[str], where: str, wanted: str
) -> Exception:
    path = shown(parts)
    if exc.errno == errno.ENOENT:
        return NotFound(f"there is no {path!r} in {where}")
    try:
        st = os.lstat(name, dir_fd=parent_fd)
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        return InvalidRequest(
            f"{path!r} in {where} is a symbolic link: links inside a vfolder are never "
            "followed by the server (use the path it points to, if that is in the vfolder)"
        )
    if exc.errno in (errno.ENOTDIR, errno.ELOOP) or (
        st is not None and not stat.S_ISDIR(st.st_mode)
    ):
        return InvalidRequest(f"{path!r} in {where} is not {wanted}")
    if exc.errno == errno.ENAMETOOLONG:
        return InvalidRequest(f"{path!r} is too long a path")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Conflict(f"{path!r} in {where} cannot be opened: permission denied on the host")
    return exc


def entry_of(name: str, st: os.stat_result) -> FileEntry:
    if stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    elif stat.S_ISDIR(st.st_mode):
        kind = "dir"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    else:
        kind = "other"
    size = st.st_size if kind == "file" else 0
    return FileEntry(name=name, type=kind, size=size, mtime=st.st_mtime)


def list_dir(dir_fd: int) -> list[FileEntry]:
    out = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            try:
                out.append(entry_of(entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    out.sort(key=lambda e: (e.type != "dir", e.name))
    return out


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def open_file(dir_fd: int, name: str, parts: list[str], where: str) -> int:
    """A read fd of the regular file ``name``; never a link, FIFO or device (O_NONBLOCK so a
    FIFO planted by a kernel cannot hang the server)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        raise _path_error(exc, dir_fd, name, parts, where, "a file") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        what = "a directory: list it instead" if stat.S_ISDIR(st.st_mode) else "not a file"
        raise InvalidRequest(f"{shown(parts)!r} in {where} is {what}")
    os.set_blocking(fd, True)
    return fd


def make_dirs(
    root_fd: int, parts: list[str], where: str, *, parents: bool, chown: Callable[..., None]
) -> FileEntry:
    """Make the directory ``parts`` under ``root_fd``; with ``parents`` also its missing
    parents (and an existing directory is fine)."""
    if not parents:
        with open_dir(root_fd, parts[:-1], where) as parent:
            return _make_dir(parent, parts, where, exist_ok=False, chown=chown)
    # One level at a time: make it (or accept it as it is), then enter it.
    with contextlib.ExitStack() as opened:
        parent = root_fd
        for depth in range(1, len(parts)):
            _make_dir(parent, parts[:depth], where, exist_ok=True, chown=chown)
            parent = open_child(parent, parts[:depth], where)
            opened.callback(os.close, parent)
        return _make_dir(parent, parts, where, exist_ok=True, chown=chown)


def _make_dir(
    parent: int, parts: list[str], where: str, *, exist_ok: bool, chown: Callable[..., None]
) -> FileEntry:
    leaf, path = parts[-1], shown(parts)
    try:
        os.mkdir(leaf, 0o755, dir_fd=parent)
        chown(leaf, dir_fd=parent)
    except FileExistsError:
        st = lstat_at(parent, leaf)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise InvalidRequest(
                f"{path!r} in {where} is a symbolic link: links inside a vfolder are "
                "never followed by the server"
            ) from None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise Conflict(f"{path!r} exists in {where} and is not a directory") from None
        if not exist_ok:
            raise Conflict(
                f"{path!r} already exists in {where} (pass parents=True to accept an "
                "existing directory)"
            ) from None
    return entry_of(leaf, os.lstat(leaf, dir_fd=parent))


def remove(parent_fd: int, parts: list[str], where: str, *, recursive: bool) -> None:
    """Delete the file, symlink (not what it points to) or directory ``parts[-1]`` inside
    ``parent_fd``; a directory that is not empty only when ``recursive``."""
    name, path = parts[-1], shown(parts)
    st = lstat_at(parent_fd, name)
    if st is None:
        raise NotFound(f"there is no {path!r} in {where}")
    try:
        if stat.S_ISDIR(st.st_mode):
            if recursive:
                remove_tree(parent_fd, name)
            else:
                os.rmdir(name, dir_fd=parent_fd)
        else:
            os.unlink(name, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno == errno.ENOTEMPTY:
            raise Conflict(
                f"directory {path!r} in {where} is not empty: delete it with "
                "recursive=True to remove everything in it"
            ) from None
        if exc.errno == errno.ENOENT:
            raise NotFound(f"there is no {path!r} in {where}") from None
        raise


def write_file(
    parent_fd: int,
    name: str,
    chunks: Iterable[bytes],
    *,
    overwrite: bool,
    chown: Callable[..., None],
    before_write: Callable[[int], None],
    on_full: Callable[[], Exception],
) -> os.stat_result:
    """Write ``chunks`` to a temporary file next to ``name`` and move it into place, so a
    failed or refused write leaves nothing behind and an overwritten file stays whole until
    the new one is complete. ``before_write(n)`` runs before each chunk of ``n`` bytes (it
    raises to refuse it); ``on_full()`` is raised when the file system is full. Without
    ``overwrite``, an existing ``name`` raises FileExistsError. Returns the new file's stat."""
    temp = f".upload-{uuid.uuid4().hex}.part"
    placed = False
    fd = os.open(
        temp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o644,
        dir_fd=parent_fd,
    )
    try:
        chown(fd)
        for chunk in chunks:
            if not chunk:
                continue
            before_write(len(chunk))
            try:
                write_all(fd, chunk)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise on_full() from None
                raise
        os.fsync(fd)
        st = os.fstat(fd)
        if overwrite:
            os.replace(temp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        else:
            # link() never replaces: a file that appeared meanwhile is kept.
            os.link(temp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
            os.unlink(temp, dir_fd=parent_fd)
        placed = True
    finally:
        os.close(fd)
        if not placed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=parent_fd)
    return st


def remove_tree(parent_fd: int, name: str) -> None:
    """Delete the directory ``name`` and everything in it, depth-first by fd, never
    following links (a link is removed, not what it points to)."""
    top = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    stack = [(parent_fd, name, top)]
    try:
        while stack:
            pfd, dname, fd = stack[-1]
            descended = False
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        child = os.open(entry.name, DIR_FLAGS, dir_fd=fd)
                        stack.append((fd, entry.name, child))
                        descended = True
                        break
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=fd)
            if not descended:
                stack.pop()
                os.close(fd)
                os.rmdir(dname, dir_fd=pfd)
    finally:
        for _, _, fd in stack:
            os.close(fd)


def copy_tree(
    src_fd: int,
    dst_fd: int,
    *,
    budget: int | None,
    chown: Callable[..., None],
    on_budget: Callable[[int], Exception],
) -> int:
    """Copy the contents of directory ``src_fd`` into the empty directory ``dst_fd``:
    directories, regular files (permission bits without setuid/setgid) and symlinks as
    links (never followed). Other file types are skipped. Raises ``on_budget(copied)``
    before writing more than ``budget`` bytes. Returns the bytes copied."""
    copied = 0
    top_src, top_dst = os.dup(src_fd), os.dup(dst_fd)
    stack = [(top_src, top_dst, os.scandir(top_src))]
    try:
        while stack:
            sfd, dfd, entries = stack[-1]
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                name = entry.name
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(name, 0o755, dir_fd=dfd)
                    try:
                        child_src = os.open(name, DIR_FLAGS, dir_fd=sfd)
                    except OSError as exc:
                        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                            continue
                        raise
                    child_dst = os.open(name, DIR_FLAGS, dir_fd=dfd)
                    chown(child_dst)
                    stack.append((child_src, child_dst, os.scandir(child_src)))
                    break
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(name, dir_fd=sfd)
                    os.symlink(target, name, dir_fd=dfd)
                    chown(name, dir_fd=dfd)
                elif stat.S_ISREG(st.st_mode):
                    copied = _copy_file(sfd, dfd, name, st, copied, budget, chown, on_budget)
            else:
                stack.pop()
                entries.close()
                os.close(sfd)
                os.close(dfd)
    finally:
        for sfd, dfd, entries in stack:
            entries.close()
            os.close(sfd)
            os.close(dfd)
    return copied


def _copy_file(sfd, dfd, name, st, copied, budget, chown, on_budget) -> int:
    if budget is not None and copied + st.st_size > budget:
        raise on_budget(copied + st.st_size)
    try:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=sfd)
    except FileNotFoundError:
        return copied
    try:
        if not stat.S_ISREG(os.fstat(src).st_mode):
            return copied  # swapped for something else while we copied
        mode = stat.S_IMODE(st.st_mode) & 0o777
        dst = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            mode,
            dir_fd=dfd,
        )
        try:
            chown(dst)
            while True:
                chunk = os.read(src, 1024 * 1024)
                if not chunk:
                    break
                if budget is not None and copied + len(chunk) > budget:
                    raise on_budget(copied + len(chunk))
                write_all(dst, chunk)
                copied += len(chunk)
            os.fsync(dst)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return copied


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
