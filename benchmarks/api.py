"""REST API latency: the sessions list under concurrent clients, and a vfolder usage count.

Starts a real Jupyter server with the extension, on a fresh SQLite store seeded with N
sessions (a mix of statuses, all owned by the user the API acts as), then measures:

- `GET /gpu-sessions/api/sessions?limit=100` from C concurrent clients, against the same
  load on jupyter_server's own `GET /api/status` in the same run (interleaved halves);
  p50/p99 and their ratio. Target: p99 under 50 ms.
- `GET /gpu-sessions/api/vfolders/bench/usage?fresh=true` over a vfolder of F small files
  in nested folders, against the same walk done in this process; and `GET /api/status`
  latency while the count runs against before it (the server must keep answering).

    .venv/bin/python benchmarks/api.py [--sessions 1000] [--clients 20] [--files 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import math
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

from jupyter_gpu_sessions.core.models import ResourceRequest, Session
from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.manager import current_process
from jupyter_gpu_sessions.store import SessionStore
from jupyter_gpu_sessions.vfolders.backends import directory_usage

S = SessionStatus
P99_TARGET_MS = 50.0
FILE_SIZE = 100  # bytes per file of the usage benchmark
FILES_PER_DIR = 100
DIRS_PER_TOP = 10
PROBE_CLIENTS = 4  # /api/status probes around the usage count
COUNT_ROUNDS = 3

# Per session, by i % 20: 60% terminated, 15% cancelled, 10% error, 10% running, 5% pending.
PATHS: list[tuple[SessionStatus, ...]] = (
    [(S.PREPARING, S.RUNNING, S.TERMINATING, S.TERMINATED)] * 12
    + [(S.CANCELLED,)] * 3
    + [(S.PREPARING, S.RUNNING, S.ERROR)] * 2
    + [(S.PREPARING, S.RUNNING)] * 2
    + [()]
)


class ServerFailed(RuntimeError):
    pass


# -- setup ---------------------------------------------------------------------------------
def seed_sessions(url: str, count: int, owner: str) -> dict[str, int]:
    """``count`` sessions of ``owner`` through the store itself, newest last. Their process
    is this one, so the server's reconciler leaves the live ones alone while we run."""
    store = SessionStore(url)
    process = current_process()
    base = time.time() - count
    statuses: dict[str, int] = {}
    try:
        for i in range(count):
            session = store.add(
                Session(
                    id=uuid.uuid4().hex,
                    owner=owner,
                    image="jupyter-gpu-sessions/bench:latest",
                    request=ResourceRequest(gpus=1 + i % 2, cpus=2.0, memory=8 * 1024**3),
                    runtime="local",
                    process=process,
                    name=f"bench-{i}",
                    kernel_id=str(uuid.uuid4()),
                    created_at=base + i,
                )
            )
            path = PATHS[i % len(PATHS)]
            for status in path:
                extra = {}
                if status == S.TERMINATED:
                    extra = {"exit_code": 0}
                elif status == S.ERROR:
                    extra = {"exit_code": 137, "oom_killed": True}
                store.transition(session.id, status, f"bench: to {status.value}", **extra)
            final = path[-1] if path else S.PENDING
            statuses[final.value] = statuses.get(final.value, 0) + 1
    finally:
        store.close()
    return statuses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    tmp: str,
    port: int,
    token: str,
    *,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
    config: dict | None = None,
) -> subprocess.Popen:
    """A real `jupyter server` with the package's own server configuration, on its own
    store, data, runtime and root directories under ``tmp``; ``env``, ``args`` and
    ``config`` add to (or replace) the defaults."""
    dirs = {name: os.path.join(tmp, name) for name in ("config", "data", "runtime", "root")}
    for path in dirs.values():
        os.makedirs(path, exist_ok=True)
    with open(os.path.join(dirs["config"], "jupyter_server_config.json"), "w") as f:
        json.dump({**shipped_server_config(), **(config or {})}, f)
    base = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
    base.update(
        JUPYTER_GPU_SESSIONS_DB_URL=f"sqlite:///{tmp}/db.sqlite",
        JUPYTER_GPU_SESSIONS_SIMULATED_GPUS="4xA100-80GB",
        JUPYTER_CONFIG_DIR=dirs["config"],
        JUPYTER_DATA_DIR=dirs["data"],
        JUPYTER_RUNTIME_DIR=dirs["runtime"],
        # No container engine: the reconciler must not talk to a shared Docker while we time.
        DOCKER_HOST=f"unix://{tmp}/no-docker.sock",
    )
    base.update(env or {})
    env = base
    cmd = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.token={token}",
        "--ServerApp.open_browser=False",
        f"--ServerApp.root_dir={dirs['root']}",
        f"--VFolderService.root={tmp}/vfolders",
    ]
    cmd.extend(args)
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    with open(os.path.join(tmp, "server.log"), "wb") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def shipped_server_config() -> dict:
    """What the package installs into jupyter_server_config.d (extension, kernel manager)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(
        here, "jupyter-config", "jupyter_server_config.d", "jupyter_gpu_sessions.json"
    )
    with open(path) as f:
        return json.load(f)


def server_log_tail(tmp: str, lines: int = 40) -> str:
    try:
        with open(os.path.join(tmp, "server.log"), errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no server log)"


@contextlib.contextmanager
def server_dir(prefix: str, log_lines: int = 60):
    """A temp dir for a benchmark's server: on failure the server log's last lines go to
    stderr; removed in any case."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        yield tmp
    except BaseException:
        print(server_log_tail(tmp, log_lines), file=sys.stderr)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def fill_vfolder(path: str, files: int) -> int:
    """``files`` files of FILE_SIZE bytes, FILES_PER_DIR per folder, nested two deep."""
    data = b"x" * (FILE_SIZE - 1) + b"\n"
    written = 0
    leaf = 0
    while written < files:
        folder = os.path.join(path, f"d{leaf // DIRS_PER_TOP:04d}", f"s{leaf % DIRS_PER_TOP:02d}")
        os.makedirs(folder)
        for k in range(min(FILES_PER_DIR, files - written)):
            with open(os.path.join(folder, f"f{k:03d}.txt"), "wb") as f:
                f.write(data)
        written += min(FILES_PER_DIR, files - written)
        leaf += 1
    return written * FILE_SIZE


