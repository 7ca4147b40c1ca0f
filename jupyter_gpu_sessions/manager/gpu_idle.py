"""GPU-aware idle reclaim: kernels that hold GPUs and leave them idle are warned, then ended.

A kernel holding GPUs (whole, MIG instances, shares) whose own processes kept them under
its owner's ``gpu_idle_threshold`` (percent of SM time, from the per-session use of
:mod:`.gpu_usage`) for the owner's ``gpu_idle_window`` is warned, and ended with reason
``gpu-idle: …`` (its devices freed) when it is still idle after a grace
(``gpu_idle_grace``). A reading at or above the threshold, or a restart, starts the clock
over and withdraws a warning. A busy cell on the CPU leaves the GPU idle: that counts.

A warning reaches its owner twice:

- as a history entry of the session that keeps its status (``gpu-idle-warning: …``), which
  every process on the store reads: the events websocket turns it into a
  ``gpu-idle-warning`` message, in an embedded server as in a user's server of the
  manager service;
- as ``kernel-notice.json`` in the session's state directory (mounted into the container):
  the kernel-side package's watcher thread prints it in the notebook, also while a cell
  runs (``kernel/notices.py``).

The checks run on a thread of their own (its own event loop) every
``gpu_idle_check_interval`` seconds, only for kernels this process supervises (it started
or adopted them), and read the GPUs through the same cached sweep as the API's views.
A GPU that does not report per-process utilization never gets its kernel reclaimed.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING

from ..core.errors import GPUSessionsError, InvalidRequest
from ..core.gpu_idle import (
    WARNING,
    WITHDRAWN,
    Decision,
    GPUIdleClock,
    ended_reason,
    warning_reason,
    withdrawn_reason,
)
from ..core.models import Session
from ..core.status import SessionStatus
from ..core.units import parse_duration
from .api_access import write_kernel_file
from .gpu_usage import GPUUsage
from .lifecycle import same_process

if TYPE_CHECKING:
    from . import GPUSessionManager

# Read by the kernel-side watcher (kernel/notices.py): one notice, replaced by the next.
NOTICE_JSON = "kernel-notice.json"


def parse_grace(text: str) -> tuple[str, float]:
    """``"10%"`` → ``("percent", 10.0)``; ``"2m"`` → ``("seconds", 120.0)``."""
    value = str(text).strip()
    if value.endswith("%"):
        try:
            percent = float(value[:-1])
        except ValueError:
            percent = -1.0
        if not 0 < percent <= 100:
            raise InvalidRequest(
                f"gpu_idle_grace {text!r}: a percent of the window must be above 0 and at "
                'most 100, e.g. "10%"'
            )
        return "percent", percent
    return "seconds", parse_duration(value, what="gpu_idle_grace")


class GPUIdleReclaim:
    """The GPU-idle monitor; mixed into :class:`GPUSessionManager`."""

    def _init_gpu_idle(self: GPUSessionManager) -> None:
        self._gpu_usage: GPUUsage | None = None
        self._gpu_idle_thread: threading.Thread | None = None
        self._gpu_idle_stopping = threading.Event()
        self._gpu_idle_clocks: dict[str, GPUIdleClock] = {}
        self._gpu_idle_said: set[str] = set()  # things logged once (per session, per owner)
        # Restarts per session (a restart may keep its container): part of a kernel's run.
        self._gpu_idle_restarts: dict[str, int] = {}

    @property
    def gpu_usage(self: GPUSessionManager) -> GPUUsage:
        """Per-session GPU use: one sweep, shared by the API's views and the idle monitor."""
        with self._lock:
            if self._gpu_usage is None:
                self._gpu_usage = GPUUsage(self)
            return self._gpu_usage

    def note_kernel_restart(self: GPUSessionManager, session_id: str) -> None:
        """The session's kernel is being restarted: its idle time so far does not count."""
        self._gpu_idle_restarts[session_id] = self._gpu_idle_restarts.get(session_id, 0) + 1

    def _gpu_idle_run(self: GPUSessionManager, session: Session) -> str:
        return f"{session.container_id}/{self._gpu_idle_restarts.get(session.id, 0)}"

    def gpu_idle_grace_for(self: GPUSessionManager, window: float) -> float:
        """Seconds a warned kernel has to use its GPU: ``gpu_idle_grace`` of ``window``,
        never less than one check interval."""
        unit, value = parse_grace(self.gpu_idle_grace)
        grace = window * value / 100 if unit == "percent" else value
        return max(grace, self.gpu_idle_check_interval)

    # -- the thread ------------------------------------------------------------------------
    def ensure_gpu_idle_monitor(self: GPUSessionManager) -> None:
        """Start the monitor thread once per process (a daemon: it never holds up exit)."""
        with self._lock:
            thread = self._gpu_idle_thread
            if thread is None or not thread.is_alive():
                self._gpu_idle_stopping = threading.Event()
                self._gpu_idle_thread = threading.Thread(
                    target=self._gpu_idle_loop,
                    args=(self._gpu_idle_stopping,),
                    name="gpu-sessions-gpu-idle",
                    daemon=True,
                )
                self._gpu_idle_thread.start()

    def stop_gpu_idle_monitor(self: GPUSessionManager, wait: bool = True) -> None:
        self._gpu_idle_stopping.set()
        thread = self._gpu_idle_thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        self._gpu_idle_thread = None

    def _gpu_idle_loop(self: GPUSessionManager, stopping: threading.Event) -> None:
        loop = asyncio.new_event_loop()  # the thread's own: checks never touch the server's
        try:
            while not stopping.is_set():
                try:
                    loop.run_until_complete(self.gpu_idle_pass())
                except Exception:  # keep watching: one bad pass must not end the reclaim
                    if not stopping.is_set():
                        self.log.exception("GPU-idle check failed")
                stopping.wait(self.gpu_idle_check_interval)
        finally:
            loop.close()

    # -- one check -------------------------------------------------------------------------
    async def gpu_idle_pass(self: GPUSessionManager) -> list[str]:
        """Read the GPU use of this process's kernels that hold GPUs, warn, withdraw and end
        as their clocks say; return what was done."""
        watched, restarting = await asyncio.to_thread(self._gpu_idle_candidates)
        for gone in set(self._gpu_idle_clocks) - {s.id for s, _, _ in watched} - restarting:
            del self._gpu_idle_clocks[gone]  # ended, or no longer holding a GPU here
            self._gpu_idle_restarts.pop(gone, None)
        active = [w for w in watched if w[1] is not None and w[2] is not None]
        if not active and not any(c.warned for c in self._gpu_idle_clocks.values()):
            return []  # no policy asks for it: no sweep at all
        done = []
        now = time.time()
        for session, threshold, window in watched:
            applies = threshold is not None and window is not None
            clock = self._gpu_idle_clocks.get(session.id)
            if clock is None:
                if not applies:
                    continue
                clock = GPUIdleClock(self._gpu_idle_run(session))
                self._gpu_idle_clocks[session.id] = clock
            utilization = await self._gpu_utilization(session) if applies else None
            run = self._gpu_idle_run(session)
            restarted = clock.run != run
            decision = clock.observe(
                run=run,
                utilization=utilization,
                threshold=threshold,
                window=window,
                grace=self.gpu_idle_grace_for(window or 0.0),
                now=now,
            )
            if not applies:  # its policy no longer asks for it (a warning is withdrawn)
                del self._gpu_idle_clocks[session.id]
            what = await self._gpu_idle_act(
                session, decision, threshold or 0.0, utilization, restarted
            )
            if what:
                done.append(f"{session.id[:12]}: {what}")
        if done:
            self.log.info("GPU-idle: %s", "; ".join(done))
        return done

    def _gpu_idle_candidates(
        self: GPUSessionManager,
    ) -> tuple[list[tuple[Session, float | None, float | None]], set[str]]:
        """Running kernels holding GPUs that this process supervises, each with its owner's
        threshold and window (None when no reclaim applies), and those restarting (their
        clocks are kept: the restart shows as a new run once it runs). Blocking."""
        policies = self.refresh_policies()
        scopes = [policies.default, *policies.groups.values(), *policies.users.values()]
        if not self._gpu_idle_clocks and not any(p.gpu_idle_window for p in scopes):
            return [], set()  # nobody's policy has a window: not even the store is read
        found = []
        restarting = set()
        for session in self.store.live():
            if (
                session.kind == "batch"
                or not session.allocations
                or not (same_process(session.process, self.process) or session.id in self._handles)
            ):
                continue
            if session.status in (SessionStatus.RESTARTING, SessionStatus.PREPARING):
                restarting.add(session.id)
                continue
            if session.status != SessionStatus.RUNNING:
                continue
            policy = self.policy_for(session.owner)
            threshold, window = policy.gpu_idle_threshold, policy.gpu_idle_window
            if window is not None and threshold is None:
                self._say_once(
                    f"owner/{session.owner}",
                    "%s's policy sets gpu_idle_window but no gpu_idle_threshold: their "
                    "kernels are not reclaimed for GPU idleness (set both)",
                    session.owner,
                )
                window = None
            found.append((session, threshold, window))
        return found, restarting

    async def _gpu_utilization(self: GPUSessionManager, session: Session) -> int | None:
        """The session's processes' SM percent (mean over its devices); None when it cannot
        be told (the GPU does not report per-process use, or its processes are unknown)."""
        usage = await self.gpu_usage.session_usage(session)
        utilization = usage.get("utilization") if usage else None
        if utilization is None:
            self._say_once(
                f"session/{session.id}",
                "Session %s: the per-process utilization of its GPU cannot be read (the GPU "
                "does not report it, or the kernel's processes were not found): it is never "
                "reclaimed for GPU idleness",
                session.id[:12],
            )
        return utilization

    async def _gpu_idle_act(
        self: GPUSessionManager,
        session: Session,
        decision: Decision,
        threshold: float,
        utilization: int | None,
        restarted: bool = False,
    ) -> str:
        if decision.action == "warn":
            grace = (decision.ends_at or 0.0) - time.time()
            reason = warning_reason(threshold, decision.idle_for, max(grace, 0.0))
            if not await asyncio.to_thread(
                self.store.note, session.id, reason, only_from=[SessionStatus.RUNNING]
            ):
                return ""
            ends = time.strftime("%H:%M:%S %Z", time.localtime(decision.ends_at))
            message = (
                f"This kernel has used under {threshold:g}% of its GPU for "
                f"{decision.idle_for:.0f}s (your gpu_idle_threshold and gpu_idle_window): it "
                f"will be shut down at {ends} (in {grace:.0f}s) and its GPU given to others, "
                "unless it uses the GPU. Save what you need now."
            )
            await asyncio.to_thread(self._write_kernel_notice, session, WARNING, message)
            return reason
        if decision.action == "withdraw":
            reason = withdrawn_reason(threshold, utilization, restarted=restarted)
            await asyncio.to_thread(
                self.store.note, session.id, reason, only_from=[SessionStatus.RUNNING]
            )
            if restarted:
                message = "This kernel was restarted: its GPU-idle clock starts over."
            elif utilization is None:
                message = (
                    "This kernel's GPU use can no longer be read: it will not be shut down "
                    "for GPU idleness."
                )
            else:
                message = (
                    "This kernel uses its GPU again: it will not be shut down for GPU idleness."
                )
            await asyncio.to_thread(self._write_kernel_notice, session, WITHDRAWN, message)
            return reason
        if decision.action == "end":
            reason = ended_reason(threshold, decision.idle_for)
            self._gpu_idle_clocks.pop(session.id, None)
            try:
                ended = await self.end_session(session.id, reason)
            except GPUSessionsError as exc:
                self.log.warning("Could not end GPU-idle session %s: %s", session.id[:12], exc)
                return ""
            return reason if ended.reason == reason else ""
        return ""

    def _write_kernel_notice(
        self: GPUSessionManager, session: Session, kind: str, message: str
    ) -> None:
        """``kernel-notice.json`` in the session's state directory, owned like it (the
        kernel's uid), replaced whole so the kernel never reads half of it. Blocking."""
        state_dir = os.path.join(self.state_root, session.id)
        try:
            owner = os.stat(state_dir)
        except OSError:
            return  # a kernel of another host, or ended meanwhile
        text = json.dumps({"id": uuid.uuid4().hex, "kind": kind, "message": message})
        path = os.path.join(state_dir, NOTICE_JSON)
        partial = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            write_kernel_file(partial, text, owner.st_uid, owner.st_gid, 0o644)
            os.replace(partial, path)  # a symlink left at ``path`` is replaced, not followed
        except OSError as exc:
            self.log.warning("Session %s: could not write its notice: %s", session.id[:12], exc)

    def _say_once(self: GPUSessionManager, key: str, message: str, *args: object) -> None:
        if key in self._gpu_idle_said:
            self.log.debug(message, *args)
        else:
            self._gpu_idle_said.add(key)
            self.log.warning(message, *args)
