"""One scheduling pass: which pending sessions start now, which wait and why.

Each pending session passes three kinds of checks: its dependencies (each must have ended
``TERMINATED`` with exit code 0; a failed one cancels it), its owner's policy limits
(counting what the owner holds plus what this pass already gave them), and free devices
(:meth:`Capacity.place`). The strategy decides the order sessions are tried in:

``fifo``
    Oldest first. Strict: when the head of the queue does not fit, nobody behind it starts
    in this pass — unless the head already failed ``max_head_attempts`` passes, when it is
    passed over so one big request cannot block small ones forever. A head is only said to
    be passed over when someone behind it does start: with nothing smaller behind it, it
    stays first in line.
``drf``
    Dominant resource fairness: the owner with the lowest dominant share (their largest
    fraction of the host's GPUs, CPUs or memory) goes next, with their oldest session that
    fits.

Within a pass capacity only shrinks and usage only grows, so a session that fails a check
once fails it for the rest of the pass: every session is looked at once, and a pass is
linear in the queue (with a heap over owners for ``drf``).
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from ..core.models import Allocation, ResourceRequest
from ..core.policy import Policy
from ..core.status import SessionStatus
from ..core.units import format_size
from .allocator import Capacity, describe_gpus

STRATEGIES = ("fifo", "drf")
# A dependency as a pass reads it: (status, exit code) or (status, exit code, name).
DependencyState = tuple[SessionStatus, int | None] | tuple[SessionStatus, int | None, str]
# Why a dependent is cancelled: reasons start with it, as the API documents.
DEPENDENCY_FAILED = "dependency-failed"
CHECKS = (
    "devices",
    "max_concurrent_sessions",
    "max_gpus",
    "max_cpus",
    "max_memory",
    "dependencies",
)
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class PendingSession:
    id: str
    owner: str
    request: ResourceRequest
    created_at: float
    attempts: int = 0  # passes it was left waiting in (the caller counts them)
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OwnerUsage:
    """What an owner's live (non-pending) sessions hold."""

    sessions: int = 0
    gpus: float = 0.0  # whole-GPU equivalents
    cpus: float = 0.0
    memory: int = 0

    def plus(self, request: ResourceRequest) -> OwnerUsage:
        return OwnerUsage(
            self.sessions + 1,
            self.gpus + request.gpu_equivalent,
            self.cpus + (request.cpus or 0.0),
            self.memory + (request.memory or 0),
        )


@dataclass(frozen=True, slots=True)
class HostTotals:
    """The host's size, the denominators of DRF's shares."""

    gpus: float
    cpus: float
    memory: int


@dataclass(frozen=True, slots=True)
class CheckFailure:
    check: str  # one of CHECKS
    message: str


@dataclass
class PassResult:
    placed: dict[str, list[Allocation]]  # in decision order
    waiting: dict[str, list[CheckFailure]]  # the sessions that stay pending, with why
    cancelled: dict[str, str]  # session id → reason (a dependency failed)
    positions: dict[str, int]  # 1-based queue position of each waiting session
    # The waiting sessions that were tried on devices and did not fit (not those held back
    # by a limit, a dependency, or a FIFO head in front of them).
    attempted: set[str] = field(default_factory=set)
    usage: dict[str, OwnerUsage] = field(default_factory=dict)  # after this pass's placements


def schedule(
    pending: Sequence[PendingSession],
    capacity: Capacity,
    usage: Mapping[str, OwnerUsage],
    policy_for: Callable[[str], Policy],
    dependencies: Mapping[str, DependencyState],
    *,
    strategy: str | SchedulingStrategy = "fifo",
    max_head_attempts: int = 3,
    totals: HostTotals,
) -> PassResult:
    """One pass over ``pending``. Placements are taken from ``capacity`` as they are
    decided, so later decisions see them; ``usage`` is not changed (the result carries the
    updated copy)."""
    chosen = as_strategy(strategy)
    run = _Pass(capacity, usage, policy_for, dependencies, totals)
    order = _oldest_first(pending)
    blocked = run.check_dependencies(order)
    served = chosen.serve(run, order, blocked, max_head_attempts)
    positions = {session_id: n for n, session_id in enumerate(served, 1)}
    return PassResult(run.placed, run.waiting, run.cancelled, positions, run.attempted, run.usage)


