"""How a session's kernel (or batch job) reaches the API: per-session tokens, the server's
endpoints, and the environment, mounts and ``session.json`` a launch gets.

A token is minted when a session is first launched and reused by its restarts; only its
SHA-256 is stored (``store/tokens.py``). It acts for the session's owner, never as an
admin, while the session is PENDING, PREPARING, RUNNING or RESTARTING: an end (TERMINATING
and after) kills it at once in this process, and within ``TOKEN_CACHE_SECONDS`` when
another process ends the session. The server's own credentials never reach a kernel.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..core.models import LaunchSpec, Mount, Session
from ..core.vfolders import CONTAINER_ROOT
from ..engine import SESSION_TOKEN_PREFIX
from ..runtime.docker import CONTAINER_STATE_DIR
from ..store.tokens import TokenStore

if TYPE_CHECKING:
    from . import GPUSessionManager

ENV_URL = "JUPYTER_GPU_SESSIONS_URL"
ENV_TOKEN = "JUPYTER_GPU_SESSIONS_TOKEN"
ENV_SOCKET = "JUPYTER_GPU_SESSIONS_SOCKET"
ENV_SESSION_ID = "JUPYTER_GPU_SESSIONS_SESSION_ID"
ENV_INFO = "JUPYTER_GPU_SESSIONS_INFO"
API_ENV = frozenset({ENV_URL, ENV_TOKEN, ENV_SOCKET, ENV_SESSION_ID, ENV_INFO})
# The server's own credentials: never passed to a kernel, whatever an allowlist or a
# kernelspec's env says (a kernel gets its session's token instead).
SERVER_SECRETS = frozenset(
    {
        "JUPYTER_TOKEN",
        "JUPYTER_PASSWORD",
        "JPY_API_TOKEN",
        "JUPYTERHUB_API_TOKEN",
        "JUPYTERHUB_OAUTH_ACCESS_TOKEN",
        "JUPYTERHUB_OAUTH_CLIENT_SECRET",
    }
)
# Inside a container: the (read-only) mount of the server's socket directory.
CONTAINER_API_DIR = "/run/jupyter-gpu-sessions-api"
API_SOCKET_NAME = "api.sock"
INFO_FILE = "session.json"
# How long this process trusts a token it looked up (another process's end of the session
# is seen within this long; this process's own ends at once).
TOKEN_CACHE_SECONDS = 2.0
_TOKEN_SHAPE = re.compile(rf"{re.escape(SESSION_TOKEN_PREFIX)}[A-Za-z0-9_-]{{43}}")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def write_kernel_file(path: str, text: str, uid: int, gid: int, mode: int = 0o600) -> None:
    """Write a file into a kernel's state directory, which the kernel itself may write to:
    whatever it left at ``path`` (a symlink to a host file, say) is replaced, never
    followed, so a restart cannot be made to write through it. Blocking."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        if os.geteuid() == 0:
            os.fchown(f.fileno(), uid, gid)


@dataclass(frozen=True)
class APIEndpoint:
    """Where this process's server answers the API: ``url`` (ends in ``gpu-sessions/api/``)
    for local kernels, and a directory holding its unix socket for containers."""

    url: str
    socket_dir: str | None = None

    @property
    def container_url(self) -> str:
        """The URL a container uses over the socket (the host part is only its Host)."""
        return "http://localhost" + urlsplit(self.url).path


