"""The session manager: request → policy → queue → allocation → runtime → events, and back.

One per process, all sharing one store: every Jupyter process on the host that starts
kernels (the server, nbclient, papermill) queues and allocates through the same database,
in serialized write transactions, so no GPU is ever handed out twice. Scheduling passes
run on every release and periodically while a kernel waits; a reconcile thread ends the
sessions of processes that are gone and removes containers nobody owns.

The rooms: this façade (collaborators; submitting, starting and stopping a kernel);
``settings.py`` (every ``c.GPUSessionManager`` option); ``lifecycle.py`` (where a session
ends, the one way); ``launching.py`` (a launch spec: env, uid, working dir, devices,
mounts); ``scheduling.py`` (passes and queue positions; the GPU itself is picked in
``scheduler/allocator.py``); ``reconciling.py`` (recovery); ``identity.py`` (groups and
policies: where a session's limits are checked; a vfolder's quota is checked in
``vfolders/quota.py``); ``logs.py``; ``gpu_idle.py`` (GPU-idle reclaim);
``kernel_watch.py`` (the manager service's kernels no server is attached to);
``views.py`` (what the API shows: sessions, the GPU-holder snapshot, quota usage);
``engine.py`` (the engine interface in process); ``doctor.py`` (host checks).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import math
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import (
    GPUSessionsError,
    ImageNotFound,
    InvalidRequest,
    KernelLaunchError,
    PolicyViolation,
    StartCancelled,
    UnsatisfiableRequest,
)
from ..core.models import (
    ExitState,
    ProcessRef,
    Session,
)
from ..core.policy import Policy, PolicySet
from ..core.status import SessionStatus
from ..core.units import parse_size
from ..devices import GPUInventory, detect_inventory
from ..engine import RUNTIMES, KernelLaunch
from ..image import build_hint
from ..runtime.base import SESSION_LABEL, KernelRuntime, RuntimeHandle
from ..scheduler import (
    Capacity,
    QueueCache,
    describe_gpus,
)
from ..store import SessionStore
from ..store.admin import AdminStore
from .api_access import SessionAPIAccess
from .batch import BatchSessions
from .gpu_idle import GPUIdleReclaim
from .identity import IdentityAndPolicies
from .kernel_watch import DetachedKernels
from .launching import KernelLaunching, _EndedMeanwhile
from .lifecycle import RESTART_GRACE, STARTING, SessionLifecycle
from .logs import SessionLogs
from .reconciling import Reconciling
from .scheduling import Scheduling, host_memory
from .settings import ManagerSettings

if TYPE_CHECKING:
    from jupyter_events import EventLogger

    from ..vfolders import VFolderService

__all__ = ["RUNTIMES", "GPUSessionManager", "KernelLaunch", "current_process", "process_alive"]

EVENT_SCHEMA = Path(__file__).resolve().parent.parent / "events" / "session-status.yaml"
EVENT_SCHEMA_ID = "https://events.jupyter.org/jupyter_gpu_sessions/session-status"
_WAIT_POLL = 0.1  # seconds between checks of a queued session's status
PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
PORT_ATTEMPTS = 3  # starts of a kernel whose ports another process took meanwhile


def port_taken(exc: KernelLaunchError) -> bool:
    """A start that failed because a port of the kernel was taken: by ZMQ in the kernel
    (a local kernel's log), or by Docker publishing the port."""
    text = exc.message.lower()
    return "address already in use" in text or "port is already allocated" in text


def _process_start_time(pid: int) -> float | None:
    """When ``pid`` started (clock ticks since boot, from /proc), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return float(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def current_process() -> ProcessRef:
    return ProcessRef(socket.gethostname(), os.getpid(), _process_start_time(os.getpid()) or 0.0)


def process_alive(ref: ProcessRef) -> bool:
    """True while the process that ``ref`` names runs (a reused pid does not count)."""
    started = _process_start_time(ref.pid)
    return started is not None and (not ref.started or started == ref.started)


class GPUSessionManager(
    BatchSessions,
    SessionLifecycle,
    Reconciling,
    GPUIdleReclaim,
    DetachedKernels,
    SessionLogs,
    Scheduling,
    KernelLaunching,
    SessionAPIAccess,
    IdentityAndPolicies,
    ManagerSettings,
):
    """Starts kernels as sessions with exactly the devices and limits they were granted."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.process = current_process()
        self._started_at = time.time()
        self._handles: dict[str, RuntimeHandle] = {}
        self._lock = threading.Lock()
        self._runtimes: dict[str, KernelRuntime] = {}
        self._inventory: GPUInventory | None = None
        self._store: SessionStore | None = None
        self._policies = PolicySet.from_config(self.policies, merge=self.group_policy_merge)
        self._reconciler: threading.Thread | None = None
        self._queue = QueueCache()
        self._pass_lock = threading.Lock()
        self._stopping = threading.Event()
        self.last_pass: dict[str, float] = {}  # scheduling/reconcile: last run and duration
        self._last_heartbeat = 0.0
        self.pass_count = 0
        self._admin: AdminStore | None = None
        self._vfolders: VFolderService | None = None
        self._effective_policies = self._policies
        # Why a kernel is about to be shut down (e.g. idle-timeout), for its history.
        self.stop_reasons: dict[str, str] = {}
        # Sessions a (re)start of this process works on → until when (monotonic).
        self._starting: dict[str, float] = {}
        # Kernel id → a future told when its start was admitted to the queue (or failed).
        self._admissions: dict[str, asyncio.Future] = {}
        # Per event loop: set when a pass places or cancels someone (queued starts wake up).
        self._wakeups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Sessions this process asked to end while a start of theirs may be under way.
        self._ending: set[str] = set()
        # Kernel ids this process's server dropped from its map (set by the server).
        self.forgotten_kernels: Callable[[], Iterable[str]] | None = None
        self._engine_down = False  # said once per outage (reconcile pass)
        # Sessions whose kernel this process asked to stop → until when (monotonic): their
        # exit is not a crash for the reconcile pass to end; their client cleans up.
        self._stop_expected: dict[str, float] = {}
        # The API as kernels reach it, and per-session tokens (api_access.py).
        self._init_api_access()
        # The GPU-idle monitor: its thread, and one clock per kernel it watches (gpu_idle.py).
        self._init_gpu_idle()
        # Kernels no server is attached to (manager service): idle ones end (kernel_watch.py).
        self._init_kernel_watch()
        # Batch sessions this process runs (queued, starting or running) → their task.
        self._batches: dict[str, asyncio.Task] = {}
        # This process's queued batch sessions → a future told when they leave the queue;
        # one watcher task polls for all of them (see batch.py).
        self._queued_batches: dict[str, asyncio.Future] = {}
        self._batch_watcher: asyncio.Task | None = None

    def use_event_logger(self, logger: EventLogger) -> None:
        """Emit session status events to ``logger`` (the server's) from now on."""
        if EVENT_SCHEMA_ID not in logger.schemas.schema_ids:
            logger.register_event_schema(EVENT_SCHEMA)
        self.event_logger = logger

    # -- collaborators ---------------------------------------------------------------------
    @property
    def store(self) -> SessionStore:
        with self._lock:
            if self._store is None:
                self._store = SessionStore(self.db_url)
            return self._store

    @property
    def inventory(self) -> GPUInventory:
        with self._lock:
            if self._inventory is None:
                if self.inventory_class is None:
                    self._inventory = detect_inventory(
                        self.simulated_gpus or None,
                        self.simulated_device_dir or None,
                        self.simulated_processes or None,
                    )
                else:
                    self._inventory = _build(
                        self.inventory_class,
                        spec=self.simulated_gpus,
                        device_dir=self.simulated_device_dir or None,
                        processes_file=self.simulated_processes or None,
                    )
                self.log.info("GPU inventory: %s", self._inventory.describe())
            return self._inventory

    def runtime(self, name: str) -> KernelRuntime:
        if name not in RUNTIMES:
            raise InvalidRequest(f"runtime {name!r} is unknown: use one of {', '.join(RUNTIMES)}")
        with self._lock:
            if name not in self._runtimes:
                self._runtimes[name] = _build(
                    self.runtime_classes[name],
                    base_url=self.docker_url or None,
                    gpu_attach_mode=self.gpu_attach_mode,
                    home_size=parse_size(self.home_size),
                    default_pids_limit=self.default_pids_limit,
                )
            return self._runtimes[name]

    @property
    def store_id(self) -> str:
        """Names this manager's store on container labels (several stores may share one
        Docker engine: each user's own SQLite file, say)."""
        return hashlib.sha256(self.db_url.encode()).hexdigest()[:16]

    @property
    def admin(self) -> AdminStore:
        """Policies set through the API, the users the API has seen, manager health."""
        store = self.store
        with self._lock:
            if self._admin is None:
                self._admin = AdminStore(store.engine)
            return self._admin

    @property
    def vfolders(self) -> VFolderService:
        """Storage folders: created, shared and mounted into kernels (same store)."""
        store = self.store
        with self._lock:
            if self._vfolders is None:
                from ..vfolders import VFolderService

                self._vfolders = VFolderService(
                    store.engine,
                    policy_for=self.policy_for,
                    known_user=self.known_user,
                    mounted_by=self.sessions_mounting,
                    parent=self,
                )
            return self._vfolders

    def sessions_mounting(self, host_dir: str) -> list[str]:
        """Live sessions whose container mounts ``host_dir`` or something below it (so a
        vfolder is never purged under a running kernel). Blocking."""
        docker = self._docker_or_none()
        if docker is None:
            return []
        found = []
        for container in docker.labelled_containers(self.store_id):
            sources = [m.get("Source", "") for m in container.attrs.get("Mounts", ())]
            if any(src == host_dir or src.startswith(host_dir + "/") for src in sources):
                found.append(container.labels.get(SESSION_LABEL, container.name))
        return found

    @property
    def manager_id(self) -> str:
        return f"{self.process.host}:{self.process.pid}"

    def handle(self, session: Session) -> RuntimeHandle | None:
        """The runtime's handle (container or process) of ``session``'s current kernel."""
        return self._handles.get(session.id)

    # -- submitting ------------------------------------------------------------------------
    async def submit(self, launch: KernelLaunch) -> Session:
        """Check a request and queue it (PENDING). What can never run — larger than the host,
        or than the owner's policy allows — is refused at once, naming the limit."""
        launch.cwd = self._working_dir(launch.cwd)
        request = launch.request
        runtime = self.runtime(launch.runtime)
        policy = await self._check_launch(launch)

        def admit(totals) -> None:
            limit = policy.max_pending_sessions
            if limit is not None and totals.pending >= limit:
                raise PolicyViolation(
                    f"{launch.owner} already has {totals.pending} queued session(s), the most "
                    f"max_pending_sessions ({limit}) allows: wait for one to start, or shut one "
                    "down."
                )

        session = Session(
            id=uuid.uuid4().hex,
            owner=launch.owner,
            image=launch.image,
            request=request,
            runtime=runtime.name,
            process=self.process,
            name=launch.name,
            kernel_id=launch.kernel_id,
        )
        session = await asyncio.to_thread(self.store.add, session, admit=admit)
        self._emit(session, None)
        self.ensure_reconciler()
        admitted = self._admissions.pop(launch.kernel_id, None)
        if admitted is not None and not admitted.done():
            admitted.set_result(session)
        return session

    async def _check_launch(self, launch: KernelLaunch, what: str = "kernel") -> Policy:
        """Refuse at once what can never run — larger than the host or than the owner's
        policy allows, an image not on this host, vfolders the owner may not mount — for a
        kernel and a batch session alike; the owner's policy."""
        request = launch.request
        request.check_fits_host(host_cpus=os.cpu_count() or 1, host_memory=host_memory())
        allowed = self.image_allowlist()
        if launch.image_chosen and launch.image not in allowed:
            raise PolicyViolation(
                f"image {launch.image!r} is not on this server's image allowlist "
                f"(GPUSessionManager.allowed_images): choose one of {', '.join(allowed)}",
                reason="image-not-allowed",
            )
        runtime = self.runtime(launch.runtime)
        if not await runtime.check_image(launch.image):
            raise ImageNotFound(
                f"The {what} image {launch.image!r} is not on this host. {build_hint(launch.image)}"
            )
        if request.gpu_kind:  # a session without GPUs never asks the inventory (NVML)
            devices = await asyncio.to_thread(self.inventory.devices)
            if not devices:
                raise UnsatisfiableRequest(
                    f"This {what} asks for {describe_gpus(request)}, but this host has no "
                    "GPUs: NVML found no NVIDIA driver and no simulated GPUs are configured. "
                    'Choose a kernel without GPUs (e.g. "Python 3 (container)"), or, for a '
                    "demo, set JUPYTER_GPU_SESSIONS_SIMULATED_GPUS=4xA100-80GB.",
                    reason="no-gpus",
                )
            problem = Capacity(devices).unsatisfiable(request)
            if problem:
                raise UnsatisfiableRequest(f"This {what} {problem}.", reason="larger-than-host")
        await asyncio.to_thread(self.refresh_policies)
        policy = await asyncio.to_thread(self.policy_for, launch.owner)
        self._check_policy(launch.owner, request, policy, what)
        if launch.vfolders:
            # Unknown or forbidden vfolders fail the start now, before it queues.
            await asyncio.to_thread(self._vfolder_mounts, launch)
        return policy

    def admission(self, kernel_id: str) -> asyncio.Future:
        """A future told with the session once a start of ``kernel_id`` is admitted to the
        queue (policy, size and image checked), so a server can answer its client at once
        while the kernel waits; call from the loop that starts the kernel."""
        future = asyncio.get_running_loop().create_future()
        self._admissions[kernel_id] = future
        return future

    def forget_admission(self, kernel_id: str) -> None:
        self._admissions.pop(kernel_id, None)

    # -- starting --------------------------------------------------------------------------
    async def start_kernel(
        self,
        launch: KernelLaunch,
        session: Session,
        progress: Callable[[str], None] | None = None,
    ) -> Session:
        """Start (or restart) ``session``'s kernel: wait in the queue while PENDING, then start
        it on its devices. On failure nothing is left behind: no container, no devices held,
        the session ended with the reason. An end asked for meanwhile (from any process) is
        seen at every step: the start removes what it made and raises :class:`StartCancelled`."""
        launch.cwd = self._working_dir(launch.cwd)
        runtime = self.runtime(launch.runtime)
        self._starting[session.id] = math.inf
        try:
            return await self._start(launch, session, runtime, progress)
        finally:
            self._starting.pop(session.id, None)

    async def _start(
        self,
        launch: KernelLaunch,
        session: Session,
        runtime: KernelRuntime,
        progress: Callable[[str], None] | None,
    ) -> Session:
        queued = session.status == SessionStatus.PENDING
        if queued:
            session = await self._wait_in_queue(session, launch.queue_timeout, progress)
        else:
            session = await asyncio.to_thread(self.store.get, session.id, history=False)
        if session.status not in STARTING:
            raise await self._not_starting(session, queued=queued)
        restart = session.status == SessionStatus.RESTARTING
        previous = self._handles.get(session.id)
        try:
            # Inside the try: a vfolder unshared while the session queued must still end
            # it and free its devices.
            notice = self.restart_notice(session)
            for attempt in range(1, PORT_ATTEMPTS + 1):
                spec = await asyncio.to_thread(self._launch_spec, session, launch)
                await asyncio.to_thread(self._prepare_state_dir, spec, notice, session)
                try:
                    handle = await self._start_until_alive(session, launch, spec, runtime, previous)
                    break
                except KernelLaunchError as exc:
                    # Another process on the host (a second server, papermill) took one
                    # of the kernel's ports between their choice and the kernel's bind.
                    # A first start may take fresh ones; a restart keeps its ports, since
                    # its clients keep them.
                    if restart or attempt == PORT_ATTEMPTS or not port_taken(exc):
                        raise
                    self.log.info("Kernel %s: a port was taken; new ports", launch.kernel_id)
                    stale = self._handles.pop(session.id, None)
                    if stale is not None:
                        await runtime.remove(stale)
                    await asyncio.to_thread(self._fresh_ports, launch, spec.state_dir)
            running = await self._transition(
                session,
                SessionStatus.RUNNING,
                "kernel restarted" if restart else "kernel ready",
                only_from=STARTING,
                container_id=handle.id,
            )
            if running is None:
                raise _EndedMeanwhile()
            session = running
            self._stop_expected.pop(session.id, None)
        except BaseException as exc:
            # Shielded: a start cancelled twice still cleans up before its devices go.
            raise await asyncio.shield(self._abort(session, exc, restart)) from exc
        self.log.info(
            "Session %s (kernel %s, %s) running in %s with %s%s",
            session.id[:12],
            launch.kernel_id,
            session.owner,
            handle.name,
            session.request.describe(),
            f" ({', '.join(a.device_uuid for a in session.allocations)})"
            if session.allocations
            else "",
        )
        return session

    async def _start_until_alive(
        self,
        session: Session,
        launch: KernelLaunch,
        spec: Any,
        runtime: KernelRuntime,
        previous: RuntimeHandle | None,
    ) -> RuntimeHandle:
        handle = await runtime.start(spec, previous=previous)
        self._handles[session.id] = handle
        recorded = await asyncio.to_thread(
            self.store.update, session.id, only_from=STARTING, container_id=handle.id
        )
        if recorded is None:
            raise _EndedMeanwhile()
        await self._wait_until_alive(runtime, handle, spec, launch.launch_timeout, session.id)
        return handle

    @staticmethod
    def _fresh_ports(launch: KernelLaunch, state_dir: str) -> None:
        """New free ports for a kernel whose port was taken (blocking). The provisioner
        returns ``launch.connection_info`` (the same dict) to its kernel manager, which then
        rewrites its connection file; a local kernel reads its own copy, made here."""
        info = launch.connection_info
        ip = str(info.get("ip") or "127.0.0.1")
        held = []
        try:
            for name in PORT_NAMES:
                probe = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
                held.append(probe)
                probe.bind((ip, 0))
                info[name] = probe.getsockname()[1]
        finally:
            for probe in held:
                probe.close()
        if launch.runtime == "docker" or not launch.connection_file:
            return  # the container gets a fresh copy of connection_info at its start
        copy = os.path.join(state_dir, os.path.basename(launch.connection_file))
        data = {k: v.decode() if isinstance(v, bytes) else v for k, v in info.items()}
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        launch.argv = [copy if arg == launch.connection_file else arg for arg in launch.argv]
        launch.connection_file = copy

    async def _not_starting(self, session: Session, queued: bool = False) -> BaseException:
        """The error for a start whose session is no longer starting; an end asked for
        meanwhile is finished here (this process made whatever runs)."""
        if session.status == SessionStatus.TERMINATING:
            session = await self.finish(session, SessionStatus.CANCELLED, session.reason)
        if queued and session.status == SessionStatus.CANCELLED:
            return StartCancelled(
                f"This kernel's start was cancelled while queued: {session.reason}",
                reason=session.reason.split(":")[0] or "cancelled",
            )
        if session.status in (SessionStatus.CANCELLED, SessionStatus.TERMINATED):
            return StartCancelled(
                f"This kernel's start was cancelled: {session.reason}. Start it again when "
                "you need it."
            )
        return KernelLaunchError(
            f"This kernel's session has ended ({session.status.value}: {session.reason}); "
            "start a new kernel.",
            reason="session-ended",
        )

    async def _abort(self, session: Session, exc: BaseException, restart: bool) -> BaseException:
        """Undo a failed (re)start: remove its container, end the session (which frees its
        devices) with the reason; return the error to raise."""
        latest = await asyncio.to_thread(self.store.get, session.id, history=False)
        if latest.status == SessionStatus.TERMINATING or isinstance(exc, _EndedMeanwhile):
            return await self._not_starting(latest)
        reason = getattr(exc, "reason", None) or type(exc).__name__
        if isinstance(exc, asyncio.CancelledError):
            reason = "start cancelled"
        if isinstance(exc, GPUSessionsError):
            reason = f"{reason}: {exc.message.splitlines()[0]}"
        ran = session.id in self._handles or restart
        status = SessionStatus.ERROR if ran else SessionStatus.CANCELLED
        await self.finish(latest, status, reason)
        return exc

    async def _wait_in_queue(
        self, session: Session, timeout: float, progress: Callable[[str], None] | None
    ) -> Session:
        """Until the scheduler allocates the session (PREPARING), it is cancelled, or
        ``timeout`` passes. A start abandoned while queued (its task cancelled) cancels the
        session: nobody will start it."""
        try:
            session = await self._queued(session, timeout, progress)
        except BaseException as exc:
            if not isinstance(exc, KernelLaunchError):
                # Also when the queue placed it just now: its devices go back at once.
                abandoned = self.finish(
                    session, SessionStatus.CANCELLED, "start abandoned while queued"
                )
                await asyncio.shield(abandoned)
            raise
        if session.status == SessionStatus.PREPARING:
            self._emit(session, SessionStatus.PENDING)
        return session

    async def _queued(
        self, session: Session, timeout: float, progress: Callable[[str], None] | None
    ) -> Session:
        # Passes run now, on every change another process makes to the store, and every
        # ``schedule_interval``; in-process releases run their own pass at once.
        loop = asyncio.get_running_loop()
        started = loop.time()
        last_pass = -1e9
        marker = None
        said = None
        while True:
            now = loop.time()
            current = await asyncio.to_thread(self.store.change_marker)
            if current != marker or now - last_pass >= self.schedule_interval:
                marker = current
                last_pass = now
                await self.schedule_now()
            # Every 0.1 s while queued: the row only, not its history.
            session = await asyncio.to_thread(self.store.get, session.id, history=False)
            if session.status != SessionStatus.PENDING:
                return session
            position, message = self.queue_position(session)
            if position != said and progress is not None:
                progress(message)  # said when its place changes, not at every pass
            said = position
            if timeout and now - started >= timeout:
                ended = await self._transition(
                    session,
                    SessionStatus.CANCELLED,
                    f"queue-timeout: waited {timeout:g}s ({message})",
                    only_from=[SessionStatus.PENDING],
                )
                if ended is not None:
                    raise StartCancelled(
                        f"This kernel waited {timeout:g}s in the queue (queue_timeout) and was "
                        f"cancelled. {message}",
                        reason="queue-timeout",
                    )
                continue
            await self._queue_news(_WAIT_POLL)

    async def cancel(self, session_id: str, reason: str = "cancelled by its owner") -> Session:
        """Cancel a queued session (its waiting start then fails with ``reason``). A session
        that is no longer queued is returned as it is."""
        session = await asyncio.to_thread(self.store.get, session_id)
        ended = await self._transition(
            session, SessionStatus.CANCELLED, reason, only_from=[SessionStatus.PENDING]
        )
        return ended or await asyncio.to_thread(self.store.get, session_id)

    # -- watching and stopping -------------------------------------------------------------
    async def poll(self, session: Session) -> ExitState | None:
        handle = self._handles.get(session.id) or await self.adopt_orphan(session)
        if handle is None:
            if session.status in (SessionStatus.PENDING, *STARTING):
                return None  # still queued or starting: alive, as far as a client can tell
            return session.exit or ExitState(exit_code=0)
        state = await self.runtime(session.runtime).poll(handle)
        if state is not None:
            session.exit_code, session.oom_killed = state.exit_code, state.oom_killed
        return state

    async def signal(self, session: Session, signum: int) -> None:
        handle = self._handles.get(session.id) or await self.adopt_orphan(session)
        if handle is not None:
            await self.runtime(session.runtime).signal(handle, signum)

    def expect_stop(self, session_id: str, within: float = 60.0) -> None:
        """This process asked the kernel to stop (a shutdown or restart request, a signal
        to end it): its exit is expected, and its own client cleans up after it."""
        self._stop_expected[session_id] = time.monotonic() + within

    def stop_reason(self, session_id: str) -> str:
        """Why the kernel is being shut down, when someone said (idle-timeout, a delete)."""
        return self.stop_reasons.get(session_id, "")

    def set_stop_reason(self, session_id: str, reason: str) -> None:
        """Why a kernel is about to be shut down (idle-timeout, a delete), for its history;
        "" forgets it (the shutdown did not happen)."""
        if reason:
            self.stop_reasons[session_id] = reason
        else:
            self.stop_reasons.pop(session_id, None)

    async def stop_kernel(self, session: Session, *, restart: bool, reason: str = "") -> Session:
        """After the kernel has stopped: keep the session for a restart (its container,
        ports and devices), or end it and free everything. A start in flight is asked to
        stop and cleans up after itself."""
        if restart:
            latest = await asyncio.to_thread(self.store.get, session.id, history=False)
            if latest.status != SessionStatus.RUNNING:
                return latest
            # The restart's start follows at once; until then nobody else may end it.
            self._starting[session.id] = time.monotonic() + RESTART_GRACE
            moved = await self._transition(
                latest,
                SessionStatus.RESTARTING,
                self.death_reason(latest) or reason or "restart requested",
                only_from=[SessionStatus.RUNNING],
            )
            if moved is None:
                self._starting.pop(session.id, None)
            else:
                self.note_kernel_restart(session.id)  # its GPU-idle clock starts over
            return moved or await asyncio.to_thread(self.store.get, session.id, history=False)
        reason = reason or self.stop_reasons.pop(session.id, "")
        return await self.end_session(session.id, reason)

    def adopt(self, session_id: str, handle: RuntimeHandle) -> Session:
        """Re-attach to a kernel described by ``get_provisioner_info`` (e.g. after a server
        restart): its session comes from the store."""
        session = self.store.get(session_id)
        self._handles[session_id] = handle
        return session

    def close(self) -> None:
        """Stop the reconcile thread and release the database (kernels keep running)."""
        self.stop_reconciler()
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    # -- scheduling ------------------------------------------------------------------------

    def clear_history(self, retention: float, *, vacuum: bool = False) -> int:
        """Delete sessions that ended more than ``retention`` seconds ago; VACUUM after."""
        if retention <= 0:
            raise InvalidRequest("retention must be positive, e.g. 30d, 6mo or 1yr")
        deleted = self.store.clear_history(time.time() - retention)
        if vacuum:
            self.store.vacuum()
        self.log.info("Cleared %d ended session(s) older than %gs", deleted, retention)
        return deleted

    # -- recovery --------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Build the collaborators a request or a kernel start would otherwise build on first
        use (the store and its migrations, the GPU inventory, the Docker client). Blocking:
        call it from a thread."""
        self.store  # noqa: B018 - built on first access
        self.inventory.devices()
        self.admin  # noqa: B018
        self._docker_or_none()

    # -- pieces ----------------------------------------------------------------------------
    async def _transition(
        self, session: Session, status: SessionStatus, reason: str, **kwargs: Any
    ) -> Session | None:
        updated = await asyncio.to_thread(
            self.store.transition, session.id, status, reason, **kwargs
        )
        if updated is not None:
            if status.is_terminal or status == SessionStatus.TERMINATING:
                self.forget_session_token(session.id)  # refused from now on, here
            self._emit(updated, session.status)
            if status.is_terminal and (
                session.allocations or session.kind == "batch" or self._awaited(session.id)
            ):
                # Event-driven: the freed devices go out at once, and dependents start
                # (or are cancelled) at once when a dependency ends.
                await self.schedule_now()
        return updated

    def _awaited(self, session_id: str) -> bool:
        """Whether a queued session (as this process's last pass saw the queue) depends on
        ``session_id``."""
        return any(session_id in p.depends_on for p in list(self._queue.pending.values()))

    def _emit(self, session: Session, previous: SessionStatus | None) -> None:
        if not self.trait_has_value("event_logger") and "handlers" not in self.config.get(
            "EventLogger", {}
        ):
            return  # no logger given or asked for, and none configured: nobody would hear
        self.event_logger.emit(
            schema_id=EVENT_SCHEMA_ID,
            data={
                "session_id": session.id,
                "kernel_id": session.kernel_id,
                "owner": session.owner,
                "status": session.status.value,
                "previous_status": previous.value if previous else None,
                "reason": session.reason,
                "devices": [a.device_uuid for a in session.allocations],
                "exit_code": session.exit_code,
            },
        )

    process_alive = staticmethod(process_alive)

    def held_devices(self) -> dict[str, str]:
        """Device UUID → session id, for every live allocation on this host's store."""
        return {a.device_uuid: a.session_id for a in self.store.allocations()}


def _build(klass: type, **options: Any) -> Any:
    """An instance of a configured class, given those ``options`` its constructor takes."""
    accepted = inspect.signature(klass).parameters
    return klass(**{k: v for k, v in options.items() if k in accepted})
