"""Helpers the tests share: a loop thread for module-wide kernels, kernel start/stop, specs."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from jupyter_gpu_sessions.runtime.base import SESSION_LABEL

REPO = Path(__file__).resolve().parent.parent
KERNEL_UID = 1000  # the uid the tests' notebook directories belong to


class LoopThread:
    """An asyncio loop in a thread, so kernels can outlive one test (shared per module)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 180) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def make_notebook_dir(path: Path) -> Path:
    """A notebook directory as a person has it: owned by them, not by root."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, KERNEL_UID, KERNEL_UID)
    return path


def write_kernelspec(kernel_dir: Path, name: str, spec: dict) -> KernelSpecManager:
    (kernel_dir / name).mkdir(parents=True, exist_ok=True)
    (kernel_dir / name / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(kernel_dir)])


def shipped_spec(name: str = "python3-container") -> dict:
    return json.loads((REPO / "provisioners" / name / "kernel.json").read_text())


def labelled_containers(client, **labels: str) -> list:
    filters = [SESSION_LABEL] + [f"io.jupyter.gpu-sessions.{k}={v}" for k, v in labels.items()]
    # ignore_removed: a container removed between the listing and its inspection is gone.
    return client.containers.list(all=True, filters={"label": filters}, ignore_removed=True)


async def start_kernel(
    kernel_name: str, cwd: Path, km_class: type = AsyncKernelManager, **km_kwargs: Any
):
    """A kernel manager + ready client, as jupyter_server would make them."""
    km = km_class(kernel_name=kernel_name, **km_kwargs)
    await km.start_kernel(cwd=str(cwd))
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    return km, kc


async def restart_kernel(km, kc, timeout: float = 60) -> None:
    """Restart and wait until the client hears the new kernel on every channel.

    ``wait_for_ready`` proves the shell channel only: the client's IOPub subscription
    reconnects to the new kernel on its own time, and output published before it has
    is lost. So nudge with kernel_info until an IOPub message arrives, as jupyter_server
    does for its websockets."""
    await km.restart_kernel()
    await wait_for_iopub(kc, timeout)


async def wait_for_iopub(kc, timeout: float = 60) -> None:
    """Until a client hears a (re)started kernel on every channel (see restart_kernel)."""
    await kc.wait_for_ready(timeout=timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        kc.kernel_info()
        try:
            await kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        while True:  # drain the rest of the nudge's messages
            try:
                await kc.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                break
        while True:
            try:
                await kc.get_shell_msg(timeout=0.2)
            except queue.Empty:
                return
    raise TimeoutError(f"the restarted kernel's IOPub stayed silent for {timeout:g}s")


async def stop_kernel(km, kc) -> None:
    kc.stop_channels()
    await km.shutdown_kernel(now=False)


async def run_code(kc, code: str, timeout: float = 60) -> tuple[dict, str]:
    """Execute ``code``; return the reply content and everything it printed."""
    out: list[str] = []

    def hook(msg):
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("\n".join(msg["content"]["traceback"]))

    reply = await kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    return reply["content"], "".join(out)


async def until(check, timeout: float = 30.0, what: str = "the condition"):
    """Wait until ``check()`` is truthy (polled every 0.1 s) and return its value; a test
    waits on the state it needs, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout:g}s")
