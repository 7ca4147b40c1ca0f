"""Which device slots of one host are free, and where a request would go.

A host's GPUs come in two modes. A GPU *not* in MIG mode is handed out whole (``gpus=N``)
or time-sliced in shares (``gpu_share``), never both at once. A GPU in MIG mode is handed
out one MIG instance at a time (``gpu_profile``). :class:`Capacity` keeps, besides who holds
what, the indexes that make every question it answers cheap: runs of untouched GPUs by
length, split GPUs by the room they have left, MIG GPUs by how much of them is in use. A
request that cannot fit now is answered in O(1); a placement costs O(log n) plus a few
list shifts.

Shares are summed in integer millionths of a GPU, so 0.1 + 0.2 + 0.7 fills a GPU exactly
and float drift never lets a GPU be promised more than once.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Sequence

from ..core.models import MIG_SLICES, Allocation, GPUDevice, ResourceRequest

SHARE_UNITS = 1_000_000  # one whole GPU, in the integer units shares are summed in

_SMALLEST_SHARE = SHARE_UNITS // 100  # the smallest share a request may ask for
_SLICES = re.compile(r"^(\d+)g\.")


def share_units(fraction: float) -> int:
    """A share of a GPU in integer millionths: ``0.25`` → ``250000``."""
    return round(fraction * SHARE_UNITS)


def mig_slices(profile: str) -> int:
    """Compute slices of a MIG profile (``"3g.40gb"`` → 3); 1 for a name without them."""
    match = _SLICES.match(profile)
    return int(match.group(1)) if match else 1


def describe_gpus(request: ResourceRequest) -> str:
    """The GPU part of a request, for messages: "2 GPUs", "a 1g.10gb MIG instance"."""
    kind = request.gpu_kind
    if kind == "gpu":
        return f"{request.gpus} GPU" + ("s" if request.gpus != 1 else "")
    if kind == "mig":
        return f"a {request.gpu_profile} MIG instance"
    if kind == "share":
        return f"{_num(request.gpu_share or 0)} of a GPU"
    return "no GPU"


def _num(value: float) -> str:
    return f"{value:.3g}"


class _Instance:
    __slots__ = ("uuid", "profile", "slices", "index", "gpu", "holder")

    def __init__(self, uuid: str, profile: str, index: int, gpu: _Gpu) -> None:
        self.uuid = uuid
        self.profile = profile
        self.slices = mig_slices(profile)
        self.index = index
        self.gpu = gpu
        self.holder: str | None = None


class _Gpu:
    __slots__ = (
        "pos",
        "uuid",
        "index",
        "mig",
        "holder",
        "share_used",
        "share_holders",
        "instances",
        "free_by_profile",
        "mig_used",
    )

    def __init__(self, pos: int, device: GPUDevice) -> None:
        self.pos = pos
        self.uuid = device.uuid
        self.index = device.index
        self.mig = device.mig_enabled
        self.holder: str | None = None  # the session holding it whole
        self.share_used = 0  # in SHARE_UNITS
        self.share_holders: dict[str, int] = {}
        self.instances: list[_Instance] = []
        self.free_by_profile: dict[str, list[tuple[int, str]]] = {}  # (index, uuid), sorted
        self.mig_used = 0  # slices of its MIG instances in use

    @property
    def split(self) -> bool:
        return not self.mig and self.holder is None and self.share_used > 0


class Capacity:
    """A mutable view of which device slots of one host are free.

    ``allocations`` are the slots already held; they are taken as by :meth:`take`, so a
    conflicting set raises :class:`ValueError`. :meth:`place` only proposes slots;
    :meth:`take` applies them and :meth:`release` frees a session's slots.
    """

    def __init__(
        self, devices: Sequence[GPUDevice], allocations: Iterable[Allocation] = ()
    ) -> None:
        ordered = sorted(devices, key=lambda d: (d.index, d.uuid))
        self._gpus: list[_Gpu] = []
        self._by_uuid: dict[str, _Gpu] = {}
        self._instances: dict[str, _Instance] = {}
        self._mig_total: dict[str, int] = {}  # profile → instances
        self._mig_free_count: dict[str, int] = {}
        self._mig_free: dict[str, list[tuple[int, int]]] = {}  # profile → (-used, pos), sorted
        self._split: list[tuple[int, int]] = []  # (room, pos) of split GPUs, sorted
        # Runs of consecutive untouched GPUs (by position): start → length, last → start,
        # starts sorted, and starts per length, so "the smallest run of at least N" is a
        # bisect away.
        self._run_len: dict[int, int] = {}
        self._run_end: dict[int, int] = {}
        self._run_starts: list[int] = []
        self._len_starts: dict[int, list[int]] = {}
        self._lengths: list[int] = []
        self._untouched = 0
        self._held: dict[str, list[Allocation]] = {}
        self._version = 0
        for pos, device in enumerate(ordered):
            if device.uuid in self._by_uuid or device.uuid in self._instances:
                raise ValueError(f"GPU {device.uuid} is listed twice")
            gpu = _Gpu(pos, device)
            self._gpus.append(gpu)
            self._by_uuid[gpu.uuid] = gpu
            for mig in device.mig_instances:
                if mig.uuid in self._instances or mig.uuid in self._by_uuid:
                    raise ValueError(f"MIG instance {mig.uuid} is listed twice")
                instance = _Instance(mig.uuid, mig.profile, mig.index, gpu)
                gpu.instances.append(instance)
                self._instances[mig.uuid] = instance
                insort(gpu.free_by_profile.setdefault(mig.profile, []), (mig.index, mig.uuid))
                self._mig_total[mig.profile] = self._mig_total.get(mig.profile, 0) + 1
                self._mig_free_count[mig.profile] = self._mig_free_count.get(mig.profile, 0) + 1
            self._index(gpu)
        self._plain = sum(1 for g in self._gpus if not g.mig)
        self.take(allocations)

    # -- questions -------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """Changes whenever a slot is taken or released (for caching answers)."""
        return self._version

    def place(self, request: ResourceRequest, session_id: str) -> list[Allocation] | None:
        """The slots ``request`` would get now, without taking them; ``None`` if it does
        not fit now; ``[]`` for a request without GPUs."""
        kind = request.gpu_kind
        if kind is None:
            return []
        if kind == "gpu":
            positions = self._place_whole(request.gpus)
            if positions is None:
                return None
            return [
                Allocation(session_id, self._gpus[p].uuid, self._gpus[p].uuid, "gpu", 1.0)
                for p in positions
            ]
        if kind == "mig":
            instance = self._place_mig(request.gpu_profile or "")
            if instance is None:
                return None
            fraction = instance.slices / MIG_SLICES
            return [Allocation(session_id, instance.gpu.uuid, instance.uuid, "mig", fraction)]
        share = request.gpu_share or 0.0
        gpu = self._place_share(share_units(share))
        if gpu is None:
            return None
        return [Allocation(session_id, gpu.uuid, gpu.uuid, "share", share)]

    def _place_whole(self, count: int) -> list[int] | None:
        if count > self._untouched or count <= 0:
            return None
        # The smallest run of untouched GPUs that holds them all (lowest first among equal
        # runs): keeps long runs whole for larger requests.
        at = bisect_left(self._lengths, count)
        if at < len(self._lengths):
            start = self._len_starts[self._lengths[at]][0]
            return list(range(start, start + count))
        # No run is long enough: the lowest untouched GPUs.
        positions: list[int] = []
        for start in self._run_starts:
            length = self._run_len[start]
            positions.extend(range(start, start + min(length, count - len(positions))))
            if len(positions) == count:
                break
        return positions

    def _place_mig(self, profile: str) -> _Instance | None:
        candidates = self._mig_free.get(profile)
        if not candidates:
            return None
        # The most used GPU with a free instance of the profile (lowest first among equals).
        gpu = self._gpus[candidates[0][1]]
        return self._instances[gpu.free_by_profile[profile][0][1]]

    def _place_share(self, units: int) -> _Gpu | None:
        if units <= 0 or units > SHARE_UNITS:
            return None
        # Best fit: the split GPU with the least room that still has enough.
        at = bisect_left(self._split, (units, -1))
        if at < len(self._split):
            return self._gpus[self._split[at][1]]
        if not self._untouched:
            return None
        # Else break an untouched GPU: the last of the shortest run, so runs that whole-GPU
        # requests need stay long.
        length = self._lengths[0]
        return self._gpus[self._len_starts[length][0] + length - 1]

    def unsatisfiable(self, request: ResourceRequest) -> str | None:
        """Why this host can never satisfy ``request`` (for "This kernel …"), or None."""
        kind = request.gpu_kind
        if kind is None:
            return None
        want = describe_gpus(request)
        total = len(self._gpus)
        if not total:
            return f"asks for {want}, but this host has no GPUs"
        mig = total - self._plain
        profiles = ", ".join(sorted(self._mig_total))
        if kind == "gpu":
            if request.gpus <= self._plain:
                return None
            if not mig:
                return f"asks for {want}, but this host has {self._plain}"
            if not self._plain:
                return f"asks for {want}, but {self._all_mig()}"
            return (
                f"asks for {want}, but this host has {self._plain} not in MIG mode "
                f"(and {mig} in MIG mode, offering {profiles})"
            )
        if kind == "mig":
            if request.gpu_profile in self._mig_total:
                return None
            if not mig:
                return (
                    f"asks for {want}, but no GPU of this host is in MIG mode: ask for whole "
                    "`gpus` or a `gpu_share` instead"
                )
            return (
                f"asks for {want}, but no GPU of this host offers that profile "
                f"(offered: {profiles})"
            )
        units = share_units(request.gpu_share or 0.0)
        if not 0 < units < SHARE_UNITS:
            return f"asks for {want}, but a share must be more than 0 and less than 1"
        if not self._plain:
            return f"asks for {want}, but {self._all_mig()}"
        return None

    def _all_mig(self) -> str:
        total = len(self._gpus)
        which = (
            "the only GPU of this host is" if total == 1 else f"all {total} GPUs of this host are"
        )
        profiles = ", ".join(sorted(self._mig_total))
        return f"{which} in MIG mode: ask for a gpu_profile ({profiles}) instead"

    def free_summary(self, request: ResourceRequest | None = None) -> str:
        """What is free, for people: about the kind ``request`` asks for, or everything."""
        if request is not None:
            kind = request.gpu_kind
            if kind == "gpu":
                return self._whole_summary()
            if kind == "mig":
                return self._mig_summary(request.gpu_profile or "")
            if kind == "share":
                return self._share_summary()
        if not self._gpus:
            return "no GPUs"
        parts = []
        if self._plain:
            parts.append(self._whole_summary())
            if self._split:
                room = self._split[-1][0] / SHARE_UNITS
                parts.append(f"at most {_num(room)} of a shared GPU free")
        for profile in sorted(self._mig_total):
            free, total = self._mig_free_count[profile], self._mig_total[profile]
            parts.append(f"{free} of {total} {profile} instances free")
        return "; ".join(parts)

    def _whole_summary(self) -> str:
        noun = "GPUs" if self._plain == len(self._gpus) else "GPUs not in MIG mode"
        text = f"{self._untouched} of {self._plain} {noun} free"
        if self._split:
            text += f" ({len(self._split)} shared)"
        return text

    def _mig_summary(self, profile: str) -> str:
        free, total = self._mig_free_count.get(profile, 0), self._mig_total.get(profile, 0)
        if not total:
            return f"no GPU offers {profile}"
        if not free:
            return f"no free {profile} instance ({total} in use)"
        return f"{free} of {total} {profile} instances free"

    def _share_summary(self) -> str:
        if self._untouched:
            return f"{self._untouched} whole GPU{'s' if self._untouched != 1 else ''} free"
        room = self._split[-1][0] if self._split else 0
        if room < _SMALLEST_SHARE:
            return "no GPU has room for a share"
        return f"{_num(room / SHARE_UNITS)} of a GPU free at most"

    def free(self) -> dict[str, object]:
        """What is free now, by kind: whole GPUs (untouched, not in MIG mode), MIG
        instances per profile, and the largest share one GPU still has room for."""
        room = 1.0 if self._untouched else (self._split[-1][0] / SHARE_UNITS if self._split else 0)
        return {
            "gpus": self._untouched,
            "gpus_total": self._plain,
            "mig": {
                profile: {"free": self._mig_free_count[profile], "total": total}
                for profile, total in sorted(self._mig_total.items())
            },
            "share_room": round(room, 6) if self._plain else 0.0,
        }

    def holders(self) -> dict[str, list[str]]:
        """Device UUID (a GPU's, or a MIG instance's) → the sessions holding it."""
        held: dict[str, list[str]] = {}
        for gpu in self._gpus:
            if gpu.holder is not None:
                held[gpu.uuid] = [gpu.holder]
            elif gpu.share_holders:
                held[gpu.uuid] = sorted(gpu.share_holders)
            for instance in gpu.instances:
                if instance.holder is not None:
                    held[instance.uuid] = [instance.holder]
        return held

    def allocations(self, session_id: str | None = None) -> list[Allocation]:
        """The slots held (by one session, or by all)."""
        if session_id is not None:
            return list(self._held.get(session_id, ()))
        return [a for held in self._held.values() for a in held]

    # -- changes ---------------------------------------------------------------------------
    def take(self, allocations: Iterable[Allocation]) -> None:
        """Hold ``allocations``: all of them, or — on any conflict with what is held or
        among themselves — none, raising :class:`ValueError`."""
        allocations = list(allocations)
        whole: set[str] = set()
        mig: set[str] = set()
        shares: dict[str, int] = {}
        for a in allocations:
            self._check(a, whole, mig, shares)
        for a in allocations:
            self._apply(a)
        if allocations:
            self._version += 1

    def _check(self, a: Allocation, whole: set[str], mig: set[str], shares: dict[str, int]) -> None:
        who = f"session {a.session_id} cannot take {a.kind} {a.device_uuid}"
        if a.kind == "gpu":
            gpu = self._by_uuid.get(a.device_uuid)
            if gpu is None or a.gpu_uuid != a.device_uuid:
                raise ValueError(f"{who}: no such GPU on this host")
            if gpu.mig:
                raise ValueError(f"{who}: the GPU is in MIG mode")
            if gpu.holder is not None or gpu.uuid in whole:
                raise ValueError(f"{who}: held by session {gpu.holder or a.session_id}")
            if gpu.share_used or gpu.uuid in shares:
                raise ValueError(f"{who}: the GPU carries shares")
            whole.add(gpu.uuid)
        elif a.kind == "mig":
            instance = self._instances.get(a.device_uuid)
            if instance is None or instance.gpu.uuid != a.gpu_uuid:
                raise ValueError(f"{who}: no such MIG instance of GPU {a.gpu_uuid}")
            if instance.holder is not None or instance.uuid in mig:
                raise ValueError(f"{who}: held by session {instance.holder or a.session_id}")
            mig.add(instance.uuid)
        elif a.kind == "share":
            gpu = self._by_uuid.get(a.gpu_uuid)
            if gpu is None or a.gpu_uuid != a.device_uuid:
                raise ValueError(f"{who}: no such GPU on this host")
            if gpu.mig:
                raise ValueError(f"{who}: the GPU is in MIG mode")
            if gpu.holder is not None or gpu.uuid in whole:
                raise ValueError(f"{who}: held whole by session {gpu.holder or a.session_id}")
            units = share_units(a.fraction)
            if units <= 0:
                raise ValueError(f"{who}: a share must be more than 0 of a GPU")
            used = gpu.share_used + shares.get(gpu.uuid, 0)
            if used + units > SHARE_UNITS:
                raise ValueError(
                    f"{who}: {a.fraction:g} of it does not fit, "
                    f"{_num(used / SHARE_UNITS)} is already shared out"
                )
            shares[gpu.uuid] = shares.get(gpu.uuid, 0) + units
        else:
            raise ValueError(f"{who}: unknown kind {a.kind!r} (gpu, mig or share)")

    def _apply(self, a: Allocation) -> None:
        if a.kind == "mig":
            instance = self._instances[a.device_uuid]
            gpu = instance.gpu
            self._unindex(gpu)
            instance.holder = a.session_id
            free = gpu.free_by_profile[instance.profile]
            del free[bisect_left(free, (instance.index, instance.uuid))]
            gpu.mig_used += instance.slices
            self._mig_free_count[instance.profile] -= 1
        else:
            gpu = self._by_uuid[a.gpu_uuid]
            self._unindex(gpu)
            if a.kind == "gpu":
                gpu.holder = a.session_id
            else:
                units = share_units(a.fraction)
                gpu.share_used += units
                gpu.share_holders[a.session_id] = gpu.share_holders.get(a.session_id, 0) + units
        self._index(gpu)
        self._held.setdefault(a.session_id, []).append(a)

    def release(self, session_id: str) -> list[Allocation]:
        """Free every slot ``session_id`` holds; return them (none if it holds none)."""
        held = self._held.pop(session_id, [])
        for a in held:
            if a.kind == "mig":
                instance = self._instances[a.device_uuid]
                gpu = instance.gpu
                self._unindex(gpu)
                instance.holder = None
                insort(gpu.free_by_profile[instance.profile], (instance.index, instance.uuid))
                gpu.mig_used -= instance.slices
                self._mig_free_count[instance.profile] += 1
            else:
                gpu = self._by_uuid[a.gpu_uuid]
                self._unindex(gpu)
                if a.kind == "gpu":
                    gpu.holder = None
                else:
                    units = share_units(a.fraction)
                    gpu.share_used -= units
                    left = gpu.share_holders[session_id] - units
                    if left:
                        gpu.share_holders[session_id] = left
                    else:
                        del gpu.share_holders[session_id]
            self._index(gpu)
        if held:
            self._version += 1
        return held

    # -- indexes ---------------------------------------------------------------------------
    def _index(self, gpu: _Gpu) -> None:
        if gpu.mig:
            for profile, free in gpu.free_by_profile.items():
                if free:
                    insort(self._mig_free.setdefault(profile, []), (-gpu.mig_used, gpu.pos))
        elif gpu.holder is None:
            if gpu.share_used:
                insort(self._split, (SHARE_UNITS - gpu.share_used, gpu.pos))
            else:
                self._run_add(gpu.pos)

    def _unindex(self, gpu: _Gpu) -> None:
        if gpu.mig:
            for profile, free in gpu.free_by_profile.items():
                if free:
                    entries = self._mig_free[profile]
                    del entries[bisect_left(entries, (-gpu.mig_used, gpu.pos))]
        elif gpu.holder is None:
            if gpu.share_used:
                del self._split[bisect_left(self._split, (SHARE_UNITS - gpu.share_used, gpu.pos))]
            else:
                self._run_remove(gpu.pos)

    def _run_add(self, pos: int) -> None:
        start, length = pos, 1
        left = self._run_end.get(pos - 1)
        if left is not None:
            length += self._drop_run(left)
            start = left
        if pos + 1 in self._run_len:
            length += self._drop_run(pos + 1)
        self._add_run(start, length)
        self._untouched += 1

    def _run_remove(self, pos: int) -> None:
        start = self._run_starts[bisect_right(self._run_starts, pos) - 1]
        end = start + self._drop_run(start)
        if pos > start:
            self._add_run(start, pos - start)
        if pos + 1 < end:
            self._add_run(pos + 1, end - pos - 1)
        self._untouched -= 1

    def _add_run(self, start: int, length: int) -> None:
        self._run_len[start] = length
        self._run_end[start + length - 1] = start
        insort(self._run_starts, start)
        starts = self._len_starts.get(length)
        if starts is None:
            self._len_starts[length] = [start]
            insort(self._lengths, length)
        else:
            insort(starts, start)

    def _drop_run(self, start: int) -> int:
        length = self._run_len.pop(start)
        del self._run_end[start + length - 1]
        del self._run_starts[bisect_left(self._run_starts, start)]
        starts = self._len_starts[length]
        del starts[bisect_left(starts, start)]
        if not starts:
            del self._len_starts[length]
            del self._lengths[bisect_left(self._lengths, length)]
        return length
