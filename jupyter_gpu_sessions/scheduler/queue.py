"""A process's in-memory queue between scheduling passes, kept in step with the store.

A pass reads only the sessions whose status changed since this process's last pass (the
store's history), applies them to the queue and to a live :class:`Capacity`, runs the
scheduler, and hands back what to write. When another process changed what this picture
holds (attempts), or anything does not add up, it reads the whole queue again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..core.models import GPUDevice, ResourceRequest
from ..core.passes import PassDecision, PassInput, QueuedSession
from ..core.policy import Policy
from .allocator import Capacity
from .strategies import (
    HostTotals,
    OwnerUsage,
    PendingSession,
    SchedulingStrategy,
    as_strategy,
    schedule,
)


class QueueCache:
    """This process's picture of the queue between scheduling passes: the pending sessions,
    a live :class:`Capacity` and who holds what. A pass updates it from the sessions whose
    status changed (the store's history) instead of reading the whole queue again; when
    another process has written the queue, or anything does not add up, it reloads all."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.token: tuple[int, int] | None = None
        self.devices_key: tuple[str, ...] = ()
        self.capacity: Capacity | None = None
        self.queued: dict[str, QueuedSession] = {}
        self.pending: dict[str, PendingSession] = {}
        self.signature: dict[str, tuple] = {}  # id → the failed checks as last stored
        self.latest: dict[str, tuple] = {}  # id → (failures, position) of the last pass
        self.holding: dict[str, tuple[str, ResourceRequest]] = {}

    @staticmethod
    def _pending(q: QueuedSession) -> PendingSession:
        return PendingSession(q.id, q.owner, q.request, q.created_at, q.attempts, q.depends_on)

    def _load(self, data: PassInput, devices: list[GPUDevice]) -> None:
        key = tuple(d.uuid for d in devices)
        if not data.full and (self.capacity is None or key != self.devices_key):
            data = data.load_full()
        known = set(key) | {m.uuid for d in devices for m in d.mig_instances}
        if not data.full:
            try:
                for session_id in data.changed:
                    self._forget(session_id)
                    self.holding.pop(session_id, None)
                    self.capacity.release(session_id)
                self.capacity.take([a for a in data.allocations if a.device_uuid in known])
            except ValueError:  # the picture does not add up: start from the store again
                data = data.load_full()
            else:
                for q in data.pending:
                    self.queued[q.id] = q
                    self.pending[q.id] = self._pending(q)
                self.holding.update(data.holding)
                return
        self.devices_key = key
        self.capacity = Capacity(devices, [a for a in data.allocations if a.device_uuid in known])
        self.queued = {q.id: q for q in data.pending}
        self.pending = {q.id: self._pending(q) for q in data.pending}
        self.signature = {}
        self.latest = {}
        self.holding = dict(data.holding)

    def _forget(self, session_id: str) -> None:
        self.queued.pop(session_id, None)
        self.pending.pop(session_id, None)
        self.signature.pop(session_id, None)
        self.latest.pop(session_id, None)

    def decide(
        self,
        data: PassInput,
        devices: list[GPUDevice],
        *,
        policy_for: Callable[[str], Policy],
        strategy: str | SchedulingStrategy,
        max_head_attempts: int,
        totals: HostTotals,
    ) -> PassDecision:
        self._load(data, devices)
        usage: dict[str, OwnerUsage] = {}
        for owner, request in self.holding.values():
            usage[owner] = usage.get(owner, OwnerUsage()).plus(request)
        dependencies = data.dependencies({d for p in self.pending.values() for d in p.depends_on})
        result = schedule(
            list(self.pending.values()),
            self.capacity,  # placements are taken from it as they are decided
            usage,
            policy_for,
            dependencies,
            strategy=strategy,
            max_head_attempts=max_head_attempts,
            totals=totals,
        )
        for session_id in result.placed:
            queued = self.queued[session_id]
            self._forget(session_id)
            self.holding[session_id] = (queued.owner, queued.request)
        for session_id in result.cancelled:
            self._forget(session_id)
        attempted = result.attempted
        if not as_strategy(strategy).attempts_per_session:
            # Attempts drive FIFO's head-skipping; DRF tries many sessions of every owner
            # each pass, so there an attempt counts for each owner's oldest session only.
            heads: dict[str, PendingSession] = {}
            for p in self.pending.values():
                head = heads.get(p.owner)
                if head is None or (p.created_at, p.id) < (head.created_at, head.id):
                    heads[p.owner] = p
            attempted = attempted & {p.id for p in heads.values()}
        waiting: dict[str, tuple[dict[str, Any], int | None]] = {}
        for session_id, failures in result.waiting.items():
            queued = self.queued[session_id]
            position = result.positions.get(session_id)
            self.latest[session_id] = (failures, position)
            # Stored: which checks failed (with their messages as of that change) and the
            # attempts. Live numbers — the position, "1 of 4 GPUs free" — change with every
            # release and stay in memory, or every release would rewrite the whole queue.
            checks = tuple(f.check for f in failures)
            known = self.signature.get(session_id)
            if known is None:  # first pass since a full read: compare with what is stored
                stored = json.loads(queued.scheduler_json or "{}").get("failed", ())
                known = tuple(f.get("check") for f in stored)
            self.signature[session_id] = checks
            attempts = None
            if session_id in attempted:  # its devices were tried and did not fit
                attempts = queued.attempts + 1
                self.queued[session_id] = queued = replace(queued, attempts=attempts)
                self.pending[session_id] = self._pending(queued)
            if attempts is not None or checks != known:
                data = {
                    "failed": [{"check": f.check, "message": f.message} for f in failures],
                    "position": position,
                }
                waiting[session_id] = (data, attempts)
        return PassDecision(placed=result.placed, waiting=waiting, cancelled=result.cancelled)
