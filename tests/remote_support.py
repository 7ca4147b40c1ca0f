"""The JupyterHub mode without a Hub: a standalone manager service (`jupyter gpu-sessions
manager`, its own SQLite store, simulated GPUs with fake device nodes) and a jupyter server
in remote mode against it, each a real subprocess on a free 127.0.0.1 port.

Fixtures (module-scoped; other test modules use them, so their names stay):

- ``manager_service``: a :class:`ManagerService` (``url``, ``token``, ``api()``, ``call()``
  for the engine RPC). Ended after the module, and then none of its containers may remain.
- ``remote_lab``: a :class:`RemoteLab`, a `jupyter server` whose engine is the service
  (``JUPYTER_GPU_SESSIONS_SERVICE_URL``/``_TOKEN``), with ``url``, ``token``, ``api()``,
  and ``stop()`` / ``kill()`` / ``start()`` (again at the same port).

``running_manager`` and ``running_remote_lab`` are the context managers behind them, for a
test that wants one of its own (another store, other GPUs, a config file, users of its
own); ``running_embedded_server`` is the same `jupyter server` in embedded mode (the
baseline of benchmarks/remote_hop.py). ``RemoteLab.execute`` / ``kernel_info`` talk to a
kernel over its websocket, as JupyterLab does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import DockerException
from tornado.httpclient import HTTPRequest

from jupyter_gpu_sessions.runtime.base import SESSION_LABEL, STORE_LABEL

from .browser_support import fake_gpu_nodes, free_port
from .support import make_notebook_dir

SERVICE_GPUS = "4xA100-80GB"


def _clean_env(base: Path) -> dict[str, str]:
    """The environment's own Jupyter config (sys-prefix) applies, nothing of the caller's;
    config, data and runtime dirs of the process's own."""
    env = dict(os.environ)
    for name in (
        "JUPYTER_PATH",
        "JUPYTER_CONFIG_PATH",
        "JUPYTERLAB_SETTINGS_DIR",
        "JUPYTER_GPU_SESSIONS_SERVICE_URL",
        "JUPYTER_GPU_SESSIONS_SERVICE_TOKEN",
        "JUPYTER_GPU_SESSIONS_URL",
        "JUPYTER_GPU_SESSIONS_TOKEN",
        "JUPYTERHUB_API_TOKEN",
        "JUPYTERHUB_SERVICE_NAME",
        "JUPYTERHUB_SERVICE_URL",
        "JUPYTERHUB_SERVICE_PREFIX",
        "JUPYTER_TOKEN",
    ):
        env.pop(name, None)
    for name in ("config", "data", "runtime"):
        (base / name).mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "JUPYTER_CONFIG_DIR": str(base / "config"),
            "JUPYTER_DATA_DIR": str(base / "data"),
            "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _request(
    url: str,
    token: str | None,
    method: str,
    body: Any = None,
    timeout: float = 30,
    raw: bool = False,
) -> tuple[int, Any]:
    """(status, JSON or text or None; the bytes when ``raw``); never raises on an HTTP
    error status."""
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
    elif method in ("POST", "PUT", "PATCH"):
        data = b""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"token {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read()
    if raw and status < 300:
        return status, text
    try:
        return status, (json.loads(text) if text else None)
    except ValueError:
        return status, text.decode(errors="replace")


class _Process:
    """A server subprocess with a log file: started, waited for, stopped."""

    url: str
    token: str
    log_path: Path
    process: subprocess.Popen | None
    what: str

    def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "",
        timeout: float = 30,
        raw: bool = False,
    ) -> tuple[int, Any]:
        """``api("GET", "gpu-sessions/api/quota")`` → (status, JSON); ``token=None``: none;
        ``raw``: the body's bytes."""
        return _request(
            f"{self.url}{path}", self.token if token == "" else token, method, body, timeout, raw
        )

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, _ = self.api("GET", "api/status", timeout=2)
                if status == 200:
                    return
                problem: Any = f"status {status}"
            except OSError as exc:
                problem = exc
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.what} exited ({self.process.returncode}) before it answered; "
                    f"its log ends:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.what} did not answer within {timeout:.0f} s ({problem}); its log "
                    f"ends:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 45) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it hangs."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (a crash)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)


