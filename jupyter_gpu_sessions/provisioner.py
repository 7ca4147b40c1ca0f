"""GPUContainerProvisioner: a kernel provisioner that asks the session manager for a session.

Named ``gpu-container-provisioner`` in a kernelspec::

    "metadata": {"kernel_provisioner": {
        "provisioner_name": "gpu-container-provisioner",
        "config": {"gpus": 1, "cpus": 4, "memory": "16GiB"}}}
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import signal
from typing import Any

from jupyter_client.connect import KernelConnectionInfo, LocalPortCache
from jupyter_client.provisioning import KernelProvisionerBase
from traitlets import Dict, Enum, Float, Int, List, Unicode, Union, validate
from traitlets.traitlets import TraitError

from .core.errors import InvalidRequest, RuntimeUnavailable
from .core.models import (
    MAX_GPUS_PER_SESSION,
    ResourceRequest,
    RuntimeHandle,
    Session,
    mig_fraction,
    parse_share,
)
from .core.parameters import CHOICE_KEY, Choice, apply_choice, parse_choice
from .core.status import SessionStatus
from .core.units import parse_cpus, parse_size
from .engine import RUNTIMES, Engine, KernelLaunch, current_engine, current_owner

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")


def notebook_choice(path: str | None, notebook_dir: str | None = None) -> Choice:
    """The launch choice a notebook saved in its metadata (``{"jupyter-gpu-sessions":
    {"resources": {"gpus": 2}, "image": "…", "vfolders": [{"name": "data", "permission":
    "ro"}]}}``, see ``core/parameters.py``); none when it is not a readable notebook. ``path``
    is ``JPY_SESSION_NAME``: absolute, or (when a client sent no name) the notebook's path
    relative to the server root, whose file then sits in ``notebook_dir``. Wrong types are
    :class:`InvalidRequest` naming the key."""
    if not path or not path.endswith(".ipynb"):
        return Choice()
    if not os.path.isabs(path) and notebook_dir:
        path = os.path.join(notebook_dir, os.path.basename(path))
    try:
        if os.path.getsize(path) > 64 * 1024 * 1024:
            return Choice()  # not worth parsing a huge notebook at every kernel start
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f).get("metadata") or {}
    except (OSError, ValueError, AttributeError):
        return Choice()
    if not isinstance(metadata, dict):
        return Choice()
    return parse_choice(metadata.get(CHOICE_KEY), where=path)


def _merge_vfolders(spec: list[str], notebook: list[str]) -> list[str]:
    """The kernelspec's vfolders plus the notebook's; the notebook's entry wins per name."""
    merged: dict[str, str] = {}
    for item in [*spec, *notebook]:
        merged[item.split(":", 1)[0]] = item
    return list(merged.values())


