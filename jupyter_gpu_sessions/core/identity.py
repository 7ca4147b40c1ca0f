"""Who is asking: a user name, the groups that user is in, and whether they administer."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Forbidden


@dataclass(frozen=True)
class Identity:
    """The caller of an API or the owner of a kernel. ``groups`` come from the OS, the
    configured ``GPUSessionManager.groups`` and (under JupyterHub) the Hub."""

    username: str
    groups: frozenset[str] = field(default_factory=frozenset)
    is_admin: bool = False

    def in_group(self, group: str) -> bool:
        return group in self.groups


def require_admin(who: Identity, what: str) -> None:
    """Refuse an admin-only action to anyone else, saying where admins are set."""
    if not who.is_admin:
        raise Forbidden(
            f"Only admins may {what}; {who.username} is not one (admins are set by "
            "GPUSessionsExtension.admin_users and admin_groups)."
        )
