"""The Binder demo (binder/), set up as repo2docker sets it up, in a fresh virtualenv:
`pip install -r binder/requirements.txt` from the repository's root, then binder/postBuild
with a fresh $HOME; then that environment's own `jupyter server`, started through
binder/start with no Docker engine reachable (Binder has none), starts the notebook's kernel
(POST /api/sessions, as JupyterLab does), and nbclient runs binder/demo.ipynb on it through
its connection file, so the magics and widgets talk to that server's API.

The virtualenv's packages come from a wheelhouse kept in the user's cache directory and
filled from the package index the first time (or when the requirements change), so later
runs install offline; the package itself is always built from this tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest
import tomllib
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from .browser_support import free_port
from .support import REPO

BINDER = REPO / "binder"
SIMULATED = "4xA100-80GB"
KERNELS = {"python3-container": 0, "python3-gpu": 1, "python3-2gpu": 2}


def _requirements() -> list[str]:
    """binder/requirements.txt's requirements, without comments."""
    lines = (line.split("#", 1)[0].strip() for line in (BINDER / "requirements.txt").open())
    return [line for line in lines if line]


def _build_system() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]


def _wheelhouse() -> Path:
    """Wheels of everything the demo installs except this package (its dependencies, the
    demo's other requirements and the build system), keyed by those requirements."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = sorted(
        [r for r in _requirements() if r != "."]
        + pyproject["project"]["dependencies"]
        + _build_system()
    )
    key = hashlib.sha256(json.dumps([sys.version_info[:2], wanted]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    house = cache / "jupyter-gpu-sessions" / "binder-wheels" / key
    if house.is_dir():
        return house
    house.parent.mkdir(parents=True, exist_ok=True)
    filling = Path(f"{house}.{os.getpid()}")
    shutil.rmtree(filling, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(filling)]
    _run([*pip, *wanted], cwd=REPO, timeout=600)
    try:
        filling.rename(house)  # complete or absent, for a concurrent run
    except OSError:
        if not house.is_dir():
            raise
        shutil.rmtree(filling, ignore_errors=True)  # a concurrent run filled it first
    return house


def _run(command: list[str], *, timeout: float, merged: bool = False, **kwargs: Any) -> str:
    """The command's stdout (with its stderr when ``merged``); it must succeed."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout + (done.stderr if merged else "")


@dataclass
class BinderEnv:
    venv: Path
    home: Path
    env: dict[str, str]  # what the image's processes see: its PATH, its $HOME, no Docker
    postbuild_output: str

    def run(self, *command: str, timeout: float = 60, merged: bool = False) -> str:
        return _run(list(command), env=self.env, cwd=self.home, timeout=timeout, merged=merged)


@pytest.fixture(scope="module")
def binder(tmp_path_factory) -> BinderEnv:
    base = tmp_path_factory.mktemp("binder")
    venv, home = base / "venv", base / "home"
    home.mkdir()
    wheels = _wheelhouse()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "VIRTUAL_ENV": str(venv),
        # Nothing answers there: what a Binder image has instead of a Docker engine.
        "DOCKER_HOST": f"unix://{base}/no-docker.sock",
    }
    # repo2docker's step, from the repository's root, with the wheelhouse as the index. For
    # speed on two cores: no bytecode compiled ahead, and the build system installed once in
    # the venv instead of in an isolated build environment of its own.
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--no-compile", "--no-index"]
    pip += ["--find-links", str(wheels)]
    _run([*pip, *_build_system()], cwd=REPO, env=env, timeout=600)
    _run(
        [*pip, "--no-build-isolation", "-r", "binder/requirements.txt"],
        cwd=REPO,
        env=env,
        timeout=600,
    )
    postbuild = BINDER / "postBuild"
    assert os.access(postbuild, os.X_OK), "binder/postBuild must be executable"
    output = _run([str(postbuild)], cwd=REPO, env=env, timeout=120)
    return BinderEnv(venv, home, env, output)