# -- HTTP ----------------------------------------------------------------------------------
class API:
    def __init__(self, port: int, token: str, clients: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"token {token}"}
        # max_clients above the concurrency: no request waits inside the client.
        self.http = AsyncHTTPClient(force_instance=True, max_clients=clients + PROBE_CLIENTS + 2)

    async def fetch(self, path: str, method: str = "GET", body: object = None) -> HTTPResponse:
        return await self.http.fetch(
            HTTPRequest(
                self.base + path,
                method=method,
                headers=self.headers,
                body=None if body is None else json.dumps(body),
                request_timeout=300,
            ),
            raise_error=False,
        )

    async def json(self, path: str, method: str = "GET", body: object = None, ok: int = 200):
        response = await self.fetch(path, method, body)
        if response.code != ok:
            text = response.body.decode(errors="replace") if response.body else response.error
            raise ServerFailed(f"{method} {path} answered {response.code}: {text}")
        return json.loads(response.body)

    async def timed(self, path: str) -> float:
        started = time.perf_counter()
        response = await self.fetch(path)
        elapsed = time.perf_counter() - started
        if response.code != 200:
            text = response.body.decode(errors="replace") if response.body else response.error
            raise ServerFailed(f"GET {path} answered {response.code}: {text[:500]}")
        return elapsed

    async def load(
        self, path: str | Callable[[int], str], requests: int, clients: int
    ) -> tuple[list[float], float]:
        """``requests`` GETs from ``clients`` concurrent clients: latencies and wall time.
        ``path`` may be a function of the request's number (a different URL each time)."""
        remaining = requests
        latencies: list[float] = []

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                url = path(remaining) if callable(path) else path
                latencies.append(await self.timed(url))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return latencies, time.perf_counter() - started

    async def probe(self, path: str, stop: asyncio.Event, clients: int) -> list[float]:
        """Back-to-back GETs from ``clients`` clients until ``stop`` is set."""
        latencies: list[float] = []

        async def client() -> None:
            while not stop.is_set():
                latencies.append(await self.timed(path))

        await asyncio.gather(*(client() for _ in range(clients)))
        return latencies

    def close(self) -> None:
        self.http.close()


