"""The quota ledger: the one place usage is measured and quotas are checked.

A vfolder's usage is measured by :meth:`QuotaLedger._usage_of` (cached for directory
vfolders, whose count walks every file), an owner's by :meth:`QuotaLedger._stored_by`; every
check (create, update, clone, upload, mount) goes through those two. Uploads in flight are
reserved here, so two uploads in this process cannot both take the last bytes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..core.errors import Conflict, PolicyViolation, QuotaExceeded
from ..core.identity import Identity
from ..core.policy import Policy
from ..core.units import format_size, parse_size
from ..core.vfolders import VFolder
from ..store.vfolders import LIVE
from .backends import disk_full

if TYPE_CHECKING:
    from .service import VFolderService


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
# How long an upload waits for younger uploads holding the room it needs to give way.
UPLOAD_GIVE_WAY_SECONDS = 10.0


@dataclass
class _Upload:
    """One upload's hold on the ledger: the bytes it has reserved so far, and what to tell
    the uploader when it must stop."""

    ledger: VFolderService
    vfolder: VFolder
    shown: str
    credit: int
    limits: list[_Limit]
    written: int = 0
    done: bool = field(default=False, init=False)

    def take(self, size: int) -> None:
        """Reserve ``size`` more bytes before they are written, or refuse them."""
        passed = self.ledger._reserve(self, size)
        if passed is not None:
            raise self.refuse(self.written + size, passed)
        self.written += size  # reserved: released when the hold ends

    def full(self) -> QuotaExceeded:
        """The error for a file system that filled up under the upload: the vfolder's own
        (a loopback vfolder: its quota), or the host's disk under a directory vfolder."""
        if self.ledger.backend(self.vfolder.backend).hard_quota:
            return self.refuse(self.written, self.limits[0] if self.limits else _FULL)
        return disk_full(self.vfolder, f"uploading {self.shown!r}")

    def landed(self) -> None:
        """The file is in place: count it in the vfolder's usage."""
        # Counted in the usage before the upload counts as landed (see _room).
        self.ledger._adjust_usage(self.vfolder.id, self.written - self.credit)
        self.done = True

    def refuse(self, size: int, limit: _Limit) -> QuotaExceeded:
        return QuotaExceeded(
            f"uploading {self.shown!r} ({format_size(size)}) would pass the quota: "
            f"{limit.why}. Delete files or ask for a larger quota."
        )