# -- the set-up --------------------------------------------------------------------------
def test_postbuild_gives_local_kernels_four_simulated_gpus_and_the_extension(binder):
    with ThreadPoolExecutor() as pool:  # four interpreters starting: at once, not in turn
        specs = pool.submit(binder.run, "jupyter", "kernelspec", "list", "--json")
        # The config files a `jupyter server` of this environment and $HOME loads.
        config = pool.submit(binder.run, "python", "-c", SERVER_CONFIG)
        servers = pool.submit(binder.run, "jupyter", "server", "extension", "list", merged=True)
        labextensions = pool.submit(binder.run, "jupyter", "labextension", "list", merged=True)
    for name, gpus in KERNELS.items():
        spec = json.loads(specs.result())["kernelspecs"][name]
        # In the environment, replacing the shipped container kernelspecs of those names.
        assert Path(spec["resource_dir"]).is_relative_to(binder.venv), spec["resource_dir"]
        provisioner = spec["spec"]["metadata"]["kernel_provisioner"]
        assert provisioner["provisioner_name"] == "gpu-container-provisioner"
        assert provisioner["config"] == {"gpus": gpus, "runtime": "local"}, name
        assert "local" in spec["spec"]["display_name"]
    loaded = json.loads(config.result())
    assert loaded["GPUSessionManager"]["simulated_gpus"] == SIMULATED
    assert loaded["GPUContainerProvisioner"]["runtime"] == "local"
    listed = _plain(servers.result())
    assert re.search(r"jupyter_gpu_sessions enabled\s.*OK", listed, re.S), listed
    if (REPO / "labextension").is_dir():
        listed = _plain(labextensions.result())
        assert re.search(r"jupyter-gpu-sessions v\S+ enabled OK", listed), listed
    assert "4 simulated A100-80GB GPUs" in binder.postbuild_output


