"""Kernelspecs that name the gpu-container-provisioner: build them and install them."""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

from .core.errors import InvalidRequest
from .core.models import ResourceRequest
from .core.parameters import defaults_from_config, parameters_schema, static_bounds
from .engine import RUNTIMES

PROVISIONER_NAME = "gpu-container-provisioner"
_KERNEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$", re.IGNORECASE)


def kernel_json(
    *,
    display_name: str,
    gpus: int = 0,
    cpus: float | str | None = None,
    memory: str | None = None,
    shm_size: str | None = None,
    image: str | None = None,
    runtime: str = "docker",
) -> dict[str, Any]:
    """A Python kernelspec running under the provisioner; every value is validated."""
    ResourceRequest.parse(gpus=gpus, cpus=cpus, memory=memory, shm_size=shm_size)
    if runtime not in RUNTIMES:
        raise InvalidRequest(f"runtime {runtime!r} is unknown: use one of {', '.join(RUNTIMES)}")
    if not display_name.strip():
        raise InvalidRequest("the display name must not be empty")
    config: dict[str, Any] = {"gpus": int(gpus)}
    if cpus not in (None, ""):
        config["cpus"] = float(cpus)
    for key, value in (("memory", memory), ("shm_size", shm_size), ("image", image)):
        if value:
            config[key] = value
    if runtime != "docker":
        config["runtime"] = runtime
    return {
        "argv": ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {
            "debugger": True,
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config},
            # JEP 87: the choosable resources as a JSON Schema. A file cannot know the
            # host: it holds the engine's own limits; GET gpu-sessions/api/launcher serves
            # the schema bounded by the host and the user's policy.
            "parameters": static_parameters(config),
        },
    }


def static_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The JEP 87 ``metadata.parameters`` of a kernelspec file with this provisioner
    config (an empty image: the server's default image)."""
    return parameters_schema(defaults_from_config(config), static_bounds(config.get("image") or ""))


def install_kernelspec(
    name: str,
    spec: dict[str, Any],
    *,
    user: bool = False,
    prefix: str | None = None,
    kernel_spec_manager: KernelSpecManager | None = None,
) -> str:
    """Install ``spec`` as kernel ``name``; return the directory it was written to."""
    if not _KERNEL_NAME.match(name):
        raise InvalidRequest(
            f"kernel name {name!r} is not valid: use letters, digits, '.', '_' and '-' "
            "(at most 64, starting with a letter or digit)"
        )
    ksm = kernel_spec_manager or KernelSpecManager()
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "kernel.json"), "w") as f:
            json.dump(spec, f, indent=2)
        return ksm.install_kernel_spec(tmp, kernel_name=name, user=user, prefix=prefix)