class QuotaLedger:
    """Usage (measured, cached, adjusted), upload reservations and quota checks; mixed into
    :class:`VFolderService`."""

    def _start_ledger(self) -> None:
        self._lock = threading.Lock()
        self._room_freed = threading.Condition(self._lock)  # told when a reservation ends
        self._uploads: list[_Upload] = []  # in flight in this process, oldest first
        self._usage: dict[str, tuple[float, int]] = {}  # vfolder id → (measured at, bytes)
        self._pending: dict[str, int] = {}  # vfolder id → bytes being uploaded right now
        self._landed: dict[str, int] = {}  # vfolder id → bytes of completed uploads, ever

    def _clear_ledger(self) -> None:
        with self._lock:
            self._usage.clear()
            self._pending.clear()

    # -- usage -----------------------------------------------------------------------------
    def usage(self: VFolderService, who: Identity, name: str, *, fresh: bool = False) -> int:
        """Bytes stored in a vfolder (cached ``usage_cache_seconds`` unless ``fresh``)."""
        return self._usage_of(self._resolve(who, name).vfolder, fresh=fresh)

    def owner_usage(self: VFolderService, username: str) -> dict[str, int]:
        """``count``: the owner's user vfolders (trash included, as the policy counts them);
        ``bytes``: what they store in all of them."""
        owned, stored = self._stored_by(username)
        return {"count": len(owned), "bytes": stored}

    def _stored_by(self: VFolderService, owner: str) -> tuple[list[VFolder], int]:
        """The owner's user vfolders (in any status) and the bytes stored in the live ones
        (trash included): what ``max_vfolder_total_size`` limits."""
        owned = self.store.user_vfolders(owner)
        return owned, sum(self._usage_of(vf) for vf in owned if vf.status in LIVE)

    def _usage_of(self: VFolderService, vf: VFolder, *, fresh: bool = False) -> int:
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

    def _known_usage(self: VFolderService, vf: VFolder) -> int | None:
        """The last known usage, without measuring (None when not counted yet)."""
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

    # -- checks ----------------------------------------------------------------------------
    @staticmethod
    def _check_quota(quota: Any, policy: Policy, type: str) -> int | None:
        """The quota a new (or changed) vfolder asks for, within the owner's policy."""
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

    def _new_quota(self: VFolderService, vf: VFolder, quota: Any) -> int | None:
        """The quota ``vf`` changes to (None when it stays): within the owner's policy, not
        below what a directory vfolder holds, and never smaller for a loopback vfolder."""
        new_quota = self._check_quota(quota, self._policy_for(vf.owner), vf.type)
        if new_quota == vf.quota:
            return None
        if self._backends[vf.backend].hard_quota:
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
        return new_quota

    def _clone_budget(
        self: VFolderService,
        username: str,
        source: VFolder,
        quota: int | None,
        policy: Policy,
    ) -> int | None:
        """The most a clone of ``source`` may copy (None: no limit); refused at once when
        what ``source`` holds now does not fit."""
        used = self._usage_of(source, fresh=True)
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
            _, stored = self._stored_by(username)
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

    def _over_soft_quota(self: VFolderService, vf: VFolder) -> str:
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
                _, stored = self._stored_by(vf.owner)
                if stored > total:
                    return (
                        f"{vf.owner} stores {format_size(stored)} in all their vfolders, "
                        f"more than the {format_size(total)} allowed; it is writable again "
                        "once files are deleted"
                    )
        return ""

    # -- uploads ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _upload_hold(
        self: VFolderService, vf: VFolder, shown: str, credit: int, size_hint: int | None
    ) -> Iterator[_Upload]:
        """Room for an upload of ``shown`` to ``vf``, refused at once when ``size_hint``
        does not fit; the bytes it reserves are released when the hold ends. ``credit``:
        the size of the file it replaces (freed once the new one is in place)."""
        with self._lock:  # before usage is read: a landing in between counts twice (safe side)
            landed = dict(self._landed)
        limits = [
            replace(limit, landed=sum(landed.get(i, 0) for i in limit.ids))
            for limit in self._upload_limits(vf, credit)
        ]
        upload = _Upload(self, vf, shown, credit, limits)
        if size_hint is not None:
            passed = self._passed(limits, size_hint)
            if passed is not None:
                raise upload.refuse(size_hint, passed)
        with self._lock:
            self._uploads.append(upload)
        try:
            yield upload
        finally:
            with self._lock:
                self._uploads.remove(upload)
            self._release(vf.id, upload.written, landed=upload.done)

    def _upload_limits(self: VFolderService, vf: VFolder, credit: int) -> list[_Limit]:
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
                owned, used = self._stored_by(vf.owner)
                # Uploads to the owner's other directory vfolders share this room.
                others = (v.id for v in owned if v.status in LIVE and v.backend == "directory")
                limits.append(
                    _Limit(
                        total - used + credit,
                        tuple({vf.id, *others}),
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

    def _reserve(self, upload: _Upload, size: int) -> _Limit | None:
        """Count ``size`` more bytes of ``upload`` as in flight, unless that passes a limit
        (returned then). Check and count are one step, so two uploads in this process cannot
        both take the last bytes.

        When the room is held by younger uploads in flight, this one waits for them rather
        than failing: the youngest gives way (it is refused) and the older ones go on, so
        uploads that would fit one after another never all fail together."""
        deadline = time.monotonic() + UPLOAD_GIVE_WAY_SECONDS
        with self._lock:
            while True:
                passed = next((lim for lim in upload.limits if self._room(lim) < size), None)
                if passed is None:
                    vfolder_id = upload.vfolder.id
                    self._pending[vfolder_id] = self._pending.get(vfolder_id, 0) + size
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._younger_holders(upload, passed):
                    return passed
                self._room_freed.wait(remaining)

    def _younger_holders(self, upload: _Upload, limit: _Limit) -> bool:
        """Whether uploads that started after ``upload`` hold room of ``limit`` (call with
        the lock held)."""
        index = self._uploads.index(upload)
        return any(u.written and u.vfolder.id in limit.ids for u in self._uploads[index + 1 :])

    def _release(self, vfolder_id: str, size: int, *, landed: bool = False) -> None:
        with self._lock:
            if landed:
                self._landed[vfolder_id] = self._landed.get(vfolder_id, 0) + size
            value = self._pending.get(vfolder_id, 0) - size
            if value > 0:
                self._pending[vfolder_id] = value
            else:
                self._pending.pop(vfolder_id, None)
            self._room_freed.notify_all()
