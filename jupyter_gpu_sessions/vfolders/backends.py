"""Where a vfolder's bytes live: a plain directory (soft quota) or a loop-mounted ext4 image
(hard quota). Every write into a vfolder's storage goes through a backend. Every method
blocks; the service calls them off the event loop."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import subprocess
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence

from ..core.errors import (
    Conflict,
    GPUSessionsError,
    InvalidRequest,
    QuotaExceeded,
    RuntimeUnavailable,
)
from ..core.units import format_size
from ..core.vfolders import FileEntry, VFolder
from . import files
from .files import DIR_FLAGS

log = logging.getLogger(__name__)

# The smallest loopback image: ext4 with a journal needs a few MiB of its own.
MIN_LOOPBACK_SIZE = 8 * 1024**2


class StorageBackend(ABC):
    """Storage for vfolders under ``root``. ``hard_quota``: the file system itself stops a
    writer at the quota (ENOSPC), so kernels may keep writing to a full vfolder."""

    name: str = ""
    hard_quota: bool = False

    def __init__(self, root: str, *, uid: int | None = None, gid: int | None = None) -> None:
        self.root = os.path.abspath(root)
        self.uid = uid
        self.gid = gid
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @abstractmethod
    def create(self, vfolder: VFolder) -> None:
        """Make the storage of a new vfolder (its data directory is empty)."""

    @abstractmethod
    def data_path(self, vfolder: VFolder) -> str:
        """The host directory holding the vfolder's files (what a kernel mounts)."""

    @abstractmethod
    def host_dir(self, vfolder: VFolder) -> str:
        """Where the vfolder's storage lives on the host, found with no side effect (such as
        a mount): a kernel's mount of the vfolder has this path or one below it as source."""

    @abstractmethod
    def usage(self, vfolder: VFolder) -> int:
        """Bytes stored in the vfolder (blocking)."""

    def free(self, vfolder: VFolder) -> int | None:
        """Bytes that can still be written, when the storage knows (hard quotas)."""
        return None

    def usage_if_ready(self, vfolder: VFolder) -> int | None:
        """Usage if it is cheap to know and needs no side effect (such as a mount)."""
        return None

    @abstractmethod
    def set_quota(self, vfolder: VFolder, quota: int | None) -> None:
        """Apply a new quota to the storage (``vfolder`` carries the current one)."""

    def ensure_ready(self, vfolder: VFolder) -> None:  # noqa: B027 (optional hook)
        """Make the storage usable again (e.g. after a reboot); nothing to do by default."""

    @abstractmethod
    def purge(self, vfolder: VFolder) -> None:
        """Delete the vfolder's storage for good. Missing storage is not an error."""

    def exists(self, vfolder: VFolder) -> bool:
        return True

    # -- writing inside a vfolder ------------------------------------------------------------
    # Here, so that everything written gets the kernels' uid (``chown``) and a full file
    # system is reported as a quota to raise.
    def make_dir(
        self, vfolder: VFolder, parts: list[str], where: str, *, parents: bool
    ) -> FileEntry:
        """Make the directory ``parts`` (with ``parents``, its missing parents too)."""
        with files.open_root(self.data_path(vfolder)) as root:
            try:
                return files.make_dirs(root, parts, where, parents=parents, chown=self.chown)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _full(vfolder, where, hard_quota=self.hard_quota) from None
                raise

    def remove(self, vfolder: VFolder, parts: list[str], where: str, *, recursive: bool) -> None:
        """Delete the file, symlink or directory ``parts`` (see :func:`files.remove`)."""
        with files.open_root(self.data_path(vfolder)) as root:
            with files.open_dir(root, parts[:-1], where) as parent:
                files.remove(parent, parts, where, recursive=recursive)

    def write_file(
        self,
        parent_fd: int,
        name: str,
        chunks: Iterable[bytes],
        *,
        overwrite: bool,
        before_write: Callable[[int], None],
        on_full: Callable[[], Exception],
    ) -> os.stat_result:
        """Store ``chunks`` as ``name`` in the directory ``parent_fd`` of one of this
        backend's vfolders (see :func:`files.write_file`)."""
        return files.write_file(
            parent_fd,
            name,
            chunks,
            overwrite=overwrite,
            chown=self.chown,
            before_write=before_write,
            on_full=on_full,
        )

    def copy_into(
        self,
        vfolder: VFolder,
        source_path: str,
        *,
        budget: int | None,
        on_budget: Callable[[int], Exception],
    ) -> int:
        """Copy everything in the directory ``source_path`` into the new, empty
        ``vfolder``; returns the bytes copied (see :func:`files.copy_tree`)."""
        with files.open_root(source_path) as src, files.open_root(self.data_path(vfolder)) as dst:
            return files.copy_tree(src, dst, budget=budget, chown=self.chown, on_budget=on_budget)

    # -- helpers ---------------------------------------------------------------------------
    def chown(self, path: str | int, *, dir_fd: int | None = None) -> None:
        """Give ``path`` to the configured uid/gid (only when we run as root)."""
        if os.geteuid() != 0 or (self.uid is None and self.gid is None):
            return
        uid = -1 if self.uid is None else self.uid
        gid = -1 if self.gid is None else self.gid
        if isinstance(path, int):
            os.fchown(path, uid, gid)
        else:
            os.chown(path, uid, gid, dir_fd=dir_fd, follow_symlinks=False)

    def _ensure_dir(self, path: str, mode: int = 0o700) -> None:
        # The store's own directories stay root's (or the server user's): kernels see only
        # the bind-mounted data directories, never these parents.
        os.makedirs(path, mode=mode, exist_ok=True)

    @contextlib.contextmanager
    def locked(self, vfolder_id: str) -> Iterator[None]:
        """Serialize storage changes of one vfolder across threads and processes."""
        with self._locks_guard:
            lock = self._locks.setdefault(vfolder_id, threading.Lock())
        self._ensure_dir(self.root)
        locks = os.path.join(self.root, "locks")
        self._ensure_dir(locks)
        with lock, open(os.path.join(locks, f"{vfolder_id}.lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _drop_lock_file(self, vfolder_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.root, "locks", f"{vfolder_id}.lock"))


def directory_usage(path: str) -> int:
    """Sum of ``st_size`` of the regular files under ``path``. Symlinks are never followed
    and directories are entered by fd, so a kernel that swaps a directory for a symlink
    mid-walk cannot send the count outside the vfolder. Depth-first, holding one fd per
    level (not per pending directory), so wide trees do not run out of fds."""
    try:
        top = os.open(path, DIR_FLAGS)
    except FileNotFoundError:
        return 0
    total = 0
    stack = [(top, os.scandir(top))]
    try:
        while stack:
            fd, entries = stack[-1]
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we walked
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
                elif stat.S_ISDIR(st.st_mode):
                    try:
                        child = os.open(entry.name, DIR_FLAGS, dir_fd=fd)
                    except OSError as exc:
                        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                            continue  # replaced while we walked
                        if exc.errno in (errno.EMFILE, errno.ENFILE):
                            raise Conflict(
                                f"the vfolder is nested {len(stack)}+ folders deep, more than this "
                                "server can walk with its open-file limit: flatten it (or "
                                "raise the server's `ulimit -n`)"
                            ) from None
                        raise
                    stack.append((child, os.scandir(child)))
                    break
            else:
                stack.pop()
                entries.close()
                os.close(fd)
    finally:
        for fd, entries in stack:
            entries.close()
            os.close(fd)
    return total


class DirectoryBackend(StorageBackend):
    """Each vfolder a directory ``<root>/dirs/<id>``. The quota is soft: the service refuses
    uploads past it and mounts a vfolder over it read-only, but a running kernel can write
    past it until its next start."""

    name = "directory"
    hard_quota = False

    def _path(self, vfolder: VFolder) -> str:
        return os.path.join(self.root, "dirs", vfolder.id)

    def create(self, vfolder: VFolder) -> None:
        self._ensure_dir(self.root)
        self._ensure_dir(os.path.join(self.root, "dirs"))
        path = self._path(vfolder)
        os.mkdir(path, 0o755)
        self.chown(path)

    def host_dir(self, vfolder: VFolder) -> str:
        return self._path(vfolder)

    def data_path(self, vfolder: VFolder) -> str:
        path = self._path(vfolder)
        if not os.path.isdir(path):
            raise GPUSessionsError(
                f"the storage of {vfolder.describe()} is missing ({path}): restore it from a "
                "backup or purge the vfolder",
                reason="storage-missing",
            )
        return path

    def exists(self, vfolder: VFolder) -> bool:
        return os.path.isdir(self._path(vfolder))

    def usage(self, vfolder: VFolder) -> int:
        return directory_usage(self._path(vfolder))

    def set_quota(self, vfolder: VFolder, quota: int | None) -> None:
        pass  # a soft quota lives in the database only

    def purge(self, vfolder: VFolder) -> None:
        path = self._path(vfolder)
        if os.path.lexists(path):
            # rmtree resists symlink attacks on Linux (it walks by fd), so a link planted
            # inside never takes it outside the vfolder.
            assert shutil.rmtree.avoids_symlink_attacks
            shutil.rmtree(path)
        self._drop_lock_file(vfolder.id)


class LoopbackBackend(StorageBackend):
    """Each vfolder an ext4 image ``<root>/images/<id>.img`` (sparse, as large as the quota),
    loop-mounted at ``<root>/mounts/<id>``; files live in its ``data`` directory (which keeps
    ext4's ``lost+found`` out of sight). The quota is hard: a kernel writing past it gets
    ENOSPC. Needs root (mount, losetup, mkfs.ext4, resize2fs)."""

    name = "loopback"
    hard_quota = True

    def _image(self, vfolder: VFolder) -> str:
        return os.path.join(self.root, "images", f"{vfolder.id}.img")

    def _mountpoint(self, vfolder: VFolder) -> str:
        return os.path.join(self.root, "mounts", vfolder.id)

    @staticmethod
    def check_available() -> None:
        if os.geteuid() != 0:
            raise RuntimeUnavailable(
                "loopback vfolders need the manager to run as root (they are ext4 images "
                "mounted with `mount -o loop`): run it as root, or use the directory backend "
                "(backend='directory', or VFolderService.default_backend = 'directory')"
            )
        missing = [t for t in ("mount", "umount", "losetup", "mkfs.ext4") if not _which(t)]
        if missing:
            raise RuntimeUnavailable(
                f"loopback vfolders need {', '.join(missing)} (package util-linux / "
                "e2fsprogs): install them, or use the directory backend"
            )

    def create(self, vfolder: VFolder) -> None:
        self.check_available()
        if vfolder.quota is None:
            raise InvalidRequest(
                "a loopback vfolder needs a quota (its image is made that large): pass a "
                "quota such as '10GiB', or use the directory backend"
            )
        if vfolder.quota < MIN_LOOPBACK_SIZE:
            raise InvalidRequest(
                f"quota {format_size(vfolder.quota)} is too small for a loopback vfolder: ask "
                f"for at least {format_size(MIN_LOOPBACK_SIZE)}"
            )
        for sub in ("", "images", "mounts"):
            self._ensure_dir(os.path.join(self.root, sub))
        image, mountpoint = self._image(vfolder), self._mountpoint(vfolder)
        with self.locked(vfolder.id):
            # O_EXCL: never format over an image that exists.
            self._check_fits(vfolder.quota)
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, vfolder.quota)
            except OSError as exc:
                os.unlink(image)
                raise InvalidRequest(
                    f"quota {format_size(vfolder.quota)} is more than the file system under "
                    f"{self.root} can hold as one image ({exc.strerror}): ask for less"
                ) from None
            finally:
                os.close(fd)
            try:
                # -m 0: no blocks reserved for root (the kernel writes as a user, and root
                # must meet the same limit); defaults otherwise, so a 16 MiB image keeps
                # most of its space and a large one gets 4 KiB blocks.
                _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", vfolder.id[:16], image])
                os.makedirs(mountpoint, mode=0o700, exist_ok=True)
                self._mount(image, mountpoint, None)
                data = os.path.join(mountpoint, "data")
                os.mkdir(data, 0o755)
                self.chown(data)
            except BaseException:
                self._teardown(vfolder)
                raise

    def _check_fits(self, size: int) -> None:
        """Images are sparse: one larger than the disk's free space would promise room that
        is not there (the kernel would get I/O errors, not ENOSPC, once the disk fills)."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        if size > free:
            raise InvalidRequest(
                f"a loopback image of {format_size(size)} does not fit: the disk under "
                f"{self.root} has {format_size(free)} free; ask for a smaller quota"
            )

    def host_dir(self, vfolder: VFolder) -> str:
        return self._mountpoint(vfolder)

    def data_path(self, vfolder: VFolder) -> str:
        self.ensure_ready(vfolder)
        return os.path.join(self._mountpoint(vfolder), "data")

    def exists(self, vfolder: VFolder) -> bool:
        return os.path.exists(self._image(vfolder))

    def usage(self, vfolder: VFolder) -> int:
        st = os.statvfs(self._mounted(vfolder))
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def usage_if_ready(self, vfolder: VFolder) -> int | None:
        mountpoint = self._mountpoint(vfolder)
        if not os.path.ismount(mountpoint):
            return None
        st = os.statvfs(mountpoint)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def free(self, vfolder: VFolder) -> int | None:
        st = os.statvfs(self._mounted(vfolder))
        return st.f_bavail * st.f_frsize

    def set_quota(self, vfolder: VFolder, quota: int | None) -> None:
        if quota is None:
            raise InvalidRequest(
                "a loopback vfolder cannot be unlimited: its quota is the size of its image"
            )
        current = vfolder.quota or 0
        if quota < current:
            raise Conflict(
                f"loopback vfolders can only grow: {vfolder.describe()} has a quota of "
                f"{format_size(current)}; clone it into a smaller vfolder if you need one"
            )
        if quota == current:
            return
        self.check_available()
        image, mountpoint = self._image(vfolder), self._mountpoint(vfolder)
        with self.locked(vfolder.id):
            self._ensure_mounted(vfolder)
            self._check_fits(quota - current)
            # Growing the file first is safe: the file system only uses what resize2fs gives.
            os.truncate(image, quota)
            devices = self._loop_devices(image)
            try:
                if not devices:
                    raise GPUSessionsError(f"{image} is mounted but not on a loop device")
                for device in devices:
                    _run(["losetup", "-c", device])
                _run(["resize2fs", devices[0]])
                return
            except GPUSessionsError as exc:
                # Online growth needs CAP_SYS_RESOURCE, which some hosts withhold: fall back
                # to growing the file system while it is unmounted.
                log.info("online resize of %s failed (%s); trying offline", image, exc)
            busy = (
                f"{vfolder.describe()} cannot be grown while a kernel has it mounted (this host "
                "does not allow growing a mounted file system): stop the kernels that use it "
                "and try again"
            )
            try:
                _run(["umount", mountpoint])
            except GPUSessionsError as exc:
                self._shrink_back(image, current)
                raise Conflict(f"{busy} ({exc})") from None
            devices = self._loop_devices(image)
            if devices:
                # Still attached: mounted in a kernel's own mount namespace. Put it back.
                self._mount(image, mountpoint, devices[0])
                self._shrink_back(image, current)
                raise Conflict(busy)
            try:
                _run(["e2fsck", "-f", "-p", image], ok=(0, 1))
                _run(["resize2fs", image])
            finally:
                self._mount(image, mountpoint, None)

    def _shrink_back(self, image: str, size: int) -> None:
        """Undo the truncate of a grow that could not happen (the file system never used the
        added space), and tell the loop devices."""
        os.truncate(image, size)
        for device in self._loop_devices(image):
            _run(["losetup", "-c", device], ok=(0, 1))

    def ensure_ready(self, vfolder: VFolder) -> None:
        if not os.path.ismount(self._mountpoint(vfolder)):
            with self.locked(vfolder.id):
                self._ensure_mounted(vfolder)

    def purge(self, vfolder: VFolder) -> None:
        with self.locked(vfolder.id):
            self._teardown(vfolder)
        self._drop_lock_file(vfolder.id)

    # -- helpers ---------------------------------------------------------------------------
    def _mounted(self, vfolder: VFolder) -> str:
        mountpoint = self._mountpoint(vfolder)
        if not os.path.ismount(mountpoint):
            self.ensure_ready(vfolder)
        return mountpoint

    def _ensure_mounted(self, vfolder: VFolder) -> None:
        image, mountpoint = self._image(vfolder), self._mountpoint(vfolder)
        if os.path.ismount(mountpoint):
            return
        self.check_available()
        if not os.path.exists(image):
            raise GPUSessionsError(
                f"the image of {vfolder.describe()} is missing ({image}): restore it from a "
                "backup or purge the vfolder",
                reason="storage-missing",
            )
        os.makedirs(mountpoint, mode=0o700, exist_ok=True)
        # An image still attached to a loop device (mounted in a kernel's namespace, or left
        # by a crash) is mounted through that device: attaching it twice would give one file
        # system two independent writers.
        devices = self._loop_devices(image)
        self._mount(image, mountpoint, devices[0] if devices else None)
        log.info("mounted loopback vfolder %s at %s", vfolder.id, mountpoint)

    @staticmethod
    def _mount(image: str, mountpoint: str, device: str | None) -> None:
        # nosuid,nodev: files a kernel makes inside cannot become setuid binaries or device
        # nodes on the host.
        if device is None:
            _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev", image, mountpoint])
        else:
            _run(["mount", "-t", "ext4", "-o", "nosuid,nodev", device, mountpoint])

    @staticmethod
    def _loop_devices(image: str) -> list[str]:
        out = _run(["losetup", "-n", "-O", "NAME", "-j", image]).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def _teardown(self, vfolder: VFolder) -> None:
        image, mountpoint = self._image(vfolder), self._mountpoint(vfolder)
        if os.path.ismount(mountpoint):
            _run(["umount", mountpoint])
        if os.path.exists(image):
            for device in self._loop_devices(image):
                # Attached but no longer mounted here: detach lazily (a kernel that still
                # mounts it keeps it until it ends).
                _run(["losetup", "-d", device], ok=(0, 1))
            os.unlink(image)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(mountpoint)


@contextlib.contextmanager
def busy(root: str, vfolder_id: str, *, wait: bool = True) -> Iterator[bool]:
    """Held while a vfolder is created, cloned or purged. A file lock, so that another
    process (``ensure_ready``) can tell a live operation from one whose process died:
    the lock goes with the process. Yields whether it was taken."""
    # The root first, so that it is made private (0700): other host users must not
    # reach vfolder files. Kernels see their vfolders through bind mounts, not this path.
    os.makedirs(root, mode=0o700, exist_ok=True)
    locks = os.path.join(root, "locks")
    os.makedirs(locks, mode=0o700, exist_ok=True)
    with open(os.path.join(locks, f"{vfolder_id}.busy"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def drop_busy(root: str, vfolder_id: str) -> None:
    """Remove the lock file of a vfolder that is gone."""
    # Whoever still waits on the unlinked file re-reads the vfolder's status first.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(root, "locks", f"{vfolder_id}.busy"))


def _full(vfolder: VFolder, where: str, *, hard_quota: bool) -> QuotaExceeded:
    if not hard_quota:  # a directory vfolder's quota is ours to count: the disk itself is full
        return disk_full(vfolder, f"writing in {where}")
    return QuotaExceeded(
        f"{where} is full (its quota is {format_size(vfolder.quota or 0)}): delete files "
        "or ask for a larger quota"
    )


def disk_full(vfolder: VFolder, what: str) -> QuotaExceeded:
    """The server's disk under a directory vfolder is full: not the vfolder's quota."""
    return QuotaExceeded(
        f"{what} failed: the server's disk under vfolder {vfolder.name!r} is full (this is "
        "not the vfolder's quota). Ask an admin to free space on the server."
    )


def _which(tool: str) -> bool:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is not None


def _run(args: Sequence[str], *, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess:
    """Run a storage tool; a failure becomes a GPUSessionsError carrying its stderr."""
    env = dict(os.environ, LC_ALL="C")
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    try:
        done = subprocess.run(
            list(args), capture_output=True, text=True, env=env, timeout=600, check=False
        )
    except FileNotFoundError:
        raise RuntimeUnavailable(
            f"{args[0]} is not installed: loopback vfolders need util-linux and e2fsprogs"
        ) from None
    except subprocess.TimeoutExpired:
        raise GPUSessionsError(f"`{' '.join(args)}` did not finish in 10 minutes") from None
    if done.returncode not in ok:
        detail = (done.stderr or done.stdout).strip() or f"exit code {done.returncode}"
        raise GPUSessionsError(
            f"`{' '.join(args)}` failed: {detail}", reason="storage-command-failed"
        )
    return done
