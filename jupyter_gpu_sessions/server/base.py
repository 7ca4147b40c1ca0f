"""The base handler: authentication, who is asking, JSON in and out, errors as 4xx JSON."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from jupyter_core.utils import ensure_async
from jupyter_server import CallContext
from jupyter_server.auth.identity import User
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from ..core.errors import (
    Conflict,
    Forbidden,
    GPUSessionsError,
    ImageNotFound,
    InvalidRequest,
    KernelLaunchError,
    NotFound,
    PolicyViolation,
    QuotaExceeded,
    RuntimeUnavailable,
    StartCancelled,
    UnsatisfiableRequest,
)
from ..core.identity import Identity, require_admin
from ..core.status import IllegalTransition
from ..engine import SESSION_TOKEN_PREFIX

if TYPE_CHECKING:
    from ..engine import Engine
    from .app import GPUSessionsExtension

T = TypeVar("T")
AUTH_RESOURCE = "gpu-sessions"
API_PREFIX = "gpu-sessions/api"
# Status codes per domain error; the most specific class wins (checked in order).
STATUS = (
    (NotFound, 404),
    (Forbidden, 403),
    (PolicyViolation, 403),
    (QuotaExceeded, 413),
    (Conflict, 409),
    (IllegalTransition, 409),
    (UnsatisfiableRequest, 422),
    (ImageNotFound, 422),
    (RuntimeUnavailable, 503),
    (StartCancelled, 409),
    # The kernel this request names died or never answered: the message carries its exit
    # and log tail. Not a 400 (nothing in the request was malformed), not a server bug.
    (KernelLaunchError, 422),
    (InvalidRequest, 400),
    (GPUSessionsError, 400),
)


def status_for(exc: BaseException) -> int | None:
    """The HTTP status a domain error is answered with; None for anything else (a bug)."""
    for klass, status in STATUS:
        if isinstance(exc, klass):
            return status
    return None


_ID = re.compile(r"^[0-9a-f]{32}$")
_AUTH_HEADER = re.compile(r"^\s*(?:token|bearer)\s+(\S+)\s*$", re.IGNORECASE)


def presented_session_token(handler: JupyterHandler) -> str | None:
    """The per-session token a request carries (``Authorization: token T`` first, else
    ``?token=T``), or None: then jupyter_server's own authentication decides, as always."""
    match = _AUTH_HEADER.match(handler.request.headers.get("Authorization", ""))
    token = match.group(1) if match else handler.get_query_argument("token", "")
    return token if token.startswith(SESSION_TOKEN_PREFIX) else None


def refuse_session_token() -> None:
    raise web.HTTPError(
        401,
        "This session token is not accepted: it is unknown, or its session has ended (a "
        "session's token dies with it). Use the token of a running session, or your Jupyter "
        "token.",
    )


async def session_token_identity(handler: JupyterHandler, token: str) -> Identity | None:
    """Who a per-session token acts for: its session's owner with their groups, never an
    admin; None when it is not accepted (then the server's own authentication decides).
    Only this API's routes call it: jupyter_server's own (contents, kernels, terminals)
    never accept such a token."""
    CallContext.set(CallContext.JUPYTER_HANDLER, handler)
    handler.current_user = handler._jupyter_current_user = None
    if not handler.check_host():
        raise web.HTTPError(403)
    owner = await handler.settings["gpu_sessions_engine"].token_owner(token)
    if owner is None:
        del handler._jupyter_current_user  # not decided yet: jupyter_server's turn
        return None
    user = User(username=owner, name=owner, display_name=owner)
    handler.current_user = handler._jupyter_current_user = user
    # A token is no cookie: no XSRF or origin check applies (as for jupyter_server's own).
    handler._token_authenticated = True
    handler.set_cors_headers()
    groups = (await handler.settings["gpu_sessions_app"].identity(owner)).groups
    return Identity(owner, groups, is_admin=False)


