"""Recovery: the reconcile thread and its pass, which make the store and the container
engine agree — sessions of dead processes, vanished or exited containers, lifetimes,
containers and state directories nobody owns."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import TYPE_CHECKING

from ..core.errors import GPUSessionsError
from ..core.models import ExitState, RuntimeHandle, Session
from ..core.status import TERMINAL_STATUSES, SessionStatus
from ..runtime.base import LABEL_PREFIX, SESSION_LABEL, STORE_LABEL
from ..runtime.docker import DockerRuntime
from .lifecycle import STALE_END, STARTING, S, crash_reason, same_process

if TYPE_CHECKING:
    from . import GPUSessionManager

# Which manager service started a container (GPUSessionManager.service_name): a restarted
# service adopts only its own predecessor's kernels.
SERVICE_LABEL = LABEL_PREFIX + "service"


class Reconciling:
    """The reconcile thread (its own event loop) and one pass of it."""

    async def reconcile_async(self: GPUSessionManager) -> list[str]:
        """Make the store and the container engine agree; return what was done.

        - Sessions whose starting process is gone end (their containers removed first), as
          a local kernel dies with its parent; but a manager service restarted after a
          crash adopts the running kernels its predecessor of the same name started
          (their containers still run, and users' servers still use them).
        - This process's starts that nobody works on any more, and kernels its server no
          longer manages (the restarter gave up), end.
        - RUNNING sessions whose container vanished end ERROR; those whose container exited
          and was not restarted within one reconcile interval end ERROR with the exit.
        - A session past its owner's ``max_session_lifetime`` ends ``lifetime-exceeded``.
        - An end asked of a process that did not finish it in time is finished here.
        - Labelled containers with no live session are removed; state directories of
          ended sessions are removed.
        """
        started = time.monotonic()
        done: list[str] = []
        docker = self._docker_or_none()
        containers: dict[str | None, list] = {}
        if docker is not None:
            try:
                listed = await asyncio.to_thread(docker.labelled_containers, self.store_id)
            except Exception as exc:  # the engine went away after we first reached it
                self._engine_answers(False, exc)
                docker, listed = None, []
            else:
                self._engine_answers(True)
            for container in listed:
                containers.setdefault(container.labels.get(SESSION_LABEL), []).append(container)
        forgotten = self._forgotten_kernel_ids()
        now = time.time()
        for session in await asyncio.to_thread(self.store.live):
            found = containers.pop(session.id, [])
            what = await self._reconcile_one(session, found, docker is not None, forgotten, now)
            if what:
                done.append(f"{session.id[:12]}: {what}")
        for session_id, leftovers in containers.items():
            for container in leftovers:
                await asyncio.to_thread(container.remove, force=True)
                done.append(f"removed container {container.name} (no live session {session_id})")
        done.extend(await asyncio.to_thread(self._sweep_state_dirs))
        if done:
            self.log.info("Reconcile: %s", "; ".join(done))
            await asyncio.to_thread(self.schedule_pass)
        self.last_pass["reconcile"] = time.time()
        self.last_pass["reconcile_duration"] = time.monotonic() - started
        return done

    async def _reconcile_one(
        self: GPUSessionManager,
        session: Session,
        containers: list,
        docker_up: bool,
        forgotten: set[str],
        now: float,
    ) -> str:
        mine = same_process(session.process, self.process)
        if (
            not mine
            and session.process.host == self.process.host
            and not self.process_alive(session.process)
        ):
            if self._adoptable(session):
                if not docker_up:
                    return ""  # its container may well run: decide when Docker answers
                adopted = await self._adopt(session, containers)
                if adopted:
                    return f"adopted (its manager service, pid {session.process.pid}, is gone)"
                if adopted is None:
                    return ""  # it changed meanwhile (ended, or taken over): the next pass
            reason = f"owner-gone: the process that started it (pid {session.process.pid}) is gone"
            status = S.TERMINATED if session.status == S.TERMINATING else S.ERROR
            if session.status in (S.PENDING, S.PREPARING):
                status = S.CANCELLED
            return await self._finish_for(session, status, reason)
        if session.status == S.TERMINATING:
            if mine and self._start_in_flight(session.id):
                return ""
            changed = await asyncio.to_thread(self.store.last_change, session.id)
            if mine or now - changed > STALE_END:
                return await self._finish_for(session, S.TERMINATED, session.reason)
            return ""
        if mine and session.status in STARTING and not self._start_in_flight(session.id):
            reason = "start-abandoned: nothing in this process is starting it any more"
            return await self._finish_for(session, S.ERROR, reason)
        if session.status != S.RUNNING:
            return ""
        if mine and session.kernel_id in forgotten:
            why = self.death_reason(session)
            reason = "kernel-forgotten: the server no longer manages its kernel"
            if why:
                reason = f"{why}; not restarted (the server gave up on the kernel)"
            return await self._finish_for(session, S.ERROR if why else S.TERMINATED, reason)
        if session.runtime == "docker" and docker_up:
            if not containers:
                reason = "container-vanished: its container no longer exists"
                return await self._finish_for(session, S.ERROR, reason)
            exited = _exited_for(containers[0])
            expected = mine and self._stop_expected.get(session.id, 0.0) > time.monotonic()
            if exited is not None and exited > self.reconcile_interval and not expected:
                state = _exit_state(containers[0])
                session = await self.note_exit(session, state)
                reason = f"{crash_reason(state, session.request.memory)}; not restarted"
                return await self._finish_for(session, S.ERROR, reason, state)
        lifetime = self.policy_for(session.owner).max_session_lifetime
        if lifetime and session.started_at and now - session.started_at > lifetime:
            reason = f"lifetime-exceeded: ran longer than max_session_lifetime ({lifetime:g}s)"
            return await self._finish_for(session, S.TERMINATED, reason)
        return ""

    # -- a restarted manager service adopts its predecessor's kernels ----------------------
    def _adoptable(self: GPUSessionManager, session: Session) -> bool:
        """A kernel this manager service may take over from a dead predecessor: running, in
        a container (whose label then says which service started it). Starts under way,
        batch sessions (nobody would collect their exit) and embedded managers' kernels
        (they end with their server) are not."""
        return bool(
            self.service_name
            and session.status == S.RUNNING
            and session.kind == "interactive"
            and session.runtime == "docker"
        )

    async def _adopt(self: GPUSessionManager, session: Session, containers: list) -> bool | None:
        """Take over ``session`` when its container runs and was started by a service of
        this name: record this process as its supervisor and keep its container's handle.
        Its devices stay where they are: nothing is allocated again. False: it cannot be
        adopted; None: it changed in the store meanwhile (ended, or another process took
        it over), so nothing is to be done with it now."""
        running = [
            c
            for c in containers
            if c.labels.get(SERVICE_LABEL) == self.service_name
            and (c.attrs.get("State") or {}).get("Running")
        ]
        if len(running) != 1:
            return False
        container = running[0]
        taken = await asyncio.to_thread(
            self.store.take_over, session.id, session.process, self.process
        )
        if taken is None:
            return None
        handle = RuntimeHandle("docker", container.id, container.name)
        if self._handles.setdefault(session.id, handle) is not handle:
            return True  # adopted meanwhile by this process's other path (a poll, a pass)
        self.log.info(
            "Adopted kernel %s of %s (session %s, container %s) from the manager service's "
            "previous process (pid %s)",
            session.kernel_id,
            session.owner,
            session.id[:12],
            container.name,
            session.process.pid,
        )
        return True

    async def adopt_orphan(self: GPUSessionManager, session: Session) -> RuntimeHandle | None:
        """Decide now about a kernel of a dead predecessor that a caller asks about before
        the reconcile pass came to it (a user's server polling it just after a restart):
        adopted, its handle; its container gone or stopped, ended at once (so that the
        caller's restarter does not restart it into a session nobody supervises). None when
        there is no kernel to use."""
        if session.id in self._handles or not self._adoptable(session):
            return self._handles.get(session.id)
        # As stored: a caller's copy (the engine RPC's) does not say which process runs it.
        session = await asyncio.to_thread(self.store.get, session.id, history=False)
        if (
            not self._adoptable(session)
            or same_process(session.process, self.process)
            or session.process.host != self.process.host
            or self.process_alive(session.process)
        ):
            return self._handles.get(session.id)
        docker = await asyncio.to_thread(self._docker_or_none)
        if docker is None:
            return None
        labels = [f"{SESSION_LABEL}={session.id}", f"{STORE_LABEL}={self.store_id}"]

        def listed() -> list:
            return docker.client().containers.list(all=True, filters={"label": labels})

        try:
            containers = await asyncio.to_thread(listed)
        except Exception:  # the engine went away: the reconcile pass decides later
            return None
        await self._reconcile_one(session, containers, True, set(), time.time())
        return self._handles.get(session.id)

    async def _finish_for(
        self: GPUSessionManager,
        session: Session,
        status: SessionStatus,
        reason: str,
        state: ExitState | None = None,
    ) -> str:
        ended = await self.finish(session, status, reason, exit_state=state)
        return reason if ended.status in TERMINAL_STATUSES else f"ending ({reason})"

    def _engine_answers(self: GPUSessionManager, answers: bool, error: object = None) -> None:
        """Say once when the container engine stops answering, and once when it is back."""
        if answers and self._engine_down:
            self.log.info("The Docker engine answers again: reconciling container kernels")
        elif not answers and not self._engine_down:
            self.log.warning(
                "The Docker engine does not answer (%s): container kernels are not reconciled "
                "until it is back (check it with `docker info`)",
                error,
            )
        self._engine_down = not answers

    def _forgotten_kernel_ids(self: GPUSessionManager) -> set[str]:
        """Kernels this process's server started and no longer manages (its restarter gave
        up, or it dropped them some other way); none when no server told us."""
        if self.forgotten_kernels is None:
            return set()
        try:
            return set(self.forgotten_kernels())
        except Exception:  # a server shutting down: no verdict this pass
            return set()

    def _sweep_state_dirs(self: GPUSessionManager) -> list[str]:
        """State directories whose session has ended (a crash between two steps of an end
        would otherwise leave a connection key behind)."""
        try:
            names = [n for n in os.listdir(self.state_root) if len(n) == 32]
        except OSError:
            return []
        if not names:
            return []
        ended = self.store.ended_among(names)
        for name in ended:
            self.remove_state_dir(name)
        return [f"removed the state directory of ended session {n[:12]}" for n in ended]

    def ensure_reconciler(self) -> None:
        """Start the reconcile thread once per process (a daemon: it never holds up exit)."""
        with self._lock:
            if self._reconciler is None or not self._reconciler.is_alive():
                # Each thread its own stop signal: one told to stop (and still finishing its
                # pass) never resumes because a new one started.
                self._stopping = threading.Event()
                self._reconciler = threading.Thread(
                    target=self._reconcile_loop,
                    args=(self._stopping,),
                    name="gpu-sessions-reconcile",
                    daemon=True,
                )
                self._reconciler.start()
        self.ensure_gpu_idle_monitor()  # gpu_idle.py: runs wherever recovery runs
        self.ensure_kernel_watch()  # kernel_watch.py: in the manager service only

    def stop_reconciler(self, wait: bool = True) -> None:
        """Stop the reconcile thread; with ``wait`` (closing the store), until its pass ends."""
        self._stopping.set()
        self.stop_gpu_idle_monitor(wait)
        self.stop_kernel_watch(wait)
        thread = self._reconciler
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        self._reconciler = None

    def _reconcile_loop(self, stopping: threading.Event) -> None:
        loop = asyncio.new_event_loop()  # the thread's own: passes never touch the server's
        try:
            while not stopping.is_set():
                try:
                    loop.run_until_complete(self.reconcile_async())
                    self.heartbeat()
                except Exception:  # keep reconciling: one bad pass must not end recovery
                    self.log.exception("Reconcile pass failed")
                stopping.wait(self.reconcile_interval)
        finally:
            loop.close()

    def reconcile(self) -> list[str]:
        """One reconcile pass, from a thread with no running loop (see reconcile_async)."""
        return asyncio.run(self.reconcile_async())

    def _docker_or_none(self) -> DockerRuntime | None:
        runtime = self.runtime("docker")
        try:
            runtime.client()
        except GPUSessionsError:
            return None
        return runtime  # type: ignore[return-value]


def _exited_for(container) -> float | None:
    """Seconds since the container's process exited; None while it runs (or is created)."""
    state = container.attrs.get("State") or {}
    if state.get("Running") or state.get("Status") in ("created", "restarting"):
        return None
    finished = state.get("FinishedAt") or ""
    try:
        from datetime import datetime

        stamp = datetime.fromisoformat(finished[:26].rstrip("Z") + "+00:00").timestamp()
    except ValueError:
        return None
    return max(0.0, time.time() - stamp)


def _exit_state(container) -> ExitState:
    state = container.attrs.get("State") or {}
    return ExitState(
        exit_code=int(state.get("ExitCode", 255)),
        oom_killed=bool(state.get("OOMKilled")),
        error=state.get("Error") or "",
    )
