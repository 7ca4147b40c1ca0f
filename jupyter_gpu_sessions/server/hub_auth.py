"""Who calls the manager service under JupyterHub: the Hub user of a token or OAuth cookie.

The manager service (``jupyter gpu-sessions manager``, run by the Hub) answers three kinds
of callers, all of them Hub users:

- a script or a user's single-user server sending ``Authorization: token <Hub token>``: a
  token the user made, or the server's own ``$JUPYTERHUB_API_TOKEN`` (which acts as that
  server's user only);
- a browser, with the service's OAuth cookie: a request without one is sent through the
  Hub's OAuth flow (``{service prefix}login``) and comes back to
  ``{service prefix}oauth_callback``.

Every caller must hold the Hub scope ``access:services!service=<JUPYTERHUB_SERVICE_NAME>``
(grant it through a role, and to users' servers through ``c.Spawner.server_token_scopes``):
an authenticated Hub user without it is refused with 403, not sent to log in again. The
user is named as on the Hub, with the Hub's groups (``groups``) and admin flag
(``hub_admin``): Hub admins are admins of the GPU sessions API. The Hub's answers are
cached (``c.HubOAuth.cache_max_age``, seconds), so a request costs the Hub one call per
token and cache period.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from jupyter_server.auth.decorator import allow_unauthenticated
from jupyter_server.auth.identity import IdentityProvider, User
from jupyter_server.auth.logout import LogoutHandler
from jupyter_server.base.handlers import JupyterHandler
from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler
from jupyterhub.utils import url_path_join
from tornado import web
from tornado.httputil import url_concat
from traitlets import Instance, default

SERVICE_NAME_ENV = "JUPYTERHUB_SERVICE_NAME"


@dataclass
class HubUser(User):
    """A Hub user as the service sees them: the Hub's groups and admin flag besides the
    jupyter_server identity fields."""

    groups: tuple[str, ...] = field(default=())
    hub_admin: bool = False


class Refused(web.HTTPError):
    """403 for a caller the Hub knows who may not use this service: they are logged in, so
    it is never answered as "log in" (401)."""

    authenticated = True

    def __init__(self, message: str, *args: Any) -> None:
        super().__init__(403, message, *args)


def hub_user(model: dict[str, Any]) -> HubUser:
    """The identity of a Hub user model (``GET /hub/api/user``)."""
    info = model.get("user_info") or {}
    name = model["name"]
    return HubUser(
        username=name,
        name=info.get("name") or name,
        display_name=info.get("display_name") or name,
        groups=tuple(sorted(model.get("groups") or ())),
        hub_admin=bool(model.get("admin")),
    )


class ServiceHubOAuth(HubOAuth):
    """HubOAuth without its XSRF patch: that patch replaces jupyter_server's
    ``check_xsrf_cookie`` on the handler classes of the whole process, and tornado calls it
    before any request is authenticated, so every token-authenticated POST would be refused.
    Here a browser's (cookie-authenticated) writes pass jupyter_server's own XSRF check
    (the ``_xsrf`` cookie sent back as X-XSRFToken), once the caller is known; calls with a
    token need none."""

    def _patch_xsrf(self, handler: web.RequestHandler) -> None:
        return None


class HubLoginHandler(JupyterHandler):
    """``{service prefix}login``: start the Hub's OAuth flow and come back to ``?next=``
    (the service's prefix by default) with the service's cookie."""

    @allow_unauthenticated
    def get(self) -> None:
        provider: HubIdentityProvider = self.identity_provider  # type: ignore[assignment]
        hub_auth = provider.hub_auth
        next_url = self.get_argument("next", "") or hub_auth.base_url
        if not next_url.startswith(hub_auth.base_url):  # no open redirect through the service
            next_url = hub_auth.base_url
        self.redirect(provider.oauth_url(self, next_url))


class HubLogoutHandler(LogoutHandler):
    """``{service prefix}logout``: forget the service's cookie, then log out of the Hub."""

    @allow_unauthenticated
    def get(self) -> None:
        hub_auth = self.identity_provider.hub_auth
        hub_auth.clear_cookie(self)
        self.redirect(hub_auth.hub_host + url_path_join(hub_auth.hub_prefix, "logout"))


class HubCallbackHandler(HubOAuthCallbackHandler):
    """``{service prefix}oauth_callback``: the end of the Hub's OAuth flow (sets the
    service's cookie and goes back to where the browser started)."""

    def initialize(self, hub_auth: HubOAuth) -> None:
        self.hub_auth = hub_auth

    @allow_unauthenticated
    async def get(self) -> None:
        await super().get()


class HubIdentityProvider(IdentityProvider):
    """The identity provider of the manager service under JupyterHub (see the module)."""

    hub_auth = Instance(HubOAuth, help="The Hub client (configure it as c.HubOAuth).")

    @default("hub_auth")
    def _default_hub_auth(self) -> HubOAuth:
        # Its API URL, token, OAuth client, prefix and access scopes come from the
        # environment the Hub gives the service.
        return ServiceHubOAuth(parent=self)

    # Not jupyter_server's token: nothing here accepts it, and it must not be written into
    # the server's info file or printed in its URL.
    @default("token")
    def _no_token(self) -> str:
        self.token_generated = False
        return ""

    @default("need_token")
    def _no_need_token(self) -> bool:
        return False

    @default("login_handler_class")
    def _default_login_handler(self) -> type:
        return HubLoginHandler

    @default("logout_handler_class")
    def _default_logout_handler(self) -> type:
        return HubLogoutHandler

    @property
    def service_name(self) -> str:
        return os.environ.get(SERVICE_NAME_ENV, "")

    async def get_user(self, handler: web.RequestHandler) -> HubUser | None:
        if hasattr(handler, "_gpu_sessions_hub_user"):
            return handler._gpu_sessions_hub_user
        self._patch_login_url(handler)
        model = await self.hub_auth.get_user(handler, sync=False)
        user = None
        if model is not None:
            required = self.hub_auth.access_scopes
            kind = model.get("kind", "user")
            if required and not self.hub_auth.check_scopes(required, model):
                self.log.warning("Refused %s %s: no %s", kind, model["name"], required)
                # Decided: nobody (jupyter_server reads this after an error, too).
                handler._jupyter_current_user = handler._gpu_sessions_hub_user = None
                raise Refused(
                    "%s %s may not use this service: it needs the Hub scope %s (a Hub admin "
                    "grants it through a role, and to users' servers through "
                    "c.Spawner.server_token_scopes).",
                    kind.capitalize(),
                    model["name"],
                    " or ".join(sorted(required)),
                )
            if kind != "user":
                # A service's own token: it acts for no user, so it may not act here.
                handler._jupyter_current_user = handler._gpu_sessions_hub_user = None
                raise Refused(
                    "%s is a Hub service, not a user: call with a user's token (or a user's "
                    "server's $JUPYTERHUB_API_TOKEN).",
                    model["name"],
                )
            user = hub_user(model)
        handler._gpu_sessions_hub_user = user
        return user

    def oauth_url(self, handler: web.RequestHandler, next_url: str) -> str:
        """The Hub's authorize URL for a browser, with the state (and PKCE) cookies set."""
        params: dict[str, str] = {}
        code_verifier = None
        if self.hub_auth.pkce_enabled:
            code_verifier, challenge, method = self.hub_auth.generate_pkce_code_challenge()
            params.update(code_challenge=challenge, code_challenge_method=method)
        params["state"] = self.hub_auth.set_state_cookie(
            handler, next_url=next_url, code_verifier=code_verifier
        )
        return url_concat(self.hub_auth.login_url, params)

    def _patch_login_url(self, handler: web.RequestHandler) -> None:
        """A browser page that needs a login goes through the Hub's OAuth flow (the API's
        handlers still answer 401/403 themselves: they never redirect)."""
        original = handler.get_login_url

        def get_login_url() -> str:
            # Lets the handler's own get_login_url refuse first (APIHandler raises 403),
            # with a login URL set for the moment (no await in between: no other request
            # sees it).
            settings = handler.application.settings
            had, saved = "login_url" in settings, settings.get("login_url")
            settings["login_url"] = "/"
            try:
                original()
            finally:
                if had:
                    settings["login_url"] = saved
                else:
                    del settings["login_url"]
            return self.oauth_url(handler, handler.request.uri)

        handler.get_login_url = get_login_url

    def get_handlers(self) -> list[tuple[str, Any]]:
        return [
            ("/login", self.login_handler_class),
            ("/logout", self.logout_handler_class),
            ("/oauth_callback", HubCallbackHandler, {"hub_auth": self.hub_auth}),
        ]

    def validate_security(self, app: Any, ssl_options: dict[str, Any] | None = None) -> None:
        """Every request is checked with the Hub: jupyter_server's warnings about a missing
        token do not apply."""

    @property
    def auth_enabled(self) -> bool:
        return True

    @property
    def login_available(self) -> bool:
        return True
