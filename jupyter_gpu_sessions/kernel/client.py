"""A small synchronous client of the gpu-sessions REST API, for kernels, scripts and the CLI.

Standard library only: it runs inside a user's container image, where nothing else of the
package (and none of its server dependencies) is installed. From async code call it in a
thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

ENV_URL = "JUPYTER_GPU_SESSIONS_URL"
ENV_TOKEN = "JUPYTER_GPU_SESSIONS_TOKEN"
ENV_SOCKET = "JUPYTER_GPU_SESSIONS_SOCKET"
ENV_SESSION_ID = "JUPYTER_GPU_SESSIONS_SESSION_ID"
ENV_INFO = "JUPYTER_GPU_SESSIONS_INFO"
ACTIVE_STATUSES = "PENDING,PREPARING,RUNNING,RESTARTING,TERMINATING"


class APIError(Exception):
    """The API answered with an error (``status`` and its ``{"message", "reason"}``), or
    could not be reached (``status`` 0)."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return self.message


class NoServer(APIError):
    """There is no API to reach: this kernel or process was started without a server."""

    def __init__(self, what: str = "this") -> None:
        super().__init__(
            f"{what} needs a Jupyter server with jupyter-gpu-sessions: this kernel was started "
            "without one (nbclient, papermill, jupyter console). Run it in JupyterLab, or set "
            f"{ENV_URL} and {ENV_TOKEN}.",
            status=0,
            reason="no-server",
        )


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the one mounted into a container kernel)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _ref(value: str) -> str:
    return quote(str(value), safe="")


