"""Sharing a vfolder: invitations and their answers, per-user permissions, revoking."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.errors import Conflict, InvalidRequest, NotFound
from ..core.identity import Identity
from ..core.vfolders import Permission, Share, VFolder

if TYPE_CHECKING:
    from .service import VFolderService


class VFolderSharing:
    """Invitations, shares and project overrides; mixed into :class:`VFolderService`."""

    def invite(
        self: VFolderService, who: Identity, name: str, user: str, permission: str | Permission
    ) -> Share:
        """Invite ``user`` to a vfolder with ``permission``; they accept or decline. Inviting
        again changes the pending invitation (or an accepted share's permission)."""
        access = self._resolve(who, name)
        self._require_manager(who, access, "share")
        perm = Permission.parse(permission)
        user = self._check_other_user(who, user, access.vfolder)
        share = self.store.put_share(
            access.vfolder.id,
            user,
            permission=perm,
            state="invited",
            invited_by=who.username,
            keep_accepted=True,
        )
        self.log.info(
            "%s invited %s to %s (%s)", who.username, user, access.vfolder.describe(), perm
        )
        return share

    def invitations(self: VFolderService, who: Identity) -> dict[str, list[dict[str, Any]]]:
        """``received``: invitations waiting for the caller's answer; ``sent``: every share
        of the caller's vfolders, in any state."""
        received = [
            _share_dict(s, v)
            for s, v in self.store.shares_received(who.username)
            if s.state == "invited" and v.status == "ready"
        ]
        sent = [_share_dict(s, v) for s, v in self.store.shares_sent(who.username)]
        return {"received": received, "sent": sent}

    def accept(self: VFolderService, who: Identity, share_id: str) -> Share:
        share, _ = self._own_invitation(who, share_id)
        if share.state == "declined":
            raise Conflict(
                "you declined this invitation: ask the vfolder's owner to invite you again"
            )
        if share.state == "accepted":
            return share
        return self.store.update_share(share.id, state="accepted")

    def decline(self: VFolderService, who: Identity, share_id: str) -> Share:
        """Decline an invitation, or leave a share accepted earlier."""
        share, _ = self._own_invitation(who, share_id)
        if share.state == "declined":
            return share
        return self.store.update_share(share.id, state="declined")

    def shares(self: VFolderService, who: Identity, name: str) -> list[Share]:
        """A vfolder's shares: all of them for its owner (admins for project vfolders), the
        caller's own otherwise."""
        access = self._resolve(who, name)
        shares = self.store.shares_of(access.vfolder.id)
        if self._manages(who, access.vfolder):
            return shares
        return [s for s in shares if s.user == who.username]

    def set_permission(
        self: VFolderService, who: Identity, name: str, user: str, permission: str | Permission
    ) -> Share:
        """Change ``user``'s permission. User vfolders: the user must have been invited.
        Project vfolders (admins): a per-user override of the group permission, effective
        at once."""
        access = self._resolve(who, name)
        self._require_manager(who, access, "change permissions of")
        perm = Permission.parse(permission)
        vf = access.vfolder
        user = self._check_other_user(who, user, vf)
        if vf.type == "project":
            return self.store.put_share(
                vf.id, user, permission=perm, state="accepted", invited_by=who.username
            )
        share = self.store.share_of(vf.id, user)
        if share is None or share.state == "declined":
            raise NotFound(f"{vf.describe()} is not shared with {user}: invite them first (invite)")
        return self.store.update_share(share.id, permission=perm)

    def revoke(self: VFolderService, who: Identity, name: str, user: str) -> None:
        """Take back ``user``'s share (or invitation, or project override)."""
        access = self._resolve(who, name)
        self._require_manager(who, access, "revoke shares of")
        if not self.store.delete_share(access.vfolder.id, str(user)):
            raise NotFound(f"{access.vfolder.describe()} is not shared with {user!r}")
        self.log.info("%s revoked %s's share of %s", who.username, user, access.vfolder.id)

    def _check_other_user(self: VFolderService, who: Identity, user: Any, vf: VFolder) -> str:
        if not isinstance(user, str) or not user.strip():
            raise InvalidRequest(f"user {user!r} is not a user name")
        if user == who.username:
            raise InvalidRequest(
                f"you cannot share {vf.describe()} with yourself: name another user"
            )
        if vf.type == "user" and user == vf.owner:
            raise InvalidRequest(f"{user} owns {vf.describe()} already")
        if not self._known_user(user):
            raise InvalidRequest(
                f"no user {user!r} is known here: check the spelling; a user must have used "
                "this server once (signed in or started a kernel) before a vfolder can be "
                "shared with them"
            )
        return user

    def _own_invitation(
        self: VFolderService, who: Identity, share_id: Any
    ) -> tuple[Share, VFolder]:
        share = self.store.get_share(share_id) if isinstance(share_id, str) else None
        vf = self.store.get(share.vfolder_id) if share else None
        if share is None or share.user != who.username or vf is None or vf.status != "ready":
            raise NotFound(
                f"no invitation {share_id!r} for you: list yours with invitations (received)"
            )
        return share, vf


def _share_dict(share: Share, vf: VFolder) -> dict[str, Any]:
    data = share.to_dict()
    data.update(vfolder_name=vf.name, vfolder_owner=vf.owner, vfolder_type=vf.type)
    if vf.group:
        data["vfolder_group"] = vf.group
    return data
