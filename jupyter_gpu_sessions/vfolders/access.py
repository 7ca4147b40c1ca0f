"""Who may do what with a vfolder: the caller's access to it, and names resolved to vfolders."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.errors import Conflict, Forbidden, GPUSessionsError, InvalidRequest, NotFound
from ..core.identity import Identity
from ..core.vfolders import Permission, Share, VFolder, check_vfolder_name, is_vfolder_id

if TYPE_CHECKING:
    from .service import VFolderService

# A name that means several vfolders means the caller's own first, then a group's.
RELATION_RANK = {"own": 0, "group": 1, "shared": 2}


@dataclass(frozen=True)
class Access:
    """What the caller may do with one vfolder, and why."""

    vfolder: VFolder
    permission: Permission
    relation: str  # own | group | shared
    share: Share | None = None


def _access(who: Identity, vf: VFolder, share: Share | None) -> Access | None:
    accepted = share if share is not None and share.state == "accepted" else None
    if vf.type == "user":
        if vf.owner == who.username:
            return Access(vf, Permission.WD, "own", share)
        if accepted:
            return Access(vf, accepted.permission, "shared", share)
        return None
    # Project vfolders: admins manage them all; a member gets the group permission unless
    # an admin set an override for them; an override alone grants access to a non-member.
    if who.is_admin:
        return Access(vf, Permission.WD, "group", share)
    member = vf.group is not None and who.in_group(vf.group)
    if accepted:
        return Access(vf, accepted.permission, "group" if member else "shared", share)
    if member:
        return Access(vf, vf.group_permission or Permission.RO, "group", share)
    return None


class VFolderAccess:
    """Visibility, name resolution and the manager's rights; mixed into
    :class:`VFolderService`."""

    def _visible(
        self: VFolderService,
        who: Identity,
        *,
        statuses: Iterable[str] = ("ready",),
        manageable: bool = False,
    ) -> list[Access]:
        out = []
        for vf, share in self.store.visible(
            who.username, who.groups, is_admin=who.is_admin, statuses=statuses
        ):
            access = _access(who, vf, share)
            if access is None or (manageable and not self._manages(who, vf)):
                continue
            out.append(access)
        return out

    def _resolve(
        self: VFolderService, who: Identity, name: str, *, statuses=("ready",), manageable=False
    ) -> Access:
        """The vfolder ``name`` (or id) means to the caller: their own, else their groups',
        else one shared with them. Invisible and nonexistent look the same (NotFound)."""
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"vfolder name {name!r} is not a vfolder name or id")
        visible = self._visible(who, statuses=statuses, manageable=manageable)
        if is_vfolder_id(name):
            for access in visible:
                if access.vfolder.id == name:
                    return access
        else:
            check_vfolder_name(name)
        matches = [a for a in visible if a.vfolder.name == name]
        if not matches:
            hint = ""
            if statuses == ("ready",) and self._own_trashed(who, name):
                hint = ": it is in your trash, restore it first"
            raise NotFound(f"no vfolder {name!r} that you can use{hint}")
        best = min(RELATION_RANK[a.relation] for a in matches)
        matches = [a for a in matches if RELATION_RANK[a.relation] == best]
        if len(matches) > 1:
            which = "; ".join(f"{a.vfolder.describe()}: id {a.vfolder.id}" for a in matches)
            raise Conflict(
                f"{len(matches)} vfolders named {name!r} are available to you ({which}): use "
                "the id of the one you mean instead of its name"
            )
        return matches[0]

    def _resolve_trashed(
        self: VFolderService, who: Identity, name: str, *, purging: bool = False
    ) -> Access:
        try:
            return self._resolve(who, name, statuses=("trashed",), manageable=True)
        except NotFound:
            pass
        try:
            live = self._resolve(who, name)
        except GPUSessionsError:
            live = None
        if live is not None and self._manages(who, live.vfolder):
            what = "purged" if purging else "restored"
            raise Conflict(
                f"{live.vfolder.describe()} is not in the trash, so it cannot be {what}"
                + (": delete it first (it goes to the trash)" if purging else "")
            )
        raise NotFound(f"no vfolder {name!r} in your trash")

    def _own_trashed(self: VFolderService, who: Identity, name: str) -> bool:
        return any(
            a.vfolder.name == name or a.vfolder.id == name
            for a in self._visible(who, statuses=("trashed",), manageable=True)
        )

    @staticmethod
    def _manages(who: Identity, vf: VFolder) -> bool:
        if vf.type == "project":
            return who.is_admin
        return vf.owner == who.username

    def _require_manager(self: VFolderService, who: Identity, access: Access, action: str) -> None:
        if self._manages(who, access.vfolder):
            return
        vf = access.vfolder
        if vf.type == "project":
            raise Forbidden(
                f"only admins can {action} {vf.describe()}; you have "
                f"{access.permission.describe()} access"
            )
        extra = " (to stop seeing it, decline its share)" if action == "delete" else ""
        raise Forbidden(
            f"only its owner ({vf.owner}) can {action} {vf.describe()}; it is shared with you "
            f"{access.permission.describe()}{extra}"
        )

    def _for_files(
        self: VFolderService, who: Identity, name: str, needed: Permission, action: str
    ) -> tuple[VFolder, Permission, str]:
        access = self._resolve(who, name)
        if not access.permission.allows(needed):
            raise Forbidden(
                f"you have {access.permission.describe()} access to {access.vfolder.describe()}"
                f": to {action} it you need {needed.describe()}; ask "
                f"{'an admin' if access.vfolder.type == 'project' else access.vfolder.owner} "
                "for more"
            )
        return access.vfolder, access.permission, f"vfolder {access.vfolder.name!r}"
