"""Chaos: random starts, deletes at every status, `docker kill`s and kernel shutdowns against a
real Jupyter server on 2 simulated GPUs, with watchers on `docker events` and the store.

It fails (exit 1) when one GPU is ever in two running containers, when a session holds a
device while no container of it runs for longer than one reconcile interval, when a
request answers 5xx, or when anything is left at the end (containers, devices, state
directories, jupyter kernels). The sequence is random with a printed seed: rerun a failure
with the same `--seed`.

    .venv/bin/python benchmarks/chaos.py [--budget 300] [--seed N] [--json]

The test suite runs it with a 30 s budget (tests/test_chaos.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import docker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from api import (  # noqa: E402
    API,
    free_port,
    server_log_tail,
    start_server,
    stop_server,
    wait_until_up,
)

from jupyter_gpu_sessions.image import default_image  # noqa: E402
from jupyter_gpu_sessions.runtime.base import SESSION_LABEL, STORE_LABEL  # noqa: E402
from jupyter_gpu_sessions.store import SessionStore  # noqa: E402

GPUS = 2
MAX_LIVE = 5  # sessions alive at once: 2 running, the rest queued or starting
KERNEL_UID = 1000
GPU_LABEL = "io.jupyter.gpu-sessions.gpus"
# Held devices with no running container are tolerated this much beyond one reconcile
# interval: the watcher samples the store every STORE_EVERY seconds.
STORE_EVERY = 0.1
SAMPLE_SLACK = 0.5


@dataclass
class Report:
    seed: int
    budget: float
    reconcile_interval: float
    ops: dict[str, int] = field(default_factory=dict)
    deleted_in: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    leftovers: dict[str, Any] = field(default_factory=dict)
    longest_held_not_running: float = 0.0
    longest_held_without_container: float = 0.0
    http_5xx: int = 0
    server_tracebacks: int = 0

    def count(self, what: str, table: dict[str, int] | None = None) -> None:
        table = self.ops if table is None else table
        table[what] = table.get(what, 0) + 1


class Watcher:
    """Reads `docker events` for this store's containers and the store's allocations the
    whole time, and records every violation of "one GPU, one container; no device held
    without a running container for longer than one reconcile interval"."""

    def __init__(self, client, store_url: str, store_id: str, report: Report) -> None:
        self.client = client
        self.store = SessionStore(store_url)
        self.store_id = store_id
        self.report = report
        self.lock = threading.Lock()
        self.running: dict[str, tuple[str, set[str]]] = {}  # container → (session, gpus)
        self.existing: dict[str, str] = {}  # container → session
        self.held_since: dict[str, float] = {}  # session → when first seen held, not running
        self.orphan_since: dict[str, float] = {}  # session → held with no container at all
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._events, daemon=True),
            threading.Thread(target=self._store, daemon=True),
        ]
        self._stream = None

    def start(self) -> None:
        # Containers already there (none, on a fresh store) count from the start.
        for c in self.client.containers.list(
            all=True, filters={"label": [f"{STORE_LABEL}={self.store_id}"]}
        ):
            self._seen(c.id, c.labels, running=c.status == "running")
        self._stream = self.client.events(
            decode=True, filters={"type": "container", "label": f"{STORE_LABEL}={self.store_id}"}
        )
        for thread in self.threads:
            thread.start()

    def close(self) -> None:
        self.stop.set()
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.close()
        for thread in self.threads:
            thread.join(5)
        self.store.close()

    def _seen(self, container: str, labels: dict, running: bool) -> None:
        session = labels.get(SESSION_LABEL, "")
        gpus = {g for g in labels.get(GPU_LABEL, "").split(",") if g}
        with self.lock:
            self.existing[container] = session
            if not running:
                self.running.pop(container, None)
                return
            for other, (other_session, other_gpus) in self.running.items():
                shared = gpus & other_gpus
                if other != container and shared:
                    self.report.violations.append(
                        f"GPU {', '.join(sorted(shared))} in two running containers: "
                        f"{container[:12]} (session {session[:12]}) and {other[:12]} "
                        f"(session {other_session[:12]})"
                    )
            self.running[container] = (session, gpus)

    def _events(self) -> None:
        try:
            for event in self._stream:
                if self.stop.is_set():
                    return
                action = event.get("Action") or event.get("status") or ""
                actor = event.get("Actor") or {}
                container = actor.get("ID") or event.get("id") or ""
                labels = actor.get("Attributes") or {}
                if action == "start":
                    self._seen(container, labels, running=True)
                elif action in ("die", "kill", "stop", "oom"):
                    if action == "die":
                        self._seen(container, labels, running=False)
                elif action == "destroy":
                    with self.lock:
                        self.running.pop(container, None)
                        self.existing.pop(container, None)
        except Exception:
            if not self.stop.is_set():
                self.report.violations.append("the docker events stream broke off")

    def _store(self) -> None:
        limit = self.report.reconcile_interval + SAMPLE_SLACK
        while not self.stop.wait(STORE_EVERY):
            holders = {a.session_id for a in self.store.allocations()}
            now = time.monotonic()
            with self.lock:
                running = {s for s, _ in self.running.values()}
                existing = set(self.existing.values())
            for table, alive, longest in (
                (self.held_since, running, "longest_held_not_running"),
                (self.orphan_since, existing, "longest_held_without_container"),
            ):
                for session in list(table):
                    if session not in holders or session in alive:
                        del table[session]
                for session in holders - alive:
                    since = table.setdefault(session, now)
                    held = now - since
                    if held > getattr(self.report, longest):
                        setattr(self.report, longest, held)
            for session, since in list(self.held_since.items()):
                if now - since > limit:
                    self.report.violations.append(
                        f"session {session[:12]} held a device with no running container for "
                        f"more than {limit:.1f}s"
                    )
                    self.held_since[session] = float("inf")  # said once per episode


