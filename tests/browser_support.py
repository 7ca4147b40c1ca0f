"""A real `jupyter lab` process and a real browser (Debian's chromium driven by Playwright),
for tests that do what a person does in JupyterLab.

The lab runs as a user runs it: `python -m jupyterlab` from this environment, so the
configuration the package ships (etc/jupyter/jupyter_server_config.d) is what applies.
Only the places it keeps things are its own (store, runtime, config and data dirs), GPUs
are simulated, and JupyterLab's news feed and update check (requests to the internet)
are off.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.errors import DockerException

from jupyter_gpu_sessions.runtime.base import SESSION_LABEL

from .support import KERNEL_UID, make_notebook_dir

CHROMIUM = "/usr/bin/chromium"
TEST_COMMAND = "bash scripts/test.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_gpu_nodes(path: Path, count: int) -> Path:
    """Fake device nodes nvidia0..N-1: character-device copies of /dev/null (DESIGN.md)."""
    path.mkdir(parents=True, exist_ok=True)
    null = os.stat("/dev/null")
    for index in range(count):
        node = path / f"nvidia{index}"
        if not node.exists():
            os.mknod(node, stat.S_IFCHR | 0o666, null.st_rdev)
    return path


@dataclass
class LabServer:
    """A running `jupyter lab`: where it answers, its token, its notebooks and its log."""

    url: str
    token: str
    root: Path
    log_path: Path
    process: subprocess.Popen
    kernel_ids: set[str] = field(default_factory=set)

    def api(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read()
        return json.loads(text) if text else None

    def lab_url(self, path: str, workspace: str = "") -> str:
        """JupyterLab opening `path`; in a workspace of its own when named (a new workspace
        restores no tab an earlier page left open)."""
        where = f"/lab/workspaces/{workspace}" if workspace else "/lab"
        return f"{self.url}{where}/tree/{path}?token={self.token}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def write_notebook(self, name: str, kernel_name: str, display_name: str = "") -> Path:
        """A notebook with one empty code cell whose metadata names the kernel, owned (like
        its directory) by the person whose notebook it is."""
        notebook = {
            "cells": [
                {
                    "cell_type": "code",
                    "execution_count": None,
                    "id": "first-cell",
                    "metadata": {},
                    "outputs": [],
                    "source": [],
                }
            ],
            "metadata": {
                "kernelspec": {
                    "name": kernel_name,
                    "display_name": display_name or kernel_name,
                    "language": "python",
                },
                "language_info": {"name": "python"},
            },
            "nbformat": 4,
            "nbformat_minor": 5,
        }
        path = self.root / name
        path.write_text(json.dumps(notebook, indent=1))
        if os.geteuid() == 0:
            os.chown(path, KERNEL_UID, KERNEL_UID)
        return path

    def note_kernels(self) -> None:
        """Remember the kernels the server has now (to find their containers later)."""
        with contextlib.suppress(OSError, ValueError):
            for kernel in self.api("GET", "/api/kernels"):
                self.kernel_ids.add(kernel["id"])

    def end_sessions(self) -> None:
        """Shut down every session's kernel (the next test starts from none)."""
        self.note_kernels()
        with contextlib.suppress(OSError, ValueError):
            for session in self.api("GET", "/api/sessions"):
                self.kernel_ids.add(session["kernel"]["id"])
                with contextlib.suppress(OSError):
                    self.api("DELETE", f"/api/sessions/{session['id']}", timeout=60)


def _lab_env(base: Path, gpus: str, extra_env: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # Nothing of the caller's Jupyter set-up: the environment's own (sys.prefix) config and
    # kernelspecs apply, as for a person who installed the package and runs `jupyter lab`.
    for name in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "JUPYTERLAB_SETTINGS_DIR"):
        env.pop(name, None)
    env.update(
        {
            "JUPYTER_CONFIG_DIR": str(base / "config"),  # also lab settings and workspaces
            "JUPYTER_DATA_DIR": str(base / "data"),
            "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
            "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
            "JUPYTER_GPU_SESSIONS_DB_URL": f"sqlite:///{base}/store.sqlite",
            "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS": gpus,
            "JUPYTER_GPU_SESSIONS_SIMULATED_DEVICE_DIR": str(base / "dev"),
        }
    )
    env.update(extra_env or {})
    return env


