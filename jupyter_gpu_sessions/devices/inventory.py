"""GPU inventories: real NVIDIA GPUs through NVML, simulated ones from config, or none.

Simulated GPUs
--------------
Hosts without NVIDIA hardware (demos, tests, CI) can describe GPUs in
``JUPYTER_GPU_SESSIONS_SIMULATED_GPUS`` (or the manager's ``simulated_gpus``)::

    COUNTxMODEL[-MEMORY][:mig=PROFILE*N[+PROFILE*N...]]

with items separated by commas:

- ``COUNTx`` is optional (default 1); 1 to 64 GPUs per item and 64 in all.
- ``MODEL`` is letters, digits and dashes, starting with a letter; a ``-<N>GB`` suffix
  (e.g. ``A100-80GB``) gives the memory in GiB, otherwise a GPU has 16 GiB.
- ``:mig=`` puts every GPU of the item in MIG mode with the listed instances:
  ``PROFILE*N`` is N instances of a profile ``<S>g.<M>gb`` (S compute slices, M GiB),
  joined by ``+``. One GPU has at most 7 compute slices in all, and its instances'
  memory must fit in the GPU's memory.

Examples: ``4xA100-80GB``; ``2xA100-80GB,1xT4-16GB``;
``2xA100-80GB,1xA100-80GB:mig=1g.10gb*7``; ``1xA100-80GB:mig=3g.40gb*1+1g.10gb*4``.

UUIDs of simulated GPUs (``GPU-…``) and of their MIG instances (``MIG-…``) are derived
from the GPU's position and model, so every process on the host names them alike.

GPU processes
-------------
:meth:`GPUInventory.processes` lists the processes using each GPU by host PID, with the
GPU memory each holds and its recent SM utilization: NVML's running compute and graphics
processes and per-process utilization samples. Simulated GPUs read theirs from a JSON
file named by ``JUPYTER_GPU_SESSIONS_SIMULATED_PROCESSES`` (or the manager's
``simulated_processes``), re-read at every call::

    [{"gpu": 0, "pid": 4242, "memory_used": "2GiB", "utilization": 35}, ...]

``gpu`` is the GPU's index or UUID, ``memory_used`` bytes or a size, ``utilization`` a
percent or ``null`` (unknown).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid as uuidlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, TypedDict

from ..core.errors import InvalidRequest
from ..core.models import MIG_PROFILE, MIG_SLICES, GPUDevice, MigInstance
from ..core.units import format_size, parse_size

log = logging.getLogger(__name__)

SIMULATED_GPUS_ENV = "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS"
SIMULATED_DEVICE_DIR_ENV = "JUPYTER_GPU_SESSIONS_SIMULATED_DEVICE_DIR"
SIMULATED_PROCESSES_ENV = "JUPYTER_GPU_SESSIONS_SIMULATED_PROCESSES"
# Per-process utilization: the newest NVML sample of each process within this many seconds.
PROCESS_SAMPLE_WINDOW = 5.0


class Utilization(TypedDict):
    """One GPU's current load: percent busy and memory in bytes; ``None`` when unknown."""

    gpu: int | None
    memory_used: int | None
    memory_total: int | None


@dataclass(frozen=True)
class GPUProcess:
    """One process using one GPU, as the host sees it.

    ``gpu_uuid``/``gpu_index`` name the physical GPU (a process on a MIG instance is
    reported on its parent GPU, with ``gpu_instance_id`` when NVML tells). ``pid`` is the
    host PID (NVML's view, which is why tools inside a container see nothing).
    ``memory_used`` is bytes, ``None`` when NVML cannot tell; ``utilization`` the percent
    of the GPU's SMs the process kept busy in its newest sample (0 without a recent
    sample), ``None`` when the GPU does not report per-process utilization."""

    gpu_uuid: str
    gpu_index: int
    pid: int
    memory_used: int | None
    utilization: int | None
    gpu_instance_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpu_uuid": self.gpu_uuid,
            "gpu_index": self.gpu_index,
            "pid": self.pid,
            "memory_used": self.memory_used,
            "utilization": self.utilization,
            "gpu_instance_id": self.gpu_instance_id,
        }


class WarnsOnce:
    """A problem said once per key as a warning, then only at debug level: sweeps repeat
    every few seconds, and a GPU that cannot report a metric will not start to."""

    _warned: set[str]

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        logger = logging.getLogger(type(self).__module__)
        if key in self._warned:
            logger.debug(message, *args)
        else:
            self._warned.add(key)
            logger.warning(message, *args)


