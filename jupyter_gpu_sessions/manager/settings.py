"""The session manager's settings: everything a deployer sets as
``c.GPUSessionManager.<name>`` (images, GPUs, uids, limits, the store, the scheduler, the
swappable parts), with their defaults and validation."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir
from traitlets import (
    Bool,
    Callable,
    Dict,
    Enum,
    Float,
    Instance,
    Int,
    List,
    Type,
    Unicode,
    Union,
    default,
    observe,
    validate,
)
from traitlets.config import LoggingConfigurable
from traitlets.traitlets import TraitError, TraitType

from ..core.errors import InvalidRequest
from ..core.policy import MERGE_MODES, PolicySet
from ..core.units import parse_size
from ..devices import GPUInventory
from ..devices.attach import ATTACH_MODES
from ..engine import RUNTIMES
from ..image import default_image
from ..runtime.base import KernelRuntime
from ..runtime.docker import DockerRuntime
from ..runtime.local import LocalRuntime
from ..scheduler import SchedulingStrategy

if TYPE_CHECKING:
    from jupyter_events import EventLogger

DB_URL_ENV = "JUPYTER_GPU_SESSIONS_DB_URL"
_RUNTIME_CLASSES = {"docker": DockerRuntime, "local": LocalRuntime}


def default_db_url() -> str:
    return os.environ.get(DB_URL_ENV) or (
        "sqlite:///" + os.path.join(jupyter_data_dir(), "gpu_sessions.sqlite")
    )


def parse_kernel_user(value: Any, what: str = "a kernel user") -> tuple[int, int | None]:
    """A uid (int or digits) or "uid:gid" as (uid, gid or None); never root."""
    text = str(value).strip() if not isinstance(value, bool) else ""
    uid_text, _, gid_text = text.partition(":")
    if not uid_text.isdigit() or (gid_text and not gid_text.isdigit()):
        raise TraitError(
            f'{what} must be a uid or "uid:gid" (e.g. 1001 or "1001:100"), not {value!r}'
        )
    uid, gid = int(uid_text), int(gid_text) if gid_text else None
    if uid == 0:
        raise TraitError(f"{what}: container kernels never run as root: choose a uid other than 0")
    return uid, gid


class _LazyInstance(Instance):
    """An ``Instance`` trait whose class, named by its dotted path, is imported when a value
    is first validated, not when an object is made (as ``Instance`` does)."""

    def instance_init(self, obj: Any) -> None:
        TraitType.instance_init(self, obj)

    def validate(self, obj: Any, value: Any) -> Any:
        self._resolve_classes()
        return super().validate(obj, value)


class ManagerSettings(LoggingConfigurable):
    """The configurable traits of :class:`GPUSessionManager` (configured under that name)."""

    default_image = Unicode(
        help="""Kernel image used when a kernelspec names none. Defaults to the image this
        package builds with `jupyter gpu-sessions image build` (tagged by its recipe's hash).""",
    ).tag(config=True)

    @default("default_image")
    def _default_image(self) -> str:
        return default_image()

    allowed_images = List(
        Unicode(),
        help="""Images a person may choose for a kernel (a notebook's saved choice, the
        launcher's resource dialog), besides the image a kernelspec names itself. Empty
        (the default): only the default image. A start choosing another image is refused
        (403) naming this list.""",
    ).tag(config=True)

    def image_allowlist(self) -> list[str]:
        """The images a person may choose: ``allowed_images``, else the default image."""
        return list(self.allowed_images) or [self.default_image]

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

    simulated_processes = Unicode(
        "",
        help="""A JSON file of processes using the simulated GPUs, re-read at every look, so
        demos show per-session GPU use: `[{"gpu": 0, "pid": 4242, "memory_used": "2GiB",
        "utilization": 35}]` (`gpu` an index or UUID, `utilization` a percent or null).
        Falls back to JUPYTER_GPU_SESSIONS_SIMULATED_PROCESSES.""",
    ).tag(config=True)

    inventory_class = Type(
        default_value=None,
        allow_none=True,
        klass=GPUInventory,
        help="""The GPU inventory class. Unset (the default): NvmlInventory when NVML
        initialises, else SimulatedInventory when `simulated_gpus` is set, else none. Set it
        (e.g. "jupyter_gpu_sessions.devices.SimulatedInventory") to choose one; it is built
        with `spec`, `device_dir` and `processes_file` from `simulated_gpus`/
        `simulated_device_dir`/`simulated_processes` when its constructor takes them.""",
    ).tag(config=True)

    runtime_classes = Dict(
        value_trait=Type(klass=KernelRuntime),
        default_value=_RUNTIME_CLASSES,
        help="""The kernel runtime class for each runtime name a kernelspec may use
        (`docker`, `local`). Each is built once, with those of `base_url`, `gpu_attach_mode`,
        `home_size` and `default_pids_limit` its constructor takes.""",
    ).tag(config=True)

    @validate("runtime_classes")
    def _valid_runtimes(self, proposal):
        unknown = set(proposal.value) - set(RUNTIMES)
        if unknown:
            raise TraitError(
                f"runtime_classes names unknown runtimes {sorted(unknown)}: kernelspecs may "
                f"use {', '.join(RUNTIMES)}"
            )
        return {**_RUNTIME_CLASSES, **proposal.value}

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

    kernel_user_map = Union(
        [Dict(), Callable()],
        default_value={},
        help="""Which uid a kernel runs as, by its owner (under JupyterHub: the Hub user),
        when the manager runs as root and `kernel_uid` is unset: a dict {"ada": 1001,
        "bob": "1002:100"} (a uid, or "uid:gid"), or a callable(owner) returning (uid, gid)
        or None. An owner it does not name: the OS user of that name when one exists (not
        root), so files in vfolders and home directories keep their owners; then (not in
        the manager service, where a caller could name another user's directory) the owner
        of the notebook's directory; else `fallback_uid`. Never 0.""",
    ).tag(config=True)

    @validate("kernel_user_map")
    def _valid_user_map(self, proposal):
        if isinstance(proposal.value, dict):
            for owner, value in proposal.value.items():
                parse_kernel_user(value, f"kernel_user_map[{owner!r}]")
        return proposal.value

    service_name = Unicode(
        help="""The name of the manager service this manager runs in (set by
        `jupyter gpu-sessions manager`; default $JUPYTERHUB_SERVICE_NAME when the Hub runs
        it). Its containers carry the name, and a service restarted after a crash adopts the
        running kernels of its predecessor of the same name and store (they outlive it, as
        they outlive users' servers). Empty: an embedded manager, whose kernels end when
        the process that started them is gone.""",
    ).tag(config=True)

    @default("service_name")
    def _default_service_name(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_NAME", "")

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

    strategy_class = Type(
        default_value=None,
        allow_none=True,
        klass=SchedulingStrategy,
        help="""A scheduling strategy class (a subclass of
        jupyter_gpu_sessions.scheduler.SchedulingStrategy) to use instead of the one
        `scheduler_strategy` names.""",
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
        idle_timeout ("1h", enforced by the server extension, and by the manager service
        for kernels whose server is gone: see detached_after), gpu_idle_threshold ("5%")
        and gpu_idle_window ("30m": a kernel holding GPUs whose own processes kept them
        under the threshold for the window is warned, then ended with reason `gpu-idle`;
        both must apply), and the storage limits max_vfolder_count, max_vfolder_size
        ("100GiB": each vfolder's quota) and max_vfolder_total_size (an owner's bytes
        across their vfolders). An owner's policy: the default, overridden by their groups'
        merged as `group_policy_merge` says, overridden by their own. Admins may replace a
        scope through the API (PUT policies/{scope}).""",
    ).tag(config=True)

    @validate("policies")
    def _valid_policies(self, proposal):
        try:
            self._policies = PolicySet.from_config(proposal.value, merge=self.group_policy_merge)
        except InvalidRequest as exc:
            raise TraitError(str(exc)) from exc
        return proposal.value

    group_policy_merge = Enum(
        MERGE_MODES,
        default_value="most-generous",
        help="""How the policies of a user's several groups combine, limit by limit (the
        default policy below them, the user's own above): `most-generous` (the largest
        limit any of the groups sets; for gpu_idle_threshold the lowest) or `strictest`
        (the smallest; for gpu_idle_threshold the highest). A limit none of the groups
        sets comes from the default policy.""",
    ).tag(config=True)

    @observe("group_policy_merge")
    def _merge_changed(self, change):
        for name in ("_policies", "_effective_policies"):
            policies = getattr(self, name, None)
            if policies is not None:
                policies.merge = change.new

    gpu_idle_check_interval = Float(
        5.0,
        help="""Seconds between checks of the GPU utilization of kernels holding GPUs, for
        the gpu_idle_threshold / gpu_idle_window policies (one NVML sweep per check, shared
        with the API's GPU views; run on a thread of its own, never on the server's event
        loop). Only kernels this process started (or adopted) are checked.""",
    ).tag(config=True)

    @validate("gpu_idle_check_interval")
    def _valid_check_interval(self, proposal):
        if not proposal.value > 0:
            raise TraitError("gpu_idle_check_interval must be a positive number of seconds")
        return proposal.value

    detached_after = Float(
        30.0,
        help="""Manager service: seconds after which a running kernel that no user's server
        has called on (a server's restarter polls its kernels every few seconds) counts as
        detached, its server gone (a crash); a server that shuts down cleanly says so, and
        its kernels are detached at once. A detached kernel that is not busy ends past its
        owner's idle_timeout, counted from its last activity or its detachment, whichever
        is later; a server that comes back re-attaches it first.""",
    ).tag(config=True)

    detached_check_interval = Float(
        5.0,
        help="""Manager service: seconds between checks of detached kernels for their
        owners' idle_timeout (a thread of its own; their activity is read from their iopub
        channels as it comes).""",
    ).tag(config=True)

    @validate("detached_after", "detached_check_interval")
    def _valid_detached_times(self, proposal):
        if not proposal.value > 0:
            raise TraitError(f"{proposal.trait.name} must be a positive number of seconds")
        return proposal.value

    gpu_idle_grace = Unicode(
        "10%",
        help="""How long a kernel warned for GPU idleness has to use its GPU before it is
        ended: a duration ("2m") or a percent of the owner's gpu_idle_window ("10%"); never
        less than one gpu_idle_check_interval.""",
    ).tag(config=True)

    @validate("gpu_idle_grace")
    def _valid_grace(self, proposal):
        from .gpu_idle import parse_grace

        try:
            parse_grace(proposal.value)
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

    batch_stop_timeout = Float(
        10.0,
        help="Seconds a batch session's command gets to exit after SIGTERM when the session "
        "is ended (deleted, or its server shuts down) before it is killed.",
    ).tag(config=True)

    event_logger = _LazyInstance(
        "jupyter_events.EventLogger",
        help="Where session status events go (the server extension passes the server's).",
    )

    @default("event_logger")
    def _default_event_logger(self) -> EventLogger:
        # Imported on first use: jupyter_events imports jsonschema, whose format checkers
        # take seconds to import (rfc3987-syntax builds its grammars at import), and a
        # process without a server (nbclient, papermill) seldom needs it.
        from jupyter_events import EventLogger

        from . import EVENT_SCHEMA

        logger = EventLogger(parent=self)
        logger.register_event_schema(EVENT_SCHEMA)
        return logger

    state_root = Unicode(
        help="Where per-session files (the kernel's connection file copy, logs) live."
    ).tag(config=True)

    @default("state_root")
    def _default_state_root(self) -> str:
        return os.path.join(jupyter_runtime_dir(), "gpu-sessions")
