"""The contract every runtime keeps; the manager only talks to this."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
from abc import ABC, abstractmethod
from typing import Any

from ..core.models import ExitState, LaunchSpec, RuntimeHandle

LABEL_PREFIX = "io.jupyter.gpu-sessions."
SESSION_LABEL = LABEL_PREFIX + "session-id"
# Which store recorded the session: a manager only ever reconciles its own store's containers.
STORE_LABEL = LABEL_PREFIX + "store"
WAIT_POLL = 0.25  # seconds between polls of a runtime that cannot tell of an exit


def spec_digest(payload: Any) -> str:
    """A stable hash of what a launch asks for, so a restart can tell if it may reuse."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def session_labels(spec: LaunchSpec) -> dict[str, str]:
    labels = {
        SESSION_LABEL: spec.session_id,
        LABEL_PREFIX + "kernel-id": spec.kernel_id,
        LABEL_PREFIX + "owner": spec.owner,
        LABEL_PREFIX + "gpus": ",".join(d.uuid for d in spec.devices),
    }
    labels.update(spec.labels)
    return labels


class KernelRuntime(ABC):
    """Start, watch, signal and remove kernels. Every method is safe to call on the loop:
    implementations push blocking work to a thread."""

    name: str = ""

    @abstractmethod
    async def check_image(self, image: str) -> bool:
        """True when ``image`` can be started here (always True for a local process)."""

    @abstractmethod
    async def start(self, spec: LaunchSpec, previous: RuntimeHandle | None = None) -> RuntimeHandle:
        """Start the kernel. ``previous`` is the same session's last handle (a restart): reuse
        it when the spec is unchanged. On failure nothing is left running."""

    @abstractmethod
    async def poll(self, handle: RuntimeHandle) -> ExitState | None:
        """``None`` while the kernel runs, else how it ended."""

    @abstractmethod
    async def signal(self, handle: RuntimeHandle, signum: int) -> None:
        """Deliver ``signum`` to the kernel; a no-op when it already ended."""

    @abstractmethod
    async def remove(self, handle: RuntimeHandle) -> None:
        """Stop (if needed) and delete the container or reap the process."""

    @abstractmethod
    async def logs(self, handle: RuntimeHandle, tail: int = 20) -> str:
        """The last ``tail`` lines the kernel wrote to stdout/stderr."""

    @abstractmethod
    async def describe(self, handle: RuntimeHandle) -> str:
        """A short human description of its state, for error messages."""

    async def pids(self, handle: RuntimeHandle) -> list[int]:
        """The host PIDs of the kernel's processes (how NVML names the processes using a
        GPU), ``[]`` when it no longer runs. A runtime that cannot tell answers ``[]``."""
        return []

    async def wait(self, handle: RuntimeHandle) -> ExitState:
        """Until the kernel (or batch command) has exited, then how. Polls; a runtime that
        can be told of an exit overrides it."""
        while True:
            state = await self.poll(handle)
            if state is not None:
                return state
            await asyncio.sleep(WAIT_POLL)

    async def stop(self, handle: RuntimeHandle, timeout: float) -> None:
        """SIGTERM, then SIGKILL when it has not exited within ``timeout`` seconds."""
        await self.signal(handle, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while await self.poll(handle) is None:
            if loop.time() >= deadline:
                await self.signal(handle, signal.SIGKILL)
                return
            await asyncio.sleep(WAIT_POLL)
