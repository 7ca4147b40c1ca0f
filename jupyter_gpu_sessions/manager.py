"""The session manager: request → validation → devices → runtime → ready, and back.

One per process for now, holding its sessions in memory; the shared store, the queue and
policies arrive with the scheduler (DESIGN.md). Everything that starts a kernel — the
provisioner under jupyter_server, nbclient, papermill — goes through here.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from jupyter_core.paths import jupyter_runtime_dir
from traitlets import Bool, Enum, Int, List, Unicode, default, validate
from traitlets.config import SingletonConfigurable
from traitlets.traitlets import TraitError

from .core.errors import (
    GPUSessionsError,
    ImageNotFound,
    InvalidRequest,
    KernelLaunchError,
    UnsatisfiableRequest,
)
from .core.models import ExitState, GPUDevice, LaunchSpec, ResourceRequest, Session
from .core.status import SessionStatus
from .core.units import parse_size
from .devices import GPUInventory, detect_inventory
from .devices.attach import ATTACH_MODES
from .image import build_hint, default_image
from .runtime.base import KernelRuntime, RuntimeHandle
from .runtime.docker import DockerRuntime
from .runtime.local import LocalRuntime

RUNTIMES = ("docker", "local")
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
    labels: dict[str, str] = field(default_factory=dict)


class SessionManager(SingletonConfigurable):
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

    ended_sessions_kept = Int(
        200, help="How many ended sessions this process remembers (for their history)."
    ).tag(config=True)

    state_root = Unicode(
        help="Where per-session files (the kernel's connection file copy, logs) live."
    ).tag(config=True)

    @default("state_root")
    def _default_state_root(self) -> str:
        return os.path.join(jupyter_runtime_dir(), "gpu-sessions")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sessions: dict[str, Session] = {}
        self._handles: dict[str, RuntimeHandle] = {}
        self._held: dict[str, str] = {}  # GPU uuid → session id
        self._lock = threading.Lock()
        self._runtimes: dict[str, KernelRuntime] = {}
        self._inventory: GPUInventory | None = None

    # -- collaborators ---------------------------------------------------------------------
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

    # -- kernel lifecycle ------------------------------------------------------------------
    async def start_kernel(self, launch: KernelLaunch, session: Session | None = None) -> Session:
        """Start a new session's kernel, or restart ``session``'s. On failure nothing is left
        behind: no container, no devices held, the session ended with the reason."""
        runtime = self.runtime(launch.runtime)
        restart = session is not None
        launch.cwd = self._working_dir(launch.cwd)
        if session is None:
            session = await self._open_session(launch, runtime)
        spec = self._launch_spec(session, launch)
        previous = self._handles.get(session.id)
        try:
            await asyncio.to_thread(self._prepare_state_dir, spec)
            handle = await runtime.start(spec, previous=previous)
            self._handles[session.id] = handle
            await self._wait_until_alive(runtime, handle, spec, launch.launch_timeout)
        except BaseException as exc:
            await self._abort(session, runtime, exc)
            raise
        session.transition(SessionStatus.RUNNING, "kernel restarted" if restart else "kernel ready")
        self.log.info(
            "Session %s (kernel %s, %s) running in %s with %s",
            session.id[:12],
            launch.kernel_id,
            session.owner,
            handle.name,
            session.request.describe() + self._device_text(session.devices),
        )
        return session

    async def _open_session(self, launch: KernelLaunch, runtime: KernelRuntime) -> Session:
        launch.request.check_fits_host(host_cpus=os.cpu_count() or 1, host_memory=_host_memory())
        if not await runtime.check_image(launch.image):
            raise ImageNotFound(
                f"The kernel image {launch.image!r} is not on this host. {build_hint(launch.image)}"
            )
        session = Session(
            id=uuid.uuid4().hex,
            owner=launch.owner,
            kernel_id=launch.kernel_id,
            image=launch.image,
            request=launch.request,
            runtime=runtime.name,
        )
        session.devices = await self._allocate(session)
        session.transition(SessionStatus.PREPARING, "resources allocated")
        self.sessions[session.id] = session
        return session

    async def poll(self, session: Session) -> ExitState | None:
        handle = self._handles.get(session.id)
        if handle is None:
            return session.exit or ExitState(exit_code=0)
        state = await self.runtime(session.runtime).poll(handle)
        if state is not None:
            session.exit = state
        return state

    def handle(self, session: Session) -> RuntimeHandle | None:
        """The runtime's handle (container or process) of ``session``'s current kernel."""
        return self._handles.get(session.id)

    async def signal(self, session: Session, signum: int) -> None:
        handle = self._handles.get(session.id)
        if handle is not None:
            await self.runtime(session.runtime).signal(handle, signum)

    async def stop_kernel(self, session: Session, *, restart: bool, reason: str = "") -> None:
        """After the kernel has stopped: keep the session for a restart (its container,
        ports and devices), or end it and free everything."""
        if restart:
            if session.status == SessionStatus.RUNNING:
                session.transition(SessionStatus.RESTARTING, reason or "restart requested")
            return
        runtime = self.runtime(session.runtime)
        if session.status in (SessionStatus.RUNNING, SessionStatus.RESTARTING):
            session.transition(SessionStatus.TERMINATING, reason or "shutdown requested")
        handle = self._handles.pop(session.id, None)
        try:
            if handle is not None:
                session.exit = await runtime.poll(handle) or session.exit
                await runtime.remove(handle)
        finally:
            self._release(session)
            if session.status == SessionStatus.TERMINATING:
                session.transition(SessionStatus.TERMINATED, reason or "shut down")
            await asyncio.to_thread(self._remove_state_dir, session.id)
            self._forget_ended()

    def adopt(
        self,
        session_id: str,
        launch_runtime: str,
        handle: RuntimeHandle,
        kernel_id: str,
        owner: str,
    ) -> Session:
        """Re-attach to a running kernel described by ``get_provisioner_info`` (another
        process started it). Its devices are not re-claimed in this process's ledger."""
        session = self.sessions.get(session_id)
        if session is None:
            session = Session(
                id=session_id,
                owner=owner,
                kernel_id=kernel_id,
                image="",
                request=ResourceRequest(),
                runtime=launch_runtime,
                status=SessionStatus.RUNNING,
            )
            self.sessions[session_id] = session
        self._handles[session_id] = handle
        return session

    async def close(self) -> None:
        for runtime in list(self._runtimes.values()):
            await runtime.close()

    # -- pieces ----------------------------------------------------------------------------
    async def _abort(self, session: Session, runtime: KernelRuntime, exc: BaseException) -> None:
        """Undo a failed (re)start: remove the container, free the devices, end the session."""
        handle = self._handles.pop(session.id, None)
        ran = handle is not None
        if handle is not None:
            try:
                await runtime.remove(handle)
            except Exception:
                self.log.exception("Could not remove %s after a failed start", handle.name)
        self._release(session)
        reason = getattr(exc, "reason", None) or type(exc).__name__
        if isinstance(exc, asyncio.CancelledError):
            reason = "start cancelled"
        status = SessionStatus.ERROR if ran else SessionStatus.CANCELLED
        if session.status == SessionStatus.RESTARTING:
            status = SessionStatus.ERROR
        session.transition(status, reason)
        await asyncio.to_thread(self._remove_state_dir, session.id)
        self._forget_ended()

    async def _allocate(self, session: Session) -> tuple[GPUDevice, ...]:
        wanted = session.request.gpus
        if wanted == 0:
            return ()
        devices = await asyncio.to_thread(self.inventory.devices)
        plural = "s" if wanted != 1 else ""
        if not devices:
            raise UnsatisfiableRequest(
                f"This kernel asks for {wanted} GPU{plural}, but this host has no GPUs: NVML "
                "found no NVIDIA driver and no simulated GPUs are configured. Choose a kernel "
                'without GPUs (e.g. "Python 3 (container)"), or, for a demo, set '
                "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS=4xA100-80GB.",
                reason="no-gpus",
            )
        if wanted > len(devices):
            raise UnsatisfiableRequest(
                f"This kernel asks for {wanted} GPUs, but this host has only {len(devices)}: "
                f"ask for at most {len(devices)}.",
                reason="more-gpus-than-host",
            )
        with self._lock:
            free = [d for d in devices if d.uuid not in self._held]
            if len(free) < wanted:
                raise UnsatisfiableRequest(
                    f"This kernel asks for {wanted} GPU{plural}, but only {len(free)} of "
                    f"{len(devices)} are free; the others are held by running kernels. Shut "
                    "one of them down, or ask for fewer GPUs.",
                    reason="gpus-busy",
                )
            chosen = tuple(free[:wanted])
            for device in chosen:
                self._held[device.uuid] = session.id
        return chosen

    def _forget_ended(self) -> None:
        """Keep only the newest ``ended_sessions_kept`` ended sessions in memory."""
        ended = [s for s in self.sessions.values() if s.status.is_terminal]
        for session in ended[: max(0, len(ended) - self.ended_sessions_kept)]:
            del self.sessions[session.id]

    def _release(self, session: Session) -> None:
        with self._lock:
            for device in session.devices:
                if self._held.get(device.uuid) == session.id:
                    del self._held[device.uuid]

    def held_devices(self) -> dict[str, str]:
        with self._lock:
            return dict(self._held)

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
        env.update(launch.explicit_env)
        return env

    def _launch_spec(self, session: Session, launch: KernelLaunch) -> LaunchSpec:
        uid, gid = self._kernel_user(launch.cwd)
        return LaunchSpec(
            session_id=session.id,
            kernel_id=launch.kernel_id,
            owner=launch.owner,
            image=launch.image,
            argv=list(launch.argv),
            env=self._kernel_env(launch),
            working_dir=launch.cwd,
            resources=launch.request,
            connection_file=launch.connection_file,
            connection_info=launch.connection_info,
            state_dir=os.path.join(self.state_root, session.id),
            uid=uid,
            gid=gid,
            devices=session.devices,
            labels=dict(launch.labels),
        )

    @staticmethod
    def _prepare_state_dir(spec: LaunchSpec) -> None:
        os.makedirs(spec.state_dir, mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(spec.state_dir, spec.uid, spec.gid)

    def _remove_state_dir(self, session_id: str) -> None:
        shutil.rmtree(os.path.join(self.state_root, session_id), ignore_errors=True)

    @staticmethod
    def _device_text(devices: tuple[GPUDevice, ...]) -> str:
        return f" ({', '.join(d.uuid for d in devices)})" if devices else ""

    async def _wait_until_alive(
        self, runtime: KernelRuntime, handle: RuntimeHandle, spec: LaunchSpec, timeout: float
    ) -> None:
        """Until the kernel's heartbeat answers; fail early when it exits, or at ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ip = spec.connection_info.get("ip") or "127.0.0.1"
        url = f"tcp://{ip}:{spec.connection_info['hb_port']}"
        context = zmq.asyncio.Context()
        try:
            while True:
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
