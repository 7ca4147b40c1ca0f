"""The session manager: request → policy → queue → allocation → runtime → events, and back.

One per process, all sharing one store: every Jupyter process on the host that starts
kernels (the server, nbclient, papermill) queues and allocates through the same database,
in serialized write transactions, so no GPU is ever handed out twice. Scheduling passes
run on every release and periodically while a kernel waits; a reconcile thread ends the
sessions of processes that are gone and removes containers nobody owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import hashlib
import json
import math
import os
import pwd
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio
from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir
from jupyter_events import EventLogger
from traitlets import Bool, Dict, Enum, Float, Instance, Int, List, Unicode, default, validate
from traitlets.config import SingletonConfigurable
from traitlets.traitlets import TraitError

from ..core.errors import (
    GPUSessionsError,
    ImageNotFound,
    InvalidRequest,
    KernelLaunchError,
    PolicyViolation,
    StartCancelled,
    UnsatisfiableRequest,
)
from ..core.identity import Identity
from ..core.models import (
    ExitState,
    GPUDevice,
    LaunchSpec,
    Mount,
    ProcessRef,
    ResourceRequest,
    Session,
)
from ..core.policy import Policy, PolicySet
from ..core.status import SessionStatus
from ..core.units import format_size, parse_size
from ..devices import GPUInventory, detect_inventory
from ..devices.attach import ATTACH_MODES
from ..image import build_hint, default_image
from ..queue import QueueCache
from ..runtime.base import SESSION_LABEL, STORE_LABEL, KernelRuntime, RuntimeHandle
from ..runtime.docker import CONTAINER_STATE_DIR, DockerRuntime
from ..runtime.local import LocalRuntime
from ..scheduler import (
    Capacity,
    HostTotals,
    describe_gpus,
)
from ..store import SessionStore
from ..store.admin import AdminStore
from ..store.sessions import PassDecision
from .lifecycle import RESTART_GRACE, STARTING, SessionLifecycle

if TYPE_CHECKING:
    from ..core.vfolders import VFolderMount
    from ..vfolders import VFolderService

RUNTIMES = ("docker", "local")
EVENT_SCHEMA = Path(__file__).resolve().parent.parent / "events" / "session-status.yaml"
EVENT_SCHEMA_ID = "https://events.jupyter.org/jupyter_gpu_sessions/session-status"
DB_URL_ENV = "JUPYTER_GPU_SESSIONS_DB_URL"
# Host paths that must never become a kernel's bind-mounted working directory.
_FORBIDDEN_WORKDIRS = {"/", "/var", "/run", "/home"}
_FORBIDDEN_WORKDIR_TREES = (
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/boot",
)
_WAIT_POLL = 0.1  # seconds between checks of a queued session's status


def default_db_url() -> str:
    return os.environ.get(DB_URL_ENV) or (
        "sqlite:///" + os.path.join(jupyter_data_dir(), "gpu_sessions.sqlite")
    )


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


def owner_groups(owner: str) -> list[str]:
    """The owner's OS groups (for group policies); none for users unknown to the OS."""
    try:
        gid = pwd.getpwnam(owner).pw_gid
        return [grp.getgrgid(g).gr_name for g in os.getgrouplist(owner, gid)]
    except (KeyError, OSError, ValueError):
        return []


@dataclass
class KernelLaunch:
    """What the provisioner asks for: one kernel start (or restart) of a session."""

    kernel_id: str
    owner: str
    image: str
    argv: list[str]
    env: dict[str, str]
    explicit_env: dict[str, str]
    cwd: str
    request: ResourceRequest
    runtime: str
    connection_file: str
    connection_info: dict[str, Any]
    launch_timeout: float
    queue_timeout: float = 0.0  # 0: wait as long as it takes
    name: str = ""
    vfolders: list[str] = field(default_factory=list)  # "data", "team-ds:ro"
    labels: dict[str, str] = field(default_factory=dict)


class _EndedMeanwhile(Exception):
    """A start found its session ended by someone else (raised and caught internally)."""


NOTICE_FILE = "notice.py"
# Run by an IPython kernel at start (exec_files): says once, on stderr of the first cell,
# why the kernel was restarted, as a local kernel's "The kernel died" does.
_NOTICE_CODE = """\
def _jgs_notice():
    import sys

    said = []

    def say(*_args):
        if not said:
            said.append(True)
            print("[jupyter-gpu-sessions] " + {message}, file=sys.stderr)

    get_ipython().events.register("pre_run_cell", say)


_jgs_notice()
del _jgs_notice
"""


