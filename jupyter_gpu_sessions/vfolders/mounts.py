"""Vfolders in kernels: the mounts a kernel start asks for, and the kernels that mount one."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..core.errors import Forbidden, InvalidRequest, NotFound
from ..core.identity import Identity
from ..core.vfolders import CONTAINER_ROOT, Permission, VFolder, VFolderMount, parse_mount

if TYPE_CHECKING:
    from .service import VFolderService


class KernelMounts:
    """What a kernel mounts; mixed into :class:`VFolderService`."""

    def resolve_mounts(
        self: VFolderService, who: Identity, specs: Iterable[str] | None
    ) -> list[VFolderMount]:
        """The mounts of a kernel start asking for ``specs`` (``"data"``, ``"team-ds:ro"``).
        A request can only lower the caller's permission; a vfolder over its soft quota is
        mounted read-only."""
        if specs is None:
            return []
        if isinstance(specs, str | bytes) or not isinstance(specs, Iterable):
            raise InvalidRequest(
                f"vfolders {specs!r} must be a list of vfolder names, such as "
                "['data', 'team-ds:ro']"
            )
        parsed = [parse_mount(s) for s in specs]
        names = [n for n, _ in parsed]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InvalidRequest(
                f"vfolder(s) {', '.join(repr(d) for d in dupes)} asked for more than once: "
                "mount each vfolder once"
            )
        mounts: list[VFolderMount] = []
        for name, asked in parsed:
            try:
                access = self._resolve(who, name)
            except NotFound:
                mountable = sorted({a.vfolder.name for a in self._visible(who)})
                choice = ", ".join(mountable) if mountable else "none yet (create one first)"
                trashed = self._own_trashed(who, name)
                hint = " It is in your trash: restore it first." if trashed else ""
                raise NotFound(
                    f"cannot mount vfolder {name!r}: there is no vfolder of that name you may "
                    f"use.{hint} Vfolders you can mount: {choice}."
                ) from None
            vf = access.vfolder
            if asked is not None and not access.permission.allows(asked):
                raise Forbidden(
                    f"cannot mount vfolder {name!r} {asked.describe()}: you have "
                    f"{access.permission.describe()} access; ask for "
                    f"'{name}:{access.permission.value}' or ask its owner for more"
                )
            effective = (
                access.permission if asked is None else Permission.lower(access.permission, asked)
            )
            container_path = f"{CONTAINER_ROOT}/{vf.name}"
            if any(m.container_path == container_path for m in mounts):
                raise InvalidRequest(
                    f"two of the requested vfolders would both be mounted at {container_path}: "
                    "mount only one of them"
                )
            read_only = effective is Permission.RO
            reason = ""
            if not read_only:
                reason = self._over_soft_quota(vf)
                if reason:
                    read_only = True
                    self.log.warning("mounting %s read-only: %s", vf.describe(), reason)
            mounts.append(
                VFolderMount(
                    vfolder_id=vf.id,
                    name=vf.name,
                    host_path=self._data_path(vf),
                    container_path=container_path,
                    read_only=read_only,
                    permission=effective,
                    reason=reason,
                )
            )
        return mounts

    def _kernels_mounting(self: VFolderService, vf: VFolder) -> list[str]:
        """The live kernels that have ``vf`` mounted (the manager knows; none without one)."""
        if self._mounted_by is None:
            return []
        return self._mounted_by(self._backends[vf.backend].host_dir(vf))
