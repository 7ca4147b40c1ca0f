"""Domain models: resource requests, GPU devices, launch specifications, sessions."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest
from .status import SessionStatus
from .units import format_size, parse_count, parse_cpus, parse_size

MAX_GPUS_PER_SESSION = 64
# A session is named in the API by its id or by its name (the owner's newest of that name).
SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


MIG_PROFILE = re.compile(r"^(\d)g\.(\d+)gb$")
MIG_SLICES = 7  # compute slices of a MIG-capable GPU (A100, H100): 1g.10gb is 1/7 of one


def mig_fraction(profile: str) -> float:
    """The share of a whole GPU a MIG profile stands for: ``"3g.40gb"`` → 3/7."""
    match = MIG_PROFILE.match(profile)
    if not match:
        raise InvalidRequest(
            f"gpu_profile {profile!r} is not a MIG profile: use a name such as 1g.10gb or 3g.40gb"
        )
    return int(match.group(1)) / MIG_SLICES


@dataclass(frozen=True)
class ResourceRequest:
    """What one session asks for. Sizes are bytes; ``None`` means "no limit".

    GPUs come in one of three forms, never mixed: ``gpus`` whole GPUs, one MIG instance of
    ``gpu_profile`` (e.g. ``"1g.10gb"``), or ``gpu_share``, a time-sliced fraction of one GPU.
    """

    gpus: int = 0
    cpus: float | None = None
    memory: int | None = None
    shm_size: int | None = None
    pids_limit: int | None = None
    gpu_profile: str | None = None
    gpu_share: float | None = None

    @classmethod
    def parse(
        cls,
        *,
        gpus: Any = 0,
        cpus: Any = None,
        memory: Any = None,
        shm_size: Any = None,
        pids_limit: Any = None,
        gpu_profile: Any = None,
        gpu_share: Any = None,
    ) -> ResourceRequest:
        """Build a request from user-facing values (``memory="8GiB"``), validating each."""
        request = cls(
            gpus=parse_count(gpus, what="gpus", maximum=MAX_GPUS_PER_SESSION),
            cpus=None if cpus in (None, "") else parse_cpus(cpus),
            memory=None
            if memory in (None, "")
            else parse_size(memory, what="memory", minimum=16 * 1024**2),
            shm_size=None
            if shm_size in (None, "")
            else parse_size(shm_size, what="shm_size", minimum=1024**2),
            pids_limit=None
            if pids_limit in (None, "", 0)
            else parse_count(pids_limit, what="pids_limit", minimum=16, maximum=4_194_304),
            gpu_profile=None if gpu_profile in (None, "") else str(gpu_profile),
            gpu_share=None if gpu_share in (None, "", 0) else parse_share(gpu_share),
        )
        if request.gpu_profile is not None:
            mig_fraction(request.gpu_profile)
        forms = [request.gpus > 0, request.gpu_profile is not None, request.gpu_share is not None]
        if sum(forms) > 1:
            raise InvalidRequest(
                "ask for GPUs in one form only: whole `gpus`, one MIG `gpu_profile`, or a "
                "`gpu_share` of one GPU"
            )
        return request

    @property
    def gpu_kind(self) -> str | None:
        """``"gpu"``, ``"mig"``, ``"share"``, or ``None`` for no GPU at all."""
        if self.gpus:
            return "gpu"
        if self.gpu_profile:
            return "mig"
        if self.gpu_share:
            return "share"
        return None

    @property
    def gpu_equivalent(self) -> float:
        """How much GPU this asks for, in whole-GPU units (what ``max_gpus`` counts)."""
        if self.gpu_profile:
            return mig_fraction(self.gpu_profile)
        return float(self.gpus or self.gpu_share or 0)

    def describe(self) -> str:
        if self.gpu_profile:
            parts = [f"a {self.gpu_profile} MIG instance"]
        elif self.gpu_share:
            parts = [f"{self.gpu_share:g} of a GPU"]
        else:
            parts = [f"{self.gpus} GPU" + ("s" if self.gpus != 1 else "")]
        if self.cpus is not None:
            parts.append(f"{self.cpus:g} CPU" + ("s" if self.cpus != 1 else ""))
        if self.memory is not None:
            parts.append(f"{format_size(self.memory)} memory")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpus": self.gpus,
            "cpus": self.cpus,
            "memory": self.memory,
            "shm_size": self.shm_size,
            "pids_limit": self.pids_limit,
            "gpu_profile": self.gpu_profile,
            "gpu_share": self.gpu_share,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResourceRequest:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__ if k in data})

    def check_fits_host(self, *, host_cpus: int, host_memory: int | None) -> None:
        """Reject at once what this host can never run."""
        if self.cpus is not None and self.cpus > host_cpus:
            raise InvalidRequest(
                f"cpus {self.cpus:g} is more than this host has ({host_cpus}): "
                f"ask for at most {host_cpus}"
            )
        if self.memory is not None and host_memory and self.memory > host_memory:
            raise InvalidRequest(
                f"memory {format_size(self.memory)} is more than this host has "
                f"({format_size(host_memory)})"
            )


def parse_share(value: Any) -> float:
    """A fraction of one GPU, more than 0 and less than 1, e.g. ``0.25``."""
    try:
        share = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"gpu_share {value!r} is not a number: use e.g. 0.25") from None
    if isinstance(value, bool) or not 0.01 <= share < 1:
        raise InvalidRequest(
            f"gpu_share {value!r} is out of range: use a fraction from 0.01 to below 1 "
            "(ask for `gpus` for whole GPUs)"
        )
    return share


@dataclass(frozen=True)
class MigInstance:
    """A MIG instance of a GPU in MIG mode: attached by its own ``MIG-…`` UUID."""

    uuid: str
    profile: str
    memory: int
    index: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "profile": self.profile,
            "memory": self.memory,
            "index": self.index,
        }


@dataclass(frozen=True)
class GPUDevice:
    """One GPU as the inventory sees it. ``device_path`` is the host's device node, if any."""

    index: int
    uuid: str
    name: str
    memory: int
    minor: int
    device_path: str | None = None
    simulated: bool = False
    mig_instances: tuple[MigInstance, ...] = ()
    # In MIG mode a GPU is only usable through its instances, even when none exist yet.
    mig_mode: bool = False

    @property
    def mig_enabled(self) -> bool:
        return self.mig_mode or bool(self.mig_instances)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory": self.memory,
            "minor": self.minor,
            "device_path": self.device_path,
            "simulated": self.simulated,
            "mig_mode": self.mig_enabled,
            "mig_instances": [m.to_dict() for m in self.mig_instances],
        }