def fake_gpu_nodes(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    null = os.stat("/dev/null")
    for index in range(GPUS):
        node = os.path.join(path, f"nvidia{index}")
        if not os.path.exists(node):
            os.mknod(node, stat.S_IFCHR | 0o666, null.st_rdev)


def write_kernelspecs(data_dir: str) -> list[str]:
    """A GPU kernel, and a slow one whose container runs a while before the kernel answers
    (a wide PREPARING window to delete in)."""
    config = {"gpus": 1, "cpus": 0.5, "memory": "512MiB", "image": default_image()}
    argv = ["python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    slow = [
        "python3",
        "-c",
        "import runpy, sys, time; time.sleep(2); sys.argv = ['ipykernel_launcher'] + "
        "sys.argv[1:]; runpy.run_module('ipykernel_launcher', run_name='__main__')",
        "-f",
        "{connection_file}",
    ]
    names = []
    for name, command in (("chaos-gpu", argv), ("chaos-slow", slow)):
        folder = os.path.join(data_dir, "kernels", name)
        os.makedirs(folder, exist_ok=True)
        spec = {
            "argv": command,
            "display_name": name,
            "language": "python",
            "interrupt_mode": "signal",
            "metadata": {
                "kernel_provisioner": {
                    "provisioner_name": "gpu-container-provisioner",
                    "config": config,
                }
            },
        }
        with open(os.path.join(folder, "kernel.json"), "w") as f:
            json.dump(spec, f)
        names.append(name)
    return names


class Chaos:
    def __init__(self, api: API, client, store_id: str, kernels: list[str], report: Report):
        self.api = api
        self.client = client
        self.store_id = store_id
        self.kernels = kernels
        self.report = report
        self.rng = random.Random(report.seed)
        self.started = 0

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        response = await self.api.fetch(path, method, body)
        if response.code >= 500:
            self.report.http_5xx += 1
            text = response.body.decode(errors="replace")[:300] if response.body else ""
            self.report.violations.append(f"{method} {path} answered {response.code}: {text}")
        try:
            return response.code, json.loads(response.body) if response.body else None
        except ValueError:
            return response.code, None

    async def gpu_sessions(self, statuses: str) -> list[dict]:
        code, body = await self.call(
            "GET", f"/gpu-sessions/api/sessions?status={statuses}&limit=100"
        )
        return body.get("sessions", []) if code == 200 and body else []

    async def step(self) -> None:
        live = await self.gpu_sessions("PENDING,PREPARING,RUNNING,RESTARTING,TERMINATING")
        choices = ["delete", "kill", "shutdown"] + ["start"] * (3 if len(live) < MAX_LIVE else 0)
        what = self.rng.choice(choices)
        if what == "start":
            self.started += 1
            kernel = self.rng.choice(self.kernels)
            body = {
                "path": f"chaos-{self.started}.ipynb",
                "type": "notebook",
                "name": f"chaos-{self.started}.ipynb",
                "kernel": {"name": kernel},
            }
            code, _ = await self.call("POST", "/api/sessions", body)
            self.report.count(f"start ({code})")
        elif what == "delete" and live:
            target = self.rng.choice(live)
            code, _ = await self.call("DELETE", f"/gpu-sessions/api/sessions/{target['id']}")
            self.report.count(f"delete ({code})")
            self.report.count(target["status"], self.report.deleted_in)
        elif what == "kill":
            running = await asyncio.to_thread(
                self.client.containers.list,
                filters={"label": [f"{STORE_LABEL}={self.store_id}"], "status": "running"},
            )
            if running:
                victim = self.rng.choice(running)
                with contextlib.suppress(docker.errors.APIError):
                    await asyncio.to_thread(victim.kill)
                self.report.count("docker kill")
        elif what == "shutdown":
            code, sessions = await self.call("GET", "/api/sessions")
            if code == 200 and sessions:
                target = self.rng.choice(sessions)
                code, _ = await self.call("DELETE", f"/api/sessions/{target['id']}")
                self.report.count(f"kernel shutdown ({code})")
        await asyncio.sleep(self.rng.uniform(0.0, 0.6))

    async def wind_down(self, timeout: float = 90) -> None:
        """Shut every kernel down as a user would, then wait until nothing is live."""
        code, sessions = await self.call("GET", "/api/sessions")
        for session in sessions or []:
            await self.call("DELETE", f"/api/sessions/{session['id']}")
        for session in await self.gpu_sessions("PENDING,PREPARING,RUNNING,RESTARTING"):
            await self.call("DELETE", f"/gpu-sessions/api/sessions/{session['id']}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = await self.gpu_sessions("PENDING,PREPARING,RUNNING,RESTARTING,TERMINATING")
            code, kernels = await self.call("GET", "/api/kernels")
            if not live and not kernels:
                return
            await asyncio.sleep(0.5)


async def run(args: argparse.Namespace, tmp: str) -> Report:
    report = Report(seed=args.seed, budget=args.budget, reconcile_interval=args.reconcile_interval)
    client = docker.from_env(timeout=120)
    store_url = f"sqlite:///{tmp}/db.sqlite"
    fake_gpu_nodes(os.path.join(tmp, "dev"))
    kernels = write_kernelspecs(os.path.join(tmp, "data"))
    root = os.path.join(tmp, "root")
    os.makedirs(root, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(root, KERNEL_UID, KERNEL_UID)
    port, token = free_port(), secrets.token_hex(16)
    docker_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    proc = start_server(
        tmp,
        port,
        token,
        env={
            "DOCKER_HOST": docker_host,
            "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS": f"{GPUS}xA100-80GB",
            "JUPYTER_GPU_SESSIONS_SIMULATED_DEVICE_DIR": os.path.join(tmp, "dev"),
        },
        config={
            "GPUSessionManager": {"reconcile_interval": args.reconcile_interval},
            # The restarter notices a killed container quickly and gives up after two.
            "KernelRestarter": {"time_to_dead": 0.5, "restart_limit": 2},
        },
    )
    api = API(port, token, clients=8)
    store = SessionStore(store_url)  # migrates the store before the watcher reads it
    from jupyter_gpu_sessions.manager import GPUSessionManager

    store_id = GPUSessionManager(db_url=store_url).store_id
    watcher = Watcher(client, store_url, store_id, report)
    try:
        await wait_until_up(api, proc, tmp)
        watcher.start()
        chaos = Chaos(api, client, store_id, kernels, report)
        deadline = time.monotonic() + args.budget
        steps = 0
        while time.monotonic() < deadline and steps < args.max_steps:
            await chaos.step()
            steps += 1
        await chaos.wind_down()
        # One more reconcile interval: anything that should go is gone by then.
        await asyncio.sleep(args.reconcile_interval + 1)
        report.leftovers = await leftovers(api, client, store, store_id, tmp)
    finally:
        watcher.close()
        store.close()
        api.close()
        stop_server(proc)
        client.close()
    with open(os.path.join(tmp, "server.log"), errors="replace") as f:
        report.server_tracebacks = f.read().count("Traceback (most recent call last)")
    if report.leftovers:
        report.violations.append(f"left behind: {report.leftovers}")
    return report


async def leftovers(api: API, client, store: SessionStore, store_id: str, tmp: str) -> dict:
    found: dict[str, Any] = {}
    containers = client.containers.list(all=True, filters={"label": [f"{STORE_LABEL}={store_id}"]})
    if containers:
        found["containers"] = [c.name for c in containers]
    held = store.allocations()
    if held:
        found["devices"] = sorted({a.device_uuid for a in held})
    live = store.live()
    if live:
        found["live sessions"] = [f"{s.id[:12]} {s.status.value}" for s in live]
    state_root = os.path.join(tmp, "runtime", "gpu-sessions")
    if os.path.isdir(state_root) and os.listdir(state_root):
        found["state dirs"] = sorted(os.listdir(state_root))
    response = await api.fetch("/api/kernels")
    kernels = json.loads(response.body) if response.code == 200 else []
    if kernels:
        found["jupyter kernels"] = [k["id"] for k in kernels]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of chaos")
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--reconcile-interval", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server log)")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 30)
    print(f"chaos: seed {args.seed}, budget {args.budget:g}s", flush=True)
    tmp = tempfile.mkdtemp(prefix="jgs-chaos-")
    try:
        report = asyncio.run(run(args, tmp))
    except BaseException:
        print(server_log_tail(tmp, 60), file=sys.stderr)
        raise
    if args.json:
        print(json.dumps(report.__dict__, indent=1))
    else:
        print(f"operations: {sum(report.ops.values())} {report.ops}")
        print(f"deleted while: {report.deleted_in}")
        print(f"violations: {len(report.violations)}")
        for line in report.violations:
            print(f"  - {line}")
        print(
            f"longest a device stayed held with no running container: "
            f"{report.longest_held_not_running:.2f}s; with no container at all: "
            f"{report.longest_held_without_container:.2f}s "
            f"(reconcile interval {report.reconcile_interval:g}s)"
        )
        print(
            f"5xx answers: {report.http_5xx}; tracebacks in the server log: "
            f"{report.server_tracebacks}"
        )
    if report.violations:
        print(server_log_tail(tmp, 80), file=sys.stderr)
        print(f"server log kept in {tmp}", file=sys.stderr)
        sys.exit(1)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
