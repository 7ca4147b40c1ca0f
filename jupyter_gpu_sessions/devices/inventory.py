"""GPU inventories: real NVIDIA GPUs through NVML, simulated ones from config, or none."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid as uuidlib
from abc import ABC, abstractmethod

from ..core.errors import InvalidRequest
from ..core.models import GPUDevice
from ..core.units import parse_size

log = logging.getLogger(__name__)

SIMULATED_GPUS_ENV = "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS"
SIMULATED_DEVICE_DIR_ENV = "JUPYTER_GPU_SESSIONS_SIMULATED_DEVICE_DIR"


class GPUInventory(ABC):
    """What GPUs this host has. ``kind`` says where the answer came from."""

    kind: str = "none"

    @abstractmethod
    def devices(self) -> list[GPUDevice]:
        """The host's GPUs, ordered by index. May block (NVML): call off the event loop."""

    def describe(self) -> str:
        devices = self.devices()
        if not devices:
            return "no GPUs"
        return f"{len(devices)} {self.kind} GPU(s): " + ", ".join(
            f"#{d.index} {d.name}" for d in devices
        )


class NoGPUInventory(GPUInventory):
    kind = "none"

    def devices(self) -> list[GPUDevice]:
        return []


class NvmlInventory(GPUInventory):
    """Real NVIDIA GPUs through nvidia-ml-py (module ``pynvml``)."""

    kind = "nvml"

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()

    @classmethod
    def try_create(cls) -> NvmlInventory | None:
        """An inventory when the library and the driver answer, else ``None`` (said once)."""
        try:
            return cls()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError…
            log.info("No NVIDIA GPUs: NVML is not available on this host (%s)", exc)
            return None

    def _safe(self, fn, *args, default=None):
        try:
            return fn(*args)
        except self._nvml.NVMLError:  # NotSupported and friends: a metric we cannot read
            return default

    def devices(self) -> list[GPUDevice]:
        nvml = self._nvml
        found = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            name = nvml.nvmlDeviceGetName(handle)
            memory = self._safe(nvml.nvmlDeviceGetMemoryInfo, handle)
            minor = self._safe(nvml.nvmlDeviceGetMinorNumber, handle, default=index)
            found.append(
                GPUDevice(
                    index=index,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                    name=name.decode() if isinstance(name, bytes) else name,
                    memory=int(memory.total) if memory is not None else 0,
                    minor=minor,
                    device_path=f"/dev/nvidia{minor}",
                )
            )
        return found


_SIM_ITEM = re.compile(r"^\s*(?:(\d+)\s*[xX]\s*)?([A-Za-z][A-Za-z0-9]*(?:-[A-Za-z0-9]+)*)\s*$")
_SIM_MEMORY = re.compile(r"-(\d+(?:\.\d+)?)(GB|G|GIB|GI)$", re.IGNORECASE)
_SIM_HINT = (
    "write it as COUNTxMODEL[-MEMORY], comma-separated, e.g. 4xA100-80GB or 2xA100-80GB,1xT4-16GB"
)


def parse_simulated_gpus(spec: str) -> list[tuple[str, int]]:
    """``"2xA100-80GB,1xT4-16GB"`` → ``[("A100-80GB", 80 GiB), ("A100-80GB", …), ("T4-16GB", …)]``.

    The memory comes from the model's ``-<N>GB`` suffix (read as GiB, like the marketing
    names); a model without one gets 16 GiB.
    """
    gpus: list[tuple[str, int]] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        match = _SIM_ITEM.match(item)
        if not match:
            raise InvalidRequest(f"simulated GPUs {item!r} is not understood: {_SIM_HINT}")
        count = int(match.group(1) or 1)
        if not 1 <= count <= 64:
            raise InvalidRequest(f"simulated GPUs {item!r}: the count must be 1 to 64")
        model = match.group(2)
        mem = _SIM_MEMORY.search(model)
        memory = parse_size(f"{mem.group(1)}GiB") if mem else 16 * 1024**3
        gpus.extend([(model, memory)] * count)
    if len(gpus) > 64:
        raise InvalidRequest(f"simulated GPUs {spec!r}: at most 64 GPUs in all")
    return gpus


class SimulatedInventory(GPUInventory):
    """GPUs described by config, for hosts without NVIDIA hardware (demos, tests, CI).

    ``device_dir``, when set, holds fake device nodes ``nvidia0``, ``nvidia1``… (e.g.
    ``mknod DIR/nvidia0 c 1 3``, copies of /dev/null); each simulated GPU is then
    attached to a container as its node, so a test can see which devices a kernel got.
    """

    kind = "simulated"

    def __init__(self, spec: str, device_dir: str | None = None) -> None:
        self.spec = spec
        self.device_dir = device_dir or None
        self._devices = []
        for index, (model, memory) in enumerate(parse_simulated_gpus(spec)):
            path = os.path.join(self.device_dir, f"nvidia{index}") if self.device_dir else None
            self._devices.append(
                GPUDevice(
                    index=index,
                    uuid=self._uuid(index, model),
                    name=f"Simulated {model}",
                    memory=memory,
                    minor=index,
                    device_path=path if path and os.path.exists(path) else None,
                    simulated=True,
                )
            )

    @staticmethod
    def _uuid(index: int, model: str) -> str:
        # Stable across processes, so every starter on the host names the same GPU alike.
        digest = hashlib.sha256(f"jupyter-gpu-sessions/{index}/{model}".encode()).digest()
        return f"GPU-{uuidlib.UUID(bytes=digest[:16])}"

    def devices(self) -> list[GPUDevice]:
        return list(self._devices)


def detect_inventory(
    simulated_gpus: str | None = None, simulated_device_dir: str | None = None
) -> GPUInventory:
    """NVML when it initialises, else simulated GPUs when configured, else none.

    ``simulated_gpus`` / ``simulated_device_dir`` fall back to the environment variables
    ``JUPYTER_GPU_SESSIONS_SIMULATED_GPUS`` / ``JUPYTER_GPU_SESSIONS_SIMULATED_DEVICE_DIR``.
    """
    nvml = NvmlInventory.try_create()
    if nvml is not None:
        return nvml
    spec = simulated_gpus or os.environ.get(SIMULATED_GPUS_ENV, "")
    if spec.strip():
        device_dir = simulated_device_dir or os.environ.get(SIMULATED_DEVICE_DIR_ENV)
        return SimulatedInventory(spec, device_dir)
    return NoGPUInventory()
