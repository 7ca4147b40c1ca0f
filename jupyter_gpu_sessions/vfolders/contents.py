"""The files inside a vfolder as callers see them: list, download, upload, mkdir, delete."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING

from ..core.errors import Conflict, InvalidRequest, NotFound
from ..core.identity import Identity
from ..core.vfolders import FileEntry, Permission, VFolder
from . import files

if TYPE_CHECKING:
    from .service import VFolderService


class VFolderContents:
    """Permission checks and quotas around the file operations of a vfolder's backend;
    mixed into :class:`VFolderService`."""

    def list_files(
        self: VFolderService, who: Identity, name: str, path: str = ""
    ) -> list[FileEntry]:
        vf, _, where = self._for_files(who, name, Permission.RO, "list files in")
        parts = files.split_path(path)
        with files.open_root(self._data_path(vf)) as root, files.open_dir(root, parts, where) as d:
            return files.list_dir(d)

    def open_download(
        self: VFolderService, who: Identity, name: str, path: str
    ) -> tuple[IO[bytes], int, str]:
        """An open binary file (the caller closes it), its size and its file name."""
        vf, _, where = self._for_files(who, name, Permission.RO, "download from")
        parts = files.split_path(path)
        if not parts:
            raise InvalidRequest("give the path of a file to download, such as 'results.csv'")
        with files.open_root(self._data_path(vf)) as root:
            with files.open_dir(root, parts[:-1], where) as parent:
                fd = files.open_file(parent, parts[-1], parts, where)
        handle = os.fdopen(fd, "rb")
        return handle, os.fstat(fd).st_size, parts[-1]

    def upload(
        self: VFolderService,
        who: Identity,
        name: str,
        path: str,
        chunks: Iterable[bytes],
        *,
        size_hint: int | None = None,
        overwrite: bool = True,
    ) -> FileEntry:
        """Store a file streamed in ``chunks``: written to a temporary file next to the
        target and renamed into place, so a failed or refused upload leaves nothing behind
        (and an overwritten file stays whole until the new one is complete)."""
        vf, _, where = self._for_files(who, name, Permission.RW, "upload to")
        parts = files.split_path(path)
        if not parts:
            raise InvalidRequest("give the path of the file to upload, such as 'data.csv'")
        if size_hint is not None and (
            isinstance(size_hint, bool) or not isinstance(size_hint, int) or size_hint < 0
        ):
            raise InvalidRequest(f"size_hint {size_hint!r} must be a number of bytes, 0 or more")
        shown = files.shown(parts)
        with files.open_root(self._data_path(vf)) as root, contextlib.ExitStack() as stack:
            try:
                parent = stack.enter_context(files.open_dir(root, parts[:-1], where))
            except NotFound as exc:
                folder = files.shown(parts[:-1])
                raise NotFound(f"{exc.message}: make the folder {folder!r} first (mkdir)") from None
            return self._upload_into(
                vf, parent, parts[-1], shown, where, chunks, size_hint, overwrite
            )

    def _upload_into(
        self: VFolderService,
        vf: VFolder,
        parent: int,
        leaf: str,
        shown: str,
        where: str,
        chunks: Iterable[bytes],
        size_hint: int | None,
        overwrite: bool,
    ) -> FileEntry:
        existing = files.lstat_at(parent, leaf)
        credit = 0
        if existing is not None:
            if stat.S_ISLNK(existing.st_mode):
                raise InvalidRequest(
                    f"{shown!r} in {where} is a symbolic link: the server never writes through "
                    "links; delete the link first or upload elsewhere"
                )
            if stat.S_ISDIR(existing.st_mode):
                raise InvalidRequest(f"{shown!r} in {where} is a directory")
            if not overwrite:
                raise Conflict(f"{shown!r} already exists in {where}: pass overwrite=True")
            credit = existing.st_size if stat.S_ISREG(existing.st_mode) else 0
        with self._upload_hold(vf, shown, credit, size_hint) as hold:
            try:
                st = self._backends[vf.backend].write_file(
                    parent,
                    leaf,
                    chunks,
                    overwrite=overwrite,
                    before_write=hold.take,
                    on_full=hold.full,
                )
            except FileExistsError:  # appeared meanwhile, and overwrite is off
                raise Conflict(
                    f"{shown!r} already exists in {where}: pass overwrite=True"
                ) from None
            except IsADirectoryError:
                raise InvalidRequest(f"{shown!r} in {where} is a directory") from None
            hold.landed()
        return files.entry_of(leaf, st)

    def mkdir(
        self: VFolderService, who: Identity, name: str, path: str, parents: bool = False
    ) -> FileEntry:
        """Make a directory; with ``parents`` also its missing parents (and an existing
        directory is fine)."""
        vf, _, where = self._for_files(who, name, Permission.RW, "make directories in")
        parts = files.split_path(path)
        if not parts:
            raise InvalidRequest("give the path of the directory to make, such as 'results'")
        return self._backends[vf.backend].make_dir(vf, parts, where, parents=parents)

    def delete_file(
        self: VFolderService, who: Identity, name: str, path: str, recursive: bool = False
    ) -> None:
        """Delete a file, a symlink (not what it points to) or a directory (``recursive``
        when it is not empty)."""
        vf, _, where = self._for_files(who, name, Permission.WD, "delete files in")
        parts = files.split_path(path)
        if not parts:
            raise InvalidRequest(
                "the vfolder's root cannot be deleted as a file: delete the vfolder instead"
            )
        self._backends[vf.backend].remove(vf, parts, where, recursive=recursive)
        self._forget_usage(vf.id)
