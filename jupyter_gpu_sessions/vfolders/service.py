"""VFolderService: the vfolder domain (create, share, quota, trash, files, kernel mounts).

Every method is synchronous, thread-safe and may block on the database or the file system:
the server calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import IO, Any

from jupyter_core.paths import jupyter_data_dir
from sqlalchemy import Engine
from traitlets import Enum, Float, Int, Unicode, default
from traitlets.config import LoggingConfigurable

from ..core.errors import (
    Conflict,
    Forbidden,
    GPUSessionsError,
    InvalidRequest,
    NotFound,
    PolicyViolation,
    QuotaExceeded,
)
from ..core.identity import Identity
from ..core.policy import Policy
from ..core.units import format_size, parse_size
from ..core.vfolders import (
    BACKENDS,
    CONTAINER_ROOT,
    VFOLDER_TYPES,
    FileEntry,
    Permission,
    Share,
    VFolder,
    VFolderMount,
    check_vfolder_name,
    is_vfolder_id,
    parse_mount,
)
from ..store.vfolders import LIVE, VFolderStore
from . import files
from .backends import DirectoryBackend, LoopbackBackend, StorageBackend

RELATION_RANK = {"own": 0, "group": 1, "shared": 2}


@dataclass(frozen=True)
class _Limit:
    """Room for an upload: bytes left when it started, the vfolders whose in-flight uploads
    share that room, and what to tell the uploader when it is passed."""

    room: int
    ids: tuple[str, ...]
    why: str
    # Bytes that had landed in ``ids`` (uploads completed) when ``room`` was measured:
    # uploads landing later take from this room too.
    landed: int = 0


_FULL = _Limit(0, (), "the vfolder's file system is full")


@dataclass(frozen=True)
class Access:
    """What the caller may do with one vfolder, and why."""

    vfolder: VFolder
    permission: Permission
    relation: str  # own | group | shared
    share: Share | None = None


class VFolderService(LoggingConfigurable):
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
            "directory": DirectoryBackend(self.root, uid=uid, gid=gid),
            "loopback": LoopbackBackend(self.root, uid=uid, gid=gid),
        }
        self._lock = threading.Lock()
        self._usage: dict[str, tuple[float, int]] = {}  # vfolder id → (measured at, bytes)
        self._pending: dict[str, int] = {}  # vfolder id → bytes being uploaded right now
        self._landed: dict[str, int] = {}  # vfolder id → bytes of completed uploads, ever

    def _host_dir(self, vf: VFolder) -> str:
        """Where the vfolder's storage lives on the host (no side effect such as a mount):
        a kernel's mount of it has this path or one below it as its source."""
        if vf.backend == "loopback":
            return os.path.join(self.root, "mounts", vf.id)
        return os.path.join(self.root, "dirs", vf.id)

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
        with self._busy(vfolder.id):
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
        out = []
        for access in self._visible(who):
            data = access.vfolder.to_dict()
            data["permission"] = access.permission.value
            data["relation"] = access.relation
            data["usage"] = self._known_usage(access.vfolder)
            out.append(data)
        return out

    def list_trash(self, who: Identity) -> list[dict[str, Any]]:
        """The caller's trashed vfolders (for admins, trashed project vfolders too)."""
        out = []
        for access in self._visible(who, statuses=("trashed",), manageable=True):
            data = access.vfolder.to_dict()
            data["permission"] = access.permission.value
            data["relation"] = access.relation
            data["usage"] = self._known_usage(access.vfolder)
            out.append(data)
        return out

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
            new_quota = self._check_quota(quota, self._policy_for(vf.owner), vf.type)
            if new_quota != vf.quota:
                backend = self._backends[vf.backend]
                if backend.hard_quota:
                    if vf.quota is not None and new_quota < vf.quota:
                        raise Conflict(
                            f"loopback vfolders can only grow: {vf.describe()} has a quota of "
                            f"{format_size(vf.quota)}; clone it into a smaller vfolder if "
                            "you need one"
                        )
                else:
                    used = self._usage_of(vf, fresh=True)
                    if used > new_quota:
                        raise Conflict(
                            f"{vf.describe()} holds {format_size(used)}, more than the new "
                            f"quota of {format_size(new_quota)}: delete files first, or ask "
                            f"for at least {format_size(used)}"
                        )
                backend.set_quota(vf, new_quota)
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
        kernels = self._mounted_by(self._host_dir(access.vfolder)) if self._mounted_by else []
        if kernels:
            raise Conflict(
                f"{access.vfolder.describe()} is still mounted in {len(kernels)} running "
                f"kernel(s) ({', '.join(k[:12] for k in kernels)}): shut them down, then "
                "purge it"
            )
        with self._busy(access.vfolder.id):
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
        self._drop_busy(vf.id)
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
        used = self._usage_of(source, fresh=True)
        budget = self._clone_budget(who.username, source, used, quota_bytes, policy)
        with self._busy(vf.id):
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
            dst_path = target_backend.data_path(vf)

            def over(needed: int) -> Exception:
                return QuotaExceeded(
                    f"{source.describe()} grew while it was copied and no longer fits "
                    f"({format_size(needed)} needed, {format_size(budget)} allowed): delete "
                    "files from it or ask for a larger quota, then clone again"
                )

            try:
                with files.open_root(src_path) as sfd, files.open_root(dst_path) as dfd:
                    copied = files.copy_tree(
                        sfd, dfd, budget=budget, chown=target_backend.chown, on_budget=over
                    )
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

    # == sharing ===========================================================================
    def invite(self, who: Identity, name: str, user: str, permission: str | Permission) -> Share:
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

    def invitations(self, who: Identity) -> dict[str, list[dict[str, Any]]]:
        """``received``: invitations waiting for the caller's answer; ``sent``: every share
        of the caller's vfolders, in any state."""
        received = [
            _share_dict(s, v)
            for s, v in self.store.shares_received(who.username)
            if s.state == "invited" and v.status == "ready"
        ]
        sent = [_share_dict(s, v) for s, v in self.store.shares_sent(who.username)]
        return {"received": received, "sent": sent}

    def accept(self, who: Identity, share_id: str) -> Share:
        share, _ = self._own_invitation(who, share_id)
        if share.state == "declined":
            raise Conflict(
                "you declined this invitation: ask the vfolder's owner to invite you again"
            )
        if share.state == "accepted":
            return share
        return self.store.update_share(share.id, state="accepted")

    def decline(self, who: Identity, share_id: str) -> Share:
        """Decline an invitation, or leave a share accepted earlier."""
        share, _ = self._own_invitation(who, share_id)
        if share.state == "declined":
            return share
        return self.store.update_share(share.id, state="declined")

    def shares(self, who: Identity, name: str) -> list[Share]:
        """A vfolder's shares: all of them for its owner (admins for project vfolders), the
        caller's own otherwise."""
        access = self._resolve(who, name)
        shares = self.store.shares_of(access.vfolder.id)
        if self._manages(who, access.vfolder):
            return shares
        return [s for s in shares if s.user == who.username]

    def set_permission(
        self, who: Identity, name: str, user: str, permission: str | Permission
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

    def revoke(self, who: Identity, name: str, user: str) -> None:
        """Take back ``user``'s share (or invitation, or project override)."""
        access = self._resolve(who, name)
        self._require_manager(who, access, "revoke shares of")
        if not self.store.delete_share(access.vfolder.id, str(user)):
            raise NotFound(f"{access.vfolder.describe()} is not shared with {user!r}")
        self.log.info("%s revoked %s's share of %s", who.username, user, access.vfolder.id)

    # == files =============================================================================
    def list_files(self, who: Identity, name: str, path: str = "") -> list[FileEntry]:
        vf, _, where = self._for_files(who, name, Permission.RO, "list files in")
        parts = files.split_path(path)
        with files.open_root(self._data_path(vf)) as root, files.open_dir(root, parts, where) as d:
            return files.list_dir(d)

    def open_download(self, who: Identity, name: str, path: str) -> tuple[IO[bytes], int, str]:
        """An open binary file (the caller closes it), its size and its file name."""
        vf, _, where = self._for_files(who, name, Permission.RO, "download from")
        parts = files.split_path(path)
        if not parts:
            raise InvalidRequest("give the path of a file to download, such as 'results.csv'")
        with files.open_root(self._data_path(vf)) as root:
            with files.open_dir(root, parts[:-1], where) as parent:
                fd = files.open_file(parent, parts[-1], parts, where)
        handle = os.fdopen(fd, "rb")
        return handle, os.fstat(fd).st_size, parts[-1]

    def upload(
        self,
        who: Identity,
        name: str,
        path: str,
        chunks: Iterable[bytes],
        *,
        size_hint: int | None = None,
        overwrite: bool = True,
    ) -> FileEntry:
        """Store a file streamed in ``chunks``: written to a temporary file next to the
        target and renamed into place, so a failed or refused upload leaves nothing behind
        (and an overwritten file stays whole until the new one is complete)."""
        vf, _, where = self._for_files(who, name, Permission.RW, "upload to")
        parts = files.split_path(path)
        if not parts:
            raise InvalidRequest("give the path of the file to upload, such as 'data.csv'")
        if size_hint is not None and (
            isinstance(size_hint, bool) or not isinstance(size_hint, int) or size_hint < 0
        ):
            raise InvalidRequest(f"size_hint {size_hint!r} must be a number of bytes, 0 or more")
        shown = files.shown(parts)
        with files.open_root(self._data_path(vf)) as root, contextlib.ExitStack() as stack:
            try:
                parent = stack.enter_context(files.open_dir(root, parts[:-1], where))
            except NotFound as exc:
                folder = files.shown(parts[:-1])
                raise NotFound(f"{exc.message}: make the folder {folder!r} first (mkdir)") from None
            return self._upload_into(
                vf, parent, parts[-1], shown, where, chunks, size_hint, overwrite
            )

    def mkdir(self, who: Identity, name: str, path: str, parents: bool = False) -> FileEntry:
        """Make a directory; with ``parents`` also its missing parents (and an existing
        directory is fine)."""
        vf, _, where = self._for_files(who, name, Permission.RW, "make directories in")
        parts = files.split_path(path)
        if not parts:
            raise InvalidRequest("give the path of the directory to make, such as 'results'")
        with files.open_root(self._data_path(vf)) as root:
            if not parents:
                with files.open_dir(root, parts[:-1], where) as parent:
                    return self._make_dir(vf, parent, parts, where, exist_ok=False)
            opened: list[int] = []
            fd = root
            try:
                for i in range(len(parts)):
                    entry = self._make_dir(vf, fd, parts[: i + 1], where, exist_ok=True)
                    if i < len(parts) - 1:
                        fd = files.open_child(fd, parts[: i + 1], where)
                        opened.append(fd)
                return entry
            finally:
                for o in opened:
                    os.close(o)

    def delete_file(self, who: Identity, name: str, path: str, recursive: bool = False) -> None:
        """Delete a file, a symlink (not what it points to) or a directory (``recursive``
        when it is not empty)."""
        vf, _, where = self._for_files(who, name, Permission.WD, "delete files in")
        parts = files.split_path(path)
        if not parts:
            raise InvalidRequest(
                "the vfolder's root cannot be deleted as a file: delete the vfolder instead"
            )
        shown = files.shown(parts)
        with files.open_root(self._data_path(vf)) as root:
            with files.open_dir(root, parts[:-1], where) as parent:
                st = files.lstat_at(parent, parts[-1])
                if st is None:
                    raise NotFound(f"there is no {shown!r} in {where}")
                try:
                    if stat.S_ISDIR(st.st_mode):
                        if recursive:
                            files.remove_tree(parent, parts[-1])
                        else:
                            os.rmdir(parts[-1], dir_fd=parent)
                    else:
                        os.unlink(parts[-1], dir_fd=parent)
                except OSError as exc:
                    if exc.errno == errno.ENOTEMPTY:
                        raise Conflict(
                            f"directory {shown!r} in {where} is not empty: delete it with "
                            "recursive=True to remove everything in it"
                        ) from None
                    if exc.errno == errno.ENOENT:
                        raise NotFound(f"there is no {shown!r} in {where}") from None
                    raise
        self._forget_usage(vf.id)

    # == usage and mounts ==================================================================
    def usage(self, who: Identity, name: str, *, fresh: bool = False) -> int:
        """Bytes stored in a vfolder (cached ``usage_cache_seconds`` unless ``fresh``)."""
        return self._usage_of(self._resolve(who, name).vfolder, fresh=fresh)

    def owner_usage(self, username: str) -> dict[str, int]:
        """``count``: the owner's user vfolders (trash included, as the policy counts them);
        ``bytes``: what they store in all of them."""
        owned = self.store.user_vfolders(username)
        total = 0
        for vf in owned:
            if vf.status in LIVE:
                total += self._usage_of(vf)
        return {"count": len(owned), "bytes": total}

    def resolve_mounts(self, who: Identity, specs: Iterable[str] | None) -> list[VFolderMount]:
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

    def ensure_ready(self) -> None:
        """At start: finish purges and undo creations whose process died midway, and mount
        loopback images that are not mounted (after a reboot)."""
        for vf in self.store.in_status(("purging", "creating")):
            with self._busy(vf.id, wait=False) as ours:
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
            self._drop_busy(vf.id)
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
        with self._lock:
            self._usage.clear()
            self._pending.clear()

    # == internals =========================================================================
    def _visible(
        self,
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
        self, who: Identity, name: str, *, statuses=("ready",), manageable=False
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

    def _resolve_trashed(self, who: Identity, name: str, *, purging: bool = False) -> Access:
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

    def _own_trashed(self, who: Identity, name: str) -> bool:
        return any(
            a.vfolder.name == name or a.vfolder.id == name
            for a in self._visible(who, statuses=("trashed",), manageable=True)
        )

    @staticmethod
    def _manages(who: Identity, vf: VFolder) -> bool:
        if vf.type == "project":
            return who.is_admin
        return vf.owner == who.username

    def _require_manager(self, who: Identity, access: Access, action: str) -> None:
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
        self, who: Identity, name: str, needed: Permission, action: str
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

    def _check_backend(self, backend: str | None) -> str:
        name = backend or self.default_backend
        if name not in BACKENDS:
            raise InvalidRequest(
                f"vfolder backend {name!r} is not known: use {' or '.join(map(repr, BACKENDS))}"
            )
        return name

    @staticmethod
    def _check_quota(quota: Any, policy: Policy, type: str) -> int | None:
        if quota is None or quota == "":
            return policy.max_vfolder_size
        size = parse_size(quota, what="quota")
        limit = policy.max_vfolder_size
        if type == "user" and limit is not None and size > limit:
            raise PolicyViolation(
                f"quota {format_size(size)} is more than your policy allows for one vfolder "
                f"(max_vfolder_size = {format_size(limit)}): ask for {format_size(limit)} or "
                "less, or ask an admin for a higher limit"
            )
        return size

    def _check_other_user(self, who: Identity, user: Any, vf: VFolder) -> str:
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

    def _own_invitation(self, who: Identity, share_id: Any) -> tuple[Share, VFolder]:
        share = self.store.get_share(share_id) if isinstance(share_id, str) else None
        vf = self.store.get(share.vfolder_id) if share else None
        if share is None or share.user != who.username or vf is None or vf.status != "ready":
            raise NotFound(
                f"no invitation {share_id!r} for you: list yours with invitations (received)"
            )
        return share, vf

    @contextlib.contextmanager
    def _busy(self, vfolder_id: str, *, wait: bool = True) -> Iterator[bool]:
        """Held while a vfolder is created, cloned or purged. A file lock, so that another
        process (``ensure_ready``) can tell a live operation from one whose process died:
        the lock goes with the process. Yields whether it was taken."""
        # The root first, so that it is made private (0700): other host users must not
        # reach vfolder files. Kernels see their vfolders through bind mounts, not this path.
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        locks = os.path.join(self.root, "locks")
        os.makedirs(locks, mode=0o700, exist_ok=True)
        with open(os.path.join(locks, f"{vfolder_id}.busy"), "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _drop_busy(self, vfolder_id: str) -> None:
        # Whoever still waits on the unlinked file re-reads the vfolder's status first.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.root, "locks", f"{vfolder_id}.busy"))

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

    def _make_dir(
        self, vf: VFolder, parent: int, parts: list[str], where: str, *, exist_ok: bool
    ) -> FileEntry:
        leaf, shown = parts[-1], files.shown(parts)
        try:
            os.mkdir(leaf, 0o755, dir_fd=parent)
            self._backends[vf.backend].chown(leaf, dir_fd=parent)
        except FileExistsError:
            st = files.lstat_at(parent, leaf)
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise InvalidRequest(
                    f"{shown!r} in {where} is a symbolic link: links inside a vfolder are "
                    "never followed by the server"
                ) from None
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise Conflict(f"{shown!r} exists in {where} and is not a directory") from None
            if not exist_ok:
                raise Conflict(
                    f"{shown!r} already exists in {where} (pass parents=True to accept an "
                    "existing directory)"
                ) from None
        except OSError as exc:
            raise self._write_error(exc, vf, where) from None
        return files.entry_of(leaf, os.lstat(leaf, dir_fd=parent))

    # -- usage -----------------------------------------------------------------------------
    def _usage_of(self, vf: VFolder, *, fresh: bool = False) -> int:
        backend = self._backends[vf.backend]
        if backend.hard_quota:
            return backend.usage(vf)  # statvfs: cheap and exact
        now = time.monotonic()
        with self._lock:
            cached = self._usage.get(vf.id)
        if not fresh and cached and now - cached[0] < self.usage_cache_seconds:
            return cached[1]
        used = backend.usage(vf)
        self._remember_usage(vf.id, used, at=now)
        return used

    def _known_usage(self, vf: VFolder) -> int | None:
        backend = self._backends[vf.backend]
        if backend.hard_quota:
            return backend.usage_if_ready(vf)
        with self._lock:
            cached = self._usage.get(vf.id)
        return cached[1] if cached else None

    def _remember_usage(self, vfolder_id: str, used: int, *, at: float | None = None) -> None:
        with self._lock:
            self._usage[vfolder_id] = (time.monotonic() if at is None else at, used)

    def _adjust_usage(self, vfolder_id: str, delta: int) -> None:
        with self._lock:
            cached = self._usage.get(vfolder_id)
            if cached:
                self._usage[vfolder_id] = (cached[0], max(0, cached[1] + delta))

    def _forget_usage(self, vfolder_id: str) -> None:
        with self._lock:
            self._usage.pop(vfolder_id, None)

    def _release(self, vfolder_id: str, size: int, *, landed: bool = False) -> None:
        with self._lock:
            if landed:
                self._landed[vfolder_id] = self._landed.get(vfolder_id, 0) + size
            value = self._pending.get(vfolder_id, 0) - size
            if value > 0:
                self._pending[vfolder_id] = value
            else:
                self._pending.pop(vfolder_id, None)

    def _upload_limits(self, vf: VFolder, credit: int) -> list[_Limit]:
        """The limits an upload to ``vf`` must stay within. ``credit``: the size of the file
        it replaces (freed once the new one is in place)."""
        backend = self._backends[vf.backend]
        limits: list[_Limit] = []
        if backend.hard_quota:
            free = backend.free(vf)
            if free is not None:
                # No credit: the old file stays until the new one is complete.
                limits.append(
                    _Limit(
                        free,
                        (vf.id,),
                        f"vfolder {vf.name!r} has {format_size(free)} free of its "
                        f"{format_size(vf.quota or 0)} quota",
                    )
                )
        elif vf.quota is not None:
            used = self._usage_of(vf)
            limits.append(
                _Limit(
                    vf.quota - used + credit,
                    (vf.id,),
                    f"vfolder {vf.name!r} uses {format_size(used)} of its "
                    f"{format_size(vf.quota)} quota",
                )
            )
        if vf.type == "user":
            total = self._policy_for(vf.owner).max_vfolder_total_size
            if total is not None:
                owned = [v for v in self.store.user_vfolders(vf.owner) if v.status in LIVE]
                used = sum(self._usage_of(v) for v in owned)
                limits.append(
                    _Limit(
                        total - used + credit,
                        tuple({vf.id, *(v.id for v in owned if v.backend == "directory")}),
                        f"{vf.owner} stores {format_size(used)} in all their vfolders, of "
                        f"{format_size(total)} allowed (max_vfolder_total_size)",
                    )
                )
        return limits

    def _passed(self, limits: list[_Limit], size: int) -> _Limit | None:
        """The first limit ``size`` more bytes would pass, counting in-flight uploads."""
        with self._lock:
            for limit in limits:
                if self._room(limit) < size:
                    return limit
        return None

    def _room(self, limit: _Limit) -> int:
        """What is left of ``limit`` now (call with the lock held): less the uploads in
        flight, and less those that completed since the room was measured."""
        landed = sum(self._landed.get(i, 0) for i in limit.ids) - limit.landed
        return limit.room - landed - sum(self._pending.get(i, 0) for i in limit.ids)

    def _reserve(self, limits: list[_Limit], vfolder_id: str, size: int) -> _Limit | None:
        """Count ``size`` bytes as being uploaded to ``vfolder_id``, unless that passes a
        limit (returned then). Check and count are one step, so two uploads in this process
        cannot both take the last bytes."""
        with self._lock:
            for limit in limits:
                if self._room(limit) < size:
                    return limit
            self._pending[vfolder_id] = self._pending.get(vfolder_id, 0) + size
        return None

    def _clone_budget(
        self, username: str, source: VFolder, used: int, quota: int | None, policy: Policy
    ) -> int | None:
        limits = []
        if quota is not None:
            if used > quota:
                raise QuotaExceeded(
                    f"{source.describe()} holds {format_size(used)}, more than the clone's "
                    f"quota of {format_size(quota)}: clone with a quota of at least "
                    f"{format_size(used)}"
                    + (
                        f" (your policy allows up to {format_size(policy.max_vfolder_size)})"
                        if policy.max_vfolder_size
                        else ""
                    )
                )
            limits.append(quota)
        if policy.max_vfolder_total_size is not None:
            stored = self.owner_usage(username)["bytes"]
            room = policy.max_vfolder_total_size - stored
            if used > room:
                raise QuotaExceeded(
                    f"cloning {source.describe()} ({format_size(used)}) would pass your storage "
                    f"quota: you store {format_size(stored)} of "
                    f"{format_size(policy.max_vfolder_total_size)} "
                    "(max_vfolder_total_size); purge or delete files first"
                )
            limits.append(room)
        return min(limits) if limits else None

    def _over_soft_quota(self, vf: VFolder) -> str:
        """Why a directory vfolder must be mounted read-only, or ``""``."""
        backend = self._backends[vf.backend]
        if backend.hard_quota:
            return ""
        if vf.quota is not None:
            used = self._usage_of(vf)
            if used > vf.quota:
                return (
                    f"it holds {format_size(used)}, more than its {format_size(vf.quota)} "
                    "quota; it is writable again once files are deleted"
                )
        if vf.type == "user":
            total = self._policy_for(vf.owner).max_vfolder_total_size
            if total is not None:
                stored = self.owner_usage(vf.owner)["bytes"]
                if stored > total:
                    return (
                        f"{vf.owner} stores {format_size(stored)} in all their vfolders, "
                        f"more than the {format_size(total)} allowed; it is writable again "
                        "once files are deleted"
                    )
        return ""

    def _write_error(self, exc: OSError, vf: VFolder, where: str) -> Exception:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return QuotaExceeded(
                f"{where} is full (its quota is {format_size(vf.quota or 0)}): delete files "
                "or ask for a larger quota"
            )
        return exc

    def _upload_into(
        self,
        vf: VFolder,
        parent: int,
        leaf: str,
        shown: str,
        where: str,
        chunks: Iterable[bytes],
        size_hint: int | None,
        overwrite: bool,
    ) -> FileEntry:
        existing = files.lstat_at(parent, leaf)
        credit = 0
        if existing is not None:
            if stat.S_ISLNK(existing.st_mode):
                raise InvalidRequest(
                    f"{shown!r} in {where} is a symbolic link: the server never writes through "
                    "links; delete the link first or upload elsewhere"
                )
            if stat.S_ISDIR(existing.st_mode):
                raise InvalidRequest(f"{shown!r} in {where} is a directory")
            if not overwrite:
                raise Conflict(f"{shown!r} already exists in {where}: pass overwrite=True")
            credit = existing.st_size if stat.S_ISREG(existing.st_mode) else 0
        with self._lock:  # before usage is read: a landing in between counts twice (safe side)
            landed = dict(self._landed)
        limits = [
            replace(limit, landed=sum(landed.get(i, 0) for i in limit.ids))
            for limit in self._upload_limits(vf, credit)
        ]

        def refuse(size: int, limit: _Limit) -> QuotaExceeded:
            return QuotaExceeded(
                f"uploading {shown!r} ({format_size(size)}) would pass the quota: "
                f"{limit.why}. Delete files or ask for a larger quota."
            )

        if size_hint is not None:
            passed = self._passed(limits, size_hint)
            if passed is not None:
                raise refuse(size_hint, passed)
        backend = self._backends[vf.backend]
        temp = f".upload-{uuid.uuid4().hex}.part"
        written = 0
        done = False
        fd = os.open(
            temp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=parent,
        )
        try:
            backend.chown(fd)
            for chunk in chunks:
                if not chunk:
                    continue
                passed = self._reserve(limits, vf.id, len(chunk))
                if passed is not None:
                    raise refuse(written + len(chunk), passed)
                written += len(chunk)  # reserved: released in finally
                try:
                    files.write_all(fd, chunk)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise refuse(written, limits[0] if limits else _FULL) from None
                    raise
            os.fsync(fd)
            st = os.fstat(fd)
            if overwrite:
                os.replace(temp, leaf, src_dir_fd=parent, dst_dir_fd=parent)
            else:
                try:
                    # link() never replaces: a file that appeared meanwhile is kept.
                    os.link(temp, leaf, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
                except FileExistsError:
                    raise Conflict(
                        f"{shown!r} already exists in {where}: pass overwrite=True"
                    ) from None
                os.unlink(temp, dir_fd=parent)
            # Counted in the usage before the upload counts as landed (see _room).
            self._adjust_usage(vf.id, written - credit)
            done = True
        except IsADirectoryError:
            raise InvalidRequest(f"{shown!r} in {where} is a directory") from None
        finally:
            os.close(fd)
            self._release(vf.id, written, landed=done)
            if not done:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=parent)
        return files.entry_of(leaf, st)


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


def _share_dict(share: Share, vf: VFolder) -> dict[str, Any]:
    data = share.to_dict()
    data.update(vfolder_name=vf.name, vfolder_owner=vf.owner, vfolder_type=vf.type)
    if vf.group:
        data["vfolder_group"] = vf.group
    return data


def _check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{what} {value!r} must be true or false")
    return value