class GPUContainerProvisioner(KernelProvisionerBase):
    """Runs the kernel as a session: a hardened container (or a local process) with exactly
    the GPUs, CPUs and memory it asks for. Every option can be set in the kernelspec's
    ``metadata.kernel_provisioner.config`` or as ``GPUContainerProvisioner.<name>`` config."""

    image = Unicode(
        "",
        help="Container image of the kernel; empty means the default image "
        "(built by `jupyter gpu-sessions image build`). Ignored by the local runtime.",
    ).tag(config=True)
    gpus = Int(0, help="Whole GPUs for the kernel (0 allowed). Honoured by both runtimes.").tag(
        config=True
    )
    cpus = Union(
        [Float(), Unicode()],
        allow_none=True,
        default_value=None,
        help="CPU limit (e.g. 2 or 0.5); unset means no limit. Docker runtime only.",
    ).tag(config=True)
    gpu_profile = Unicode(
        "",
        help='One MIG instance of this profile (e.g. "1g.10gb") instead of whole GPUs.',
    ).tag(config=True)
    gpu_share = Float(
        0.0,
        help="A time-sliced fraction of one GPU (e.g. 0.25) instead of whole GPUs. The "
        "kernel gets the frameworks' memory caps (XLA_PYTHON_CLIENT_MEM_FRACTION, …): soft "
        "limits, not isolation.",
    ).tag(config=True)
    queue_timeout = Float(
        1800.0,
        help="Seconds a kernel may wait in the queue for its resources before its start is "
        "cancelled; 0 waits as long as it takes.",
    ).tag(config=True)
    memory = Unicode(
        "",
        help='Memory limit, e.g. "8GiB"; unset means no limit. Docker runtime only. A kernel '
        "that passes it is killed (OOMKilled) and its exit says so.",
    ).tag(config=True)
    shm_size = Unicode(
        "", help='Size of /dev/shm, e.g. "1GiB" (PyTorch data loaders need it). Docker only.'
    ).tag(config=True)
    pids_limit = Int(
        0, help="Process limit; 0 means the manager's default_pids_limit. Docker only."
    ).tag(config=True)
    env = Dict(
        value_trait=Unicode(),
        help="Extra environment variables for the kernel (the server's own environment "
        "never reaches it, except GPUSessionManager.env_allowlist).",
    ).tag(config=True)
    working_dir = Unicode(
        "",
        help="Working directory to use instead of the notebook's directory (which is "
        "bind-mounted into the container at the same path).",
    ).tag(config=True)
    launch_timeout = Float(
        60.0,
        help="Seconds a kernel may take to answer on its heartbeat before its start fails "
        "(the error carries the container's state and the tail of its log).",
    ).tag(config=True)
    vfolders = List(
        Unicode(),
        help='vfolders to mount at /home/work/<name>, e.g. ["data", "team-ds:ro"]: each with '
        "its owner's permission on it, which a `:ro`/`:rw`/`:wd` suffix can only lower. A "
        "notebook adds its own in its metadata (`jupyter-gpu-sessions.vfolders`). An unknown "
        "or forbidden vfolder fails the kernel start. Docker runtime only.",
    ).tag(config=True)
    runtime = Enum(
        RUNTIMES,
        default_value="docker",
        help="`docker`: a container per kernel. `local`: a local process with the same "
        "environment rules and CUDA_VISIBLE_DEVICES, for hosts without Docker.",
    ).tag(config=True)

    @validate("gpus")
    def _valid_gpus(self, proposal):
        if not 0 <= proposal.value <= MAX_GPUS_PER_SESSION:
            raise TraitError(
                f"gpus {proposal.value!r} is out of range: use 0 to {MAX_GPUS_PER_SESSION}"
            )
        return proposal.value

    @validate("gpu_profile")
    def _valid_profile(self, proposal):
        if proposal.value:
            self._checked(mig_fraction, proposal.value)
        return proposal.value

    @validate("gpu_share")
    def _valid_share(self, proposal):
        if proposal.value:
            self._checked(parse_share, proposal.value)
        return proposal.value

    @validate("queue_timeout")
    def _valid_queue_timeout(self, proposal):
        if proposal.value < 0:
            raise TraitError(f"queue_timeout {proposal.value!r} must be 0 or more seconds")
        return proposal.value

    @validate("cpus")
    def _valid_cpus(self, proposal):
        if proposal.value in (None, ""):
            return None
        return self._checked(parse_cpus, proposal.value)

    @validate("memory", "shm_size")
    def _valid_size(self, proposal):
        if proposal.value:
            minimum = 16 * 1024**2 if proposal.trait.name == "memory" else 1024**2
            self._checked(parse_size, proposal.value, what=proposal.trait.name, minimum=minimum)
        return proposal.value

    @validate("launch_timeout")
    def _valid_timeout(self, proposal):
        if not 0 < proposal.value <= 3600:
            raise TraitError(
                f"launch_timeout {proposal.value!r} is out of range: use more than 0 and at "
                "most 3600 seconds"
            )
        return proposal.value

    @validate("env")
    def _valid_env(self, proposal):
        bad = [name for name in proposal.value if not _ENV_NAME.match(name)]
        if bad:
            raise TraitError(f"env has invalid variable names: {', '.join(map(repr, bad))}")
        return proposal.value

    @staticmethod
    def _checked(parse, value, **kwargs):
        try:
            return parse(value, **kwargs)
        except InvalidRequest as exc:
            raise TraitError(str(exc)) from exc

    # Per-session state; per-launch state is reset in pre_launch.
    session: Session | None = None
    ports_cached = False
    _death_noted = False  # the current death is recorded (once, not at every poll)
    _engine_down = False
    request: ResourceRequest | None = None
    _notebook: tuple[str | None, str | None] | None = None  # JPY_SESSION_NAME, cwd

    _engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        """The process's engine, fixed for this provisioner's life once first used."""
        if self._engine is None:
            config = self.parent.config if self.parent is not None else self.config
            self._engine = current_engine(config)
        return self._engine

    @property
    def has_process(self) -> bool:
        return self.session is not None

    # -- launch ----------------------------------------------------------------------------
    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        km = self.parent
        if km is None:
            raise InvalidRequest("GPUContainerProvisioner must be created by a kernel manager")
        self._death_noted = False  # per-launch state
        self.request = ResourceRequest.parse(
            gpus=self.gpus,
            cpus=self.cpus,
            memory=self.memory,
            shm_size=self.shm_size,
            pids_limit=self.pids_limit,
            gpu_profile=self.gpu_profile,
            gpu_share=self.gpu_share,
        )
        if km.cache_ports and not self.ports_cached:
            # Reserved once per session: a restarted kernel must publish the same host
            # ports, because clients made before the restart keep using them.
            cache = LocalPortCache.instance()
            for name in _PORT_NAMES:
                setattr(km, name, cache.find_available_port(km.ip))
            self.ports_cached = True
        env = kwargs.get("env") or {}
        # File I/O (and the session key's creation): off the server's event loop, so that
        # kernels started at once do not run their whole set-up in one go.
        await asyncio.to_thread(
            km.write_connection_file, jupyter_session=env.get("JPY_SESSION_NAME", "")
        )
        self.connection_info = km.get_connection_info()
        cmd = km.format_kernel_cmd(extra_arguments=kwargs.pop("extra_arguments", []))
        if self.runtime == "docker" and cmd and self.kernel_spec.argv:
            # jupyter_client swaps `python3` for the server's own interpreter; inside the
            # container the image's `python3` is the one to run.
            cmd[0] = self.kernel_spec.argv[0]
        return await super().pre_launch(cmd=cmd, **kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        env: dict[str, str] = kwargs.get("env") or {}
        # The kernelspec's env (after ${VAR} substitution) and our `env` always pass.
        explicit = {k: env[k] for k in (self.kernel_spec.env or {}) if k in env}
        explicit.update(self.env)
        engine = self.engine
        # Reading the notebook is file I/O: off the server's event loop. Its saved choice
        # applies at every start and restart, over the kernelspec's values.
        choice = await asyncio.to_thread(
            notebook_choice, env.get("JPY_SESSION_NAME"), kwargs.get("cwd")
        )
        spec_image = self.image or engine.default_image
        image = choice.image or spec_image
        request = self._chosen_request(choice, env.get("JPY_SESSION_NAME") or "the notebook")
        launch = KernelLaunch(
            kernel_id=self.kernel_id,
            owner=current_owner(),
            image=image,
            # Another image than the kernelspec's must be on the server's allowlist.
            image_chosen=image != spec_image,
            argv=list(cmd),
            env=dict(env),
            explicit_env=explicit,
            cwd=self.working_dir or kwargs.get("cwd") or os.getcwd(),
            request=request,
            runtime=self.runtime,
            connection_file=self.parent.connection_file,
            connection_info=self.connection_info,
            launch_timeout=self.launch_timeout,
            queue_timeout=self.queue_timeout,
            # The notebook's file name names the session in lists and GPU holders.
            name=os.path.basename(env.get("JPY_SESSION_NAME") or "")[:128],
            vfolders=_merge_vfolders(self.vfolders, choice.vfolders),
        )
        self._notebook = (env.get("JPY_SESSION_NAME"), kwargs.get("cwd"))
        try:
            if self.session is None or self.session.status.is_terminal:
                self.session = await engine.submit(launch)
            self.session = await engine.start_kernel(launch, self.session, progress=self._progress)
        except BaseException:
            # jupyter_client does not clean up after a failed launch: the session has
            # ended (nothing left running), so let go of it and of the reserved ports.
            self.session = None
            self._return_ports()
            raise
        return self.connection_info

    def _chosen_request(self, choice: Choice, where: str) -> ResourceRequest:
        """The request of this start: the kernelspec's (``pre_launch``), or with the
        notebook's choice over it; a value that does not parse names the notebook's key."""
        if not choice.resources:
            return self.request or ResourceRequest()
        config = {
            "gpus": self.gpus,
            "gpu_profile": self.gpu_profile,
            "gpu_share": self.gpu_share,
            "cpus": self.cpus,
            "memory": self.memory,
        }
        merged = apply_choice(config, choice)
        try:
            return ResourceRequest.parse(
                **merged, shm_size=self.shm_size, pids_limit=self.pids_limit
            )
        except InvalidRequest as exc:
            raise InvalidRequest(
                f"{where}: metadata {CHOICE_KEY}.resources: {exc.message}",
                reason="invalid-parameters",
            ) from None

    def _progress(self, message: str) -> None:
        """Queue position and what the kernel waits for, in the kernel's start log."""
        self.log.info("Kernel %s: %s", self.kernel_id, message)

    # -- lifecycle -------------------------------------------------------------------------
    async def poll(self) -> int | None:
        if self.session is None:
            return 0
        try:
            state = await self.engine.poll(self.session)
        except RuntimeUnavailable as exc:
            # The engine is down, not the kernel: say so once per outage, and let the
            # restarter keep its hands off a kernel that may well be running.
            if not self._engine_down:
                self._engine_down = True
                self.log.warning("Kernel %s: cannot see its container: %s", self.kernel_id, exc)
            return None
        if self._engine_down:
            self._engine_down = False
            self.log.info("Kernel %s: the container engine answers again", self.kernel_id)
        if state is None:
            self._death_noted = False
            return None
        km = self.parent
        if not self._death_noted and not getattr(km, "shutting_down", False):
            # Nobody asked it to stop: a crash (OOM kill, segfault, `docker kill`), recorded
            # before the restarter (or the client's shutdown) acts on it.
            self._death_noted = True
            self.session = await self.engine.note_exit(self.session, state)
            ended = self.session.status
            if ended.is_terminal or ended == SessionStatus.TERMINATING:
                self._give_up_restarts(km)
        return state.exit_code

    def _give_up_restarts(self, km: Any) -> None:
        """The engine ended this kernel's session itself (a GPU-idle reclaim, a lifetime
        limit, a delete from another process): a restart would take devices anew behind
        that end. The kernel's restarter gives up at its next look instead, so the server
        reports the kernel dead and cleans it up."""
        self.log.info(
            "Kernel %s: its session was ended (%s); it is not restarted",
            self.kernel_id,
            self.session.reason if self.session is not None else "",
        )
        restarter = getattr(km, "_restarter", None)
        if restarter is not None:
            restarter.restart_limit = 0

    async def wait(self) -> int | None:
        while (code := await self.poll()) is None:
            await asyncio.sleep(0.1)
        return code

    async def send_signal(self, signum: int) -> None:
        if self.session is not None:
            await self.engine.signal(self.session, signum)

    async def shutdown_requested(self, restart: bool = False) -> None:
        self._expect_stop()

    async def kill(self, restart: bool = False) -> None:
        self._expect_stop()
        await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        self._expect_stop()
        await self.send_signal(signal.SIGTERM)

    def _expect_stop(self) -> None:
        """The kernel's exit that follows was asked for: not a crash to reconcile."""
        if self.session is not None:
            self.engine.expect_stop(self.session.id)

    async def cleanup(self, restart: bool = False) -> None:
        """``restart=True`` keeps the session (container, ports, devices) for the next start;
        otherwise the container is removed, the devices freed and the ports returned."""
        if self.session is not None:
            if restart and await self._choice_changed(self.session):
                # The notebook changed its choice since this session started: the session
                # ends (its devices go back) and the restart queues for the new choice,
                # on the same ports.
                await self.engine.stop_kernel(
                    self.session, restart=False, reason="restarted with a new resource choice"
                )
                self.session = None
                return
            self.session = await self.engine.stop_kernel(self.session, restart=restart)
        if restart:
            return
        self.session = None
        self._return_ports()

    async def _choice_changed(self, session: Session) -> bool:
        """Whether the notebook's saved choice now asks for other resources or another
        image than ``session`` has (a choice that no longer parses fails the start)."""
        if self._notebook is None:
            return False
        try:
            choice = await asyncio.to_thread(notebook_choice, *self._notebook)
            request = self._chosen_request(choice, self._notebook[0] or "the notebook")
        except InvalidRequest:
            return False
        image = choice.image or self.image or self.engine.default_image
        return (request, image) != (session.request, session.image)

    def _return_ports(self) -> None:
        if self.ports_cached:
            cache = LocalPortCache.instance()
            for name in _PORT_NAMES:
                cache.return_port(self.connection_info[name])
            self.ports_cached = False

    def get_stable_start_time(self, recommended: float = 10.0) -> float:
        return max(recommended, self.launch_timeout)

    def resolve_path(self, path_str: str) -> str | None:
        # The working directory is mounted at the same path, so host paths resolve alike.
        path = pathlib.Path(path_str).expanduser()
        base = self.working_dir or os.getcwd()
        if not path.is_absolute():
            path = (pathlib.Path(base) / path).resolve()
        return path.as_posix() if path.exists() else None

    # -- persistence -----------------------------------------------------------------------
    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        handle = self.engine.handle(self.session) if self.session else None
        info.update(
            {
                "session_id": self.session.id if self.session else None,
                "runtime": self.runtime,
                "container_id": handle.id if handle else None,
                "container_name": handle.name if handle else None,
                "owner": self.session.owner if self.session else None,
            }
        )
        return info

    async def load_provisioner_info(self, provisioner_info: dict) -> None:
        """Re-attach to the running kernel ``get_provisioner_info`` described (a server
        restarted, its kernels kept running in the manager service): its session is
        adopted, and its ports stay this kernel's, for its restarts as for its clients."""
        await super().load_provisioner_info(provisioner_info)
        if provisioner_info.get("session_id") and provisioner_info.get("container_id"):
            handle = RuntimeHandle(
                provisioner_info.get("runtime", self.runtime),
                provisioner_info["container_id"],
                provisioner_info.get("container_name") or "",
            )
            self.session = await self.engine.adopt(provisioner_info["session_id"], handle)
            ports = [self.connection_info.get(name) for name in _PORT_NAMES]
            if all(isinstance(port, int) and port > 0 for port in ports):
                LocalPortCache.instance().currently_used_ports.update(ports)
                self.ports_cached = True
