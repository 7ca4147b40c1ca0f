"""Domain models: resource requests, GPU devices, launch specifications, sessions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest
from .status import SessionStatus, check_transition
from .units import format_size, parse_count, parse_cpus, parse_size

MAX_GPUS_PER_SESSION = 64


@dataclass(frozen=True)
class ResourceRequest:
    """What one session asks for. Sizes are bytes; ``None`` means "no limit"."""

    gpus: int = 0
    cpus: float | None = None
    memory: int | None = None
    shm_size: int | None = None
    pids_limit: int | None = None

    @classmethod
    def parse(
        cls,
        *,
        gpus: Any = 0,
        cpus: Any = None,
        memory: Any = None,
        shm_size: Any = None,
        pids_limit: Any = None,
    ) -> ResourceRequest:
        """Build a request from user-facing values (``memory="8GiB"``), validating each."""
        return cls(
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
        )

    def describe(self) -> str:
        parts = [f"{self.gpus} GPU" + ("s" if self.gpus != 1 else "")]
        if self.cpus is not None:
            parts.append(f"{self.cpus:g} CPU" + ("s" if self.cpus != 1 else ""))
        if self.memory is not None:
            parts.append(f"{format_size(self.memory)} memory")
        return ", ".join(parts)

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "memory": self.memory,
            "minor": self.minor,
            "device_path": self.device_path,
            "simulated": self.simulated,
        }


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


@dataclass
class StatusChange:
    status: SessionStatus
    at: float
    reason: str = ""


@dataclass
class Session:
    """One kernel session. Its history is append-only; repeats are kept."""

    id: str
    owner: str
    kernel_id: str
    image: str
    request: ResourceRequest
    runtime: str
    status: SessionStatus = SessionStatus.PENDING
    reason: str = ""
    devices: tuple[GPUDevice, ...] = ()
    history: list[StatusChange] = field(default_factory=list)
    exit: ExitState | None = None
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not self.history:
            self.history.append(StatusChange(self.status, self.created_at, "requested"))

    def transition(self, new: SessionStatus, reason: str = "") -> None:
        check_transition(self.status, new)
        self.status = new
        self.reason = reason
        self.history.append(StatusChange(new, time.time(), reason))
