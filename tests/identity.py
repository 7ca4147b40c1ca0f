"""A test identity provider: several users on one server, each with their own token."""

from __future__ import annotations

from jupyter_server.auth.identity import IdentityProvider, User
from traitlets import Dict


class TokenUsers(IdentityProvider):
    """``Authorization: token <t>`` is the user ``users[t]``; anything else is nobody."""

    users = Dict(help="token → user name").tag(config=True)

    @property
    def auth_enabled(self) -> bool:
        return True

    def get_user(self, handler):
        token = self.get_token(handler)
        username = self.users.get(token) if token else None
        if username is None:
            return None
        handler._token_authenticated = True
        return User(username=username, name=username, display_name=username)