class SchedulingStrategy(ABC):
    """The order pending sessions are tried in, within one pass: subclass it and name it in
    ``GPUSessionManager.strategy_class`` to schedule another way. ``serve`` tries sessions
    through the pass's checks (``run.place``-style helpers of :class:`_Pass`) and returns the
    waiting sessions' ids in the order they will be served (their queue positions)."""

    name = ""
    # True: every session tried counts an attempt (FIFO's head-skipping relies on it);
    # False: only each owner's oldest session does (a strategy that tries many per owner).
    attempts_per_session = True

    @abstractmethod
    def serve(
        self,
        run: _Pass,
        order: list[PendingSession],
        blocked: Mapping[str, CheckFailure],
        max_head_attempts: int,
    ) -> list[str]: ...


class FifoStrategy(SchedulingStrategy):
    name = "fifo"

    def serve(self, run, order, blocked, max_head_attempts):
        run.fifo(order, blocked, max_head_attempts)
        return list(run.waiting)  # already in queue order


class DrfStrategy(SchedulingStrategy):
    name = "drf"
    attempts_per_session = False

    def serve(self, run, order, blocked, max_head_attempts):
        run.drf(order, blocked)
        return run.drf_order([p for p in order if p.id in run.waiting])


STRATEGY_CLASSES: dict[str, type[SchedulingStrategy]] = {"fifo": FifoStrategy, "drf": DrfStrategy}
_BY_NAME: dict[str, SchedulingStrategy] = {}


def as_strategy(strategy: str | SchedulingStrategy) -> SchedulingStrategy:
    """A strategy given by name (``fifo``, ``drf``) or as an instance."""
    if isinstance(strategy, SchedulingStrategy):
        return strategy
    if strategy not in STRATEGY_CLASSES:
        raise ValueError(f"unknown scheduling strategy {strategy!r}: use one of {STRATEGIES}")
    if strategy not in _BY_NAME:
        _BY_NAME[strategy] = STRATEGY_CLASSES[strategy]()
    return _BY_NAME[strategy]


def _oldest_first(pending: Sequence[PendingSession]) -> list[PendingSession]:
    """By (created_at, id). Sorting by the float alone is much faster (and linear on the
    store's already ordered queue); ties in created_at are rare but then sorted fully."""
    order = sorted(pending, key=_CREATED)
    if len({p.created_at for p in order}) != len(order):
        order.sort(key=_AGE)
    return order


_CREATED = attrgetter("created_at")
_AGE = attrgetter("created_at", "id")


def _num(value: float) -> str:
    return f"{value:.3g}"