class GPUInventory(ABC):
    """What GPUs this host has. ``kind`` says where the answer came from."""

    kind: str = "none"

    @abstractmethod
    def devices(self) -> list[GPUDevice]:
        """The host's GPUs, ordered by index. May block (NVML): call off the event loop."""

    @abstractmethod
    def utilization(self) -> dict[str, Utilization]:
        """Current load per GPU, keyed by the GPU's UUID. May block: call off the event loop."""

    @abstractmethod
    def driver_version(self) -> str | None:
        """The NVIDIA driver's version, e.g. ``"550.54.15"``; ``None`` when there is none."""

    def processes(self) -> list[GPUProcess]:
        """The processes using each GPU, by host PID. May block (NVML): call off the event
        loop. An inventory that cannot tell answers ``[]``."""
        return []

    def close(self) -> None:  # noqa: B027 - only NVML holds anything to release
        """Release what the inventory holds. Safe to call more than once."""

    def describe(self) -> str:
        devices = self.devices()
        if not devices:
            return "no GPUs"
        return f"{len(devices)} {self.kind} GPU(s): " + ", ".join(
            f"#{d.index} {d.name}"
            + (f" (MIG: {len(d.mig_instances)} instances)" if d.mig_enabled else "")
            for d in devices
        )


class NoGPUInventory(GPUInventory):
    kind = "none"

    def devices(self) -> list[GPUDevice]:
        return []

    def utilization(self) -> dict[str, Utilization]:
        return {}

    def driver_version(self) -> str | None:
        return None


# "No NVIDIA GPUs" is said once per process, however often detection runs.
_unavailable_said = False
_unavailable_lock = threading.Lock()


def _say_unavailable(reason: str) -> None:
    global _unavailable_said
    with _unavailable_lock:
        first, _unavailable_said = not _unavailable_said, True
    if first:
        log.info("No NVIDIA GPUs: %s", reason)
    else:
        log.debug("No NVIDIA GPUs: %s", reason)


_MIG_NAME_PROFILE = re.compile(r"(?<!\d)(\d)g\.(\d+)gb")