@dataclass
class ManagerService(_Process):
    """`jupyter gpu-sessions manager`, standalone (jupyter_server token auth: every caller
    acts as the OS user it runs as)."""

    url: str  # http://127.0.0.1:PORT/ (its base URL)
    token: str
    base: Path
    port: int
    db_url: str
    log_path: Path
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    what: str = "jupyter gpu-sessions manager"

    @property
    def api_url(self) -> str:
        """What RemoteEngine.url is set to."""
        return f"{self.url}gpu-sessions/api/"

    def call(self, method: str, args: dict[str, Any] | None = None, *, token: str | None = ""):
        """One engine RPC: (status, JSON)."""
        return self.api(
            "POST", f"gpu-sessions/api/engine/{method}", {"args": args or {}}, token=token
        )

    def sessions(self, **params: Any) -> list[dict[str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        status, page = self.api("GET", f"gpu-sessions/api/sessions?limit=500&{query}")
        assert status == 200, page
        return page["sessions"]

    def end_live_sessions(self) -> None:
        """End every session still queued, starting or running (through the REST API)."""
        for session in self.sessions(status="PENDING,PREPARING,RUNNING,RESTARTING"):
            self.api("DELETE", f"gpu-sessions/api/sessions/{session['id']}", timeout=60)

    def start(self, timeout: float = 60) -> None:
        assert not self.running, "the manager service already runs"
        log = open(self.log_path, "a")  # noqa: SIM115 - the child holds it
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.base,
        )
        log.close()
        self._wait_until_up(timeout)


@dataclass
class RemoteLab(_Process):
    """A `jupyter server` in remote mode: its kernels start in the manager service."""

    url: str  # http://127.0.0.1:PORT (no trailing slash: paths start with /)
    token: str
    root: Path
    base: Path
    port: int
    log_path: Path
    command: list[str]
    env: dict[str, str]
    service: ManagerService | None  # None: embedded mode (the engine in the server)
    process: subprocess.Popen | None = None
    what: str = "jupyter server"
    kernel_ids: set[str] = field(default_factory=set)

    def api(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        return super().api(method, "/" + path.lstrip("/"), body, **kwargs)

    def start(self, timeout: float = 60) -> None:
        assert not self.running, "the server already runs"
        log = open(self.log_path, "a")  # noqa: SIM115 - the child holds it
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
        )
        log.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_until_up(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def kernel_session(self, kernel_name: str = "python3-container", path: str = "") -> dict:
        """POST /api/sessions (a notebook's kernel); the session row as answered."""
        path = path or f"nb-{secrets.token_hex(4)}.ipynb"
        status, session = self.api(
            "POST",
            "api/sessions",
            {"path": path, "type": "notebook", "name": path, "kernel": {"name": kernel_name}},
            timeout=120,
        )
        assert status == 201, (status, session, self.log_tail())
        self.kernel_ids.add(session["kernel"]["id"])
        return session

    def kernel_info(self, kernel_id: str, timeout: float = 120) -> dict:
        """kernel_info over the kernel's websocket (waits for a kernel still starting)."""
        reply, _ = asyncio.run(
            shell_request_over_websocket(
                self.url, self.token, kernel_id, "kernel_info_request", {}, timeout
            )
        )
        return reply

    def execute(self, kernel_id: str, code: str, timeout: float = 120) -> tuple[dict, str]:
        """Run ``code`` in the kernel over its websocket (as JupyterLab does): the
        execute_reply's content and what it printed. The websocket waits for a kernel that
        is still starting."""
        return asyncio.run(execute_over_websocket(self.url, self.token, kernel_id, code, timeout))

    def end_sessions(self) -> None:
        with contextlib.suppress(OSError, ValueError, TypeError):
            status, sessions = self.api("GET", "api/sessions")
            for session in sessions if status == 200 else []:
                self.api("DELETE", f"api/sessions/{session['id']}", timeout=60)


async def shell_request_over_websocket(
    url: str, token: str, kernel_id: str, msg_type: str, content: dict, timeout: float = 120
) -> tuple[dict, str]:
    """One shell request through ``{url}/api/kernels/{id}/channels`` (as JupyterLab sends
    it): its reply's content, and the stdout and stderr text it caused (until idle)."""
    from tornado.websocket import websocket_connect

    ws_url = url.replace("http://", "ws://", 1) + f"/api/kernels/{kernel_id}/channels"
    request = HTTPRequest(ws_url, headers={"Authorization": f"token {token}"})
    ws = await asyncio.wait_for(websocket_connect(request), timeout)
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": msg_type,
        "username": "test",
        "session": uuid.uuid4().hex,
        "date": "",
        "version": "5.3",
    }
    message = {"header": header, "parent_header": {}, "metadata": {}, "content": content}
    ws.write_message(json.dumps({**message, "channel": "shell", "buffers": []}))
    reply_type = msg_type.replace("_request", "_reply")
    out: list[str] = []
    reply: dict | None = None
    idle = False
    try:
        deadline = time.monotonic() + timeout
        while reply is None or not idle:
            raw = await asyncio.wait_for(ws.read_message(), max(0.1, deadline - time.monotonic()))
            if raw is None:
                raise AssertionError(f"the kernel's websocket closed ({ws.close_reason})")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                out.append("\n".join(msg["content"]["traceback"]))
            elif kind == reply_type:
                reply = msg["content"]
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
    finally:
        ws.close()
    return reply, "".join(out)


async def execute_over_websocket(
    url: str, token: str, kernel_id: str, code: str, timeout: float = 120
) -> tuple[dict, str]:
    """``code`` run through the kernel's websocket: (execute_reply content, its output)."""
    content = {
        "code": code,
        "silent": False,
        "store_history": False,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
    }
    return await shell_request_over_websocket(
        url, token, kernel_id, "execute_request", content, timeout
    )


def service_command(port: int, token: str, extra_args: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jupyter_gpu_sessions.cli",
        "manager",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        *extra_args,
    ]


@contextlib.contextmanager
def running_manager(
    base: Path,
    *,
    gpus: str = SERVICE_GPUS,
    db_url: str | None = None,
    extra_args: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
    config: dict[str, Any] | None = None,
    token: str | None = None,
    start_timeout: float = 60,
) -> Iterator[ManagerService]:
    """A manager service on its own store (a SQLite file under ``base`` unless ``db_url``)
    with simulated GPUs and fake device nodes; ``config`` goes to its config file
    (``jupyter_gpu_sessions_manager_config.json``), and ``token`` is the one the fixture's
    own calls present (default: a fresh jupyter_server token). On exit: live sessions
    ended, the service stopped, and none of its containers left (a leftover is removed and
    fails the test)."""
    base.mkdir(parents=True, exist_ok=True)
    fake_gpu_nodes(base / "dev", 8)
    env = _clean_env(base)
    if config:
        path = base / "config" / "jupyter_gpu_sessions_manager_config.json"
        path.write_text(json.dumps(config, indent=1))
    db_url = db_url or f"sqlite:///{base}/service.sqlite"
    env.update(
        {
            "JUPYTER_GPU_SESSIONS_DB_URL": db_url,
            "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS": gpus,
            "JUPYTER_GPU_SESSIONS_SIMULATED_DEVICE_DIR": str(base / "dev"),
        }
    )
    env.update(extra_env or {})
    token = token or secrets.token_hex(16)
    port = free_port()
    command = service_command(
        port, token, [f"--VFolderService.root={base / 'vfolders'}", *extra_args]
    )
    service = ManagerService(
        url=f"http://127.0.0.1:{port}/",
        token=token,
        base=base,
        port=port,
        db_url=db_url,
        log_path=base / "service.log",
        command=command,
        env=env,
    )
    service.start(start_timeout)
    try:
        yield service
    finally:
        if service.running:
            with contextlib.suppress(Exception):
                service.end_live_sessions()
        service.stop()
        _no_containers_left(db_url)


def running_remote_lab(
    base: Path,
    service: ManagerService,
    *,
    extra_args: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
    start_timeout: float = 60,
) -> contextlib.AbstractContextManager[RemoteLab]:
    """`jupyter server` in remote mode against ``service``, serving a notebook directory
    owned by the kernels' uid. On exit: its sessions ended, then stopped."""
    env = {
        "JUPYTER_GPU_SESSIONS_SERVICE_URL": service.api_url,
        "JUPYTER_GPU_SESSIONS_SERVICE_TOKEN": service.token,
        # Nothing local: a store here would be a mistake the tests should see.
        "JUPYTER_GPU_SESSIONS_DB_URL": f"sqlite:///{base}/must-not-exist.sqlite",
        **(extra_env or {}),
    }
    return running_server(
        base, env, service=service, extra_args=extra_args, start_timeout=start_timeout
    )


def running_embedded_server(
    base: Path, *, gpus: str = SERVICE_GPUS, start_timeout: float = 60
) -> contextlib.AbstractContextManager[RemoteLab]:
    """The same `jupyter server`, with the engine in its own process (embedded mode, its
    own store): the baseline of the remote hop."""
    fake_gpu_nodes(base / "dev", 8)
    env = {
        "JUPYTER_GPU_SESSIONS_DB_URL": f"sqlite:///{base}/store.sqlite",
        "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS": gpus,
        "JUPYTER_GPU_SESSIONS_SIMULATED_DEVICE_DIR": str(base / "dev"),
    }
    return running_server(base, env, start_timeout=start_timeout)


@contextlib.contextmanager
def running_server(
    base: Path,
    env_update: dict[str, str],
    *,
    service: ManagerService | None = None,
    extra_args: Sequence[str] = (),
    start_timeout: float = 60,
) -> Iterator[RemoteLab]:
    base.mkdir(parents=True, exist_ok=True)
    root = make_notebook_dir(base / "notebooks")
    env = _clean_env(base)
    env.update(env_update)
    token = secrets.token_hex(16)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--no-browser",
        "--allow-root",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        *extra_args,
    ]
    lab = RemoteLab(
        url=f"http://127.0.0.1:{port}",
        token=token,
        root=root,
        base=base,
        port=port,
        log_path=base / "server.log",
        command=command,
        env=env,
        service=service,
    )
    lab.start(start_timeout)
    try:
        yield lab
    finally:
        if lab.running:
            lab.end_sessions()
        lab.stop()


def _no_containers_left(db_url: str) -> None:
    """No kernel container of this service's store may outlive it."""
    try:
        client = docker.from_env(timeout=30)
    except DockerException:
        return
    try:
        store = hashlib.sha256(db_url.encode()).hexdigest()[:16]  # the manager's store_id
        left = client.containers.list(
            all=True,
            filters={"label": [SESSION_LABEL, f"{STORE_LABEL}={store}"]},
            ignore_removed=True,
        )
        for container in left:
            with contextlib.suppress(DockerException):
                container.remove(force=True)
    finally:
        client.close()
    if left:
        names = ", ".join(c.name for c in left)
        raise AssertionError(f"the manager service left kernel containers behind: {names}")


@pytest.fixture(scope="module")
def manager_service(tmp_path_factory, kernel_image) -> Iterator[ManagerService]:
    with running_manager(tmp_path_factory.mktemp("service")) as service:
        yield service


@pytest.fixture(scope="module")
def remote_lab(tmp_path_factory, manager_service) -> Iterator[RemoteLab]:
    with running_remote_lab(tmp_path_factory.mktemp("remote-lab"), manager_service) as lab:
        yield lab