@dataclass(frozen=True)
class Allocation:
    """One device slot held by one session. ``device_uuid`` is what the container gets
    (the GPU's UUID, or a MIG instance's ``MIG-…`` UUID); ``gpu_uuid`` the physical GPU."""

    session_id: str
    gpu_uuid: str
    device_uuid: str
    kind: str  # "gpu" | "mig" | "share"
    fraction: float  # 1.0 for a whole GPU, the share, or a MIG instance's slices / 7


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass
class LaunchSpec:
    """Everything a runtime needs to start one kernel. Built by the manager."""

    session_id: str
    kernel_id: str
    owner: str
    image: str
    argv: list[str]
    env: dict[str, str]
    working_dir: str
    resources: ResourceRequest
    connection_file: str
    connection_info: dict[str, Any]
    state_dir: str
    uid: int
    gid: int
    devices: tuple[GPUDevice, ...] = ()
    mounts: tuple[Mount, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    # A batch session's command (``argv``): no kernel ports, no connection file.
    batch: bool = False


@dataclass
class RuntimeHandle:
    """One started kernel: a container id or a process id, plus what a restart may reuse."""

    runtime: str
    id: str
    name: str = ""
    digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExitState:
    """How a kernel's container or process ended."""

    exit_code: int
    oom_killed: bool = False
    error: str = ""

    def describe(self) -> str:
        text = f"exited with code {self.exit_code}"
        if self.oom_killed:
            text += " (killed for running out of memory: ask for more memory)"
        elif self.exit_code == 137:
            text += " (killed, SIGKILL)"
        elif self.exit_code == 143:
            text += " (terminated, SIGTERM)"
        if self.error:
            text += f": {self.error}"
        return text


@dataclass(frozen=True)
class StatusChange:
    status: SessionStatus
    at: float
    reason: str = ""


@dataclass(frozen=True)
class ProcessRef:
    """The process that started a session (host, pid, and the pid's start time, so a
    reused pid is not mistaken for it). Its kernels end when it is gone."""

    host: str
    pid: int
    started: float


@dataclass
class Session:
    """One session as stored. Its history is append-only; repeats are kept."""

    id: str
    owner: str
    image: str
    request: ResourceRequest
    runtime: str
    process: ProcessRef
    kind: str = "interactive"  # or "batch"
    name: str = ""
    kernel_id: str | None = None
    status: SessionStatus = SessionStatus.PENDING
    reason: str = ""
    allocations: tuple[Allocation, ...] = ()
    depends_on: tuple[str, ...] = ()
    scheduler: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    oom_killed: bool = False
    container_id: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    history: list[StatusChange] = field(default_factory=list)
    # A batch session's launch: {"command": [...], "vfolders": [...], "env": {...},
    # "cwd": "..."}; None for kernels (their provisioner holds the launch).
    launch: dict[str, Any] | None = None

    @property
    def command(self) -> list[str] | None:
        """A batch session's command; None for a kernel."""
        return list(self.launch["command"]) if self.launch else None

    @property
    def exit(self) -> ExitState | None:
        if self.exit_code is None:
            return None
        return ExitState(self.exit_code, oom_killed=self.oom_killed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "kind": self.kind,
            "kernel_id": self.kernel_id,
            "image": self.image,
            "runtime": self.runtime,
            "request": self.request.to_dict(),
            "status": self.status.value,
            "reason": self.reason,
            "allocations": [
                {
                    "gpu_uuid": a.gpu_uuid,
                    "device_uuid": a.device_uuid,
                    "kind": a.kind,
                    "fraction": a.fraction,
                }
                for a in self.allocations
            ],
            "depends_on": list(self.depends_on),
            "command": self.command,
            "scheduler": self.scheduler,
            "exit_code": self.exit_code,
            "oom_killed": self.oom_killed,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }
