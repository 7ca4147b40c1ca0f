"""VFolderService: the vfolder domain's façade, and each vfolder's lifecycle and trash.

What else it does lives next door, one concern a module: ``access`` (who may do what),
``sharing``, ``quota`` (the ledger: usage and every quota check), ``mounts`` (kernels),
``contents`` (the files inside), ``backends`` and ``files`` (every write to storage).

Every method is synchronous, thread-safe and may block on the database or the file system:
the server calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from jupyter_core.paths import jupyter_data_dir
from sqlalchemy import Engine
from traitlets import Dict, Enum, Float, Int, TraitError, Type, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from ..core.errors import Conflict, Forbidden, GPUSessionsError, InvalidRequest, QuotaExceeded
from ..core.identity import Identity
from ..core.policy import Policy
from ..core.units import format_size
from ..core.vfolders import (
    BACKENDS,
    VFOLDER_TYPES,
    Permission,
    VFolder,
    check_vfolder_name,
)
from ..store.vfolders import LIVE, VFolderStore
from .access import Access, VFolderAccess
from .backends import DirectoryBackend, LoopbackBackend, StorageBackend, busy, drop_busy
from .contents import VFolderContents
from .mounts import KernelMounts
from .quota import QuotaLedger
from .sharing import VFolderSharing

_BACKEND_CLASSES = {"directory": DirectoryBackend, "loopback": LoopbackBackend}


class VFolderService(
    VFolderAccess, VFolderSharing, QuotaLedger, KernelMounts, VFolderContents, LoggingConfigurable
):
    """Storage folders mounted into kernels: ownership, sharing, quotas, trash and files."""

    root = Unicode(
        config=True,
        help="""Where vfolders are stored: ``dirs/`` for the directory backend, ``images/``
        and ``mounts/`` for the loopback backend. Must be on a local file system; the
        loopback backend needs root. Moving it means moving its content too.""",
    )

    @default("root")
    def _default_root(self) -> str:
        return os.path.join(jupyter_data_dir(), "gpu-sessions", "vfolders")

    backend_classes = Dict(
        value_trait=Type(klass=StorageBackend),
        default_value=_BACKEND_CLASSES,
        config=True,
        help="""The storage backend class for each backend name (``directory``,
        ``loopback``): a subclass of jupyter_gpu_sessions.vfolders.backends.StorageBackend,
        built once with the vfolder root and the uid/gid files get.""",
    )

    @validate("backend_classes")
    def _valid_backend_classes(self, proposal):
        unknown = set(proposal.value) - set(BACKENDS)
        if unknown:
            raise TraitError(
                f"backend_classes names unknown backends {sorted(unknown)}: use "
                f"{', '.join(BACKENDS)}"
            )
        return {**_BACKEND_CLASSES, **proposal.value}

    default_backend = Enum(
        list(BACKENDS),
        default_value="directory",
        config=True,
        help="""The storage of new vfolders when a request names none. ``directory``: a plain
        directory; the quota is soft (uploads past it are refused and a vfolder over it is
        mounted read-only at the next kernel start, but a running kernel can write past it).
        ``loopback``: an ext4 image per vfolder, loop-mounted; the quota is hard (a kernel
        writing past it gets "No space left on device"), loopback vfolders can only grow, and
        the manager must run as root.""",
    )

    file_uid = Int(
        None,
        allow_none=True,
        config=True,
        help="""When the manager runs as root, the uid given to every directory and file the
        service creates (vfolder roots, uploads, clones), so kernels running as that uid can
        write to them. Default: 1000 when running as root; unused otherwise (files belong to
        the server's user).""",
    )

    file_gid = Int(
        None,
        allow_none=True,
        config=True,
        help="""The gid that goes with ``file_uid``. Default: 1000 when running as root.""",
    )

    @default("file_uid")
    def _default_file_uid(self) -> int | None:
        return 1000 if os.geteuid() == 0 else None

    @default("file_gid")
    def _default_file_gid(self) -> int | None:
        return 1000 if os.geteuid() == 0 else None

    usage_cache_seconds = Float(
        5.0,
        config=True,
        help="""How long a directory vfolder's measured usage is reused before it is counted
        again (counting walks every file). Quota checks on upload use it, plus the bytes this
        process has written since.""",
    )

    def __init__(
        self,
        engine: Engine,
        *,
        policy_for: Callable[[str], Policy],
        known_user: Callable[[str], bool],
        mounted_by: Callable[[str], list[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.store = VFolderStore(engine)
        self._policy_for = policy_for
        self._known_user = known_user
        # vfolder host path → the live kernels that have it mounted (the manager knows).
        self._mounted_by = mounted_by
        uid, gid = (self.file_uid, self.file_gid) if os.geteuid() == 0 else (None, None)
        self._backends: dict[str, StorageBackend] = {
            name: klass(self.root, uid=uid, gid=gid) for name, klass in self.backend_classes.items()
        }
        self._start_ledger()

    @staticmethod
    def _creating(**fields: Any) -> VFolder:
        """A new vfolder record (status ``creating``), checked before anything is stored:
        a loopback vfolder needs root and a quota (its image is made that large)."""
        if fields["backend"] == "loopback":
            LoopbackBackend.check_available()
            if fields["quota"] is None:
                raise InvalidRequest(
                    "a loopback vfolder needs a quota (its image is made that large): pass a "
                    "quota such as '10GiB', or use the directory backend"
                )
        return VFolder(id=uuid.uuid4().hex, status="creating", created_at=time.time(), **fields)

    def backend(self, name: str) -> StorageBackend:
        return self._backends[name]

    # == vfolders ==========================================================================
    def create(
        self,
        who: Identity,
        name: str,
        *,
        type: str = "user",
        group: str | None = None,
        quota: int | str | None = None,
        cloneable: bool = False,
        backend: str | None = None,
        group_permission: str | Permission | None = None,
    ) -> VFolder:
        """A new, empty vfolder. ``quota`` defaults to the owner's ``max_vfolder_size``."""
        name = check_vfolder_name(name)
        if type not in VFOLDER_TYPES:
            raise InvalidRequest(
                f"vfolder type {type!r} is not known: use 'user' (yours) or 'project' (a "
                "group's, created by an admin)"
            )
        backend_name = self._check_backend(backend)
        cloneable = _check_bool(cloneable, "cloneable")
        policy = self._policy_for(who.username)
        gperm = None
        if type == "project":
            if not who.is_admin:
                raise Forbidden(
                    "only admins can create project vfolders: ask an admin, or create a user "
                    "vfolder and share it with your group's members"
                )
            if not isinstance(group, str) or not group.strip() or len(group) > 128:
                raise InvalidRequest(
                    f"a project vfolder needs the group it belongs to (group {group!r} is not "
                    "a group name): pass group='NAME'"
                )
            gperm = Permission.parse(
                "rw" if group_permission is None else group_permission, what="group_permission"
            )
        elif group_permission is not None:
            raise InvalidRequest(
                "group_permission applies to project vfolders only: share a user vfolder "
                "with people instead"
            )
        elif group is not None:
            raise InvalidRequest(
                "only project vfolders belong to a group: leave out group, or create a project "
                "vfolder (type='project', admins only)"
            )
        quota_bytes = self._check_quota(quota, policy, type)
        vfolder = self._creating(
            name=name,
            type=type,
            owner=who.username,
            group=group if type == "project" else None,
            backend=backend_name,
            quota=quota_bytes,
            cloneable=cloneable,
            group_permission=gperm,
        )
        with self._making(vfolder.id):
            self.store.insert(
                vfolder, max_user_count=policy.max_vfolder_count if type == "user" else None
            )
            with self._undo_create(vfolder):
                self._backends[backend_name].create(vfolder)
                ready = self.store.set_status(vfolder.id, "ready", expect=("creating",))
        self.log.info("created %s (%s, %s)", vfolder.describe(), backend_name, vfolder.id)
        return ready

    def list(self, who: Identity) -> list[dict[str, Any]]:
        """Every vfolder the caller may use: own, their groups' project vfolders, shared
        with them (accepted); with ``permission``, ``relation`` and ``usage`` (last known
        bytes, or None when not counted yet)."""
        return self._listing(self._visible(who))

    def list_trash(self, who: Identity) -> list[dict[str, Any]]:
        """The caller's trashed vfolders (for admins, trashed project vfolders too)."""
        return self._listing(self._visible(who, statuses=("trashed",), manageable=True))

    def get(self, who: Identity, name: str) -> tuple[VFolder, Permission, str]:
        access = self._resolve(who, name)
        return access.vfolder, access.permission, access.relation

    def update(
        self,
        who: Identity,
        name: str,
        *,
        new_name: str | None = None,
        quota: int | str | None = None,
        cloneable: bool | None = None,
        group_permission: str | Permission | None = None,
    ) -> VFolder:
        """Rename, change the quota (loopback: grow only), cloneability or a project
        vfolder's group permission. Owner only (admins for project vfolders)."""
        access = self._resolve(who, name)
        self._require_manager(who, access, "change")
        vf = access.vfolder
        values: dict[str, Any] = {}
        if new_name is not None and new_name != vf.name:
            values["name"] = check_vfolder_name(new_name)
            self.store.check_name_free(vf, values["name"])
        if cloneable is not None:
            values["cloneable"] = _check_bool(cloneable, "cloneable")
        if group_permission is not None:
            if vf.type != "project":
                raise InvalidRequest(
                    "group_permission applies to project vfolders only: share a user vfolder "
                    "with invitations instead"
                )
            values["group_permission"] = Permission.parse(group_permission, what="group_permission")
        if quota is not None and quota != "":
            new_quota = self._new_quota(vf, quota)
            if new_quota is not None:
                self._backends[vf.backend].set_quota(vf, new_quota)
                values["quota"] = new_quota
        if not values:
            return vf
        updated = self.store.update(vf.id, **values)
        self.log.info("%s changed %s: %s", who.username, vf.describe(), sorted(values))
        return updated

    def delete(self, who: Identity, name: str) -> VFolder:
        """Move a vfolder to the trash; its files stay until it is purged."""
        access = self._resolve(who, name)
        self._require_manager(who, access, "delete")
        vf = self.store.set_status(
            access.vfolder.id, "trashed", expect=("ready",), trashed_at=time.time()
        )
        self.log.info("%s moved %s to the trash", who.username, vf.describe())
        return vf

    def restore(self, who: Identity, name: str) -> VFolder:
        """Bring a vfolder back from the trash, with every file it had."""
        access = self._resolve_trashed(who, name)
        vf = self.store.set_status(access.vfolder.id, "ready", expect=("trashed",), trashed_at=None)
        self.log.info("%s restored %s from the trash", who.username, vf.describe())
        return vf

    def purge(self, who: Identity, name: str) -> None:
        """Delete a trashed vfolder for good: its files, its storage and its shares."""
        access = self._resolve_trashed(who, name, purging=True)
        kernels = self._kernels_mounting(access.vfolder)
        if kernels:
            raise Conflict(
                f"{access.vfolder.describe()} is still mounted in {len(kernels)} running "
                f"kernel(s) ({', '.join(k[:12] for k in kernels)}): shut them down, then "
                "purge it"
            )
        with busy(self.root, access.vfolder.id):
            vf = self.store.set_status(access.vfolder.id, "purging", expect=("trashed",))
            try:
                self._backends[vf.backend].purge(vf)
            except BaseException as exc:
                # Back to the trash, so the owner can retry (or restore what is left).
                self.store.set_status(vf.id, "trashed", expect=("purging",))
                if isinstance(exc, OSError):
                    raise Conflict(
                        f"{vf.describe()} could not be deleted completely ({exc}); it stays in "
                        "the trash, perhaps partly emptied: ask an admin to check the files' "
                        "owners, then purge again"
                    ) from exc
                raise
            self.store.remove(vf.id)
        drop_busy(self.root, vf.id)
        self._forget_usage(vf.id)
        self.log.info("%s purged %s (%s)", who.username, vf.describe(), vf.id)

    def clone(
        self,
        who: Identity,
        name: str,
        new_name: str,
        *,
        quota: int | str | None = None,
        cloneable: bool = False,
        backend: str | None = None,
    ) -> VFolder:
        """A copy of a vfolder as the caller's new user vfolder. The source must be
        cloneable (or the caller's own); the copy counts against the caller's quotas."""
        source = self._resolve(who, name).vfolder
        manager = self._manages(who, source)
        if not source.cloneable and not manager:
            raise Forbidden(
                f"{source.describe()} is not cloneable: ask its owner to make it cloneable "
                "(update cloneable=True)"
            )
        new_name = check_vfolder_name(new_name)
        backend_name = self._check_backend(backend)
        cloneable = _check_bool(cloneable, "cloneable")
        policy = self._policy_for(who.username)
        quota_bytes = self._check_quota(quota, policy, "user")
        vf = self._creating(
            name=new_name,
            type="user",
            owner=who.username,
            group=None,
            backend=backend_name,
            quota=quota_bytes,
            cloneable=cloneable,
            group_permission=None,
        )
        budget = self._clone_budget(who.username, source, quota_bytes, policy)
        with self._making(vf.id):
            return self._clone_into(source, vf, budget, policy)

    def _clone_into(
        self, source: VFolder, vf: VFolder, budget: int | None, policy: Policy
    ) -> VFolder:
        quota_bytes = vf.quota
        self.store.insert(vf, max_user_count=policy.max_vfolder_count)
        target_backend = self._backends[vf.backend]
        with self._undo_create(vf):
            target_backend.create(vf)
            src_path = self._backends[source.backend].data_path(source)

            def over(needed: int) -> Exception:
                return QuotaExceeded(
                    f"{source.describe()} grew while it was copied and no longer fits "
                    f"({format_size(needed)} needed, {format_size(budget)} allowed): delete "
                    "files from it or ask for a larger quota, then clone again"
                )

            try:
                copied = target_backend.copy_into(vf, src_path, budget=budget, on_budget=over)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise QuotaExceeded(
                        f"the clone of {source.describe()} does not fit in its quota of "
                        f"{format_size(quota_bytes or 0)}: clone with a larger quota"
                    ) from None
                raise
            ready = self.store.set_status(vf.id, "ready", expect=("creating",))
        self._remember_usage(vf.id, copied)
        self.log.info("%s cloned %s into %r", vf.owner, source.describe(), vf.name)
        return ready

    # == start and stop ===================================================================
    def ensure_ready(self) -> None:
        """At start: finish purges and undo creations whose process died midway, and mount
        loopback images that are not mounted (after a reboot)."""
        for vf in self.store.in_status(("purging", "creating")):
            with busy(self.root, vf.id, wait=False) as ours:
                if not ours:
                    continue  # a live process is still working on it
                current = self.store.get(vf.id)
                if current is None or current.status != vf.status:
                    continue
                try:
                    # A vfolder still "creating" holds nothing of anyone's yet.
                    self._backends[vf.backend].purge(vf)
                    self.store.remove(vf.id)
                    self.log.info(
                        "finished removing %s (%s, was %s)", vf.describe(), vf.id, vf.status
                    )
                except Exception as exc:
                    self.log.error("could not finish removing %s: %s", vf.id, exc)
                    continue
            drop_busy(self.root, vf.id)
        for vf in self.store.in_status(LIVE):
            backend = self._backends[vf.backend]
            try:
                if not backend.exists(vf):
                    self.log.error(
                        "the storage of %s (%s) is missing: restore it from a backup or "
                        "purge the vfolder",
                        vf.describe(),
                        vf.id,
                    )
                    continue
                backend.ensure_ready(vf)
            except GPUSessionsError as exc:
                self.log.error("%s (%s) is not ready: %s", vf.describe(), vf.id, exc)

    def close(self) -> None:
        """Nothing to release but caches: loopback mounts stay for running kernels."""
        self._clear_ledger()

    # == internals =========================================================================
    def _listing(self, accesses: Iterable[Access]) -> list[dict[str, Any]]:
        """The rows of ``list`` and ``list_trash``: each vfolder with the caller's access."""
        out = []
        for access in accesses:
            data = access.vfolder.to_dict()
            data["permission"] = access.permission.value
            data["relation"] = access.relation
            data["usage"] = self._known_usage(access.vfolder)
            out.append(data)
        return out

    def _check_backend(self, backend: str | None) -> str:
        name = backend or self.default_backend
        if name not in BACKENDS:
            raise InvalidRequest(
                f"vfolder backend {name!r} is not known: use {' or '.join(map(repr, BACKENDS))}"
            )
        return name

    @contextlib.contextmanager
    def _making(self, vfolder_id: str) -> Iterator[None]:
        """``busy`` for a vfolder being created or cloned: when that fails, the vfolder is
        not there, and neither is its lock file."""
        try:
            with busy(self.root, vfolder_id):
                yield
        except BaseException:
            drop_busy(self.root, vfolder_id)
            raise

    @contextlib.contextmanager
    def _undo_create(self, vf: VFolder):
        """Undo a create or clone that failed halfway: its storage (new, so nothing of
        anyone's) and its row."""
        try:
            yield
        except BaseException:
            try:
                self._backends[vf.backend].purge(vf)
                self.store.remove(vf.id)
            except Exception as exc:  # leave the row for ensure_ready to clean
                self.log.error("could not undo the half-created %s: %s", vf.id, exc)
            raise

    def _data_path(self, vf: VFolder) -> str:
        return self._backends[vf.backend].data_path(vf)


def _check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{what} {value!r} must be true or false")
    return value