SERVER_CONFIG = """
import json
from jupyter_server.serverapp import ServerApp

app = ServerApp()
app.load_config_file()
sections = ("GPUSessionManager", "GPUContainerProvisioner")
print(json.dumps({name: dict(app.config[name]) for name in sections}))
"""


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# -- the notebook, on a kernel the demo's server started -------------------------------------
@dataclass
class Server:
    url: str
    token: str
    process: subprocess.Popen
    log: Path

    def api(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read()
        return json.loads(text) if text else None

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


@contextlib.contextmanager
def binder_server(binder: BinderEnv, root: Path) -> Iterator[Server]:
    """The environment's `jupyter server` as repo2docker starts it: through binder/start."""
    token, port = secrets.token_hex(16), free_port()
    log = root.parent / "server.log"
    command = [
        str(BINDER / "start"),
        "jupyter",
        "server",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        *(["--allow-root"] if os.geteuid() == 0 else []),
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, env=binder.env, cwd=root, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server(f"http://127.0.0.1:{port}", token, process, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(OSError, ValueError):
                server.api("GET", "/gpu-sessions/api/gpus")
                break
            assert process.poll() is None, f"the server exited:\n{server.log_tail()}"
            assert time.monotonic() < deadline, f"the server never answered:\n{server.log_tail()}"
            time.sleep(0.25)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


class ServerKernel(AsyncKernelManager):
    """A kernel the server started, reached through its connection file (as `jupyter
    console --existing` does): never started or shut down from here (``owns_kernel``
    False), and always there for nbclient, which would otherwise start one."""

    @property
    def has_kernel(self) -> bool:
        return True


def run_on_server_kernel(server: Server, binder: BinderEnv, nb, path: str):
    kernel_name = nb.metadata["kernelspec"]["name"]
    body = {"path": path, "name": path, "type": "notebook", "kernel": {"name": kernel_name}}
    session = server.api("POST", "/api/sessions", body)
    kernel_id = session["kernel"]["id"]
    try:
        # Its session turns RUNNING once the kernel answers (jupyter_server's own
        # execution_state stays "starting" until a client asks the kernel something).
        deadline = time.monotonic() + 60
        while _status(server, kernel_id) != "RUNNING":
            assert time.monotonic() < deadline, f"the kernel never started:\n{server.log_tail()}"
            time.sleep(0.1)
        runtime_dir = binder.run("jupyter", "--runtime-dir").strip()
        km = ServerKernel(owns_kernel=False)
        km.load_connection_file(os.path.join(runtime_dir, f"kernel-{kernel_id}.json"))
        client = NotebookClient(nb, km=km, timeout=120, allow_errors=False)
        client.execute()
        client.kc.stop_channels()
    finally:
        server.api("DELETE", f"/api/sessions/{session['id']}")
    return nb


def _status(server: Server, kernel_id: str) -> str | None:
    sessions = server.api("GET", "/gpu-sessions/api/sessions?limit=20")["sessions"]
    return next((s["status"] for s in sessions if s["kernel_id"] == kernel_id), None)


def _cell(nb, source_start: str):
    cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source_start)]
    assert len(cells) == 1, (source_start, [c.source for c in cells])
    return cells[0]


def _shown(cell) -> str:
    assert not [o for o in cell.outputs if o.output_type == "error"], cell.outputs
    return "".join(
        o.text
        if o.output_type == "stream" and o.name == "stdout"
        else o.get("data", {}).get("text/plain", "") + "\n"
        for o in cell.outputs
        if o.output_type in ("stream", "display_data", "execute_result")
        and o.get("name") != "stderr"
    )


def _stderr(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.get("name") == "stderr")


def test_the_demo_notebook_runs_on_a_kernel_the_demo_server_started(binder, tmp_path):
    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(BINDER / "demo.ipynb", root / "demo.ipynb")
    nb = nbformat.read(BINDER / "demo.ipynb", as_version=4)
    assert nb.metadata["kernelspec"]["name"] in KERNELS
    with binder_server(binder, root) as server:
        gpus = server.api("GET", "/gpu-sessions/api/gpus")["gpus"]
        assert len(gpus) == 4 and all("A100-80GB" in g["name"] for g in gpus), gpus
        started = time.monotonic()
        run_on_server_kernel(server, binder, nb, "demo.ipynb")
        print(f"demo.ipynb ran in {time.monotonic() - started:.1f} s")
        nbformat.write(nb, tmp_path / "demo.executed.ipynb")
        print(f"the executed notebook: {tmp_path / 'demo.executed.ipynb'}")
        ended = server.api("GET", "/gpu-sessions/api/sessions?limit=10")
        log = server.log_tail()

    for cell in nb.cells:
        if cell.cell_type == "code" and "--runtime local" not in cell.source:
            assert _stderr(cell) == "", (cell.source, _stderr(cell))
    uuid = re.search(r"CUDA_VISIBLE_DEVICES: (GPU-\S+)$", _shown(_cell(nb, "import os")), re.M)
    assert uuid and uuid.group(1) in {g["uuid"] for g in gpus}, _shown(_cell(nb, "import os"))
    info = _shown(_cell(nb, "%session info"))
    assert re.search(r"runtime:\s+local", info) and "RUNNING" in info and "1 GPU" in info, info
    table = _shown(_cell(nb, "%session gpus"))
    rows = [line for line in table.splitlines() if "Simulated A100-80GB" in line]
    assert len(rows) == 4 and sum(line.endswith("free") for line in rows) == 3, table
    assert "demo.ipynb" in table
    assert re.search(r"demo\.ipynb .* RUNNING", _shown(_cell(nb, "%session list")))
    assert "Created vfolder demo" in _shown(_cell(nb, "%vfolder create demo"))
    assert re.search(r"^demo\s+user .* 1GiB", _shown(_cell(nb, "%vfolder list")), re.M)
    refusal = _stderr(_cell(nb, "%session start prep"))
    assert "batch sessions run in containers" in refusal and refusal.count("\n") == 1, refusal
    for source, widget in (
        ("from jupyter_gpu_sessions.widgets", "SessionGraph"),
        ("monitor = GPUMonitor()", "GPUMonitor"),
        ("SessionTable()", "SessionTable"),
    ):
        (view,) = [o for o in _cell(nb, source).outputs if o.output_type == "execute_result"]
        assert "application/vnd.jupyter.widget-view+json" in view.data
        assert view.data["text/plain"].startswith(f"{widget}("), view.data
    drawn = _shown(_cell(nb, "import asyncio"))
    assert "graph: [('demo.ipynb', 'RUNNING')]" in drawn, drawn
    labels = re.search(r"GPUs:  (\[.*\])", drawn).group(1)
    assert labels.count("'free'") == 3 and labels.count("demo.ipynb") == 1, drawn
    # Deleting the notebook's session ended the kernel's and gave its GPU back.
    (own,) = [s for s in ended["sessions"] if s["name"] == "demo.ipynb"]
    assert own["status"] == "TERMINATED" and own["runtime"] == "local", (own, log)
    assert "Traceback" not in log, log
