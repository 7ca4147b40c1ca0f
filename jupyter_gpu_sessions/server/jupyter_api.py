"""jupyter_server's own session and kernel endpoints, answering engine refusals with 4xx.

jupyter_server turns every failure of a kernel start in ``POST /api/sessions`` (and of a
restart) into a 500. These subclasses, loaded through ``ServerApp.extra_services`` (which
jupyter_server routes before its defaults; set by the package's server config), answer
the engine's refusals with the codes the GPU sessions API uses — 400 a bad value, 403 a
policy, 409 cancelled while queued or still starting, 422 what the host can never run,
503 Docker unreachable — and the engine's message. Everything else is jupyter_server's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from jupyter_server.services.kernels.handlers import KernelActionHandler
from jupyter_server.services.kernels.handlers import default_handlers as kernel_handlers
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


# Each override keeps jupyter_server's authentication and authorization (the method it
# calls carries them too); the decorator also tells jupyter_server's check that it does.
class GPUSessionRootHandler(SessionRootHandler):
    @web.authenticated
    async def post(self):
        return await _keeping_codes(super().post)


class GPUSessionHandler(SessionHandler):
    @web.authenticated
    async def patch(self, session_id):
        return await _keeping_codes(lambda: super(GPUSessionHandler, self).patch(session_id))


class GPUKernelActionHandler(KernelActionHandler):
    @web.authenticated
    async def post(self, kernel_id, action):
        return await _keeping_codes(
            lambda: super(GPUKernelActionHandler, self).post(kernel_id, action)
        )


_REPLACED = {
    SessionRootHandler: GPUSessionRootHandler,
    SessionHandler: GPUSessionHandler,
    KernelActionHandler: GPUKernelActionHandler,
}
# Only the routes whose handler is replaced: the rest stay jupyter_server's defaults.
default_handlers = [
    (pattern, _REPLACED[handler])
    for pattern, handler in [*session_handlers, *kernel_handlers]
    if handler in _REPLACED
]
