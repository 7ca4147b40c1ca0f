"""The first kernel start in a fresh process (what papermill and nbclient pay each time).

Each run is a new interpreter (`python -c …`) that starts one kernel with jupyter_client
(`AsyncKernelManager.start_kernel` + a client's `wait_for_ready`, i.e. until `kernel_info`
answers) and shuts it down. Runs alternate between the container kernelspec and a local
ipykernel, so both see the same machine load; the time counts from the spawn of the
interpreter to the `kernel_info` reply. It prints median and p90 of each, their ratio
(target: under 2x), and for the container kernel when each phase began and how long it
took (medians, milliseconds from the spawn): interpreter start, imports, the kernel
manager and its provisioner, the engine and session manager, the checks before queueing
(Docker client, image, GPU inventory, store open and migrations, policies), queueing and
allocation, container create, container start, the heartbeat, `kernel_info`. Phases nest
(the store opens inside the submit) and some run in worker threads; what the start would
import on its way is imported up front in the timed runs, as phases of their own.

The store is a fresh SQLite file of the run's own (migrated by a warm-up start, as a
store in use is); `--fresh-store` gives every container run a new, empty one instead.

    .venv/bin/python benchmarks/first_start.py [--runs 10] [--kernel python3-container]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

# The child: one kernel start, timed. argv: kernel name, working directory, whether to
# time phases. Prints one JSON line: {"ready": t, "phases": [[name, began, ended], ...]}
# with monotonic times (CLOCK_MONOTONIC: the same clock as the parent's).
CHILD = r"""
import time
T0 = time.monotonic()
import asyncio, functools, inspect, json, sys

kernel, cwd, timed = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
PHASES = []


def mark(name, began, ended=None):
    PHASES.append([name, began, time.monotonic() if ended is None else ended])


def wrap(owner, attr, name):
    # Time every call of owner.attr (sync or async) as the phase `name`.
    fn = inspect.getattr_static(owner, attr, None)
    if fn is None:
        return
    if isinstance(fn, property):
        getter = fn.fget

        @functools.wraps(getter)
        def timed_get(self):
            began = time.monotonic()
            try:
                return getter(self)
            finally:
                mark(name, began)

        setattr(owner, attr, property(timed_get, fn.fset, fn.fdel, fn.__doc__))
        return
    if asyncio.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def timed_async(*args, **kwargs):
            began = time.monotonic()
            try:
                return await fn(*args, **kwargs)
            finally:
                mark(name, began)

        setattr(owner, attr, timed_async)
    else:
        @functools.wraps(fn)
        def timed_sync(*args, **kwargs):
            began = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                mark(name, began)

        setattr(owner, attr, timed_sync)


began = time.monotonic()
from jupyter_client.manager import AsyncKernelManager
mark("import jupyter_client", began)

if timed:
    # What the start imports anyway (the provisioner's entry point, the engine it builds on
    # first use, the docker SDK its runtime loads), imported here to hook it: each import
    # is a phase of its own, so the engine's own phase below holds no import.
    began = time.monotonic()
    import jupyter_gpu_sessions.provisioner
    mark("import the provisioner", began)
    began = time.monotonic()
    import jupyter_gpu_sessions.manager.engine
    mark("import the engine (manager, store, events)", began)
    began = time.monotonic()
    import docker.api.container
    mark("import docker", began)
    import importlib

    def hook(module, cls, attr, name):
        try:
            target = importlib.import_module(module)
        except ImportError:
            return
        if cls:
            target = getattr(target, cls, None)
        if target is not None:
            wrap(target, attr, name)

    J = "jupyter_gpu_sessions."
    for module, cls, attr, name in (
        ("jupyter_client.manager", "AsyncKernelManager", "_async_pre_start_kernel",
         "kernelspec, provisioner, ports, connection file"),
        (J + "provisioner", "", "current_engine", "engine + session manager"),
        (J + "store.sessions", "SessionStore", "__init__", "store open (with migrations)"),
        (J + "store.sessions", "", "migrate", "store migrations"),
        (J + "manager", "GPUSessionManager", "inventory", "GPU inventory"),
        (J + "runtime.docker", "DockerRuntime", "client", "docker client"),
        (J + "runtime.docker", "DockerRuntime", "check_image", "image check"),
        (J + "manager", "GPUSessionManager", "refresh_policies", "policies"),
        (J + "store.sessions", "SessionStore", "add", "store add (queued)"),
        (J + "manager", "GPUSessionManager", "submit", "submit (checks, queueing)"),
        (J + "manager", "GPUSessionManager", "_wait_in_queue", "queue + allocation"),
        (J + "manager", "GPUSessionManager", "_launch_spec", "launch spec"),
        ("docker.api.container", "ContainerApiMixin", "create_container", "container create"),
        ("docker.api.container", "ContainerApiMixin", "start", "container start"),
        (J + "manager", "GPUSessionManager", "_wait_until_alive", "heartbeat"),
    ):
        hook(module, cls, attr, name)


