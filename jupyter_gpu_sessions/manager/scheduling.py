"""Scheduling passes over the shared queue (event-driven on every release, plus a periodic
tick), where a queued session stands, and this manager's health record. The GPU itself is
picked in ``scheduler/allocator.py``; the order sessions are tried in, in
``scheduler/strategies.py``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from typing import TYPE_CHECKING, Any

from ..core.models import Session
from ..core.status import SessionStatus
from ..scheduler import HostTotals, PassDecision

if TYPE_CHECKING:
    pass


class Scheduling:
    """Passes, queue positions and health."""

    async def schedule_now(self) -> PassDecision:
        """One scheduling pass over the whole queue (any process's sessions)."""
        decision = await asyncio.to_thread(self.schedule_pass)
        for session_id in decision.cancelled:
            self._emit(await asyncio.to_thread(self.store.get, session_id), SessionStatus.PENDING)
        if decision.placed or decision.cancelled:
            # Starts waiting on this loop look at once instead of at their next poll.
            wakeup = self._wakeups.pop(asyncio.get_running_loop(), None)
            if wakeup is not None:
                wakeup.set()
        return decision

    async def _queue_news(self, timeout: float) -> None:
        """Until a pass on this loop placed or cancelled someone, or ``timeout``."""
        loop = asyncio.get_running_loop()
        wakeup = self._wakeups.get(loop)
        if wakeup is None:
            wakeup = self._wakeups[loop] = asyncio.Event()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wakeup.wait(), timeout)

    def schedule_pass(self) -> PassDecision:
        started = time.monotonic()
        devices = self.inventory.devices()
        self.refresh_policies()
        policy_for = functools.cache(self.policy_for)  # group look-ups once per owner and pass
        totals = HostTotals(
            gpus=float(len(devices) or 1),
            cpus=float(os.cpu_count() or 1),
            memory=host_memory() or 1,
        )
        with self._pass_lock:
            queue = self._queue
            try:
                decision = self.store.schedule(
                    lambda data: queue.decide(
                        data,
                        devices,
                        policy_for=policy_for,
                        strategy=self.strategy_class()
                        if self.strategy_class
                        else self.scheduler_strategy,
                        max_head_attempts=self.max_head_attempts,
                        totals=totals,
                    ),
                    since=queue.token,
                )
            except BaseException:
                queue.reset()  # the transaction rolled back: the picture may be wrong
                raise
            queue.token = decision.token
        self.pass_count += 1  # queue positions in memory may have moved
        self.last_pass["schedule"] = time.time()
        self.last_pass["schedule_duration"] = time.monotonic() - started
        self.heartbeat(every=5.0)
        return decision

    def queue_message(self, session: Session) -> str:
        """Where a queued session stands and what it waits for, for people: live from this
        process's last pass when it has one, else as stored."""
        return self.queue_position(session)[1]

    def queue_position(self, session: Session) -> tuple[int | None, str]:
        """A queued session's place (None when unknown) and the message that says it."""
        live = self._queue.latest.get(session.id)
        if live is not None:
            failures, position = live
            checks = [(f.check, f.message) for f in failures]
        else:
            data = session.scheduler or {}
            position = data.get("position")
            checks = [(f.get("check", ""), f["message"]) for f in data.get("failed", ())]
        place = f"#{position} in the queue" if position else "in the queue"
        waits = "; ".join(message for _, message in checks) or "the next scheduling pass"
        if checks and all(check == "dependencies" for check, _ in checks):
            # Only its dependencies hold it: what it asks for is not what it waits for.
            return position, f"Queued: {place}, {waits}"
        return position, f"Queued: {place}, waiting for {session.request.describe()}: {waits}"

    def heartbeat(self, every: float = 0.0) -> None:
        """Record this manager's last passes in the store (for scheduler/health), at most
        once per ``every`` seconds."""
        now = time.time()
        if now - self._last_heartbeat < every:
            return
        self._last_heartbeat = now
        try:
            self.admin.heartbeat(
                self.manager_id,
                self.process.host,
                self.process.pid,
                self._started_at,
                dict(self.last_pass),
            )
        except Exception:  # health reporting must never break scheduling
            self.log.warning("Could not record this manager's health", exc_info=True)

    def health(self) -> list[dict[str, Any]]:
        """Every manager that recorded its passes recently (all processes on this store)."""
        self.heartbeat()
        horizon = max(300.0, 3 * self.reconcile_interval)
        return self.admin.managers(seen_since=time.time() - horizon)


def host_memory() -> int | None:
    """The host's physical memory in bytes (None when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
