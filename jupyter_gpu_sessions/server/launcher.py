"""``GET launcher``: the GPU session kernelspecs as the caller may launch them now."""

from __future__ import annotations

from typing import Any

from tornado import web

from .base import GPUSessionsHandler
from .kernels import PROVISIONER_NAME


def session_kernelspecs(kernel_spec_manager: Any, provisioner_name: str) -> list[dict[str, Any]]:
    """Every kernelspec whose kernels are GPU sessions: name, display name and its
    provisioner config (blocking: reads the kernelspec files)."""
    found = []
    for name, entry in sorted(kernel_spec_manager.get_all_specs().items()):
        spec = entry.get("spec") or {}
        provisioner = (spec.get("metadata") or {}).get("kernel_provisioner") or {}
        if provisioner.get("provisioner_name") != provisioner_name:
            continue
        config = provisioner.get("config")
        found.append(
            {
                "name": name,
                "display_name": spec.get("display_name") or name,
                "config": config if isinstance(config, dict) else {},
            }
        )
    return found


class LauncherHandler(GPUSessionsHandler):
    @web.authenticated
    async def get(self) -> None:
        kernel_manager = self.serverapp.kernel_manager
        name = getattr(kernel_manager, "provisioner_name", PROVISIONER_NAME)
        specs = await self.run(session_kernelspecs, self.serverapp.kernel_spec_manager, name)
        self.reply(await self.engine.launcher(self.who, specs))