async def main():
    km = AsyncKernelManager(kernel_name=kernel)
    await km.start_kernel(cwd=cwd)
    began = time.monotonic()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        ready = time.monotonic()
        mark("kernel_info", began, ready)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    print(json.dumps({"t0": T0, "ready": ready, "phases": PHASES}))


asyncio.run(main())
"""

ORDER = (
    "interpreter start",
    "import jupyter_client",
    "import the provisioner",
    "import the engine (manager, store, events)",
    "import docker",
    "kernelspec, provisioner, ports, connection file",
    "engine + session manager",
    "submit (checks, queueing)",
    "docker client",
    "image check",
    "GPU inventory",
    "store open (with migrations)",
    "store migrations",
    "policies",
    "store add (queued)",
    "queue + allocation",
    "launch spec",
    "container create",
    "container start",
    "heartbeat",
    "kernel_info",
)


def one_run(kernel: str, cwd: str, env: dict[str, str], timed: bool) -> dict:
    spawned = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, kernel, cwd, "1" if timed else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the {kernel} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["spawned"] = spawned
    result["total"] = result["ready"] - spawned
    return result


def phases_of(result: dict) -> dict[str, tuple[float, float]]:
    """Each phase's first start and its summed duration, in ms from the spawn."""
    spawned = result["spawned"]
    found: dict[str, tuple[float, float]] = {
        "interpreter start": (0.0, (result["t0"] - spawned) * 1000)
    }
    for name, began, ended in result["phases"]:
        start, took = found.get(name, ((began - spawned) * 1000, 0.0))
        found[name] = (min(start, (began - spawned) * 1000), took + (ended - began) * 1000)
    return found


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--kernel", default="python3-container")
    parser.add_argument("--baseline", default="python3", help="the local ipykernel's kernelspec")
    parser.add_argument(
        "--fresh-store", action="store_true", help="a new, empty store for every container run"
    )
    parser.add_argument("--json", help="also write every run's figures to this file")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="jgs-first-start-")
    cwd = os.path.join(tmp, "work")
    os.makedirs(cwd)
    if os.geteuid() == 0:
        os.chown(cwd, 1000, 1000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
    env["JUPYTER_RUNTIME_DIR"] = os.path.join(tmp, "runtime")

    def container_env(run: int) -> dict[str, str]:
        name = f"store-{run}.sqlite" if args.fresh_store else "store.sqlite"
        return {**env, "JUPYTER_GPU_SESSIONS_DB_URL": f"sqlite:///{tmp}/{name}"}

    try:
        # Warm-up: page cache, bytecode, image layers; migrates the shared store.
        one_run(args.kernel, cwd, container_env(-1), timed=False)
        one_run(args.baseline, cwd, env, timed=False)
        container: list[dict] = []
        local: list[dict] = []
        for run in range(args.runs):
            container.append(one_run(args.kernel, cwd, container_env(run), timed=True))
            local.append(one_run(args.baseline, cwd, env, timed=False))
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    c_totals = [r["total"] for r in container]
    l_totals = [r["total"] for r in local]
    store = "a fresh store each run" if args.fresh_store else "a migrated store"
    print(
        f"first start in a fresh process, spawn → kernel_info: {args.runs} runs each, "
        f"interleaved; {store}"
    )
    print(f"{'':48}{'median s':>10}{'p90 s':>10}")
    print(
        f"{args.kernel + ' (container)':48}{statistics.median(c_totals):>10.3f}"
        f"{pct(c_totals, 90):>10.3f}"
    )
    print(
        f"{args.baseline + ' (local ipykernel)':48}{statistics.median(l_totals):>10.3f}"
        f"{pct(l_totals, 90):>10.3f}"
    )
    median_ratio = statistics.median(c_totals) / statistics.median(l_totals)
    p90_ratio = pct(c_totals, 90) / pct(l_totals, 90)
    print(f"{'ratio container/local':48}{median_ratio:>10.2f}{p90_ratio:>10.2f}")

    per_run = [phases_of(r) for r in container]
    names = [n for n in ORDER if any(n in p for p in per_run)]
    names += sorted({n for p in per_run for n in p} - set(names))
    print(f"\n{args.kernel}: phases (median ms over the runs that had them)")
    print(f"{'phase':48}{'began at':>10}{'took':>10}{'runs':>6}")
    for name in names:
        had = [p[name] for p in per_run if name in p]
        print(
            f"{name:48}{statistics.median(b for b, _ in had):>10.0f}"
            f"{statistics.median(t for _, t in had):>10.0f}{len(had):>6}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"container": container, "local": local}, f)


if __name__ == "__main__":
    main()