class _Pass:
    def __init__(
        self,
        capacity: Capacity,
        usage: Mapping[str, OwnerUsage],
        policy_for: Callable[[str], Policy],
        dependencies: Mapping[str, DependencyState],
        totals: HostTotals,
    ) -> None:
        self.capacity = capacity
        self.usage = dict(usage)
        self.policy_for = policy_for
        self.dependencies = dependencies
        self.totals = totals
        self.policies: dict[str, Policy | None] = {}  # None: no limits
        self.placed: dict[str, list[Allocation]] = {}
        self.waiting: dict[str, list[CheckFailure]] = {}
        self.cancelled: dict[str, str] = {}
        self.attempted: set[str] = set()
        self.mig_equivalents: dict[str, float] = {}  # profile → GPU equivalent
        self.inverse_totals = tuple(
            1.0 / total if total > 0 else 0.0
            for total in (totals.gpus, totals.cpus, float(totals.memory))
        )
        # Device failures per kind of request, valid while capacity.version is unchanged.
        self.no_fit: dict[tuple, tuple[int, CheckFailure, bool]] = {}
        self.never: dict[tuple, str | None] = {}  # what this host can never run

    # -- dependencies ----------------------------------------------------------------------
    def check_dependencies(self, order: Sequence[PendingSession]) -> dict[str, CheckFailure]:
        """Cancel sessions whose dependencies failed (also through a dependency cancelled
        in this pass); return why the others with unfinished dependencies wait."""
        dependents: dict[str, list[PendingSession]] = {}
        candidates = [p for p in order if p.depends_on]
        for p in candidates:
            for dep in p.depends_on:
                dependents.setdefault(dep, []).append(p)
        waits: dict[str, CheckFailure] = {}
        newly: list[str] = []
        for p in candidates:
            waiting_for = []
            for dep in p.depends_on:
                failed, note = self._dependency(dep)
                if failed:
                    self.cancelled[p.id] = note
                    newly.append(p.id)
                    break
                if note:
                    waiting_for.append(note)
            else:
                if waiting_for:
                    waits[p.id] = CheckFailure("dependencies", "; ".join(waiting_for))
        while newly:
            gone = newly.pop()
            for p in dependents.get(gone, ()):
                if p.id not in self.cancelled:
                    self.cancelled[p.id] = f"{DEPENDENCY_FAILED}: {self._label(gone)} was cancelled"
                    waits.pop(p.id, None)
                    newly.append(p.id)
        return waits

    def _label(self, dep: str) -> str:
        """A dependency as people know it: ``prep (abc123456789)``, or its id."""
        known = self.dependencies.get(dep)
        name = known[2] if known is not None and len(known) > 2 else ""
        short = dep[:12] if len(dep) == 32 else dep
        return f"{name} ({short})" if name else short

    def _dependency(self, dep: str) -> tuple[bool, str]:
        """(failed, why): failed with the reason to cancel (``dependency-failed: …``); else
        why it waits, or ""."""
        known = self.dependencies.get(dep)
        if known is None:
            return False, f"waiting for session {dep}, whose status is not known"
        status, exit_code = SessionStatus(known[0]), known[1]
        failed = f"{DEPENDENCY_FAILED}: {self._label(dep)}"
        if status == SessionStatus.TERMINATED:
            if exit_code == 0:
                return False, ""
            if exit_code is None:
                return True, f"{failed} terminated with an unknown exit code"
            return True, f"{failed} exited with code {exit_code}"
        if status == SessionStatus.CANCELLED:
            return True, f"{failed} was cancelled"
        if status == SessionStatus.ERROR:
            code = "" if exit_code is None else f", exit code {exit_code}"
            return True, f"{failed} failed (ERROR{code})"
        return False, f"waiting for session {self._label(dep)} to finish (it is {status.value})"

    # -- policy ----------------------------------------------------------------------------
    def limits(self, p: PendingSession) -> list[CheckFailure] | None:
        """The owner's limits this session would break (counting this pass's placements)."""
        owner = p.owner
        policy = self.policies.get(owner, _UNKNOWN)
        if policy is _UNKNOWN:
            policy = self.policy_for(owner)
            if policy.max_concurrent_sessions is None and policy.max_gpus is None:
                if policy.max_cpus is None and policy.max_memory is None:
                    policy = None  # unlimited: nothing to check
            self.policies[owner] = policy
        if policy is None:
            return None
        use = self.usage.get(owner, _NO_USAGE)
        request = p.request
        failures: list[CheckFailure] = []
        limit = policy.max_concurrent_sessions
        if limit is not None and use.sessions + 1 > limit:
            failures.append(
                CheckFailure(
                    "max_concurrent_sessions",
                    f"{owner} already has {use.sessions} of {limit} concurrent sessions "
                    "(max_concurrent_sessions)",
                )
            )
        if policy.max_gpus is not None:
            wanted = self.equivalent(request)
            if wanted and use.gpus + wanted > policy.max_gpus + _EPSILON:
                failures.append(
                    CheckFailure(
                        "max_gpus",
                        f"{owner} holds {_num(use.gpus)} of {_num(policy.max_gpus)} GPUs and "
                        f"this asks for {_num(wanted)} more (max_gpus)",
                    )
                )
        if policy.max_cpus is not None and request.cpus:
            if use.cpus + request.cpus > policy.max_cpus + _EPSILON:
                failures.append(
                    CheckFailure(
                        "max_cpus",
                        f"{owner} holds {_num(use.cpus)} of {_num(policy.max_cpus)} CPUs and "
                        f"this asks for {_num(request.cpus)} more (max_cpus)",
                    )
                )
        if policy.max_memory is not None and request.memory:
            if use.memory + request.memory > policy.max_memory:
                failures.append(
                    CheckFailure(
                        "max_memory",
                        f"{owner} holds {format_size(use.memory)} of "
                        f"{format_size(policy.max_memory)} memory and this asks for "
                        f"{format_size(request.memory)} more (max_memory)",
                    )
                )
        return failures or None

    def equivalent(self, request: ResourceRequest) -> float:
        """``request.gpu_equivalent``, without parsing a MIG profile more than once."""
        profile = request.gpu_profile
        if not profile:
            return float(request.gpus or request.gpu_share or 0)
        wanted = self.mig_equivalents.get(profile)
        if wanted is None:
            wanted = self.mig_equivalents[profile] = request.gpu_equivalent
        return wanted

    def add_usage(self, owner: str, request: ResourceRequest) -> None:
        use = self.usage.get(owner, _NO_USAGE)
        self.usage[owner] = OwnerUsage(
            use.sessions + 1,
            use.gpus + self.equivalent(request),
            use.cpus + (request.cpus or 0.0),
            use.memory + (request.memory or 0),
        )

    # -- devices ---------------------------------------------------------------------------
    def try_devices(self, p: PendingSession) -> tuple[list[Allocation] | None, CheckFailure, bool]:
        """(allocations, _, _) if it fits now, else (None, why not, whether it never will)."""
        request = p.request
        key = (request.gpus, request.gpu_profile, request.gpu_share)
        version = self.capacity.version
        known = self.no_fit.get(key)
        if known is not None and known[0] == version:
            return None, known[1], known[2]
        allocations = self.capacity.place(request, p.id)
        if allocations is not None:
            return allocations, _FITS, False
        never = self.never.get(key, "")
        if never == "":
            never = self.never[key] = self.capacity.unsatisfiable(request)
        if never:
            failure = CheckFailure("devices", f"can never start on this host: it {never}")
        else:
            failure = CheckFailure(
                "devices",
                f"waiting for {describe_gpus(request)}: {self.capacity.free_summary(request)}",
            )
        self.no_fit[key] = (version, failure, bool(never))
        return None, failure, bool(never)

    def start(self, p: PendingSession, allocations: list[Allocation]) -> None:
        self.capacity.take(allocations)
        self.placed[p.id] = allocations
        self.add_usage(p.owner, p.request)

    # -- strategies ------------------------------------------------------------------------
    def fifo(
        self,
        order: Sequence[PendingSession],
        blocked: Mapping[str, CheckFailure],
        max_head_attempts: int,
    ) -> None:
        cancelled, waiting = self.cancelled, self.waiting
        behind: CheckFailure | None = None  # set once a head that does not fit blocks
        # Heads let past (id, why it waits, sessions placed before it was): each was only
        # "passed over" if someone behind it then started.
        skipped: list[tuple[str, CheckFailure, int]] = []
        for p in order:
            session_id = p.id
            if session_id in cancelled:
                continue
            failures = self.limits(p)
            if blocked and session_id in blocked:
                failures = [blocked[session_id], *(failures or ())]
            if failures:
                waiting[session_id] = failures
                continue
            if behind is not None:
                waiting[session_id] = [behind]
                continue
            allocations, failure, never = self.try_devices(p)
            if allocations is not None:
                self.start(p, allocations)
                continue
            self.attempted.add(session_id)
            if never:
                waiting[session_id] = [failure]
            elif p.attempts < max_head_attempts:
                waiting[session_id] = [failure]
                behind = CheckFailure(
                    "devices",
                    f"queued behind session {session_id}, first in line and {failure.message}",
                )
            else:
                waiting[session_id] = [
                    CheckFailure(
                        "devices",
                        f"{failure.message} (passed over after {p.attempts} passes, so that "
                        "sessions behind it can start)",
                    )
                ]
                skipped.append((session_id, failure, len(self.placed)))
        for session_id, failure, placed_before in skipped:
            if len(self.placed) == placed_before:
                # Nobody behind it could start either (no smaller request waits): it was
                # not passed over, and does not say so.
                waiting[session_id] = [failure]

    def drf(self, order: Sequence[PendingSession], blocked: Mapping[str, CheckFailure]) -> None:
        waiting, attempted, limits = self.waiting, self.attempted, self.limits
        capacity, no_fit = self.capacity, self.no_fit
        queues: dict[str, deque[PendingSession]] = {}
        for p in order:
            if p.id in self.cancelled:
                continue
            if blocked and p.id in blocked:
                waiting[p.id] = [blocked[p.id], *(limits(p) or ())]
                continue
            queue = queues.get(p.owner)
            if queue is None:
                queue = queues[p.owner] = deque()
            queue.append(p)
        heap = [(self.dominant(owner), q[0].created_at, owner) for owner, q in queues.items()]
        heapq.heapify(heap)
        while heap:
            _, _, owner = heapq.heappop(heap)
            queue = queues[owner]
            while queue:
                p = queue.popleft()
                failures = limits(p)
                if failures:
                    waiting[p.id] = failures
                    continue
                request = p.request
                known = no_fit.get((request.gpus, request.gpu_profile, request.gpu_share))
                if known is not None and known[0] == capacity.version:  # fast path
                    waiting[p.id] = [known[1]]
                    attempted.add(p.id)
                    continue
                allocations, failure, _ = self.try_devices(p)
                if allocations is None:
                    waiting[p.id] = [failure]
                    attempted.add(p.id)
                    continue
                self.start(p, allocations)
                if queue:  # back in line, behind owners that now hold less
                    entry = (self.dominant(owner), queue[0].created_at, owner)
                    heapq.heappush(heap, entry)
                break

    def dominant(self, owner: str) -> float:
        """The owner's largest share of the host's GPUs, CPUs or memory."""
        use = self.usage.get(owner, _NO_USAGE)
        gpus, cpus, memory = self.inverse_totals
        return max(use.gpus * gpus, use.cpus * cpus, use.memory * memory)

    def drf_order(self, waiting: Sequence[PendingSession]) -> list[str]:
        """The order DRF would serve ``waiting`` in (oldest first per owner) were there
        room for all of it: their queue positions."""
        gpus, cpus, memory = self.inverse_totals
        equivalent = self.equivalent
        queues: dict[str, deque[PendingSession]] = {}
        for p in waiting:
            queue = queues.get(p.owner)
            if queue is None:
                queue = queues[p.owner] = deque()
            queue.append(p)
        held: dict[str, list[float]] = {}
        heap = []
        for owner, queue in queues.items():
            use = self.usage.get(owner, _NO_USAGE)
            held[owner] = [use.gpus, use.cpus, float(use.memory)]
            heap.append((self.dominant(owner), queue[0].created_at, owner))
        heapq.heapify(heap)
        served: list[str] = []
        serve, replace = served.append, heapq.heapreplace
        while heap:
            owner = heap[0][2]
            queue = queues[owner]
            p = queue.popleft()
            serve(p.id)
            if not queue:
                heapq.heappop(heap)
                continue
            total = held[owner]
            request = p.request
            total[0] += request.gpus if request.gpus else equivalent(request)
            if request.cpus:
                total[1] += request.cpus
            if request.memory:
                total[2] += request.memory
            share = max(total[0] * gpus, total[1] * cpus, total[2] * memory)
            replace(heap, (share, queue[0].created_at, owner))
        return served


_FITS = CheckFailure("devices", "")
_NO_USAGE = OwnerUsage()
_UNKNOWN = Policy()  # a sentinel: not looked up yet