async def wait_until_up(api: API, proc: subprocess.Popen, tmp: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"the server exited with code {proc.returncode}")
        with contextlib.suppress(OSError):
            response = await api.fetch("/api/status")
            if response.code == 200:
                return
        await asyncio.sleep(0.2)
    raise ServerFailed(f"the server did not answer /api/status within {timeout:.0f}s")


# -- figures -------------------------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] * 1000


def row(label: str, values: Sequence[float], wall: float | None = None) -> str:
    rate = f"{len(values) / wall:>9.0f}" if wall else f"{'':>9}"
    return f"{label:44}{pct(values, 50):>9.1f}{pct(values, 99):>9.1f}{rate}{len(values):>8}"


def ratio_row(label: str, a: Sequence[float], b: Sequence[float]) -> str:
    return f"{label:44}{pct(a, 50) / pct(b, 50):>9.2f}{pct(a, 99) / pct(b, 99):>9.2f}"


HEADER = f"{'':44}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'n':>8}"


# -- the benchmark -------------------------------------------------------------------------
async def run(args: argparse.Namespace, tmp: str, proc: subprocess.Popen, port: int, token: str):
    api = API(port, token, args.clients)
    try:
        await wait_until_up(api, proc, tmp)
        first = await api.json("/gpu-sessions/api/sessions?limit=1")
        if first["total"] != args.sessions:
            raise ServerFailed(
                f"the API sees {first['total']} sessions, not {args.sessions}: does it act as "
                f"{getpass.getuser()!r}?"
            )

        # (a) the sessions list against /api/status, interleaved halves after a warm-up.
        # The same page polled again and again (what UIs do: served from the page cache
        # while nothing changed), and pages that are never reused (900 different offsets,
        # more than the cache holds: every request queries and encodes its page).
        sessions_path = "/gpu-sessions/api/sessions?limit=100"
        status_path = "/api/status"
        fresh_path = "fresh pages"

        def fresh(n: int) -> str:
            return f"/gpu-sessions/api/sessions?limit=100&offset={n % 900}"

        paths = {status_path: status_path, sessions_path: sessions_path, fresh_path: fresh}
        for path in paths.values():
            await api.load(path, 4 * args.clients, args.clients)
        latency: dict[str, list[float]] = {name: [] for name in paths}
        wall: dict[str, float] = {name: 0.0 for name in paths}
        for half in (args.requests // 2, args.requests - args.requests // 2):
            for name, path in paths.items():
                latencies, seconds = await api.load(path, half, args.clients)
                latency[name].extend(latencies)
                wall[name] += seconds

        # (b) usage of a vfolder of many small files, and the server's answers meanwhile.
        vfolder = await api.json("/gpu-sessions/api/vfolders", "POST", {"name": "bench"}, ok=201)
        root = os.path.join(tmp, "vfolders")
        data_path = os.path.join(root, "dirs", vfolder["id"])  # the directory backend's layout
        if not os.path.isdir(data_path):
            raise ServerFailed(f"vfolder {vfolder['id']} has no directory at {data_path}")
        started = time.perf_counter()
        expected = await asyncio.to_thread(fill_vfolder, data_path, args.files)
        fill_seconds = time.perf_counter() - started

        direct = []
        for _ in range(COUNT_ROUNDS):
            started = time.perf_counter()
            counted = await asyncio.to_thread(directory_usage, data_path)
            direct.append(time.perf_counter() - started)
        if counted != expected:
            raise ServerFailed(f"the walk counted {counted} bytes, not {expected}")

        stop = asyncio.Event()
        probing = asyncio.ensure_future(api.probe(status_path, stop, PROBE_CLIENTS))
        await asyncio.sleep(3.0)
        stop.set()
        before = await probing

        usage_path = "/gpu-sessions/api/vfolders/bench/usage?fresh=true"
        stop = asyncio.Event()
        probing = asyncio.ensure_future(api.probe(status_path, stop, PROBE_CLIENTS))
        await asyncio.sleep(0.2)  # the probes are running before the first count starts
        through_api = []
        for _ in range(COUNT_ROUNDS):
            started = time.perf_counter()
            usage = await api.json(usage_path)
            through_api.append(time.perf_counter() - started)
            if usage["bytes"] != expected:
                raise ServerFailed(f"the API counted {usage['bytes']} bytes, not {expected}")
        stop.set()
        during = await probing
    finally:
        api.close()

    status_lat, sessions_lat = latency[status_path], latency[sessions_path]
    print(
        f"(a) {args.sessions} sessions in the store; {args.requests} requests per endpoint "
        f"from {args.clients} concurrent clients (interleaved halves)"
    )
    print(HEADER)
    print(row("GET /api/status (baseline)", status_lat, wall[status_path]))
    print(row("GET /gpu-sessions/api/sessions?limit=100", sessions_lat, wall[sessions_path]))
    print(ratio_row("ratio sessions/status", sessions_lat, status_lat))
    fresh_lat = latency[fresh_path]
    print(row("  pages never reused (offset=0..899)", fresh_lat, wall[fresh_path]))
    print(ratio_row("  ratio never-reused/status", fresh_lat, status_lat))
    p99 = pct(sessions_lat, 99)
    verdict = "met" if p99 < P99_TARGET_MS else "NOT met"
    print(f"target p99 < {P99_TARGET_MS:.0f} ms: {verdict} ({p99:.1f} ms)")
    print()
    print(
        f"(b) vfolder of {args.files} files of {FILE_SIZE} B in {math.ceil(args.files / 100)} "
        f"folders ({expected} bytes; written in {fill_seconds:.1f}s)"
    )
    api_count, direct_count = statistics.median(through_api), statistics.median(direct)
    print(f"{'':44}{'median s':>9}{'ratio':>9}")
    print(
        f"{'usage?fresh=true through the API':44}{api_count:>9.3f}{api_count / direct_count:>9.2f}"
    )
    print(f"{'the same walk in this process (baseline)':44}{direct_count:>9.3f}{1:>9.2f}")
    print(f"GET /api/status from {PROBE_CLIENTS} back-to-back clients:")
    print(HEADER)
    print(row("before the count (3 s)", before))
    print(row(f"during {COUNT_ROUNDS} fresh counts", during))
    print(ratio_row("ratio during/before", during, before))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000, help="per endpoint")
    parser.add_argument("--files", type=int, default=100_000)
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="jgs-api-bench-")
    proc = None
    try:
        url = f"sqlite:///{tmp}/db.sqlite"
        started = time.perf_counter()
        statuses = seed_sessions(url, args.sessions, getpass.getuser())
        mix = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
        print(f"seeded {args.sessions} sessions in {time.perf_counter() - started:.1f}s: {mix}")
        port, token = free_port(), secrets.token_hex(16)
        proc = start_server(tmp, port, token)
        asyncio.run(run(args, tmp, proc, port, token))
    except ServerFailed as exc:
        print(f"FAILED: {exc}\n--- last lines of the server log ---\n{server_log_tail(tmp)}")
        sys.exit(1)
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
