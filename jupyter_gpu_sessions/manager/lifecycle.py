"""How a session ends, and how a kernel's death is recorded: one path for every ender.

Whoever ends a session — its owner's delete, the kernel's shutdown, jupyter_server's
restarter giving up, the reconcile pass, a lifetime policy, a failed start — goes through
:meth:`SessionLifecycle.end_session` (decide who may end it now) and :meth:`SessionLifecycle.finish`
(do it). Finishing marks the session TERMINATING, removes its container (or learns it is
gone), and only then writes the final status, which releases the devices in the same
transaction. A start in flight is never finished by someone else while its process lives:
it is asked to stop (TERMINATING) and cleans up after itself at its next step.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from typing import TYPE_CHECKING

from ..core.errors import Conflict, GPUSessionsError, RuntimeUnavailable
from ..core.models import ExitState, ProcessRef, Session
from ..core.status import SessionStatus
from ..core.units import format_size
from ..runtime.base import RuntimeHandle

if TYPE_CHECKING:
    from . import GPUSessionManager

S = SessionStatus
STARTING = (S.PREPARING, S.RESTARTING)
ENDABLE = (S.PREPARING, S.RUNNING, S.RESTARTING)
LIVE = (S.PENDING, S.PREPARING, S.RUNNING, S.RESTARTING, S.TERMINATING)
# How long a restart may take between its RESTARTING mark and its new start (jupyter_client
# launches at once; this only bounds a restart that never comes).
RESTART_GRACE = 60.0
# An end asked of a live process that has not finished it within this long is finished by
# the reconcile pass (the process is stuck, or lost the start without cleaning up).
STALE_END = 120.0
LOG_NOTE = "[jupyter-gpu-sessions]"
CRASH_PREFIXES = ("oom-killed", "exited ")


def crash_reason(state: ExitState, memory: int | None) -> str:
    """Why a kernel died on its own, for the history, the kept log and the user."""
    if state.oom_killed:
        limit = format_size(memory) if memory else "none"
        return f"oom-killed: limit {limit}, exit code {state.exit_code}"
    text = f"exited {state.exit_code}: the kernel's process ended on its own"
    return f"{text} ({state.error})" if state.error else text


def is_crash(reason: str) -> bool:
    return reason.startswith(CRASH_PREFIXES)


def same_process(a: ProcessRef, b: ProcessRef) -> bool:
    return a.host == b.host and a.pid == b.pid and (not a.started or a.started == b.started)


class SessionLifecycle:
    """The end of sessions and the record of deaths; mixed into :class:`GPUSessionManager`."""

    # -- asking for an end -----------------------------------------------------------------
    async def end_session(self: GPUSessionManager, session_id: str, reason: str) -> Session:
        """End a session in any status, from any process on this host.

        Queued: cancelled at once. Starting or restarting in a live process: asked to stop
        (TERMINATING, devices still held); that start removes what it made and ends the
        session. Running: its container is removed, then the session ends and frees its
        devices. Already ending or ended: returned as it is."""
        while True:
            session = await asyncio.to_thread(self.store.get, session_id, history=False)
            if session.status.is_terminal or session.status == S.TERMINATING:
                return session
            if session.status == S.PENDING:
                ended = await self._transition(
                    session, S.CANCELLED, reason or "cancelled while queued", only_from=[S.PENDING]
                )
            elif session.status in STARTING and self._starter_alive(session):
                self._ending.add(session.id)  # this process's start looks at once
                ended = await self._transition(
                    session,
                    S.TERMINATING,
                    reason or "ended while starting",
                    only_from=[session.status],
                )
            else:
                if (
                    session.runtime != "docker"
                    and session.id not in self._handles
                    and not same_process(session.process, self.process)
                ):
                    raise Conflict(
                        f"Session {session.id[:12]} is a local process of another program "
                        f"(pid {session.process.pid} on {session.process.host}); shut its "
                        "kernel down there."
                    )
                why = self.death_reason(session)
                if why:  # it died on its own, and this end comes instead of a restart
                    reason = f"{why}; not restarted" + (f" ({reason})" if reason else "")
                    return await self.finish(session, S.ERROR, reason)
                return await self.finish(session, S.TERMINATED, reason or "shut down")
            if ended is not None:
                return ended
            # Lost a race (the queue placed it, a start finished): look again.

    def _starter_alive(self: GPUSessionManager, session: Session) -> bool:
        """Whether a process is still working on this session's (re)start."""
        if same_process(session.process, self.process):
            return self._start_in_flight(session.id)
        if session.process.host != self.process.host:
            return True  # another host's manager: only it can tell
        return self.process_alive(session.process)

    def _start_in_flight(self: GPUSessionManager, session_id: str) -> bool:
        deadline = self._starting.get(session_id)
        return deadline is not None and time.monotonic() < deadline

    # -- the one way to end ----------------------------------------------------------------
    async def finish(
        self: GPUSessionManager,
        session: Session,
        status: SessionStatus,
        reason: str,
        *,
        exit_state: ExitState | None = None,
    ) -> Session:
        """End ``session`` as ``status``: mark it TERMINATING, keep its log, remove its
        container, then write the final status (releasing its devices) and remove its state
        directory. Every step tolerates "already gone"; when the container cannot be
        removed (the engine is down), the session stays TERMINATING with its devices held
        and the reconcile pass finishes it later. Safe to call twice, from any process."""
        latest = await asyncio.to_thread(self.store.get, session.id, history=False)
        if latest.status.is_terminal:
            await asyncio.to_thread(self.remove_state_dir, session.id)
            return latest
        if latest.status == S.PENDING:
            ended = await self._transition(latest, S.CANCELLED, reason, only_from=[S.PENDING])
            return ended or await self.finish(latest, status, reason, exit_state=exit_state)
        if latest.status != S.TERMINATING:
            marked = await self._transition(
                latest, S.TERMINATING, reason, only_from=[latest.status]
            )
            if marked is None:  # it moved meanwhile: start over from what it is now
                return await self.finish(latest, status, reason, exit_state=exit_state)
            latest = marked
        runtime = self.runtime(latest.runtime)
        try:
            handles = await self._handles_of(latest)
            for handle in handles:
                if exit_state is None:
                    if latest.kind == "batch":  # a command gets SIGTERM and time to exit
                        await runtime.stop(handle, self.batch_stop_timeout)
                    exit_state = await self._poll_quietly(runtime, handle)
                await self._keep_logs(latest, runtime, handle, reason)
            for handle in handles:
                await runtime.remove(handle)
        except GPUSessionsError as exc:
            # Not known to be gone: keep the devices held, and say why.
            self.log.warning(
                "Session %s: its kernel could not be removed yet (%s); its devices stay "
                "held until the reconcile pass removes it",
                latest.id[:12],
                exc.message.splitlines()[0],
            )
            return latest
        except Exception as exc:  # the Docker SDK's own errors
            self.log.warning(
                "Session %s: its container could not be removed yet (%s); its devices stay "
                "held until the reconcile pass removes it",
                latest.id[:12],
                exc,
            )
            return latest
        self._handles.pop(latest.id, None)
        self._stop_expected.pop(latest.id, None)
        self._ending.discard(latest.id)
        if status == S.CANCELLED and handles and latest.started_at is not None:
            status = S.TERMINATED  # it ran once: not "never ran"
        # Before the final status: a session seen ended has nothing left on the host (the
        # transition runs the scheduling pass its release triggers before it returns).
        await asyncio.to_thread(self.remove_state_dir, latest.id)
        ended = await self._transition(
            latest,
            status,
            reason,
            only_from=[S.TERMINATING],
            exit_code=exit_state.exit_code if exit_state else None,
            oom_killed=exit_state.oom_killed if exit_state else None,
        )
        return ended or await asyncio.to_thread(self.store.get, latest.id)

    async def _handles_of(self: GPUSessionManager, session: Session) -> list[RuntimeHandle]:
        """Everything that may still run for ``session``: this process's handle, and for
        containers whatever carries its label (a start may not have recorded its own yet)."""
        handles: dict[str, RuntimeHandle] = {}
        own = self._handles.get(session.id)
        if own is not None:
            handles[own.id] = own
        if session.runtime == "docker":
            docker = self.runtime("docker")
            for handle in await docker.session_handles(self.store_id, session.id):
                handles.setdefault(handle.id, handle)
        return list(handles.values())

    @staticmethod
    async def _poll_quietly(runtime, handle: RuntimeHandle) -> ExitState | None:
        try:
            return await runtime.poll(handle)
        except RuntimeUnavailable:
            raise
        except Exception:
            return None

    def remove_state_dir(self: GPUSessionManager, session_id: str) -> None:
        """The session's state directory: connection-file copy (with its key), notices."""
        shutil.rmtree(os.path.join(self.state_root, session_id), ignore_errors=True)

    # -- deaths ----------------------------------------------------------------------------
    async def note_exit(self: GPUSessionManager, session: Session, state: ExitState) -> Session:
        """A kernel died on its own (nobody asked it to stop): record its exit code, OOM
        kill and a reason on the session and in its kept log, once per death. The status
        changes when a restart or an end follows; their history entries carry the reason."""
        stored = await asyncio.to_thread(self.store.get, session.id, history=False)
        if stored.status != S.RUNNING or stored.exit_code is not None:
            return stored  # ending, restarting, or this death is already recorded
        noted = await asyncio.to_thread(
            self.store.update,
            session.id,
            only_from=[S.RUNNING],
            exit_code=state.exit_code,
            oom_killed=state.oom_killed,
        )
        if noted is None:
            return stored
        why = crash_reason(state, session.request.memory)
        self.log.warning("Kernel %s (session %s) died: %s", session.kernel_id, session.id[:12], why)
        handle = self._handles.get(session.id)
        if handle is not None:
            await self._keep_logs(noted, self.runtime(session.runtime), handle, "")
        return noted

    def death_reason(self: GPUSessionManager, session: Session) -> str:
        """The reason of the death recorded for the session's current run, or ""."""
        if session.exit_code is None:
            return ""
        return crash_reason(
            ExitState(session.exit_code, oom_killed=session.oom_killed), session.request.memory
        )

    def restart_notice(self: GPUSessionManager, session: Session) -> str:
        """What the user is told in the first cell after an automatic restart."""
        why = self.death_reason(session)
        if not why:
            return ""
        if session.oom_killed and why.startswith("oom-killed"):
            limit = format_size(session.request.memory) if session.request.memory else "none"
            return (
                f"The previous kernel was killed for running out of memory (limit {limit}) "
                "and was restarted: its variables are gone. Use less memory, or start a "
                "kernel with a larger memory limit."
            )
        return f"The previous kernel died ({why}) and was restarted: its variables are gone."

    # -- the reconcile pass ----------------------------------------------------------------
