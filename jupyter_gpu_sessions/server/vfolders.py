"""Handlers for vfolders: folders, sharing, trash, and their files (streamed up and down)."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from tornado import web

from ..core.errors import InvalidRequest, QuotaExceeded
from .base import GPUSessionsHandler

CHUNK = 1024 * 1024
# Largest single upload the server accepts at all; quotas usually refuse far earlier.
MAX_UPLOAD = 1 << 40


def _dicts(items: Any) -> Any:
    if isinstance(items, list):
        return [_dicts(i) for i in items]
    if isinstance(items, dict):
        return {k: _dicts(v) for k, v in items.items()}
    return items.to_dict() if hasattr(items, "to_dict") else items


class VFolderHandlerBase(GPUSessionsHandler):
    @property
    def vfolders(self):
        return self.engine.vfolders

    def path_argument(self) -> str:
        """``?path=`` as sent: tornado's get_argument would quietly turn control characters
        (NUL included) into spaces and strip blanks, writing under another name."""
        values = self.request.query_arguments.get("path")
        if not values:
            return ""
        try:
            return values[-1].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest("path must be UTF-8") from None

    async def described(self, name: str) -> dict[str, Any]:
        vfolder, permission, relation = await self.run(self.vfolders.get, self.who, name)
        data = vfolder.to_dict()
        data.update(permission=permission.value, relation=relation)
        return data


class VFoldersHandler(VFolderHandlerBase):
    query_args = frozenset({"trash"})

    @web.authenticated
    async def get(self) -> None:
        if self.bool_argument("trash"):
            items = await self.run(self.vfolders.list_trash, self.who)
        else:
            items = await self.run(self.vfolders.list, self.who)
        self.reply({"vfolders": _dicts(items)})

    @web.authenticated
    async def post(self) -> None:
        data = self.body(
            {"name", "type", "group", "quota", "cloneable", "backend", "group_permission"}
        )
        if "name" not in data:
            raise InvalidRequest('Send at least {"name": "data"}.')
        kwargs = {k: data[k] for k in data if k != "name"}
        vfolder = await self.run(self.vfolders.create, self.who, data["name"], **kwargs)
        self.reply(await self.described(vfolder.id), status=201)


class VFolderHandler(VFolderHandlerBase):
    @web.authenticated
    async def get(self, name: str) -> None:
        data = await self.described(name)
        data["usage"] = await self.run(self.vfolders.usage, self.who, name)
        self.reply(data)

    @web.authenticated
    async def patch(self, name: str) -> None:
        data = self.body({"name", "quota", "cloneable", "group_permission"})
        nulls = sorted(k for k, v in data.items() if v is None)
        if nulls:
            raise InvalidRequest(
                f"{', '.join(nulls)} may not be null: leave a field out to keep it as it is"
            )
        kwargs = {("new_name" if k == "name" else k): v for k, v in data.items()}
        vfolder = await self.run(self.vfolders.update, self.who, name, **kwargs)
        self.reply(await self.described(vfolder.id))

    @web.authenticated
    async def delete(self, name: str) -> None:
        """To the trash: ``restore`` brings it back with every file, ``purge`` deletes it."""
        await self.run(self.vfolders.delete, self.who, name)
        self.set_status(204)
        self.finish()


class VFolderActionHandler(VFolderHandlerBase):
    """``restore`` | ``purge`` | ``clone``."""

    @web.authenticated
    async def post(self, name: str, action: str) -> None:
        if action == "restore":
            self.body(set())
            await self.run(self.vfolders.restore, self.who, name)
            self.reply(await self.described(name))
        elif action == "purge":
            self.body(set())
            await self.run(self.vfolders.purge, self.who, name)
            self.set_status(204)
            self.finish()
        elif action == "clone":
            data = self.body({"name", "quota", "cloneable"})
            if "name" not in data:
                raise InvalidRequest('Send {"name": "<name of the clone>"}.')
            vfolder = await self.run(
                self.vfolders.clone,
                self.who,
                name,
                data["name"],
                quota=data.get("quota"),
                cloneable=data.get("cloneable", False),
            )
            self.reply(await self.described(vfolder.id), status=201)
        else:
            raise web.HTTPError(404, f"No action {action!r}: use restore, purge or clone.")


class VFolderUsageHandler(VFolderHandlerBase):
    query_args = frozenset({"fresh"})

    @web.authenticated
    async def get(self, name: str) -> None:
        fresh = self.bool_argument("fresh")
        vfolder, _, _ = await self.run(self.vfolders.get, self.who, name)
        usage = await self.run(self.vfolders.usage, self.who, name, fresh=fresh)
        self.reply({"name": vfolder.name, "id": vfolder.id, "bytes": usage, "quota": vfolder.quota})


class SharesHandler(VFolderHandlerBase):
    @web.authenticated
    async def get(self, name: str) -> None:
        self.reply({"shares": _dicts(await self.run(self.vfolders.shares, self.who, name))})

    @web.authenticated
    async def post(self, name: str) -> None:
        """Invite a user with a permission (``ro`` | ``rw`` | ``wd``); they accept or decline."""
        data = self.body({"user", "permission"})
        if "user" not in data or "permission" not in data:
            raise InvalidRequest('Send {"user": "<name>", "permission": "ro" | "rw" | "wd"}.')
        share = await self.run(
            self.vfolders.invite, self.who, name, data["user"], data["permission"]
        )
        self.reply(_dicts(share), status=201)


class ShareHandler(VFolderHandlerBase):
    @web.authenticated
    async def patch(self, name: str, user: str) -> None:
        data = self.body({"permission"})
        if "permission" not in data:
            raise InvalidRequest('Send {"permission": "ro" | "rw" | "wd"}.')
        share = await self.run(
            self.vfolders.set_permission, self.who, name, user, data["permission"]
        )
        self.reply(_dicts(share))

    @web.authenticated
    async def delete(self, name: str, user: str) -> None:
        await self.run(self.vfolders.revoke, self.who, name, user)
        self.set_status(204)
        self.finish()


class InvitationsHandler(VFolderHandlerBase):
    @web.authenticated
    async def get(self) -> None:
        self.reply(_dicts(await self.run(self.vfolders.invitations, self.who)))


class InvitationHandler(VFolderHandlerBase):
    @web.authenticated
    async def post(self, share_id: str, action: str) -> None:
        self.body(set())
        if action == "accept":
            share = await self.run(self.vfolders.accept, self.who, share_id)
        elif action == "decline":
            share = await self.run(self.vfolders.decline, self.who, share_id)
        else:
            raise web.HTTPError(404, f"No action {action!r}: use accept or decline.")
        self.reply(_dicts(share))


class FilesHandler(VFolderHandlerBase):
    query_args = frozenset({"path", "recursive"})

    @web.authenticated
    async def get(self, name: str) -> None:
        path = self.path_argument()
        entries = await self.run(self.vfolders.list_files, self.who, name, path)
        self.reply({"path": path, "entries": _dicts(list(entries))})

    @web.authenticated
    async def delete(self, name: str) -> None:
        path = self.path_argument()
        if path in ("", ".", "/"):
            raise InvalidRequest("Name a file or folder to delete (delete the vfolder itself).")
        recursive = self.bool_argument("recursive")
        await self.run(self.vfolders.delete_file, self.who, name, path, recursive=recursive)
        self.set_status(204)
        self.finish()


class MkdirHandler(VFolderHandlerBase):
    @web.authenticated
    async def post(self, name: str) -> None:
        data = self.body({"path", "parents"})
        if not isinstance(data.get("path"), str):
            raise InvalidRequest('Send {"path": "folder/inside"}.')
        parents = data.get("parents", False)
        if not isinstance(parents, bool):
            raise InvalidRequest("parents must be true or false")
        await self.run(self.vfolders.mkdir, self.who, name, data["path"], parents=parents)
        self.reply({"path": data["path"]}, status=201)


class DownloadHandler(VFolderHandlerBase):
    query_args = frozenset({"path"})

    @web.authenticated
    async def get(self, name: str) -> None:
        f, size, filename = await self.run(
            self.vfolders.open_download, self.who, name, self.path_argument()
        )
        try:
            self.set_header("Content-Type", "application/octet-stream")
            self.set_header("Content-Length", str(size))
            self.set_header(
                "Content-Disposition", f"attachment; filename*=UTF-8''{quote(filename)}"
            )
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                self.write(chunk)
                await self.flush()
        finally:
            await asyncio.to_thread(f.close)
        # APIHandler.finish would call an empty file application/json.
        self.finish(set_content_type="application/octet-stream")


_END = object()  # the whole body arrived
_ABORT = object()  # the client went away: the writer must discard what it has


@web.stream_request_body
class UploadHandler(VFolderHandlerBase):
    """``PUT vfolders/{name}/upload?path=…``: the body is the file, streamed to disk in a
    worker thread as it arrives (never held in memory); refused with 413 as soon as it
    would pass a quota, before anything is written when Content-Length says so."""

    query_args = frozenset({"path", "overwrite"})

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method != "PUT":
            return
        # Chunks go to the writer thread through a queue bounded by ``_room``; the thread
        # hands room (and "I want the body") back to the loop with call_soon_threadsafe.
        self._loop = asyncio.get_running_loop()
        self._chunks: queue.Queue = queue.Queue()
        self._room = asyncio.Semaphore(8)
        self._writing = asyncio.Event()  # the checks passed: the writer wants the body
        length = self.request.headers.get("Content-Length")
        size_hint = int(length) if length and length.isdigit() else None
        if size_hint is not None and size_hint > MAX_UPLOAD:
            raise QuotaExceeded(f"An upload of {size_hint} bytes is larger than any quota.")
        self.request.connection.set_max_body_size(MAX_UPLOAD)
        name = self.path_args[0]
        path = self.path_argument()
        overwrite = self.bool_argument("overwrite", True)
        self._upload = asyncio.ensure_future(
            asyncio.to_thread(
                self.vfolders.upload,
                self.who,
                name,
                path,
                self._iter_chunks(),
                size_hint=size_hint,
                overwrite=overwrite,
            )
        )
        # The writer checks permission, path and quota (by Content-Length) before it takes
        # the first chunk: a refusal is answered now, before the client sends the body.
        wants = asyncio.ensure_future(self._writing.wait())
        await asyncio.wait({self._upload, wants}, return_when=asyncio.FIRST_COMPLETED)
        wants.cancel()
        if self._upload.done():
            self._upload.result()

    def _iter_chunks(self) -> Iterator[bytes]:
        self._loop.call_soon_threadsafe(self._writing.set)
        while (chunk := self._chunks.get()) is not _END:
            self._loop.call_soon_threadsafe(self._room.release)
            if chunk is _ABORT:
                raise InvalidRequest("The upload was interrupted before the whole file arrived.")
            yield chunk

    _upload: asyncio.Future | None = None  # only a PUT has a writer

    async def _feed(self, item: Any) -> None:
        # Until the writer takes it, or has stopped (refused: the answer comes in put()).
        if self._upload is None:
            return  # another method's body: dropped, tornado answers 405
        room = asyncio.ensure_future(self._room.acquire())
        await asyncio.wait({room, self._upload}, return_when=asyncio.FIRST_COMPLETED)
        if not room.done():
            room.cancel()  # the writer stopped (refused): the answer comes in put()
            return
        self._chunks.put_nowait(item)

    async def data_received(self, chunk: bytes) -> None:
        await self._feed(chunk)

    @web.authenticated
    async def put(self, name: str) -> None:
        await self._feed(_END)
        entry = await self._upload
        self.reply(_dicts(entry), status=201)

    def on_connection_close(self) -> None:
        # The client went away mid-upload: the writer discards its temp file.
        upload = getattr(self, "_upload", None)
        if upload is not None and not upload.done():
            asyncio.ensure_future(self._feed(_ABORT))
        super().on_connection_close()