def mig_profile_from_name(name: str) -> str | None:
    """The MIG profile at the end of a MIG device's NVML name:
    ``"NVIDIA A100-SXM4-80GB MIG 1g.10gb"`` → ``"1g.10gb"``; ``None`` when there is none."""
    matches = _MIG_NAME_PROFILE.findall(name)
    if not matches:
        return None
    slices, memory = matches[-1]
    return f"{slices}g.{memory}gb"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlInventory(WarnsOnce, GPUInventory):
    """Real NVIDIA GPUs through nvidia-ml-py (module ``pynvml``).

    Creating one initialises NVML; :meth:`close` shuts it down again (NVML counts
    initialisations, so each inventory undoes exactly its own). A metric a GPU does not
    support (``NVMLError``: NotSupported, NoPermission…) becomes ``None`` or a default;
    the GPU is still listed.
    """

    kind = "nvml"

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._lock = threading.Lock()
        self._closed = False
        self._warned: set[str] = set()

    @classmethod
    def try_create(cls) -> NvmlInventory | None:
        """An inventory when the library and the driver answer, else ``None``.

        Why there is none is logged once per process ("No NVIDIA GPUs: …"), at INFO.
        """
        try:
            import pynvml
        except ImportError as exc:
            _say_unavailable(f"the nvidia-ml-py package (module pynvml) is not installed ({exc})")
            return None
        try:
            return cls()
        except pynvml.NVMLError as exc:
            _say_unavailable(cls._why_unavailable(pynvml, exc))
        except OSError as exc:
            _say_unavailable(f"NVML could not be loaded ({exc})")
        return None

    @staticmethod
    def _why_unavailable(pynvml: Any, exc: Exception) -> str:
        code = getattr(exc, "value", None)
        if code == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
            return (
                "the NVIDIA driver's library libnvidia-ml.so.1 was not found or could not be "
                "loaded (no NVIDIA driver on this host)"
            )
        if code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED:
            return "the NVIDIA kernel driver is not loaded (is the driver installed and running?)"
        if code == pynvml.NVML_ERROR_NO_PERMISSION:
            return "NVML refused access to the GPUs (no permission for /dev/nvidia*)"
        return f"NVML did not initialise ({exc})"

    def close(self) -> None:
        """Shut NVML down for this inventory. Later calls are no-ops."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            log.debug("nvmlShutdown failed: %s", exc)

    def __enter__(self) -> NvmlInventory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this NVML inventory is closed: create a new one")

    def _safe(self, fn, *args, default=None):
        try:
            return fn(*args)
        except self._nvml.NVMLError:  # NotSupported and friends: a metric we cannot read
            return default

    def _handles(self) -> list[tuple[int, Any]]:
        """``(index, handle)`` of every GPU NVML can open; a GPU it cannot is left out."""
        self._check_open()
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            self._warn_once("count", "NVML could not count the GPUs: %s", exc)
            return []
        handles = []
        for index in range(count):
            try:
                handles.append((index, nvml.nvmlDeviceGetHandleByIndex(index)))
            except nvml.NVMLError as exc:
                self._warn_once(f"handle/{index}", "NVML could not open GPU %d: %s", index, exc)
        return handles

    def devices(self) -> list[GPUDevice]:
        nvml = self._nvml
        found = []
        for index, handle in self._handles():
            uuid = self._safe(nvml.nvmlDeviceGetUUID, handle)
            if uuid is None:  # attached by UUID only: a GPU without one cannot be used
                self._warn_once(f"uuid/{index}", "NVML gave no UUID for GPU %d: left out", index)
                continue
            name = self._safe(nvml.nvmlDeviceGetName, handle, default="NVIDIA GPU")
            memory = self._safe(nvml.nvmlDeviceGetMemoryInfo, handle)
            minor = self._safe(nvml.nvmlDeviceGetMinorNumber, handle)
            mode = self._safe(nvml.nvmlDeviceGetMigMode, handle)
            mig_mode = bool(mode) and mode[0] == nvml.NVML_DEVICE_MIG_ENABLE  # current mode
            found.append(
                GPUDevice(
                    index=index,
                    uuid=_text(uuid),
                    name=_text(name),
                    memory=int(memory.total) if memory is not None else 0,
                    minor=minor if minor is not None else index,
                    # No node rather than a guessed one when the minor number is unknown.
                    device_path=f"/dev/nvidia{minor}" if minor is not None else None,
                    mig_instances=self._mig_instances(index, handle) if mig_mode else (),
                    mig_mode=mig_mode,
                )
            )
        return found

    def _mig_instances(self, index: int, handle: Any) -> tuple[MigInstance, ...]:
        nvml = self._nvml
        instances = []
        for slot in range(self._safe(nvml.nvmlDeviceGetMaxMigDeviceCount, handle, default=0)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError_NotFound:  # an empty slot
                continue
            except nvml.NVMLError as exc:
                self._warn_once(
                    f"mig/{index}/{slot}",
                    "NVML could not open MIG slot %d of GPU %d: %s",
                    slot,
                    index,
                    exc,
                )
                continue
            uuid = self._safe(nvml.nvmlDeviceGetUUID, mig)
            name = _text(self._safe(nvml.nvmlDeviceGetName, mig, default=""))
            profile = mig_profile_from_name(name)
            if uuid is None or profile is None:
                self._warn_once(
                    f"mig/{index}/{slot}",
                    "MIG slot %d of GPU %d is left out: no UUID or no profile in its name %r",
                    slot,
                    index,
                    name,
                )
                continue
            memory = self._safe(nvml.nvmlDeviceGetMemoryInfo, mig)
            instances.append(
                MigInstance(
                    uuid=_text(uuid),
                    profile=profile,
                    memory=int(memory.total) if memory is not None else _profile_memory(profile),
                    index=slot,
                )
            )
        return tuple(instances)

    def utilization(self) -> dict[str, Utilization]:
        nvml = self._nvml
        loads: dict[str, Utilization] = {}
        for _index, handle in self._handles():
            uuid = self._safe(nvml.nvmlDeviceGetUUID, handle)
            if uuid is None:
                continue
            rates = self._safe(nvml.nvmlDeviceGetUtilizationRates, handle)
            memory = self._safe(nvml.nvmlDeviceGetMemoryInfo, handle)
            loads[_text(uuid)] = {
                "gpu": int(rates.gpu) if rates is not None else None,
                "memory_used": int(memory.used) if memory is not None else None,
                "memory_total": int(memory.total) if memory is not None else None,
            }
        return loads

    def driver_version(self) -> str | None:
        self._check_open()
        version = self._safe(self._nvml.nvmlSystemGetDriverVersion)
        return _text(version) if version is not None else None

    def processes(self) -> list[GPUProcess]:
        """Every GPU's running compute and graphics processes (one entry per process and
        GPU: a process in both lists counts once) with their per-process SM utilization."""
        nvml = self._nvml
        found: list[GPUProcess] = []
        for index, handle in self._handles():
            uuid = self._safe(nvml.nvmlDeviceGetUUID, handle)
            if uuid is None:
                continue
            memory: dict[int, int | None] = {}
            instances: dict[int, int | None] = {}
            for kind in ("Compute", "Graphics"):
                for info in self._running_processes(kind, index, handle):
                    pid = int(info.pid)
                    used = info.usedGpuMemory
                    used = int(used) if used is not None else None
                    # The same process in both lists: NVML reports the same memory twice.
                    if pid not in memory or (used or 0) > (memory[pid] or 0):
                        memory[pid] = used
                    instance = getattr(info, "gpuInstanceId", None)
                    instances[pid] = (
                        int(instance) if instance is not None and instance < 0xFFFFFFFF else None
                    )
            if not memory:
                continue
            samples = self._process_utilization(index, handle)
            for pid, used in memory.items():
                found.append(
                    GPUProcess(
                        gpu_uuid=_text(uuid),
                        gpu_index=index,
                        pid=pid,
                        memory_used=used,
                        utilization=None if samples is None else min(100, samples.get(pid, 0)),
                        gpu_instance_id=instances.get(pid),
                    )
                )
        return found

    def _running_processes(self, kind: str, index: int, handle: Any) -> list[Any]:
        """NVML's running ``kind`` ("Compute" or "Graphics") processes on one GPU: the
        newest versioned entry point the driver has (``_v3``, else ``_v2``, else the
        unversioned one); ``[]`` when the GPU cannot tell."""
        nvml = self._nvml
        names = [f"nvmlDeviceGet{kind}RunningProcesses{v}" for v in ("_v3", "_v2", "")]
        for name in names:
            call = getattr(nvml, name, None)
            if call is None:
                continue
            for _attempt in range(3):
                try:
                    return list(call(handle))
                except nvml.NVMLError_InsufficientSize:
                    continue  # processes started between NVML's count and its copy
                except nvml.NVMLError_FunctionNotFound:
                    break  # an older driver: the next older entry point
                except nvml.NVMLError as exc:
                    self._warn_once(
                        f"processes/{kind}/{index}",
                        "NVML could not list the %s processes of GPU %d: %s",
                        kind.lower(),
                        index,
                        exc,
                    )
                    return []
                except nvml.NVMLLibraryMismatchError:
                    break
            else:
                return []
        return []

    def _process_utilization(self, index: int, handle: Any) -> dict[int, int] | None:
        """PID → SM percent of its newest sample within the last ``PROCESS_SAMPLE_WINDOW``
        seconds; ``{}`` when no process was sampled (idle); ``None`` when the GPU does not
        report per-process utilization."""
        nvml = self._nvml
        since = int((time.time() - PROCESS_SAMPLE_WINDOW) * 1_000_000)  # microseconds
        for _attempt in range(3):
            try:
                samples = nvml.nvmlDeviceGetProcessUtilization(handle, since)
                break
            except nvml.NVMLError_NotFound:
                return {}  # no sample since then: nothing ran
            except nvml.NVMLError_InsufficientSize:
                continue  # more samples arrived between NVML's count and its copy
            except nvml.NVMLError as exc:
                log.debug("No per-process utilization for GPU %d: %s", index, exc)
                return None
        else:
            return None
        newest: dict[int, tuple[int, int]] = {}
        for sample in samples:
            pid, stamp = int(sample.pid), int(sample.timeStamp)
            if pid not in newest or stamp >= newest[pid][0]:
                newest[pid] = (stamp, int(sample.smUtil))
        return {pid: util for pid, (_stamp, util) in newest.items()}


# -- simulated GPUs -----------------------------------------------------------------------

_SIM_ITEM = re.compile(r"^\s*(?:(\d+)\s*[xX]\s*)?([A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*)\s*$")
_SIM_MEMORY = re.compile(r"-(\d+(?:\.\d+)?)(GB|G|GIB|GI)$", re.IGNORECASE)
_SIM_MIG_TERM = re.compile(r"^\s*([^*\s]+)\s*\*\s*(\d+)\s*$")
_SIM_HINT = (
    "write it as COUNTxMODEL[-MEMORY][:mig=PROFILE*N[+PROFILE*N...]], comma-separated, "
    "e.g. 4xA100-80GB or 2xA100-80GB,1xT4-16GB"
)
_SIM_MIG_HINT = (
    "write MIG instances as :mig=PROFILE*N[+PROFILE*N...] with profiles such as 1g.10gb "
    "(1 of 7 compute slices, 10 GiB), e.g. 1xA100-80GB:mig=1g.10gb*7 or "
    "1xA100-80GB:mig=3g.40gb*1+1g.10gb*4; one GPU has at most 7 slices and its memory in all"
)
_SIM_DEFAULT_MEMORY = 16 * 1024**3
_SIM_MAX_GPUS = 64


@dataclass(frozen=True)
class SimulatedGPU:
    """One GPU of a simulated-GPU spec: its model, memory in bytes, and the profiles of its
    MIG instances in order (empty when the GPU is not in MIG mode)."""

    model: str
    memory: int
    mig: tuple[str, ...] = ()


def _profile_memory(profile: str) -> int:
    """A MIG profile's memory, read as GiB like the profile names: ``"1g.10gb"`` → 10 GiB."""
    match = MIG_PROFILE.match(profile)
    return int(match.group(2)) * 1024**3 if match else 0


