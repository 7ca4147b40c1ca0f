"""The events websocket: session status changes (from any process on this store), GPU-idle
warnings and their withdrawals, and GPU utilization ticks, each subscriber seeing only
what it may."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import ws_authenticated
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web, websocket

from ..core.gpu_idle import notice_event
from ..core.identity import Identity
from .base import (
    AUTH_RESOURCE,
    presented_session_token,
    refuse_session_token,
    session_token_identity,
)

if TYPE_CHECKING:
    from ..engine import Engine
    from .app import GPUSessionsExtension

POLL_SECONDS = 0.5  # how often the store is asked "did any status change?" while watched


class EventHub:
    """Fans status changes and utilization out to the open websockets. Status changes are
    read from the store's history (so kernels started by nbclient or papermill in other
    processes show up too), only while someone listens."""

    def __init__(self, engine: Engine, app: GPUSessionsExtension) -> None:
        self.engine = engine
        self.app = app
        self.log: logging.Logger = app.log
        self.subscribers: dict[EventsHandler, Identity] = {}
        self._task: asyncio.Task | None = None
        self._last_id: int | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for handler in list(self.subscribers):
            handler.close()
        self.subscribers.clear()

    async def subscribe(self, handler: EventsHandler, who: Identity) -> None:
        if self._last_id is None:
            self._last_id = await self.engine.status_marker()
        self.subscribers[handler] = who
        self.start()  # also when the server's start hook has not run (embedded servers)
        self._wake.set()

    def unsubscribe(self, handler: EventsHandler) -> None:
        self.subscribers.pop(handler, None)

    async def _watch(self) -> None:
        while True:
            if not self.subscribers:
                self._wake.clear()
                await self._wake.wait()
                self._last_id = await self.engine.status_marker()
            try:
                await self._send_changes()
            except Exception:
                self.log.warning("Could not read session status changes", exc_info=True)
            await asyncio.sleep(POLL_SECONDS)

    async def _send_changes(self) -> None:
        rows = await self.engine.status_changes(self._last_id or 0)
        for row in rows:
            self._last_id = max(self._last_id or 0, row["id"])
            # A history entry that keeps the status is a word to the owner (a GPU-idle
            # warning or its withdrawal), not a status change.
            event = notice_event(row) or {
                "type": "status",
                **{k: v for k, v in row.items() if k != "id"},
            }
            for handler, who in list(self.subscribers.items()):
                if who.is_admin or row["owner"] == who.username:
                    handler.send(event)

    async def tick(self) -> None:
        """One GPU utilization tick to every subscriber."""
        if not self.subscribers:
            return
        views: dict[Identity, list[dict[str, Any]]] = {}
        for handler, who in list(self.subscribers.items()):
            if who not in views:  # one snapshot per identity, not per open tab
                try:
                    views[who] = (await self.engine.gpus(who))["gpus"]
                except Exception:
                    self.log.warning("Could not read GPU utilization", exc_info=True)
                    return
            handler.send({"type": "gpus", "gpus": views[who]})


class EventsHandler(ExtensionHandlerMixin, JupyterHandler, websocket.WebSocketHandler):
    """``GET gpu-sessions/api/events`` (websocket): JSON messages ``{"type": "status", …}``,
    ``{"type": "gpu-idle-warning", …}`` / ``{"type": "gpu-idle-withdrawn", …}`` and
    ``{"type": "gpus", …}``."""

    auth_resource = AUTH_RESOURCE

    @property
    def hub(self) -> EventHub:
        return self.settings["gpu_sessions_events"]

    async def prepare(self, *args: Any, **kwargs: Any) -> None:
        # A kernel's own token (header or ?token=): its session's owner, never an admin.
        token = presented_session_token(self)
        self.token_who: Identity | None = None
        if token is not None:
            self.token_who = await session_token_identity(self, token)
            if self.token_who is not None:
                return
        # An API: no redirect to a login page, a 403 (from ws_authenticated) instead.
        try:
            await super().prepare(_redirect_to_login=False)
        except web.HTTPError as exc:
            if token is not None and exc.status_code == 403 and self.current_user is None:
                refuse_session_token()  # a dead session token: say so (401)
            raise

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Refusals before the upgrade as JSON, as the rest of the API answers them."""
        exc = kwargs.get("exc_info", (None, None))[1]
        message = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message else ""
        self.set_header("Content-Type", "application/json")
        reason = {401: "unauthenticated", 403: "forbidden"}.get(status_code, "error")
        self.finish(json.dumps({"message": message or self._reason, "reason": reason}))

    @ws_authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        user = self.current_user
        if not await ensure_async(self.authorizer.is_authorized(self, user, "read", AUTH_RESOURCE)):
            raise web.HTTPError(403, "You may not read GPU session events on this server.")
        app = self.settings["gpu_sessions_app"]
        self.who = self.token_who or await app.identity_of_user(user)
        res = super().get(*args, **kwargs)
        if res is not None:
            await res

    async def open(self, *args: Any, **kwargs: Any) -> None:
        await self.hub.subscribe(self, self.who)
        self.send({"type": "hello", "user": self.who.username, "admin": self.who.is_admin})

    def on_message(self, message: str | bytes) -> None:
        pass  # nothing to receive: the stream goes one way

    def on_close(self) -> None:
        self.hub.unsubscribe(self)

    def send(self, event: dict[str, Any]) -> None:
        try:
            self.write_message(json.dumps(event))
        except websocket.WebSocketClosedError:
            self.hub.unsubscribe(self)
