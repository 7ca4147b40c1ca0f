"""LocalRuntime: kernels as local processes, for hosts without Docker (and Binder demos).

It keeps the environment rules (an allowlist, never the server's whole environment) and
gives the kernel its GPUs through ``CUDA_VISIBLE_DEVICES``; it cannot enforce memory,
CPU or uid limits, and says so in the kernelspec documentation.
"""

from __future__ import annotations

import asyncio
import os
import signal as signals
import subprocess
from collections import deque

from ..core.errors import KernelLaunchError
from ..core.models import ExitState, LaunchSpec
from .base import KernelRuntime, RuntimeHandle

LOG_NAME = "kernel.log"


class LocalRuntime(KernelRuntime):
    name = "local"

    def __init__(self) -> None:
        self._processes: dict[str, subprocess.Popen] = {}

    async def check_image(self, image: str) -> bool:
        return True  # a local kernel runs in the server's own environment

    def _spawn(self, spec: LaunchSpec) -> subprocess.Popen:
        env = dict(spec.env)
        if spec.devices:
            uuids = ",".join(d.uuid for d in spec.devices)
            env["CUDA_VISIBLE_DEVICES"] = uuids
            env["NVIDIA_VISIBLE_DEVICES"] = uuids
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""  # no GPUs granted: none visible
        # As jupyter_client's own launcher does: the kernel (ipykernel's parent poller) exits
        # when this process dies, so no orphan keeps running on a GPU the reconcile pass
        # of another process gives back.
        env["JPY_PARENT_PID"] = str(os.getpid())
        log_path = os.path.join(spec.state_dir, LOG_NAME)
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                list(spec.argv),
                env=env,
                cwd=spec.working_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so signals reach children
            )

    async def start(self, spec: LaunchSpec, previous: RuntimeHandle | None = None) -> RuntimeHandle:
        if previous is not None:
            await self.remove(previous)
        try:
            process = await asyncio.to_thread(self._spawn, spec)
        except OSError as exc:
            raise KernelLaunchError(
                f"Could not start the local kernel {spec.argv[0]!r}: {exc}"
            ) from exc
        handle = RuntimeHandle(
            self.name, str(process.pid), f"pid {process.pid}", extra={"log": spec.state_dir}
        )
        self._processes[handle.id] = process
        return handle

    async def poll(self, handle: RuntimeHandle) -> ExitState | None:
        process = self._processes.get(handle.id)
        if process is None:
            return ExitState(exit_code=255, error=f"process {handle.id} is not ours")
        code = process.poll()
        if code is None:
            return None
        # Popen reports a signal death as -N; shells (and Docker) say 128+N.
        return ExitState(exit_code=128 - code if code < 0 else code)

    async def signal(self, handle: RuntimeHandle, signum: int) -> None:
        process = self._processes.get(handle.id)
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass

    async def remove(self, handle: RuntimeHandle) -> None:
        process = self._processes.pop(handle.id, None)
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signals.SIGKILL)
            except ProcessLookupError:
                pass
        await asyncio.to_thread(process.wait)

    async def logs(self, handle: RuntimeHandle, tail: int = 20) -> str:
        path = os.path.join(handle.extra.get("log", ""), LOG_NAME)

        def read() -> str:
            try:
                with open(path, errors="replace") as f:
                    return "".join(deque(f, maxlen=tail))
            except OSError:
                return ""

        return await asyncio.to_thread(read)

    async def pids(self, handle: RuntimeHandle) -> list[int]:
        """The kernel process and every process it started (its descendants, and whatever
        stayed in its session after leaving the tree), by a scan of /proc; ``[]`` once it
        has exited. Works for the processes of other managers on this host too."""
        process = self._processes.get(handle.id)
        if process is not None and process.poll() is not None:
            return []
        try:
            root = int(handle.id)
        except ValueError:
            return []
        return await asyncio.to_thread(process_tree, root)

    async def describe(self, handle: RuntimeHandle) -> str:
        state = await self.poll(handle)
        return f"process {handle.id} is " + ("running" if state is None else state.describe())


def process_tree(root: int) -> list[int]:
    """``root`` and the live processes below it or in its session (``start_new_session``
    makes the kernel its session's leader), read from /proc; ``[]`` when ``root`` is gone.
    Blocking."""
    parents: dict[int, int] = {}
    in_session: list[int] = []
    alive = False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        if len(fields) < 4 or fields[0] == b"Z":
            continue  # a zombie uses nothing
        pid = int(entry)
        parents[pid] = int(fields[1])
        if int(fields[3]) == root:
            in_session.append(pid)
        alive = alive or pid == root
    if not alive:
        return []
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found = {root}
    todo = [root, *in_session]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(child for child in children.get(pid, ()) if child not in found)
    return sorted(found)