@contextlib.contextmanager
def running_lab(
    base: Path,
    *,
    gpus: str = "2xA100-80GB",
    extra_args: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
    start_timeout: float = 90,
    base_url: str = "/",
) -> Iterator[LabServer]:
    """`jupyter lab` on a free 127.0.0.1 port with a token, serving a notebook directory
    owned by the kernels' uid, under `base_url` (e.g. JupyterHub's `/user/NAME/`; the
    LabServer's `url` includes it). On exit: stopped (SIGTERM, then SIGKILL), and none of its
    containers left (a leftover is removed and reported as a failure)."""
    base.mkdir(parents=True, exist_ok=True)
    for name in ("config", "data", "runtime", "workspaces"):
        (base / name).mkdir(exist_ok=True)
    fake_gpu_nodes(base / "dev", 8)
    root = make_notebook_dir(base / "notebooks")
    token = secrets.token_hex(16)
    port = free_port()
    log_path = base / "lab.log"
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        # No requests to the internet: the news feed and the check for a newer JupyterLab.
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
        f"--ServerApp.base_url={base_url}",
        *extra_args,
    ]
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        command,
        env=_lab_env(base, gpus, extra_env),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=root,
    )
    url = f"http://127.0.0.1:{port}{base_url.rstrip('/')}"
    server = LabServer(url, token, root, log_path, process)
    try:
        _wait_until_up(server, start_timeout)
        yield server
        server.note_kernels()
    finally:
        _stop(process)
        log.close()
        _no_containers_left(server)


def _wait_until_up(server: LabServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.api("GET", "/api/status", timeout=2)
            return
        except (OSError, ValueError) as exc:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"jupyter lab exited ({server.process.returncode}) before it answered "
                    f"/api/status; its log ends:\n{server.log_tail()}"
                ) from exc
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"jupyter lab did not answer /api/status within {timeout:.0f} s ({exc}); "
                    f"its log ends:\n{server.log_tail()}"
                ) from exc
            time.sleep(0.25)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(45)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _no_containers_left(server: LabServer) -> None:
    """None of this lab's kernel containers may outlive it: they are the ones that work in
    its notebook directory (the notebook's directory is the container's working dir), or
    that carry one of its kernels' ids."""
    try:
        client = docker.from_env(timeout=30)
        try:
            containers = client.containers.list(
                all=True, filters={"label": SESSION_LABEL}, ignore_removed=True
            )
            left = [c for c in containers if _belongs_to(c, server)]
            for container in left:
                with contextlib.suppress(DockerException):
                    container.remove(force=True)
        finally:
            client.close()
    except DockerException:
        return  # no engine: no container of ours either
    if left:
        names = ", ".join(c.name for c in left)
        raise AssertionError(f"jupyter lab left kernel containers behind (removed): {names}")


def _belongs_to(container: Any, server: LabServer) -> bool:
    config = container.attrs.get("Config") or {}
    working_dir = config.get("WorkingDir") or ""
    labels = config.get("Labels") or {}
    root = str(server.root)
    return (
        working_dir == root
        or working_dir.startswith(root + "/")
        or labels.get("io.jupyter.gpu-sessions.kernel-id") in server.kernel_ids
    )


def launch_chromium(playwright: Any) -> Any:
    """Debian's chromium (never Playwright's own download, which cannot work here)."""
    if not os.access(CHROMIUM, os.X_OK):
        raise FileNotFoundError(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium. Run the "
            f"README's test command ({TEST_COMMAND}), which installs it, or "
            "`apt-get install chromium`."
        )
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-dev-shm-usage"],
        headless=True,
    )


@dataclass
class Tab:
    """A page in a browser context of its own, with what the browser reported: console
    warnings and errors, and requests that failed (with why)."""

    page: Any
    console: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, browser: Any) -> Tab:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        tab = cls(context.new_page())
        tab.page.on("console", tab._on_console)
        tab.page.on("requestfailed", tab._on_request_failed)
        return tab

    def _on_console(self, message: Any) -> None:
        if message.type in ("error", "warning"):
            self.console.append(f"{message.type}: {message.text}")

    def _on_request_failed(self, request: Any) -> None:
        self.failed_requests.append(f"{request.method} {request.url}: {request.failure}")

    @property
    def network_changed(self) -> bool:
        """Chromium dropped requests because it saw the machine's network change (a Docker
        network or engine coming or going): nothing the page under test did."""
        return any("ERR_NETWORK_CHANGED" in line for line in self.failed_requests)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.page.context.close()