def _parse_mig(item: str, value: str, memory: int) -> tuple[str, ...]:
    """The ``mig=`` value of one item → one profile per instance, validated for one GPU."""
    if not value.strip():
        raise InvalidRequest(f"simulated GPUs {item!r}: mig= lists no instances: {_SIM_MIG_HINT}")
    profiles: list[str] = []
    for term in value.split("+"):
        match = _SIM_MIG_TERM.match(term)
        if not match:
            raise InvalidRequest(
                f"simulated GPUs {item!r}: MIG instances {term.strip()!r} are not "
                f"PROFILE*N: {_SIM_MIG_HINT}"
            )
        profile, count = match.group(1).lower(), int(match.group(2))
        shape = MIG_PROFILE.match(profile)
        if not shape:
            raise InvalidRequest(
                f"simulated GPUs {item!r}: {match.group(1)!r} is not a MIG profile: {_SIM_MIG_HINT}"
            )
        slices, size = int(shape.group(1)), int(shape.group(2))
        if not 1 <= slices <= MIG_SLICES:
            raise InvalidRequest(
                f"simulated GPUs {item!r}: MIG profile {profile} has {slices} compute slices, "
                f"a GPU has 1 to {MIG_SLICES}: {_SIM_MIG_HINT}"
            )
        if size < 1:
            raise InvalidRequest(
                f"simulated GPUs {item!r}: MIG profile {profile} has no memory: {_SIM_MIG_HINT}"
            )
        if count < 1:
            raise InvalidRequest(
                f"simulated GPUs {item!r}: {profile}*{count} asks for no instances: {_SIM_MIG_HINT}"
            )
        if count > MIG_SLICES:
            raise InvalidRequest(
                f"simulated GPUs {item!r}: {count} instances of {profile} are more than "
                f"{MIG_SLICES} compute slices: {_SIM_MIG_HINT}"
            )
        profiles.extend([profile] * count)
    slices_used = sum(int(MIG_PROFILE.match(p).group(1)) for p in profiles)
    if slices_used > MIG_SLICES:
        raise InvalidRequest(
            f"simulated GPUs {item!r}: the MIG instances use {slices_used} compute slices, "
            f"more than a GPU's {MIG_SLICES}: {_SIM_MIG_HINT}"
        )
    memory_used = sum(_profile_memory(p) for p in profiles)
    if memory_used > memory:
        raise InvalidRequest(
            f"simulated GPUs {item!r}: the MIG instances need {format_size(memory_used)}, "
            f"more than the GPU's {format_size(memory)}: {_SIM_MIG_HINT}"
        )
    return tuple(profiles)


