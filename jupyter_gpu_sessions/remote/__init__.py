"""RemoteEngine: the engine interface over HTTP, for a user's server under JupyterHub (remote
mode). Kernels start, run and end in the manager service (`jupyter gpu-sessions manager`),
the only process that holds the Docker socket; this server holds no store, no Docker client
and no API socket of its own. The service acts as the identity this server's token
authenticates: the server's own user (a shared server's guests act as its owner too,
since jupyter_server does not tell a provisioner who asked for a kernel).

Async operations go over tornado's ``AsyncHTTPClient`` (nothing blocks the loop); vfolder
operations, blocking as the interface has them, over ``http.client`` (``remote.vfolders``).
Errors come back as the same ``core.errors`` class with the same message; a service that
cannot be reached is :class:`RuntimeUnavailable` (the provisioner then keeps its hands off
a kernel that may well be running).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from traitlets import Float, Int, Unicode, default, validate
from traitlets.traitlets import TraitError

from ..core.errors import (
    Forbidden,
    GPUSessionsError,
    NotFound,
    RuntimeUnavailable,
    SessionNotFound,
    StartCancelled,
)
from ..core.identity import Identity
from ..core.models import ExitState, RuntimeHandle, Session
from ..engine import Engine, KernelLaunch, VFolderOperations
from . import wire
from .vfolders import RemoteVFolders

__all__ = ["ENV_SERVICE_TOKEN", "ENV_SERVICE_URL", "RemoteEngine"]

ENV_SERVICE_URL = "JUPYTER_GPU_SESSIONS_SERVICE_URL"
ENV_SERVICE_TOKEN = "JUPYTER_GPU_SESSIONS_SERVICE_TOKEN"
API_SUFFIX = "gpu-sessions/api/"
# The service answers a wait_kernel within this (engine_rpc.MAX_WAIT); asked for less.
WAIT_SECONDS = 15.0
SERVICE_UNAVAILABLE = wire.SERVICE_UNAVAILABLE


class RemoteEngine(Engine):
    """The engine of a manager service, reached at ``url`` with ``token``."""

    url = Unicode(
        help=f"""The manager service's API, ending in `{API_SUFFIX}` (e.g.
        `http://127.0.0.1:8890/services/gpu-sessions/{API_SUFFIX}`). Default:
        ${ENV_SERVICE_URL}.""",
    ).tag(config=True)

    token = Unicode(
        help=f"""The token this server presents to the service: ${ENV_SERVICE_TOKEN}, else
        $JUPYTERHUB_API_TOKEN (this server's own Hub token: it acts as this server's user
        only, and needs the `access:services!service=<name>` scope).""",
    ).tag(config=True)

    request_timeout = Float(
        60.0, help="Seconds one call to the service may take (a kernel start long-polls)."
    ).tag(config=True)

    identity_cache_seconds = Float(
        5.0, help="How long the service's view of this server's user (groups, admin) is reused."
    ).tag(config=True)

    outage_grace = Float(
        60.0,
        help="""Seconds a kernel start keeps asking for its progress while the service does
        not answer (a restart of the service) before the start is given up.""",
    ).tag(config=True)

    max_connections = Int(64, help="Concurrent HTTP requests to the service.").tag(config=True)

    @default("url")
    def _default_url(self) -> str:
        return os.environ.get(ENV_SERVICE_URL, "")

    @default("token")
    def _default_token(self) -> str:
        return os.environ.get(ENV_SERVICE_TOKEN) or os.environ.get("JUPYTERHUB_API_TOKEN", "")

    @validate("url")
    def _valid_url(self, proposal: Any) -> str:
        url = proposal.value
        if url and not url.startswith(("http://", "https://")):
            raise TraitError(f"RemoteEngine.url {url!r} must be an http(s) URL")
        if url and not url.endswith(API_SUFFIX):
            url = url.rstrip("/") + "/"
            if not url.endswith(API_SUFFIX):
                url += API_SUFFIX
        return url

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.url:
            raise RuntimeUnavailable(
                f"RemoteEngine has no service to talk to: set ${ENV_SERVICE_URL} (or "
                "c.RemoteEngine.url) to the manager service's API.",
                reason=SERVICE_UNAVAILABLE,
            )
        self._clients: dict[asyncio.AbstractEventLoop, AsyncHTTPClient] = {}
        self._admissions: dict[str, asyncio.Future] = {}
        self._handles: dict[str, RuntimeHandle] = {}
        self._begun: set[str] = set()  # sessions whose start the service began at submit
        self._stop_reasons: dict[str, str] = {}
        self._default_image: str | None = None
        self._whoami: tuple[float, Identity] | None = None
        self._background: set[asyncio.Task] = set()
        self._vfolders = RemoteVFolders(self.url, self.token, timeout=self.request_timeout)

    @property
    def remote(self) -> bool:
        return True

    # -- calls -----------------------------------------------------------------------------
    def _client(self) -> AsyncHTTPClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # Its own instance per loop (not tornado's shared one), with room for the long
            # polls of many starting kernels at once.
            client = AsyncHTTPClient(force_instance=True, max_clients=self.max_connections)
            self._clients[loop] = client
        return client

    def _unreachable(self, exc: BaseException) -> RuntimeUnavailable:
        return RuntimeUnavailable(
            f"Cannot reach the GPU sessions manager service at {self.url} ({exc}). Kernels "
            "keep running there; ask the administrator whether it runs.",
            reason=SERVICE_UNAVAILABLE,
        )

    async def call(self, method: str, timeout: float | None = None, **args: Any) -> Any:
        """One engine RPC; its domain error raised as the service raised it."""
        request = HTTPRequest(
            f"{self.url}engine/{method}",
            method="POST",
            body=json.dumps({"args": args}),
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
            connect_timeout=10,
            request_timeout=timeout or self.request_timeout,
        )
        try:
            response = await self._client().fetch(request, raise_error=False)
        except (OSError, asyncio.TimeoutError) as exc:
            raise self._unreachable(exc) from exc
        if response.code == 599:  # no HTTP answer: refused, reset, timed out
            raise self._unreachable(response.error or "no answer")
        try:
            data = json.loads(response.body) if response.body else None
        except ValueError:
            data = response.body[:300].decode(errors="replace")
        if response.code != 200:
            raise wire.error_from_wire(response.code, data, where=f" ({method})")
        return data["result"]

    def call_blocking(self, method: str, **args: Any) -> Any:
        """One engine RPC from synchronous code (never from the event loop's thread)."""
        request = urllib.request.Request(
            f"{self.url}engine/{method}",
            data=json.dumps({"args": args}).encode(),
            method="POST",
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.request_timeout) as response:
                return json.loads(response.read())["result"]
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                data = json.loads(text)
            except ValueError:
                data = text[:300].decode(errors="replace")
            raise wire.error_from_wire(exc.code, data, where=f" ({method})") from None
        except OSError as exc:
            raise self._unreachable(exc) from exc

    def _in_background(self, method: str, **args: Any) -> None:
        """A call whose answer nobody waits for (from a synchronous member)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.call_blocking(method, **args)
            return
        task = asyncio.ensure_future(self.call(method, **args))
        self._background.add(task)

        def done(task: asyncio.Task) -> None:
            self._background.discard(task)
            if not task.cancelled() and task.exception() is not None:
                self.log.warning("engine/%s failed: %s", method, task.exception())

        task.add_done_callback(done)

    # -- kernel sessions: the provisioner's side -------------------------------------------
    @property
    def default_image(self) -> str:
        if self._default_image is None:
            # Fetched at start(); a process without a server (papermill) asks once here.
            self._default_image = self.call_blocking("default_image")
        return self._default_image

    async def submit(self, launch: KernelLaunch) -> Session:
        # The service begins the start at once: it goes on if this server goes away before
        # it asks (start_kernel then only follows it).
        session = wire.session_from_wire(
            await self.call("submit", launch=wire.launch_to_wire(launch), start=True)
        )
        self._begun.add(session.id)
        admitted = self._admissions.pop(launch.kernel_id, None)
        if admitted is not None and not admitted.done():
            admitted.set_result(session)
        return session

    async def start_kernel(
        self,
        launch: KernelLaunch,
        session: Session,
        progress: Callable[[str], None] | None = None,
    ) -> Session:
        """The start runs in the service (it goes on there if this server goes away);
        this long-polls it for its progress lines and its outcome."""
        if session.id in self._begun:
            self._begun.discard(session.id)  # begun by submit
        else:  # a restart
            await self.call(
                "start_kernel", launch=wire.launch_to_wire(launch), session_id=session.id
            )
        seen = 0
        unreachable_since: float | None = None
        while True:
            try:
                answer = await self.call(
                    "wait_kernel",
                    WAIT_SECONDS + self.request_timeout,
                    session_id=session.id,
                    seen=seen,
                    wait=WAIT_SECONDS,
                )
            except RuntimeUnavailable as exc:
                if exc.reason != SERVICE_UNAVAILABLE:
                    raise  # the start's own failure (e.g. Docker is down), as it was raised
                # The service does not answer (restarting?): the start goes on there.
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.outage_grace:
                    raise
                await asyncio.sleep(1.0)
                continue
            except NotFound as exc:
                raise StartCancelled(exc.message, reason="service-lost-start") from None
            unreachable_since = None
            for line in answer["lines"]:
                if progress is not None:
                    progress(line)
            seen += len(answer["lines"])
            if answer["done"]:
                started = wire.session_from_wire(answer["session"])
                handle = wire.handle_from_wire(answer.get("handle"))
                if handle is not None:
                    self._handles[started.id] = handle
                return started

    def admission(self, kernel_id: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._admissions[kernel_id] = future
        return future

    def forget_admission(self, kernel_id: str) -> None:
        self._admissions.pop(kernel_id, None)

    async def poll(self, session: Session) -> ExitState | None:
        return wire.exit_from_wire(await self.call("poll", session_id=session.id))

    async def signal(self, session: Session, signum: int) -> None:
        await self.call("signal", session_id=session.id, signum=int(signum))

    def expect_stop(self, session_id: str) -> None:
        self._in_background("expect_stop", session_id=session_id)

    async def note_exit(self, session: Session, state: ExitState) -> Session:
        result = await self.call("note_exit", session_id=session.id, state=wire.exit_to_wire(state))
        return wire.session_from_wire(result)

    async def stop_kernel(self, session: Session, *, restart: bool, reason: str = "") -> Session:
        reason = reason or self._stop_reasons.pop(session.id, "")
        result = await self.call(
            "stop_kernel", session_id=session.id, restart=restart, reason=reason
        )
        ended = wire.session_from_wire(result)
        if ended.status.is_terminal:
            self._handles.pop(session.id, None)
        return ended

    def handle(self, session: Session) -> RuntimeHandle | None:
        return self._handles.get(session.id)

    async def adopt(self, session_id: str, handle: RuntimeHandle) -> Session:
        # The service uses its own handle of the kernel, never the one sent.
        answer = await self.call("adopt", session_id=session_id, handle=wire.handle_to_wire(handle))
        adopted = wire.handle_from_wire(answer["handle"])
        if adopted is not None:
            self._handles[session_id] = adopted
        return wire.session_from_wire(answer["session"])

    def stop_reason(self, session_id: str) -> str:
        return self._stop_reasons.get(session_id, "")

    def set_stop_reason(self, session_id: str, reason: str) -> None:
        if reason:
            self._stop_reasons[session_id] = reason
        else:
            self._stop_reasons.pop(session_id, None)
        self._in_background("set_stop_reason", session_id=session_id, reason=reason)

    # -- sessions: what people see and do --------------------------------------------------
    async def sessions_page(
        self,
        who: Identity,
        *,
        owner: str | None,
        statuses: list[Any] | None,
        limit: int,
        offset: int,
    ) -> bytes:
        page = await self.call(
            "sessions_page",
            owner=owner,
            statuses=None if statuses is None else [getattr(s, "value", s) for s in statuses],
            limit=limit,
            offset=offset,
        )
        return json.dumps(page).encode()

    async def get_session(self, who: Identity, session_id: str) -> dict[str, Any]:
        return await self.call("get_session", session_id=session_id)

    async def own_session(self, who: Identity, session_id: str) -> Session:
        # The service answers as this server's user: its view of the session is theirs.
        data = await self.get_session(who, session_id)
        if data.get("owner") != (await self._service_identity()).username:
            raise SessionNotFound(f"No session {session_id!r} of yours.")
        return wire.session_from_wire(data)

    async def create_sessions(
        self, who: Identity, specs: list[Any], *, working_dir: str | None = None
    ) -> list[dict[str, Any]]:
        return await self.call("create_sessions", specs=specs, working_dir=working_dir)

    async def resolve_session(self, who: Identity, ref: str) -> str:
        return await self.call("resolve_session", ref=ref)

    async def dependents(self, who: Identity, session_id: str) -> list[dict[str, Any]]:
        return await self.call("dependents", session_id=session_id)

    async def end_session(self, who: Identity | None, session_id: str, reason: str) -> Session:
        result = await self.call(
            "end_session", session_id=session_id, reason=reason, own=who is None
        )
        self._handles.pop(session_id, None)
        return wire.session_from_wire(result)

    async def session_logs(self, who: Identity, session_id: str, tail: int = 200) -> dict:
        return await self.call("session_logs", session_id=session_id, tail=tail)

    async def session_history(self, who: Identity, session_id: str) -> dict[str, Any]:
        return await self.call("session_history", session_id=session_id)

    async def session_graph(
        self, who: Identity, session_id: str, direction: str = "both"
    ) -> dict[str, Any]:
        return await self.call("session_graph", session_id=session_id, direction=direction)

    def session_json(self, session: Session, *, history: bool = False) -> dict[str, Any]:
        """A session as the API shows it, from what this server holds (without its place in
        the queue: ``get_session`` asks the service for that)."""
        data = session.to_dict()
        if history:
            data["history"] = [
                {"status": h.status.value, "at": h.at, "reason": h.reason} for h in session.history
            ]
        return data

    # -- GPUs, quota, policies, operations -------------------------------------------------
    async def gpus(self, who: Identity) -> dict[str, Any]:
        return await self.call("gpus")

    async def launcher(self, who: Identity, kernelspecs: list[dict[str, Any]]) -> dict[str, Any]:
        return await self.call("launcher", kernelspecs=kernelspecs)

    async def quota(self, who: Identity) -> dict[str, Any]:
        return await self.call("quota")

    async def idle_timeouts(self, owners: Iterable[str]) -> dict[str, float | None]:
        return await self.call("idle_timeouts", owners=sorted(set(owners)))

    async def policies(self, who: Identity) -> list[dict[str, Any]]:
        return await self.call("policies")

    async def get_policy(self, who: Identity, scope: str) -> dict[str, Any]:
        return await self.call("get_policy", scope=scope)

    async def put_policy(self, who: Identity, scope: str, limits: dict[str, Any]) -> dict[str, Any]:
        return await self.call("put_policy", scope=scope, limits=limits)

    async def delete_policy(self, who: Identity, scope: str) -> None:
        await self.call("delete_policy", scope=scope)

    async def scheduler_health(self, who: Identity) -> dict[str, Any]:
        return await self.call("scheduler_health")

    async def schedule_now(self, who: Identity) -> dict[str, Any]:
        return await self.call("schedule_now")

    async def clear_history(self, who: Identity, retention: float, *, vacuum: bool) -> int:
        return await self.call("clear_history", retention=retention, vacuum=vacuum)

    async def user_groups(self, username: str, hub_groups: Iterable[str] | None) -> frozenset:
        # The service knows this server's user with their Hub groups; it answers for no one else.
        return (await self._service_identity()).groups

    async def status_marker(self) -> int:
        return await self.call("status_marker")

    async def status_changes(self, since: int) -> list[dict[str, Any]]:
        return await self.call("status_changes", since=since)

    @property
    def vfolders(self) -> VFolderOperations:
        return self._vfolders

    # -- JupyterHub mode -------------------------------------------------------------------
    async def _service_identity(self) -> Identity:
        now = time.monotonic()
        if self._whoami is not None and self._whoami[0] > now:
            return self._whoami[1]
        data = await self.call("whoami")
        who = Identity(data["username"], frozenset(data["groups"]), bool(data["is_admin"]))
        self._whoami = (now + self.identity_cache_seconds, who)
        return who

    async def identity_of(self, username: str, hub_groups: Iterable[str] | None) -> Identity | None:
        """Whoever calls this server's API acts as the identity the service knows this
        server by (its user, their Hub groups, Hub admin or not)."""
        return await self._service_identity()

    async def running_kernels(self, who: Identity) -> list[dict[str, Any]]:
        return await self.call("running_kernels")

    async def note_attachment(self, session_id: str, attachment: dict[str, Any]) -> None:
        await self.call("note_attachment", session_id=session_id, attachment=attachment)

    async def note_detached(self, session_ids: list[str]) -> None:
        if session_ids:
            await self.call("note_detached", session_ids=list(session_ids))

    # -- life ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Ask the service once for what synchronous members need (the default image), so
        no kernel start waits on it; a service that is down now is tried again later."""
        try:
            self._default_image = await self.call("default_image")
            await self._service_identity()
        except GPUSessionsError as exc:
            self.log.warning("The GPU sessions manager service does not answer yet: %s", exc)

    def stop(self) -> None:
        for task in list(self._background):
            task.cancel()

    def close(self) -> None:
        self.stop()
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def diagnose(self) -> list[tuple[bool | None, str, str]]:
        answers = (True, f"manager service at {self.url} answers (remote mode)", "")
        try:
            checks = self.call_blocking("diagnose")
        except Forbidden:
            return [answers, (None, "the service's host checks are shown to its admins", "")]
        except GPUSessionsError as exc:
            return [
                (
                    False,
                    f"manager service at {self.url}: {exc.message}",
                    "ask the administrator to start `jupyter gpu-sessions manager`",
                )
            ]
        return [answers] + [(ok, what, hint) for ok, what, hint in checks]

    def use_event_logger(self, logger: Any) -> None:
        """Status events are emitted by the service, where sessions change."""

    # -- how kernels reach the API ---------------------------------------------------------
    def serve_api(self, url: str | None, socket_dir: str | None = None) -> None:
        """Kernels reach the service's API (its socket is mounted into their containers):
        nothing of this server's is served to them."""

    async def token_owner(self, token: str) -> str | None:
        return await self.call("token_owner", token=token)

    def watch_kernels(self, forgotten: Callable[[], Iterable[str]]) -> None:
        """The service supervises its kernels itself: a kernel this server drops from its map
        is shut down through the provisioner (stop_kernel), and one it never re-attaches
        ends by the engine's own idle and lifetime policies."""