class GPUSessionManager(SessionLifecycle, SingletonConfigurable):
    """Starts kernels as sessions with exactly the devices and limits they were granted."""

    default_image = Unicode(
        help="""Kernel image used when a kernelspec names none. Defaults to the image this
        package builds with `jupyter gpu-sessions image build` (tagged by its recipe's hash).""",
    ).tag(config=True)

    @default("default_image")
    def _default_image(self) -> str:
        return default_image()

    simulated_gpus = Unicode(
        "",
        help="""Simulated GPUs for hosts without NVIDIA hardware, used only when NVML does not
        initialise, e.g. `4xA100-80GB` or `2xA100-80GB,1xT4-16GB`. Falls back to the
        JUPYTER_GPU_SESSIONS_SIMULATED_GPUS environment variable.""",
    ).tag(config=True)

    simulated_device_dir = Unicode(
        "",
        help="""A directory of fake device nodes `nvidia0`, `nvidia1`… (copies of /dev/null)
        attached to containers for simulated GPUs. Falls back to
        JUPYTER_GPU_SESSIONS_SIMULATED_DEVICE_DIR.""",
    ).tag(config=True)

    gpu_attach_mode = Enum(
        ATTACH_MODES,
        default_value="auto",
        help="""How GPUs reach a container, always by UUID: `nvidia` (a device request to the
        NVIDIA container toolkit), `cdi` (CDI names, Docker ≥ 25 with an nvidia CDI spec),
        `nodes` (device nodes plus NVIDIA_VISIBLE_DEVICES/CUDA_VISIBLE_DEVICES; the image
        must bring the driver's user-space libraries). `auto` picks the first the host
        supports; simulated GPUs always use `nodes`.""",
    ).tag(config=True)

    docker_url = Unicode(
        "",
        help="Docker engine URL; empty means DOCKER_HOST or unix:///var/run/docker.sock.",
    ).tag(config=True)

    kernel_uid = Int(
        None,
        allow_none=True,
        help="""The uid container kernels run as. Unset (the default): the server's own uid
        when it is not root; when the server runs as root, the owner of the notebook's
        directory if that is not root, else `fallback_uid`. Never 0.""",
    ).tag(config=True)

    kernel_gid = Int(None, allow_none=True, help="The gid for `kernel_uid`.").tag(config=True)

    match_notebook_owner = Bool(
        True,
        help="""When the server runs as root, run each container kernel as the owner of its
        notebook's directory, so files it writes belong to that person, not to root.""",
    ).tag(config=True)

    fallback_uid = Int(
        1000, help="uid (and gid) for container kernels when no other non-root uid applies."
    ).tag(config=True)

    @validate("kernel_uid", "fallback_uid")
    def _not_root(self, proposal):
        if proposal.value == 0:
            raise TraitError("container kernels never run as root: choose a uid other than 0")
        return proposal.value

    env_allowlist = List(
        Unicode(),
        default_value=["JPY_SESSION_NAME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ"],
        help="""Variables of the server's environment a kernel inherits. Everything else of
        the server's environment stays out; a kernelspec's `env` and the provisioner's
        `env` are always passed.""",
    ).tag(config=True)

    local_env_allowlist = List(
        Unicode(),
        default_value=[
            "PATH",
            "HOME",
            "USER",
            "LOGNAME",
            "SHELL",
            "TMPDIR",
            "VIRTUAL_ENV",
            "CONDA_PREFIX",
            "PYTHONPATH",
            "LD_LIBRARY_PATH",
        ],
        help="Further variables a *local* (non-container) kernel inherits.",
    ).tag(config=True)

    home_size = Unicode(
        "1GiB", help="Size of the in-memory $HOME (/home/work) of a container kernel."
    ).tag(config=True)

    default_pids_limit = Int(
        4096, help="Process limit of a container kernel whose kernelspec sets none."
    ).tag(config=True)

    @validate("home_size")
    def _valid_size(self, proposal):
        try:
            parse_size(proposal.value, what="home_size")
        except InvalidRequest as exc:
            raise TraitError(str(exc)) from exc
        return proposal.value

    db_url = Unicode(
        help="""Where sessions, their history and allocations are stored: any SQLAlchemy
        URL (e.g. postgresql+psycopg://…). Defaults to JUPYTER_GPU_SESSIONS_DB_URL, else a
        SQLite file in the Jupyter data directory, shared by every Jupyter process of this
        user on the host (servers, nbclient, papermill).""",
    ).tag(config=True)

    @default("db_url")
    def _default_db_url(self) -> str:
        return default_db_url()

    scheduler_strategy = Enum(
        ("fifo", "drf"),
        default_value="fifo",
        help="""`fifo`: oldest first; a head that failed `max_head_attempts` passes is skipped
        so one big request does not block small ones forever. `drf`: dominant resource
        fairness across owners.""",
    ).tag(config=True)

    max_head_attempts = Int(
        3, help="FIFO: passes the queue's head may fail before sessions behind it go first."
    ).tag(config=True)

    schedule_interval = Float(
        2.0,
        help="Seconds between periodic scheduling passes while a kernel waits (besides the "
        "pass that runs on every release).",
    ).tag(config=True)

    reconcile_interval = Float(
        10.0,
        help="Seconds between reconcile passes: sessions of dead processes and vanished "
        "containers are ended, unrecorded containers removed, lifetimes enforced.",
    ).tag(config=True)

    policies = Dict(
        help="""Limits per scope: {"default": {...}, "group:NAME": {...}, "user:NAME": {...}}
        with max_concurrent_sessions, max_pending_sessions, max_gpus (whole-GPU
        equivalents), max_cpus, max_memory ("64GiB"), max_session_lifetime ("12h"),
        idle_timeout ("1h", enforced by the server extension), and the storage limits
        max_vfolder_count, max_vfolder_size ("100GiB": each vfolder's quota) and
        max_vfolder_total_size (an owner's bytes across their vfolders). An owner's policy:
        the default, overridden by the most generous of their groups', overridden by their
        own. Admins may replace a scope through the API (PUT policies/{scope}).""",
    ).tag(config=True)

    @validate("policies")
    def _valid_policies(self, proposal):
        try:
            self._policies = PolicySet.from_config(proposal.value)
        except InvalidRequest as exc:
            raise TraitError(str(exc)) from exc
        return proposal.value

    groups = Dict(
        help="""Group → list of members, in addition to the members' OS groups (and, under
        JupyterHub, their Hub groups): {"ml": ["ada", "grace"]}. Group policies, project
        vfolders and admin_groups use them.""",
    ).tag(config=True)

    @validate("groups")
    def _valid_groups(self, proposal):
        for group, members in proposal.value.items():
            if not isinstance(members, list | tuple) or not all(
                isinstance(m, str) for m in members
            ):
                raise TraitError(f"groups[{group!r}] must be a list of user names")
        return proposal.value

    log_tail_lines = Int(
        200,
        help="How many of a kernel's last log lines are kept when its container is removed "
        "(shown by the sessions API after the kernel has ended).",
    ).tag(config=True)

    event_logger = Instance(
        EventLogger,
        help="Where session status events go (the server extension passes the server's).",
    )

    @default("event_logger")
    def _default_event_logger(self) -> EventLogger:
        return EventLogger(parent=self)

    state_root = Unicode(
        help="Where per-session files (the kernel's connection file copy, logs) live."
    ).tag(config=True)

    @default("state_root")
    def _default_state_root(self) -> str:
        return os.path.join(jupyter_runtime_dir(), "gpu-sessions")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.process = current_process()
        self._started_at = time.time()
        self._handles: dict[str, RuntimeHandle] = {}
        self._lock = threading.Lock()
        self._runtimes: dict[str, KernelRuntime] = {}
        self._inventory: GPUInventory | None = None
        self._store: SessionStore | None = None
        self._policies = PolicySet.from_config(self.policies)
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
        self.event_logger.register_event_schema(EVENT_SCHEMA)

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
                self._inventory = detect_inventory(
                    self.simulated_gpus or None, self.simulated_device_dir or None
                )
                self.log.info("GPU inventory: %s", self._inventory.describe())
            return self._inventory

    def runtime(self, name: str) -> KernelRuntime:
        if name not in RUNTIMES:
            raise InvalidRequest(f"runtime {name!r} is unknown: use one of {', '.join(RUNTIMES)}")
        with self._lock:
            if name not in self._runtimes:
                self._runtimes[name] = (
                    DockerRuntime(
                        base_url=self.docker_url or None,
                        gpu_attach_mode=self.gpu_attach_mode,
                        home_size=parse_size(self.home_size),
                        default_pids_limit=self.default_pids_limit,
                    )
                    if name == "docker"
                    else LocalRuntime()
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

    def groups_of(self, username: str) -> frozenset[str]:
        """OS groups, configured groups, and the groups the API last saw the user with."""
        found = set(owner_groups(username))
        found.update(g for g, members in self.groups.items() if username in members)
        try:
            found.update(self.admin.user_groups(username))
        except Exception:  # a missing store must not hide the OS and configured groups
            self.log.debug("No stored groups for %s", username, exc_info=True)
        return frozenset(found)

    def identity(self, username: str, *, is_admin: bool = False) -> Identity:
        return Identity(username, self.groups_of(username), is_admin)

    def known_user(self, username: str) -> bool:
        """Someone this host knows: an OS account, a configured group member, or a user
        the API has seen."""
        try:
            pwd.getpwnam(username)
            return True
        except (KeyError, ValueError):  # ValueError: an embedded NUL
            pass
        if any(username in members for members in self.groups.values()):
            return True
        return self.admin.known_user(username)

    def refresh_policies(self) -> PolicySet:
        """The configured policies with those set through the API on top (a stored scope
        replaces the configured one). Read at every submit and scheduling pass, so a
        change applies to the next kernel start."""
        stored = self.admin.policies()
        if not stored:
            self._effective_policies = self._policies
        else:
            merged = dict(self.policies)
            merged.update(stored)
            self._effective_policies = PolicySet.from_config(merged)
        return self._effective_policies

    def policy_for(self, owner: str) -> Policy:
        return self._effective_policies.for_owner(owner, self.groups_of(owner))

    def handle(self, session: Session) -> RuntimeHandle | None:
        """The runtime's handle (container or process) of ``session``'s current kernel."""
        return self._handles.get(session.id)

    # -- submitting ------------------------------------------------------------------------
    async def submit(self, launch: KernelLaunch) -> Session:
        """Check a request and queue it (PENDING). What can never run — larger than the host,
        or than the owner's policy allows — is refused at once, naming the limit."""
        launch.cwd = self._working_dir(launch.cwd)
        request = launch.request
        request.check_fits_host(host_cpus=os.cpu_count() or 1, host_memory=_host_memory())
        runtime = self.runtime(launch.runtime)
        if not await runtime.check_image(launch.image):
            raise ImageNotFound(
                f"The kernel image {launch.image!r} is not on this host. {build_hint(launch.image)}"
            )
        devices = await asyncio.to_thread(self.inventory.devices)
        if request.gpu_kind and not devices:
            raise UnsatisfiableRequest(
                f"This kernel asks for {describe_gpus(request)}, but this host has no GPUs: NVML "
                "found no NVIDIA driver and no simulated GPUs are configured. Choose a kernel "
                'without GPUs (e.g. "Python 3 (container)"), or, for a demo, set '
                "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS=4xA100-80GB.",
                reason="no-gpus",
            )
        problem = Capacity(devices).unsatisfiable(request)
        if problem:
            raise UnsatisfiableRequest(f"This kernel {problem}.", reason="larger-than-host")
        await asyncio.to_thread(self.refresh_policies)
        policy = await asyncio.to_thread(self.policy_for, launch.owner)
        self._check_policy(launch.owner, request, policy)
        if launch.vfolders:
            # Unknown or forbidden vfolders fail the start now, before it queues.
            await asyncio.to_thread(self._vfolder_mounts, launch)

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

    def admission(self, kernel_id: str) -> asyncio.Future:
        """A future told with the session once a start of ``kernel_id`` is admitted to the
        queue (policy, size and image checked), so a server can answer its client at once
        while the kernel waits; call from the loop that starts the kernel."""
        future = asyncio.get_running_loop().create_future()
        self._admissions[kernel_id] = future
        return future

    def forget_admission(self, kernel_id: str) -> None:
        self._admissions.pop(kernel_id, None)

    @staticmethod
    def _check_policy(owner: str, request: ResourceRequest, policy: Policy) -> None:
        checks = [
            (
                "max_gpus",
                request.gpu_equivalent,
                policy.max_gpus,
                f"{request.gpu_equivalent:g} GPUs",
            ),
            ("max_cpus", request.cpus or 0, policy.max_cpus, f"{request.cpus or 0:g} CPUs"),
            (
                "max_memory",
                request.memory or 0,
                policy.max_memory,
                format_size(request.memory or 0),
            ),
        ]
        for name, asked, limit, text in checks:
            if limit is not None and asked > limit:
                raise PolicyViolation(
                    f"This kernel asks for {text}, more than {owner}'s policy allows "
                    f"({name} = {policy.describe(name)}): ask for less, or ask an admin."
                )

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
            spec = await asyncio.to_thread(self._launch_spec, session, launch)
            await asyncio.to_thread(self._prepare_state_dir, spec, self.restart_notice(session))
            handle = await runtime.start(spec, previous=previous)
            self._handles[session.id] = handle
            recorded = await asyncio.to_thread(
                self.store.update, session.id, only_from=STARTING, container_id=handle.id
            )
            if recorded is None:
                raise _EndedMeanwhile()
            await self._wait_until_alive(runtime, handle, spec, launch.launch_timeout, session.id)
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

    def queue_message(self, session: Session) -> str:
        """Where a queued session stands and what it waits for, for people: live from this
        process's last pass when it has one, else as stored."""
        return self.queue_position(session)[1]

    def queue_position(self, session: Session) -> tuple[int | None, str]:
        """A queued session's place (None when unknown) and the message that says it."""
        live = self._queue.latest.get(session.id)
        if live is not None:
            failures, position = live
            reasons = [f.message for f in failures]
        else:
            data = session.scheduler or {}
            position = data.get("position")
            reasons = [f["message"] for f in data.get("failed", ())]
        place = f"#{position} in the queue" if position else "in the queue"
        waits = "; ".join(reasons) or "the next scheduling pass"
        return position, f"Queued: {place}, waiting for {session.request.describe()}: {waits}"

    # -- watching and stopping -------------------------------------------------------------
    async def poll(self, session: Session) -> ExitState | None:
        handle = self._handles.get(session.id)
        if handle is None:
            if session.status in (SessionStatus.PENDING, *STARTING):
                return None  # still queued or starting: alive, as far as a client can tell
            return session.exit or ExitState(exit_code=0)
        state = await self.runtime(session.runtime).poll(handle)
        if state is not None:
            session.exit_code, session.oom_killed = state.exit_code, state.oom_killed
        return state

    async def signal(self, session: Session, signum: int) -> None:
        handle = self._handles.get(session.id)
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
            memory=_host_memory() or 1,
        )
        with self._pass_lock:
            queue = self._queue
            try:
                decision = self.store.schedule(
                    lambda data: queue.decide(
                        data,
                        devices,
                        policy_for=policy_for,
                        strategy=self.scheduler_strategy,
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

    def stop_reconciler(self, wait: bool = True) -> None:
        """Stop the reconcile thread; with ``wait`` (closing the store), until its pass ends."""
        self._stopping.set()
        thread = self._reconciler
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        self._reconciler = None

    def warm_up(self) -> None:
        """Build the collaborators a request or a kernel start would otherwise build on first
        use (the store and its migrations, the GPU inventory, the Docker client). Blocking:
        call it from a thread."""
        self.store  # noqa: B018 - built on first access
        self.inventory.devices()
        self.admin  # noqa: B018
        self._docker_or_none()

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

    # -- pieces ----------------------------------------------------------------------------
    async def _transition(
        self, session: Session, status: SessionStatus, reason: str, **kwargs: Any
    ) -> Session | None:
        updated = await asyncio.to_thread(
            self.store.transition, session.id, status, reason, **kwargs
        )
        if updated is not None:
            self._emit(updated, session.status)
            if status.is_terminal and session.allocations:
                await self.schedule_now()  # event-driven: the freed devices go out at once
        return updated

    def _emit(self, session: Session, previous: SessionStatus | None) -> None:
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

    def _working_dir(self, cwd: str) -> str:
        path = os.path.realpath(cwd or os.getcwd())
        if not os.path.isdir(path):
            raise InvalidRequest(f"the kernel's working directory {cwd!r} is not a directory")
        if path in _FORBIDDEN_WORKDIRS or any(
            path == tree or path.startswith(tree + "/") for tree in _FORBIDDEN_WORKDIR_TREES
        ):
            raise InvalidRequest(
                f"the kernel's working directory {path!r} is a system directory and cannot be "
                "mounted into a container: start the kernel from a notebook directory, or set "
                "the kernelspec's working_dir"
            )
        return path

    def _kernel_user(self, working_dir: str) -> tuple[int, int]:
        if self.kernel_uid is not None:
            gid = self.kernel_gid if self.kernel_gid is not None else self.kernel_uid
            return self.kernel_uid, gid
        if os.geteuid() != 0:
            return os.geteuid(), os.getegid()
        if self.match_notebook_owner:
            st = os.stat(working_dir)
            if st.st_uid != 0:
                return st.st_uid, st.st_gid
        return self.fallback_uid, self.fallback_uid

    def _kernel_env(self, launch: KernelLaunch) -> dict[str, str]:
        allowed = set(self.env_allowlist)
        if launch.runtime == "local":
            allowed |= set(self.local_env_allowlist)
        env = {k: v for k, v in launch.env.items() if k in allowed}
        share = launch.request.gpu_share
        if share:
            # A time-sliced share: the frameworks' own memory caps (soft — a process can
            # ignore them), and the MPS thread limit where an MPS daemon runs.
            env.update(
                JUPYTER_GPU_SESSIONS_GPU_SHARE=f"{share:g}",
                XLA_PYTHON_CLIENT_MEM_FRACTION=f"{share:g}",
                TF_FORCE_GPU_ALLOW_GROWTH="true",
                CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=str(max(1, int(share * 100))),
            )
        env.update(launch.explicit_env)
        return env

    def _attached_devices(self, session: Session) -> tuple[GPUDevice, ...]:
        """What the container gets for its allocations: whole GPUs, MIG instances (by their
        own UUID, through the parent's device node), or the GPU a share runs on."""
        by_uuid = {d.uuid: d for d in self.inventory.devices()}
        attached = []
        for allocation in session.allocations:
            parent = by_uuid.get(allocation.gpu_uuid)
            if parent is None:
                raise KernelLaunchError(
                    f"GPU {allocation.gpu_uuid} allocated to this session is not in this "
                    "host's inventory any more"
                )
            if allocation.kind == "mig":
                attached.append(replace(parent, uuid=allocation.device_uuid, mig_instances=()))
            else:
                attached.append(parent)
        return tuple(attached)

    def _launch_spec(self, session: Session, launch: KernelLaunch) -> LaunchSpec:
        uid, gid = self._kernel_user(launch.cwd)
        state_dir = os.path.join(self.state_root, session.id)
        return LaunchSpec(
            session_id=session.id,
            kernel_id=launch.kernel_id,
            owner=launch.owner,
            image=launch.image,
            argv=self._kernel_argv(launch, state_dir),
            env=self._kernel_env(launch),
            working_dir=launch.cwd,
            resources=launch.request,
            connection_file=launch.connection_file,
            connection_info=launch.connection_info,
            state_dir=state_dir,
            uid=uid,
            gid=gid,
            devices=self._attached_devices(session),
            mounts=tuple(
                Mount(m.host_path, m.container_path, m.read_only)
                for m in self._vfolder_mounts(launch)
            ),
            labels={**launch.labels, STORE_LABEL: self.store_id},
        )

    @staticmethod
    def _kernel_argv(launch: KernelLaunch, state_dir: str) -> list[str]:
        """The kernel's command; an IPython kernel also runs the session's notice file."""
        argv = list(launch.argv)
        if any("ipykernel" in arg for arg in argv):
            folder = CONTAINER_STATE_DIR if launch.runtime == "docker" else state_dir
            argv.append(f"--IPKernelApp.exec_files={json.dumps([f'{folder}/{NOTICE_FILE}'])}")
        return argv

    def _vfolder_mounts(self, launch: KernelLaunch) -> list[VFolderMount]:
        """The vfolders a kernel asked for, checked against what its owner may mount now."""
        if not launch.vfolders:
            return []
        if launch.runtime != "docker":
            raise InvalidRequest(
                "vfolders are mounted only into container kernels (runtime 'docker'); "
                f"this kernel uses the {launch.runtime!r} runtime: remove its vfolders, or "
                "use a container kernelspec"
            )
        return self.vfolders.resolve_mounts(self.identity(launch.owner), list(launch.vfolders))

    @staticmethod
    def _prepare_state_dir(spec: LaunchSpec, notice: str = "") -> None:
        """The kernel's state directory, with the notice an IPython kernel shows in its
        first cell (why it was restarted; empty when there is nothing to say)."""
        os.makedirs(spec.state_dir, mode=0o700, exist_ok=True)
        path = os.path.join(spec.state_dir, NOTICE_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write(_NOTICE_CODE.format(message=json.dumps(notice)) if notice else "")
        if os.geteuid() == 0:
            os.chown(spec.state_dir, spec.uid, spec.gid)
            os.chown(path, spec.uid, spec.gid)

    async def _wait_until_alive(
        self,
        runtime: KernelRuntime,
        handle: RuntimeHandle,
        spec: LaunchSpec,
        timeout: float,
        session_id: str,
    ) -> None:
        """Until the kernel's heartbeat answers; fail early when it exits, when its session
        is ended meanwhile (by anyone), or at ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ip = spec.connection_info.get("ip") or "127.0.0.1"
        url = f"tcp://{ip}:{spec.connection_info['hb_port']}"
        context = zmq.asyncio.Context()
        try:
            checked = -math.inf
            while True:
                # An end asked for meanwhile: this process's own at once, another's (read
                # from the store) within half a second.
                if session_id in self._ending or loop.time() - checked >= 0.5:
                    checked = loop.time()
                    current = await asyncio.to_thread(self.store.get, session_id, history=False)
                    if current.status not in STARTING:
                        raise _EndedMeanwhile()
                state = await runtime.poll(handle)
                if state is not None:
                    raise KernelLaunchError(
                        f"The kernel {state.describe()} before it was ready "
                        f"({await runtime.describe(handle)}). "
                        + await self._log_tail(runtime, handle)
                    )
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise KernelLaunchError(
                        f"The kernel did not answer within {timeout:g}s (launch_timeout); "
                        f"{await runtime.describe(handle)}. It has been removed. "
                        + await self._log_tail(runtime, handle),
                        reason="launch-timeout",
                    )
                if await _heartbeat(context, url, min(0.5, remaining)):
                    return
        finally:
            context.destroy(linger=0)

    async def session_logs(self, session: Session, tail: int = 200) -> str:
        """The kernel's log: live from its container (or process) while it has one, the
        kept tail after it ended."""
        handle = self._handles.get(session.id)
        runtime = self.runtime(session.runtime)
        if handle is None and session.container_id and not session.status.is_terminal:
            if session.runtime == "docker":  # a kernel of another process on this host
                handle = RuntimeHandle("docker", session.container_id, "")
        if handle is not None and not session.status.is_terminal:
            try:
                return await runtime.logs(handle, tail=tail)
            except GPUSessionsError:
                pass  # the container just went: fall back to the kept tail
        text = await asyncio.to_thread(self.store.log_tail, session.id) or ""
        lines = text.splitlines(keepends=True)
        return "".join(lines[-tail:])

    @staticmethod
    async def _log_tail(runtime: KernelRuntime, handle: RuntimeHandle) -> str:
        try:
            text = (await runtime.logs(handle, tail=20)).rstrip()
        except GPUSessionsError:
            text = ""
        return f"Last lines of its log:\n{text}" if text else "It wrote nothing to its log."


async def _heartbeat(context: zmq.asyncio.Context, url: str, timeout: float) -> bool:
    """One ping on the kernel's heartbeat channel; True when it echoes within ``timeout``.

    ``IMMEDIATE`` queues the ping only on a completed handshake: Docker's port proxy
    accepts (and then drops) connections before the kernel listens, and a ping queued on
    such a connection would be lost, costing a whole timeout.
    """
    socket = context.socket(zmq.REQ)
    socket.linger = 0
    socket.immediate = 1
    socket.reconnect_ivl = 20  # ms; the default 100 ms adds up to a visible delay
    try:
        socket.connect(url)
        await asyncio.wait_for(socket.send(b"ping"), timeout)
        return bool(await socket.poll(timeout=int(timeout * 1000)))
    except asyncio.TimeoutError:
        return False
    finally:
        socket.close(linger=0)


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