def parse_simulated_gpus(spec: str) -> list[SimulatedGPU]:
    """Read a simulated-GPU spec: ``COUNTxMODEL[-MEMORY][:mig=PROFILE*N[+PROFILE*N...]]``,
    items comma-separated.

    ``"2xA100-80GB,1xA100-80GB:mig=3g.40gb*1+1g.10gb*4"`` →
    ``[SimulatedGPU("A100-80GB", 80 GiB), SimulatedGPU("A100-80GB", 80 GiB),
    SimulatedGPU("A100-80GB", 80 GiB, ("3g.40gb", "1g.10gb", "1g.10gb", "1g.10gb",
    "1g.10gb"))]``.

    - ``COUNTx`` is optional (default 1): 1 to 64 per item, 64 GPUs in all.
    - The memory comes from the model's ``-<N>GB`` suffix (read as GiB, like the marketing
      names); a model without one gets 16 GiB.
    - ``:mig=`` puts each GPU of the item in MIG mode with ``N`` instances of each
      ``PROFILE`` (``<S>g.<M>gb``: S compute slices, M GiB), joined by ``+``. Per GPU the
      slices add up to at most 7 and the instances' memory to at most the GPU's.

    A malformed spec raises :class:`InvalidRequest` naming the bad item and how to write it.
    """
    gpus: list[SimulatedGPU] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        head, _, options = item.partition(":")
        match = _SIM_ITEM.match(head)
        if not match:
            raise InvalidRequest(f"simulated GPUs {item!r} is not understood: {_SIM_HINT}")
        count = int(match.group(1) or 1)
        if not 1 <= count <= _SIM_MAX_GPUS:
            raise InvalidRequest(
                f"simulated GPUs {item!r}: the count must be 1 to {_SIM_MAX_GPUS}: {_SIM_HINT}"
            )
        model = match.group(2)
        mem = _SIM_MEMORY.search(model)
        memory = parse_size(f"{mem.group(1)}GiB") if mem else _SIM_DEFAULT_MEMORY
        mig: tuple[str, ...] = ()
        if options or item.endswith(":"):
            key, eq, value = options.partition("=")
            if key.strip().lower() != "mig" or not eq:
                raise InvalidRequest(
                    f"simulated GPUs {item!r}: unknown option {options!r}, the only option "
                    f"is mig=: {_SIM_MIG_HINT}"
                )
            mig = _parse_mig(item, value, memory)
        gpus.extend([SimulatedGPU(model, memory, mig)] * count)
    if len(gpus) > _SIM_MAX_GPUS:
        raise InvalidRequest(
            f"simulated GPUs {spec!r}: at most {_SIM_MAX_GPUS} GPUs in all: {_SIM_HINT}"
        )
    return gpus


