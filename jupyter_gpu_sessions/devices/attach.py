"""How allocated GPUs reach a container: always by identity (UUID), never by count."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..core.errors import InvalidRequest
from ..core.models import GPUDevice

ATTACH_MODES = ("auto", "nvidia", "cdi", "nodes")
# Control nodes a CUDA process needs besides its GPUs' own /dev/nvidiaN.
NVIDIA_CONTROL_NODES = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)
CDI_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")


@dataclass
class DeviceAttachment:
    """A runtime-neutral description: device requests (nvidia/cdi drivers), device nodes
    (host path → container path) and the environment the kernel sees."""

    mode: str
    device_requests: list[dict] = field(default_factory=list)
    device_nodes: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def cdi_available(spec_dirs: Iterable[str] = CDI_SPEC_DIRS) -> bool:
    """True when an NVIDIA CDI spec (from ``nvidia-ctk cdi generate``) is installed."""
    for directory in spec_dirs:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        if any(name.startswith("nvidia") for name in names):
            return True
    return False


def choose_mode(
    devices: Sequence[GPUDevice],
    configured: str,
    *,
    nvidia_runtime: bool,
    cdi: bool,
) -> str:
    """The attach mode for ``devices``: the configured one, or the best the host supports."""
    if configured not in ATTACH_MODES:
        raise InvalidRequest(
            f"gpu attach mode {configured!r} is unknown: use one of {', '.join(ATTACH_MODES)}"
        )
    if configured != "auto":
        return configured
    if any(d.simulated for d in devices):
        return "nodes"
    if nvidia_runtime:
        return "nvidia"
    if cdi:
        return "cdi"
    return "nodes"


def attach_devices(devices: Sequence[GPUDevice], mode: str) -> DeviceAttachment:
    """Describe how to give exactly ``devices`` to one container in ``mode``."""
    uuids = ",".join(d.uuid for d in devices)
    if not devices:
        # Hide every GPU the toolkit might otherwise expose by default.
        return DeviceAttachment(mode=mode, env={"NVIDIA_VISIBLE_DEVICES": "void"})
    if mode == "nvidia":
        return DeviceAttachment(
            mode=mode,
            device_requests=[
                {
                    "driver": "nvidia",
                    "device_ids": [d.uuid for d in devices],
                    "capabilities": [["gpu"]],
                }
            ],
        )
    if mode == "cdi":
        return DeviceAttachment(
            mode=mode,
            device_requests=[
                {"driver": "cdi", "device_ids": [f"nvidia.com/gpu={d.uuid}" for d in devices]}
            ],
        )
    if mode != "nodes":
        raise InvalidRequest(f"gpu attach mode {mode!r} is unknown")
    nodes = [(d.device_path, f"/dev/nvidia{d.minor}") for d in devices if d.device_path]
    if not all(d.simulated for d in devices):
        nodes += [(path, path) for path in NVIDIA_CONTROL_NODES if os.path.exists(path)]
    return DeviceAttachment(
        mode=mode,
        device_nodes=nodes,
        # The kernel sees its GPUs by UUID: CUDA accepts UUIDs in CUDA_VISIBLE_DEVICES.
        env={"NVIDIA_VISIBLE_DEVICES": uuids, "CUDA_VISIBLE_DEVICES": uuids},
    )