class Client:
    """The gpu-sessions API at ``base_url`` (ending in ``gpu-sessions/api/``)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        socket_path: str | None = None,
        timeout: float = 30,
    ) -> None:
        if not base_url.endswith("/"):
            base_url += "/"
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise APIError(
                f"{base_url!r} is not an API URL: expected http://HOST:PORT/BASE/gpu-sessions/api/",
                reason="invalid-url",
            )
        self.base_url = base_url
        self.token = token or None
        self.socket_path = socket_path or None
        self.timeout = timeout
        self._parts = parts

    def __repr__(self) -> str:
        where = f" via {self.socket_path}" if self.socket_path else ""
        return f"<Client {self.base_url}{where}>"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, what: str = "this") -> Client:
        """The API this kernel or script was given; ``NoServer`` when there is none."""
        env = os.environ if environ is None else environ
        url = env.get(ENV_URL, "").strip()
        if not url:
            raise NoServer(what)
        return cls(url, token=env.get(ENV_TOKEN) or None, socket_path=env.get(ENV_SOCKET) or None)

    # -- transport ------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        if self.socket_path:
            return _UnixConnection(self.socket_path, self.timeout)
        if self._parts.scheme == "https":
            return http.client.HTTPSConnection(self._parts.netloc, timeout=self.timeout)
        return http.client.HTTPConnection(self._parts.netloc, timeout=self.timeout)

    def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
    ) -> Any:
        """``method`` ``{base_url}{path}``: the decoded JSON answer (None for 204)."""
        url = self._parts.path + path.lstrip("/")
        if params:
            query = {k: _param(v) for k, v in params.items() if v is not None}
            if query:
                url += "?" + urlencode(query)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"token {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connection()
        try:
            conn.request(method, url, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            where = self.socket_path or self._parts.netloc
            raise APIError(
                f"cannot reach the gpu-sessions API at {where} ({_describe(exc)}): "
                "the Jupyter server may have stopped",
                status=0,
                reason="unreachable",
            ) from None
        finally:
            conn.close()
        if response.status == 204 or not raw:
            if response.status >= 400:
                raise APIError(f"{method} {path}: HTTP {response.status}", status=response.status)
            return None
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if response.status >= 400:
            if isinstance(payload, dict) and payload.get("message"):
                raise APIError(
                    str(payload["message"]),
                    status=response.status,
                    reason=str(payload.get("reason") or "error"),
                )
            raise APIError(
                f"{method} {path}: HTTP {response.status} {response.reason}",
                status=response.status,
            )
        if payload is None:
            raise APIError(
                f"{method} {path}: the answer is not JSON (is {self.base_url} the "
                "gpu-sessions API?)",
                status=response.status,
                reason="not-json",
            )
        return payload

    # -- sessions -------------------------------------------------------------------------
    def sessions(
        self, all: bool = False, status: str | list[str] | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The caller's sessions, newest first: those not ended yet, or with ``all`` ended
        ones too; ``status`` (a name or a list) picks statuses instead."""
        if isinstance(status, list | tuple):
            status = ",".join(status)
        if not status and not all:
            status = ACTIVE_STATUSES
        params: dict[str, Any] = {"limit": limit, "status": status or None}
        page = self.request("GET", "sessions", params)
        return page["sessions"] if isinstance(page, dict) and "sessions" in page else page

    def session(self, ref: str) -> dict[str, Any]:
        return self.request("GET", f"sessions/{_ref(ref)}")

    def create_session(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", "sessions", body=dict(spec))

    def create_sessions(self, specs: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        answer = self.request("POST", "sessions", body={"sessions": [dict(s) for s in specs]})
        return answer["sessions"]

    def end_session(self, ref: str, recursive: bool = False) -> dict[str, Any]:
        params = {"recursive": "true"} if recursive else None
        return self.request("DELETE", f"sessions/{_ref(ref)}", params)

    def logs(self, ref: str, tail: int = 200) -> dict[str, Any]:
        return self.request("GET", f"sessions/{_ref(ref)}/logs", {"tail": tail})

    def history(self, ref: str) -> Any:
        return self.request("GET", f"sessions/{_ref(ref)}/history")

    def graph(self, ref: str, direction: str = "both") -> dict[str, Any]:
        return self.request("GET", f"sessions/{_ref(ref)}/graph", {"direction": direction})

    def gpus(self) -> Any:
        return self.request("GET", "gpus")

    def quota(self) -> dict[str, Any]:
        return self.request("GET", "quota")

    # -- vfolders -------------------------------------------------------------------------
    def vfolders(self, trash: bool = False) -> list[dict[str, Any]]:
        params = {"trash": "true"} if trash else None
        return self.request("GET", "vfolders", params)["vfolders"]

    def vfolder(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"vfolders/{_ref(name)}")

    def create_vfolder(
        self, name: str, quota: str | int | None = None, project: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if quota is not None:
            body["quota"] = quota
        if project:
            body.update(type="project", group=project)
        return self.request("POST", "vfolders", body=body)

    def share_vfolder(self, name: str, user: str, perm: str) -> dict[str, Any]:
        return self.request(
            "POST", f"vfolders/{_ref(name)}/shares", body={"user": user, "permission": perm}
        )

    def clone_vfolder(self, src: str, dst: str) -> dict[str, Any]:
        return self.request("POST", f"vfolders/{_ref(src)}/clone", body={"name": dst})

    def delete_vfolder(self, name: str) -> None:
        self.request("DELETE", f"vfolders/{_ref(name)}")

    def restore_vfolder(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"vfolders/{_ref(name)}/restore", body={})


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


# -- this kernel's own session, offline ---------------------------------------------------
def own_session_id(environ: Mapping[str, str] | None = None) -> str | None:
    """This kernel's session id, when a jupyter-gpu-sessions provisioner started it."""
    env = os.environ if environ is None else environ
    return env.get(ENV_SESSION_ID) or None


def own_info(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """What the provisioner wrote about this kernel's session (no server needed), or None
    when this kernel was not started by a jupyter-gpu-sessions provisioner."""
    env = os.environ if environ is None else environ
    path = env.get(ENV_INFO)
    info: dict[str, Any] | None = None
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
            if isinstance(loaded, dict):
                info = loaded
        except (OSError, ValueError):
            info = None
    session_id = own_session_id(env)
    if info is None:
        if session_id is None:
            return None
        info = {"id": session_id}
    elif session_id and not info.get("id"):
        info["id"] = session_id
    return info