class SessionAPIAccess:
    """Tokens, endpoints and what a launch gets to reach the API; mixed into the manager."""

    def _init_api_access(self: GPUSessionManager) -> None:
        self.api_endpoint: APIEndpoint | None = None
        self._tokens: TokenStore | None = None
        self._session_tokens: dict[str, str] = {}  # session id → its token (this process)
        self._token_cache: dict[str, tuple[str, str, float]] = {}  # hash → owner, id, until
        # Sessions this process saw begin to end (the newest): a lookup that raced the end
        # must not accept, nor cache, their tokens.
        self._ended_sessions: OrderedDict[str, None] = OrderedDict()
        self._token_lock = threading.Lock()

    @property
    def tokens(self: GPUSessionManager) -> TokenStore:
        store = self.store
        with self._lock:
            if self._tokens is None:
                self._tokens = TokenStore(store.engine)
            return self._tokens

    def serve_api(self: GPUSessionManager, url: str | None, socket_dir: str | None = None) -> None:
        """Where kernels launched from now on reach the API (None: nowhere, e.g. after the
        server stopped, or in nbclient and papermill, which have no server)."""
        self.api_endpoint = APIEndpoint(url, socket_dir or None) if url else None

    # -- tokens ----------------------------------------------------------------------------
    def session_token(self: GPUSessionManager, session: Session) -> str | None:
        """The session's API token: the one this process minted for an earlier start of it
        while it is still accepted, else a new one. None when the session has begun to end.
        Blocking."""
        with self._token_lock:
            token = self._session_tokens.get(session.id)
        if token is not None and self.tokens.holds(session.id, token_hash(token)):
            return token
        token = SESSION_TOKEN_PREFIX + secrets.token_urlsafe(32)
        if not self.tokens.add(session.id, token_hash(token)):
            return None
        with self._token_lock:
            self._session_tokens[session.id] = token
        return token

    def cached_token_owner(self: GPUSessionManager, token: str) -> str | None | bool:
        """The owner of ``token`` from this process's cache, without I/O; False when it
        must be looked up (``token_owner``), None when it is refused outright."""
        if not _TOKEN_SHAPE.fullmatch(token):
            return None
        with self._token_lock:
            hit = self._token_cache.get(token_hash(token))
        if hit is None or hit[2] < time.monotonic():
            return False
        return hit[0]

    def token_owner(self: GPUSessionManager, token: str) -> str | None:
        """Who ``token`` acts for: its session's owner while the session has not begun to
        end, else None. Blocking (one indexed read on a cache miss)."""
        if not _TOKEN_SHAPE.fullmatch(token):
            return None
        digest = token_hash(token)
        found = self.tokens.owner(digest)
        if found is None:
            return None
        with self._token_lock:
            if found[1] in self._ended_sessions:
                return None  # it began to end here while the read was under way
            if len(self._token_cache) > 10_000:
                self._token_cache.clear()
            self._token_cache[digest] = (*found, time.monotonic() + TOKEN_CACHE_SECONDS)
        return found[0]

    def forget_session_token(self: GPUSessionManager, session_id: str) -> None:
        """The session has begun to end: its token is refused from now on in this process
        (its rows go with the final status)."""
        with self._token_lock:
            self._ended_sessions[session_id] = None
            self._ended_sessions.move_to_end(session_id)
            while len(self._ended_sessions) > 10_000:
                self._ended_sessions.popitem(last=False)
            self._session_tokens.pop(session_id, None)
            for digest in [d for d, hit in self._token_cache.items() if hit[1] == session_id]:
                del self._token_cache[digest]

    # -- what a launch gets ----------------------------------------------------------------
    def session_api_env(self: GPUSessionManager, session: Session) -> dict[str, str]:
        """The variables a session's kernel or job gets to know itself and reach the API:
        always its id and the path of its ``session.json``; with a server, the API's URL
        and the session's token, and in containers the socket to send them over. Mints the
        token on a first start (blocking: call it from a thread)."""
        container = session.runtime == "docker"
        folder = CONTAINER_STATE_DIR if container else os.path.join(self.state_root, session.id)
        env = {ENV_SESSION_ID: session.id, ENV_INFO: f"{folder}/{INFO_FILE}"}
        endpoint = self.api_endpoint
        if endpoint is None or (container and not endpoint.socket_dir):
            return env  # no server, or none a container can reach
        token = self.session_token(session)
        if token is None:
            return env  # ending: the start fails on its own at its next step
        env[ENV_TOKEN] = token
        if container:
            env[ENV_URL] = endpoint.container_url
            env[ENV_SOCKET] = f"{CONTAINER_API_DIR}/{API_SOCKET_NAME}"
        else:
            env[ENV_URL] = endpoint.url
        return env

    def session_api_mounts(self: GPUSessionManager, session: Session) -> tuple[Mount, ...]:
        """The server's socket directory, read-only, for a container (the directory, not
        the socket: a restarted server's new socket at the same path is seen)."""
        endpoint = self.api_endpoint
        if session.runtime != "docker" or endpoint is None or not endpoint.socket_dir:
            return ()
        return (Mount(endpoint.socket_dir, CONTAINER_API_DIR, read_only=True),)

    def session_info(self: GPUSessionManager, session: Session, spec: LaunchSpec) -> dict[str, Any]:
        """What ``session.json`` says about the session (``%session info`` without a
        server): no token, no secret."""
        policy = self.policy_for(session.owner)
        return {
            "id": session.id,
            "name": session.name,
            "owner": session.owner,
            "image": session.image,
            "runtime": session.runtime,
            "kind": session.kind,
            "request": session.request.to_dict(),
            "devices": [
                {"uuid": d.uuid, "index": d.index, "name": d.name, "memory_total": d.memory}
                for d in spec.devices
            ],
            "mounts": [
                {"name": os.path.basename(m.target), "path": m.target, "read_only": m.read_only}
                for m in spec.mounts
                if m.target.startswith(CONTAINER_ROOT + "/")
            ],
            "limits": {k: v for k, v in policy.to_dict().items() if v is not None},
            "created_at": session.created_at,
        }

    def write_session_info(self: GPUSessionManager, session: Session, spec: LaunchSpec) -> None:
        """``session.json`` in the session's state directory (which must exist), readable by
        the kernel's uid. Blocking."""
        text = json.dumps(self.session_info(session, spec), indent=1)
        write_kernel_file(os.path.join(spec.state_dir, INFO_FILE), text, spec.uid, spec.gid)
