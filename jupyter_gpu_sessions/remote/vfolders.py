"""Vfolder operations over the manager service's REST routes (blocking, as the interface
is: the server's handlers run them in a thread). Files are streamed both ways, never held
whole in memory. The service acts as the identity the token authenticates: the ``who``
each operation takes is this server's user, as the service knows it."""

from __future__ import annotations

import http.client
import json
import os
import re
import ssl
from collections.abc import Iterable
from typing import IO, Any
from urllib.parse import quote, unquote, urlencode, urlsplit

from ..core.errors import InvalidRequest, RuntimeUnavailable
from ..core.identity import Identity
from ..core.vfolders import FileEntry, Permission, Share, VFolder
from ..engine import VFolderOperations
from . import wire

_FILENAME = re.compile(r"filename\*=UTF-8''([^;]+)")


def _permission(value: str | Permission | None) -> str | None:
    return value.value if isinstance(value, Permission) else value


class _Download:
    """A download as a file object: read() from the open response, close() the connection."""

    def __init__(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse):
        self.conn = conn
        self.response = response

    def read(self, size: int = -1) -> bytes:
        return self.response.read(None if size < 0 else size)

    def close(self) -> None:
        self.response.close()
        self.conn.close()

    def __enter__(self) -> _Download:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RemoteVFolders(VFolderOperations):
    """``VFolderOperations`` of a manager service at ``url`` (ending ``gpu-sessions/api/``)."""

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(f"The manager service URL {url!r} is not an http(s) URL")
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.path = parts.path if parts.path.endswith("/") else parts.path + "/"
        self.token = token
        self.timeout = timeout

    # -- HTTP ------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _target(self, route: str, params: dict[str, Any] | None = None) -> str:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        target = self.path + route
        return target + ("?" + urlencode(query) if query else "")

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"token {self.token}"}
        headers.update(extra or {})
        return headers

    def _open(
        self,
        method: str,
        route: str,
        params: dict[str, Any] | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._connection()
        try:
            conn.request(
                method, self._target(route, params), body=body, headers=self._headers(headers)
            )
            response = conn.getresponse()
        except (BrokenPipeError, ConnectionResetError):
            # The service refused an upload before taking its body: its answer says why.
            try:
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise self._unreachable(exc) from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._unreachable(exc) from exc
        if response.status >= 300:
            try:
                text = response.read()
            finally:
                conn.close()
            raise wire.error_from_wire(response.status, _json(text))
        return conn, response

    def _unreachable(self, exc: BaseException) -> RuntimeUnavailable:
        return RuntimeUnavailable(
            f"Cannot reach the GPU sessions manager service at {self.url} ({exc}): ask the "
            "administrator whether it runs.",
            reason=wire.SERVICE_UNAVAILABLE,
        )

    def _json(self, method: str, route: str, body: Any = None, **params: Any) -> Any:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else None
        if payload is None and method in ("POST", "PUT", "PATCH"):
            payload = b""
        conn, response = self._open(method, route, params, payload, headers)
        try:
            return _json(response.read())
        finally:
            conn.close()

    @staticmethod
    def _name(name: str) -> str:
        return quote(name, safe="")

    # -- folders ---------------------------------------------------------------------------
    def list(self, who: Identity) -> list[dict[str, Any]]:
        return self._json("GET", "vfolders")["vfolders"]

    def list_trash(self, who: Identity) -> list[dict[str, Any]]:
        return self._json("GET", "vfolders", trash="true")["vfolders"]

    def create(
        self,
        who: Identity,
        name: str,
        *,
        type: str = "user",
        group: str | None = None,
        quota: int | str | None = None,
        cloneable: bool = False,
        backend: str | None = None,
        group_permission: str | Permission | None = None,
    ) -> VFolder:
        body = {
            "name": name,
            "type": type,
            "group": group,
            "quota": quota,
            "cloneable": cloneable,
            "backend": backend,
            "group_permission": _permission(group_permission),
        }
        data = self._json("POST", "vfolders", {k: v for k, v in body.items() if v is not None})
        return wire.vfolder_from_wire(data)

    def get(self, who: Identity, name: str) -> tuple[VFolder, Permission, str]:
        data = self._json("GET", f"vfolders/{self._name(name)}")
        return wire.vfolder_from_wire(data), Permission.parse(data["permission"]), data["relation"]

    def update(
        self,
        who: Identity,
        name: str,
        *,
        new_name: str | None = None,
        quota: int | str | None = None,
        cloneable: bool | None = None,
        group_permission: str | Permission | None = None,
    ) -> VFolder:
        body = {
            "name": new_name,
            "quota": quota,
            "cloneable": cloneable,
            "group_permission": _permission(group_permission),
        }
        data = self._json(
            "PATCH",
            f"vfolders/{self._name(name)}",
            {k: v for k, v in body.items() if v is not None},
        )
        return wire.vfolder_from_wire(data)

    def delete(self, who: Identity, name: str) -> VFolder:
        vfolder, _, _ = self.get(who, name)
        self._json("DELETE", f"vfolders/{self._name(vfolder.id)}")
        return vfolder

    def restore(self, who: Identity, name: str) -> VFolder:
        return wire.vfolder_from_wire(self._json("POST", f"vfolders/{self._name(name)}/restore"))

    def purge(self, who: Identity, name: str) -> None:
        self._json("POST", f"vfolders/{self._name(name)}/purge")

    def clone(
        self,
        who: Identity,
        name: str,
        new_name: str,
        *,
        quota: int | str | None = None,
        cloneable: bool = False,
        backend: str | None = None,
    ) -> VFolder:
        if backend is not None:
            raise InvalidRequest("A clone through the manager service keeps its source's backend")
        body = {"name": new_name, "cloneable": cloneable}
        if quota is not None:
            body["quota"] = quota
        return wire.vfolder_from_wire(
            self._json("POST", f"vfolders/{self._name(name)}/clone", body)
        )

    def usage(self, who: Identity, name: str, *, fresh: bool = False) -> int:
        data = self._json("GET", f"vfolders/{self._name(name)}/usage", fresh=str(fresh).lower())
        return int(data["bytes"])

    def owner_usage(self, username: str) -> dict[str, int]:
        usage = self._json("GET", "quota")["usage"]
        return {"count": int(usage["vfolder_count"]), "bytes": int(usage["vfolder_bytes"])}

    # -- sharing ---------------------------------------------------------------------------
    def invite(self, who: Identity, name: str, user: str, permission: str | Permission) -> Share:
        body = {"user": user, "permission": _permission(permission)}
        return wire.share_from_wire(self._json("POST", f"vfolders/{self._name(name)}/shares", body))

    def invitations(self, who: Identity) -> dict[str, list[dict[str, Any]]]:
        return self._json("GET", "vfolder-invitations")

    def accept(self, who: Identity, share_id: str) -> Share:
        return wire.share_from_wire(
            self._json("POST", f"vfolder-invitations/{self._name(share_id)}/accept")
        )

    def decline(self, who: Identity, share_id: str) -> Share:
        return wire.share_from_wire(
            self._json("POST", f"vfolder-invitations/{self._name(share_id)}/decline")
        )

    def shares(self, who: Identity, name: str) -> list[Share]:
        data = self._json("GET", f"vfolders/{self._name(name)}/shares")
        return [wire.share_from_wire(s) for s in data["shares"]]

    def set_permission(
        self, who: Identity, name: str, user: str, permission: str | Permission
    ) -> Share:
        route = f"vfolders/{self._name(name)}/shares/{self._name(user)}"
        return wire.share_from_wire(
            self._json("PATCH", route, {"permission": _permission(permission)})
        )

    def revoke(self, who: Identity, name: str, user: str) -> None:
        self._json("DELETE", f"vfolders/{self._name(name)}/shares/{self._name(user)}")

    # -- files -----------------------------------------------------------------------------
    def list_files(self, who: Identity, name: str, path: str = "") -> list[FileEntry]:
        data = self._json("GET", f"vfolders/{self._name(name)}/files", path=path)
        return [wire.file_entry_from_wire(e) for e in data["entries"]]

    def open_download(self, who: Identity, name: str, path: str) -> tuple[IO[bytes], int, str]:
        conn, response = self._open("GET", f"vfolders/{self._name(name)}/download", {"path": path})
        size = int(response.getheader("Content-Length") or 0)
        match = _FILENAME.search(response.getheader("Content-Disposition") or "")
        filename = unquote(match.group(1)) if match else os.path.basename(path)
        return _Download(conn, response), size, filename  # type: ignore[return-value]

    def upload(
        self,
        who: Identity,
        name: str,
        path: str,
        chunks: Iterable[bytes],
        *,
        size_hint: int | None = None,
        overwrite: bool = True,
    ) -> FileEntry:
        headers = {"Content-Type": "application/octet-stream"}
        if size_hint is not None:
            headers["Content-Length"] = str(size_hint)  # else sent chunked
        params = {"path": path, "overwrite": str(overwrite).lower()}
        conn, response = self._open(
            "PUT", f"vfolders/{self._name(name)}/upload", params, iter(chunks), headers
        )
        try:
            return wire.file_entry_from_wire(_json(response.read()))
        finally:
            conn.close()

    def mkdir(self, who: Identity, name: str, path: str, parents: bool = False) -> FileEntry:
        self._json("POST", f"vfolders/{self._name(name)}/mkdir", {"path": path, "parents": parents})
        parent, _, leaf = path.strip("/").rpartition("/")
        for entry in self.list_files(who, name, parent):
            if entry.name == leaf:
                return entry
        raise RuntimeUnavailable(
            f"The manager service made {path!r} in vfolder {name!r} but does not list it"
        )

    def delete_file(self, who: Identity, name: str, path: str, recursive: bool = False) -> None:
        route = f"vfolders/{self._name(name)}/files"
        self._json("DELETE", route, path=path, recursive=str(recursive).lower())

    def ensure_ready(self) -> None:
        """The service makes its vfolders ready at its own start: nothing is mounted here."""


def _json(text: bytes) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text.decode(errors="replace")
