"""jupyter_server's own session and kernel endpoints, answering engine refusals with 4xx.

jupyter_server turns every failure of a kernel start in ``POST /api/sessions`` (and of a
restart) into a 500. These subclasses, loaded through ``ServerApp.extra_services`` (which
jupyter_server routes before its defaults; set by the package's server config), answer
the engine's refusals with the codes the GPU sessions API uses — 400 a bad value, 403 a
policy, 409 cancelled while queued or still starting, 422 what the host can never run,
503 Docker unreachable — and the engine's message. Everything else is jupyter_server's.

In remote mode (kernels run in the manager service and outlive this server) these
endpoints, the kernel endpoints and the kernel websocket also wait, at start-up, until the
kernels of the server's previous run are re-attached (an open notebook then finds its
session and kernel), and a session created or changed tells the engine what re-attaching
its kernel needs (``GPUSessionsKernelManager.note_attachments``).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from jupyter_server.services.kernels.handlers import (
    KernelActionHandler,
    KernelHandler,
    MainKernelHandler,
)
from jupyter_server.services.kernels.handlers import default_handlers as kernel_handlers
from jupyter_server.services.kernels.websocket import KernelWebsocketHandler
from jupyter_server.services.sessions.handlers import SessionHandler, SessionRootHandler
from jupyter_server.services.sessions.handlers import default_handlers as session_handlers
from tornado import web

from ..core.errors import GPUSessionsError
from .kernels import engine_http_error


async def _keeping_codes(call: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await call()
    except web.HTTPError as exc:
        cause = exc.__cause__
        if exc.status_code == 500 and isinstance(cause, web.HTTPError):
            raise cause from None
        if exc.status_code == 500 and isinstance(cause, GPUSessionsError):
            raise engine_http_error(cause) from cause
        raise


class _AfterRestore:
    """Answers once the kernels of the server's previous run are re-attached (remote mode),
    so that an open notebook's first requests find its session and kernel."""

    async def prepare(self, *args: Any, **kwargs: Any) -> None:
        restored = getattr(self.kernel_manager, "restored", None)  # type: ignore[attr-defined]
        if restored is not None:
            await restored()
        result = super().prepare(*args, **kwargs)  # type: ignore[misc]
        if inspect.isawaitable(result):
            await result

    async def _note_attachments(self) -> None:
        note = getattr(self.kernel_manager, "note_attachments", None)  # type: ignore[attr-defined]
        if note is not None:
            await note()


# Each override keeps jupyter_server's authentication and authorization (the method it
# calls carries them too); the decorator also tells jupyter_server's check that it does.
class GPUSessionRootHandler(_AfterRestore, SessionRootHandler):
    @web.authenticated
    async def post(self):
        await _keeping_codes(super().post)
        await self._note_attachments()  # answered already: the client does not wait


class GPUSessionHandler(_AfterRestore, SessionHandler):
    @web.authenticated
    async def patch(self, session_id):
        await _keeping_codes(lambda: super(GPUSessionHandler, self).patch(session_id))
        await self._note_attachments()


class GPUKernelActionHandler(_AfterRestore, KernelActionHandler):
    @web.authenticated
    async def post(self, kernel_id, action):
        await _keeping_codes(lambda: super(GPUKernelActionHandler, self).post(kernel_id, action))
        if action == "restart":  # a new resource choice restarts in a new engine session
            await self._note_attachments()


class GPUMainKernelHandler(_AfterRestore, MainKernelHandler):
    pass


class GPUKernelHandler(_AfterRestore, KernelHandler):
    pass


class GPUKernelWebsocketHandler(_AfterRestore, KernelWebsocketHandler):
    pass


_REPLACED = {
    SessionRootHandler: GPUSessionRootHandler,
    SessionHandler: GPUSessionHandler,
    KernelActionHandler: GPUKernelActionHandler,
    MainKernelHandler: GPUMainKernelHandler,
    KernelHandler: GPUKernelHandler,
    KernelWebsocketHandler: GPUKernelWebsocketHandler,
}
# Only the routes whose handler is replaced: the rest stay jupyter_server's defaults.
default_handlers = [
    (pattern, _REPLACED[handler])
    for pattern, handler in [*session_handlers, *kernel_handlers]
    if handler in _REPLACED
]
