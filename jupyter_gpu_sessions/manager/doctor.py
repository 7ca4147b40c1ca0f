"""Host checks for `jupyter gpu-sessions doctor`: the Docker engine, the kernel image, the
GPUs and how they attach, the session store and the vfolder root, each with a fix."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from ..core.errors import GPUSessionsError, docker_socket_hint
from ..devices import NvmlInventory, SimulatedInventory
from ..devices.attach import cdi_available
from ..image import build_hint
from ..runtime.docker import DockerRuntime

if TYPE_CHECKING:
    from . import GPUSessionManager

Check = tuple[bool | None, str, str]  # ok (None: a note), what, how to fix


def diagnose(manager: GPUSessionManager) -> list[Check]:
    checks: list[Check] = []
    runtime = manager.runtime("docker")
    assert isinstance(runtime, DockerRuntime)
    engine = None
    try:
        engine = runtime.engine_info()
        checks.append(
            (
                True,
                f"Docker engine {engine.get('ServerVersion')} reachable "
                f"({engine.get('CgroupDriver')}, cgroup v{engine.get('CgroupVersion')})",
                "",
            )
        )
    except GPUSessionsError:
        checks.append((False, "Docker engine not reachable", docker_socket_hint(None)))

    image = manager.default_image
    if engine is not None:
        if runtime.client().images.list(name=image):
            checks.append((True, f"default kernel image {image} present", ""))
        else:
            checks.append((False, f"default kernel image {image} missing", build_hint(image)))
            if shutil.which("mmdebstrap") is None:
                checks.append(
                    (
                        None,
                        "mmdebstrap (needed to build the image) is not installed",
                        "sudo apt-get install mmdebstrap",
                    )
                )

    inventory = manager.inventory
    if isinstance(inventory, NvmlInventory):
        driver = inventory.driver_version() or "unknown"
        checks.append((True, f"NVML (driver {driver}): {inventory.describe()}", ""))
    elif isinstance(inventory, SimulatedInventory):
        checks.append((True, f"simulated GPUs configured: {inventory.describe()}", ""))
    else:
        checks.append(
            (
                None,
                "no GPUs: NVML found no NVIDIA driver and no simulated GPUs are "
                "configured; kernels without GPUs still run",
                "install the NVIDIA driver, or for a demo set "
                "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS=4xA100-80GB",
            )
        )

    if engine is not None:
        nvidia = "nvidia" in (engine.get("Runtimes") or {})
        cdi = cdi_available()
        if nvidia or cdi:
            found = " and ".join(x for x, y in (("nvidia runtime", nvidia), ("CDI", cdi)) if y)
            checks.append((True, f"GPU attachment: {found} available", ""))
        elif isinstance(inventory, NvmlInventory):
            checks.append(
                (
                    False,
                    "neither the NVIDIA container runtime nor a CDI spec is set up",
                    "install nvidia-container-toolkit, then `sudo nvidia-ctk runtime "
                    "configure --runtime=docker && sudo systemctl restart docker` (or "
                    "`sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`)",
                )
            )
        else:
            checks.append(
                (
                    None,
                    "GPU attachment: device nodes (no nvidia runtime or CDI; "
                    "fine for simulated GPUs)",
                    "",
                )
            )

    try:
        live = manager.store.live()
        checks.append((True, f"session store {manager.db_url} ({len(live)} live session(s))", ""))
    except Exception as exc:  # any database error: say which store and why
        checks.append(
            (
                False,
                f"session store {manager.db_url} cannot be opened: {exc}",
                "check the path's permissions, or set c.GPUSessionManager.db_url",
            )
        )
        return checks
    checks.extend(_vfolder_checks(manager))
    return checks


def _vfolder_checks(manager: GPUSessionManager) -> list[Check]:
    from ..vfolders.backends import LoopbackBackend

    service = manager.vfolders
    root = service.root
    parent = root
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        return [
            (
                False,
                f"vfolder root {root} cannot be created or written",
                "check its permissions, or set c.VFolderService.root",
            )
        ]
    checks: list[Check] = [
        (True, f"vfolder root {root} ({service.default_backend} by default)", "")
    ]
    try:
        LoopbackBackend.check_available()
        checks.append((True, "loopback vfolders (hard quotas) available", ""))
    except GPUSessionsError as exc:
        bad = service.default_backend == "loopback"
        checks.append((False if bad else None, "loopback vfolders unavailable", exc.message))
    return checks