class SimulatedInventory(GPUInventory):
    """GPUs described by config, for hosts without NVIDIA hardware (demos, tests, CI).

    ``spec`` follows :func:`parse_simulated_gpus`. ``device_dir``, when set, holds fake
    device nodes ``nvidia0``, ``nvidia1``… (e.g. ``mknod DIR/nvidia0 c 1 3``, copies of
    /dev/null); each simulated GPU is then attached to a container as its node, so a test
    can see which devices a kernel got.
    """

    kind = "simulated"

    def __init__(
        self, spec: str, device_dir: str | None = None, processes_file: str | None = None
    ) -> None:
        self.spec = spec
        self.device_dir = device_dir or None
        # GPU processes (see the module's docs): read at every call, so a demo or a test
        # can change them while the inventory is in use.
        self.processes_file = processes_file or os.environ.get(SIMULATED_PROCESSES_ENV) or None
        self._warned_file: tuple[str, str] | None = None
        self._devices = []
        for index, gpu in enumerate(parse_simulated_gpus(spec)):
            path = os.path.join(self.device_dir, f"nvidia{index}") if self.device_dir else None
            self._devices.append(
                GPUDevice(
                    index=index,
                    uuid=self._uuid(index, gpu.model),
                    name=f"Simulated {gpu.model}",
                    memory=gpu.memory,
                    minor=index,
                    device_path=path if path and os.path.exists(path) else None,
                    simulated=True,
                    mig_mode=bool(gpu.mig),
                    mig_instances=tuple(
                        MigInstance(
                            uuid=self._mig_uuid(index, gpu.model, slot, profile),
                            profile=profile,
                            memory=_profile_memory(profile),
                            index=slot,
                        )
                        for slot, profile in enumerate(gpu.mig)
                    ),
                )
            )

    @staticmethod
    def _uuid(index: int, model: str) -> str:
        # Stable across processes, so every starter on the host names the same GPU alike.
        digest = hashlib.sha256(f"jupyter-gpu-sessions/{index}/{model}".encode()).digest()
        return f"GPU-{uuidlib.UUID(bytes=digest[:16])}"

    @staticmethod
    def _mig_uuid(index: int, model: str, slot: int, profile: str) -> str:
        key = f"jupyter-gpu-sessions/{index}/{model}/mig/{slot}/{profile}"
        return f"MIG-{uuidlib.UUID(bytes=hashlib.sha256(key.encode()).digest()[:16])}"

    def devices(self) -> list[GPUDevice]:
        return list(self._devices)

    def utilization(self) -> dict[str, Utilization]:
        memory: dict[str, int] = {}
        busy: dict[str, int] = {}
        for p in self.processes():
            memory[p.gpu_uuid] = memory.get(p.gpu_uuid, 0) + (p.memory_used or 0)
            busy[p.gpu_uuid] = min(100, busy.get(p.gpu_uuid, 0) + (p.utilization or 0))
        return {
            d.uuid: {
                "gpu": busy.get(d.uuid, 0),
                "memory_used": min(d.memory, memory.get(d.uuid, 0)),
                "memory_total": d.memory,
            }
            for d in self._devices
        }

    def driver_version(self) -> str | None:
        return None

    def processes(self) -> list[GPUProcess]:
        """The processes ``processes_file`` describes; ``[]`` without one. A file that cannot
        be read or understood is logged (once per problem) and counts as no processes."""
        path = self.processes_file
        if not path:
            return []
        try:
            with open(path, encoding="utf-8") as f:
                entries = json.load(f)
            return self._read_processes(entries)
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError, InvalidRequest) as exc:
            problem = (path, str(exc))
            if problem != self._warned_file:
                self._warned_file = problem
                log.warning("Simulated GPU processes in %s are ignored: %s", path, exc)
            return []

    def _read_processes(self, entries: Any) -> list[GPUProcess]:
        if not isinstance(entries, list):
            raise ValueError(
                'write a JSON list of {"gpu": INDEX or UUID, "pid": N, "memory_used": '
                'BYTES or "2GiB", "utilization": PERCENT or null}'
            )
        by_index = {d.index: d for d in self._devices}
        by_uuid = {d.uuid: d for d in self._devices}
        found = []
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise ValueError(f"entry {n} is not an object")
            gpu = entry.get("gpu")
            device = by_uuid.get(gpu) if isinstance(gpu, str) else by_index.get(gpu)
            if device is None or isinstance(gpu, bool):
                raise ValueError(f"entry {n}: no simulated GPU {gpu!r}")
            pid = entry.get("pid")
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
                raise ValueError(f"entry {n}: pid {pid!r} is not a positive integer")
            used = entry.get("memory_used", 0)
            used = parse_size(used) if isinstance(used, str) else used
            if used is not None and (not isinstance(used, int) or used < 0):
                raise ValueError(f"entry {n}: memory_used {used!r} is not a size")
            util = entry.get("utilization")
            if util is not None and (not isinstance(util, int) or not 0 <= util <= 100):
                raise ValueError(f"entry {n}: utilization {util!r} is not 0 to 100")
            found.append(GPUProcess(device.uuid, device.index, pid, used, util))
        return found


def detect_inventory(
    simulated_gpus: str | None = None,
    simulated_device_dir: str | None = None,
    simulated_processes: str | None = None,
) -> GPUInventory:
    """NVML when it initialises, else simulated GPUs when configured, else none.

    ``simulated_gpus`` / ``simulated_device_dir`` / ``simulated_processes`` fall back to the
    environment variables ``JUPYTER_GPU_SESSIONS_SIMULATED_GPUS`` /
    ``JUPYTER_GPU_SESSIONS_SIMULATED_DEVICE_DIR`` / ``JUPYTER_GPU_SESSIONS_SIMULATED_PROCESSES``.
    Why NVML is unavailable is logged once per process, however often this runs.
    """
    nvml = NvmlInventory.try_create()
    if nvml is not None:
        return nvml
    spec = simulated_gpus or os.environ.get(SIMULATED_GPUS_ENV, "")
    if spec.strip():
        device_dir = simulated_device_dir or os.environ.get(SIMULATED_DEVICE_DIR_ENV)
        return SimulatedInventory(spec, device_dir, simulated_processes)
    return NoGPUInventory()