class GPUSessionsHandler(ExtensionHandlerMixin, APIHandler):
    """Every route of the API: authenticated (``prepare``), authorized against the
    ``gpu-sessions`` resource, domain errors answered as ``{"message", "reason"}``."""

    auth_resource = AUTH_RESOURCE
    # Query parameters a route reads; any other is refused, so a typo (?staus=) is not
    # silently ignored. ``token`` is jupyter_server's own.
    query_args: frozenset[str] = frozenset()

    @property
    def app(self) -> GPUSessionsExtension:
        return self.extensionapp

    @property
    def engine(self) -> Engine:
        return self.settings["gpu_sessions_engine"]

    async def prepare(self) -> None:
        token = presented_session_token(self)
        if token is not None:  # a kernel's (or batch job's) own token: acts as its owner
            who = await session_token_identity(self, token)
            if who is not None:
                self.who = who
                await self._check_access()
                return
        try:
            await super().prepare()
        except web.HTTPError as exc:
            # A Hub user without the service's scope is authenticated: their 403 stays.
            known = getattr(exc, "authenticated", False)
            if exc.status_code == 403 and self.current_user is None and not known:
                self._unauthenticated(token)
            raise
        if self.current_user is None:
            # allow_unauthenticated_access or not: this API never answers strangers.
            self._unauthenticated(token)
        await self._check_access()
        self.who = await self.identify()

    async def _check_access(self) -> None:
        """The server's authorizer, then the route's query parameters."""
        action = "read" if self.request.method in ("GET", "HEAD") else "write"
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, action, AUTH_RESOURCE)
        )
        if not allowed:
            raise web.HTTPError(403, f"You may not {action} GPU sessions on this server.")
        unknown = sorted(
            name
            for name in set(self.request.query_arguments) - self.query_args - {"token"}
            # JupyterLab's ServerConnection busts caches with a bare `?<milliseconds>`.
            if not (name.isdigit() and self.request.query_arguments[name] == [b""])
        )
        if unknown:
            known = ", ".join(sorted(self.query_args)) or "none"
            raise InvalidRequest(
                f"Unknown query parameter(s) {', '.join(map(repr, unknown))}; this route "
                f"takes: {known}."
            )

    def _unauthenticated(self, session_token: str | None = None) -> None:
        if session_token is not None:
            refuse_session_token()
        raise web.HTTPError(
            401, "Authentication required: send 'Authorization: token <your Jupyter token>'."
        )

    async def identify(self) -> Identity:
        return await self.app.identity_of_user(self.current_user)

    # -- helpers for subclasses ------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Blocking domain work (database, file system) off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    def require_admin(self, what: str) -> None:
        require_admin(self.who, what)

    def body(self, allowed: set[str] | None = None, *, required: bool = False) -> dict[str, Any]:
        """The JSON object sent, with unknown keys refused (a typo must not pass silently)."""
        if required and not self.request.body:
            raise InvalidRequest("Send a JSON object in the request body.")
        raw = self.request.body or b"{}"
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise InvalidRequest(f"The request body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        if allowed is not None:
            unknown = sorted(set(data) - allowed)
            if unknown:
                raise InvalidRequest(
                    f"Unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
                )
        return data

    def int_argument(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        raw = self.get_argument(name, None)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise InvalidRequest(f"{name} must be a whole number, not {raw!r}") from None
        if not minimum <= value <= maximum:
            raise InvalidRequest(f"{name} must be between {minimum} and {maximum}, not {value}")
        return value

    def bool_argument(self, name: str, default: bool = False) -> bool:
        raw = self.get_argument(name, None)
        if raw is None:
            return default
        if raw in ("true", "false"):
            return raw == "true"
        raise InvalidRequest(f"{name} must be true or false, not {raw!r}")

    @staticmethod
    def check_id(value: str, what: str = "session") -> str:
        if not _ID.match(value):
            raise NotFound(f"No {what} {value!r}: ids are 32 hexadecimal digits.")
        return value

    @classmethod
    def allowed_methods(cls) -> list[str]:
        """The methods this route answers (for ``Allow`` on a 405)."""
        methods = []
        for name in ("get", "post", "put", "patch", "delete"):
            impl = getattr(cls, name, None)
            if impl is not None and impl is not getattr(web.RequestHandler, name):
                methods.append(name.upper())
        return methods

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data))

    # -- errors ----------------------------------------------------------------------------
    def _handle_request_exception(self, e: BaseException) -> None:
        status = status_for(e)
        if status is None:
            super()._handle_request_exception(e)
            return
        if self._finished:
            return
        self.clear()
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        reason = getattr(e, "reason", None) or "conflict"
        message = e.message if isinstance(e, GPUSessionsError) else str(e)
        # ``error``: the domain error's class, so a remote engine raises the same one.
        error = type(e).__name__ if isinstance(e, GPUSessionsError) else "Conflict"
        self.finish(json.dumps({"message": message, "reason": reason, "error": error}))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Tornado/jupyter_server errors (404 route, 401 auth, 405) in our JSON shape."""
        self.set_header("Content-Type", "application/json")
        if status_code == 401:
            self.set_header("WWW-Authenticate", 'token realm="jupyter-gpu-sessions"')
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        message = self._reason
        exc_info = kwargs.get("exc_info")
        if exc_info and isinstance(exc_info[1], web.HTTPError) and exc_info[1].log_message:
            message = (
                exc_info[1].log_message % exc_info[1].args
                if exc_info[1].args
                else (exc_info[1].log_message)
            )
        elif status_code >= 500:
            message = "Internal error: the server log has the details. Please report it."
        self.finish(json.dumps({"message": message, "reason": _REASONS.get(status_code, "error")}))


_REASONS = {
    400: "invalid-request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "quota-exceeded",
    500: "internal-error",
}
