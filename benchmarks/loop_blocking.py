"""What runs on the server's event loop, and for how long, while container kernels start.

A real `jupyter server` with the extension (as in server_responsiveness.py), instrumented
at start-up through a ``sitecustomize`` module (loop_sampler.py). Each round starts four
`python3-container` kernels at once through `POST /api/kernels`, waits until they run (the
same polling as server_responsiveness.py) and deletes them. It prints, per kernel start:

- the server's CPU over the rounds, its loop thread's and its other threads' (these hold
  the GIL the loop then waits for), and how long the loop thread waited for a CPU while
  ready to run (/proc schedstat; idle for comparison): the machine's load, not the server;
- every busy stretch of the loop of at least ``--threshold`` ms, sampled every
  ``--interval`` ms (0: no sampler): the longest with the callbacks they ran and the CPU
  the loop and the process used meanwhile (much less than the stretch: the loop waited
  for the GIL or a CPU), the functions by inclusive and by own time, and what the other
  threads ran meanwhile;
- every loop callback that used at least ``--step-threshold`` ms of the loop thread's CPU
  (timed around asyncio's ``Handle._run``; garbage collections on the loop too), grouped
  by what it was: for a task step, its coroutine, where it resumed and where it stopped;
- with ``--probe``: GET /api/status back to back, as server_responsiveness.py does, and
  the callbacks that ran while the slowest 1% of those requests waited;
- with ``--cprofile``: deterministic profiles of the CPU time of the loop thread and of
  the thread-pool work items (``asyncio.to_thread``), by function.

    .venv/bin/python benchmarks/loop_blocking.py [--rounds 3] [--interval 0.5] [--threshold 2]
        [--step-threshold 1] [--probe] [--cprofile] [--top 40]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import secrets
import shutil
import signal
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from api import API, free_port, server_dir, start_server, stop_server, wait_until_up  # noqa: E402
from loop_sampler import ENV  # noqa: E402
from server_responsiveness import IDLE_SECONDS, KERNEL_UID, four_kernels  # noqa: E402

SITECUSTOMIZE = f"""\
import os, sys
if any(name.startswith({ENV!r}) for name in os.environ):
    sys.path.insert(0, {HERE!r})
    import loop_sampler
    loop_sampler.install_from_env()
    for name in [n for n in os.environ if n.startswith({ENV!r})]:
        del os.environ[name]  # the server's own subprocesses are not sampled
"""

# Frames every busy stretch passes through: not worth naming.
PLUMBING = (
    "asyncio/base_events.py",
    "asyncio/events.py",
    "asyncio/runners.py",
    "tornado/platform/asyncio.py",
    "tornado/ioloop.py",
    "traitlets/config/application.py",
    "jupyter_server/serverapp.py:start",
    "jupyter_server/serverapp.py:start_ioloop",
    "jupyter_server/serverapp.py:launch_instance",
    "jupyter_server/__main__.py",
    "runpy.py",
    "<frozen runpy>",
    "benchmarks/loop_sampler.py",  # the step timer around every callback
)


def plumbing(where: str) -> bool:
    return where.startswith(PLUMBING)


def entry(stack: list[str]) -> str:
    """The callback the loop ran (the frame inside asyncio's ``Handle._run``); for a
    tornado request, its handler method."""
    for i, where in enumerate(stack):
        if where.startswith("asyncio/events.py:_run"):
            callback = function(stack[i - 1]) if i else "?"
            if callback == "tornado/web.py:_execute" and i >= 2:
                inner = [w for w in stack[: i - 1] if not w.startswith(("tornado/", "auth/"))]
                return f"{callback} > {function(inner[-1]) if inner else '?'}"
            return callback
    return "(outside a loop callback)"


def function(where: str) -> str:
    return where.rsplit(":", 1)[0]  # file:function, without the line


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of a process's main thread (its event loop) and of the
    whole process, from /proc."""

    def read(path: str) -> float:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    return read(f"/proc/{pid}/task/{pid}/stat"), read(f"/proc/{pid}/stat")


def runqueue_wait(pid: int) -> float:
    """Seconds the process's main thread (its event loop) has waited for a CPU while ready
    to run (/proc schedstat): what the machine's load, not the server, costs it."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


CPU: dict[str, float] = {}
PROBES: list[tuple[float, float]] = []  # (sent, answered), monotonic


async def probing(api: API, stop: asyncio.Event) -> None:
    """Back-to-back GET /api/status (as server_responsiveness.py), timed at both ends."""
    while not stop.is_set():
        sent = time.monotonic()
        await api.fetch("/api/status")
        PROBES.append((sent, time.monotonic()))


async def run(args: argparse.Namespace, tmp: str, samples: str) -> list[tuple[float, float]]:
    root = os.path.join(tmp, "root")
    os.makedirs(root, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(root, KERNEL_UID, KERNEL_UID)
    site = os.path.join(tmp, "site")
    os.makedirs(site)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    pythonpath = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
    port, token = free_port(), secrets.token_hex(16)
    env = {
        "DOCKER_HOST": os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
        "PYTHONPATH": pythonpath,
        ENV + "_THRESHOLD": str(args.threshold / 1000),
        ENV + "_INTERVAL": str(args.interval / 1000),
        ENV + "_STEPS": samples + ".steps",
        ENV + "_STEP_THRESHOLD": str(args.step_threshold / 1000),
    }
    if args.interval > 0:
        env[ENV] = samples
    if args.cprofile:
        env[ENV + "_PROFILE"] = samples + ".pstats"
    proc = start_server(tmp, port, token, env=env)
    api = API(port, token, clients=8)
    windows = []
    try:
        await wait_until_up(api, proc, tmp)
        await four_kernels(api)  # warm-up: first imports, page cache
        await asyncio.sleep(1.0)
        if args.cprofile:
            proc.send_signal(signal.SIGUSR2)  # the loop thread's CPU profile: on
        idle_wait = runqueue_wait(proc.pid)
        await asyncio.sleep(IDLE_SECONDS)
        CPU["idle wait"] = (runqueue_wait(proc.pid) - idle_wait) / IDLE_SECONDS
        loop_before, process_before = cpu_seconds(proc.pid)
        wait_before, rounds_began = runqueue_wait(proc.pid), time.monotonic()
        stop = asyncio.Event()
        probes = asyncio.ensure_future(probing(api, stop)) if args.probe else None
        for _ in range(args.rounds):
            began = time.monotonic()
            await four_kernels(api)
            windows.append((began, time.monotonic()))
            await asyncio.sleep(0.5)
        stop.set()
        if probes is not None:
            await probes
        loop_after, process_after = cpu_seconds(proc.pid)
        CPU["loop"], CPU["process"] = loop_after - loop_before, process_after - process_before
        CPU["rounds wait"] = (runqueue_wait(proc.pid) - wait_before) / (
            time.monotonic() - rounds_began
        )
        if args.cprofile:
            proc.send_signal(signal.SIGUSR2)  # off, and written
            for _ in range(100):
                if os.path.exists(samples + ".pstats"):
                    break
                await asyncio.sleep(0.1)
    finally:
        api.close()
        stop_server(proc)
    return windows


def report(samples: str, windows: list[tuple[float, float]], args: argparse.Namespace) -> None:
    runs = []
    with open(samples, "a+") as f:  # none when the sampler was off
        f.seek(0)
        for line in f:
            run = json.loads(line)
            if any(a <= run["at"] <= b for a, b in windows):
                runs.append(run)
    starts = 4 * len(windows)
    wall = sum(b - a for a, b in windows) * 1000
    total = sum(r["ms"] for r in runs)
    if CPU:
        print(
            f"server CPU over the rounds (with the gaps between them), per start: "
            f"{CPU['process'] * 1000 / starts:.1f} ms, of which the loop's thread "
            f"{CPU['loop'] * 1000 / starts:.1f} ms and other threads "
            f"{(CPU['process'] - CPU['loop']) * 1000 / starts:.1f} ms (they hold the GIL "
            "the loop then waits for)"
        )
        print(
            f"the loop's thread waited for a CPU (ready to run, not running) "
            f"{CPU['rounds wait'] * 1000:.1f} ms per second of the rounds, "
            f"{CPU['idle wait'] * 1000:.1f} ms per second idle ({IDLE_SECONDS:g} s before them)"
        )
    print(
        f"{len(windows)} rounds of 4 container kernel starts ({starts} starts, {wall:.0f} ms "
        f"wall): {len(runs)} busy stretches >= {args.threshold:g} ms, {total:.0f} ms in all "
        f"({total / starts:.1f} ms per start)"
    )
    loop_cpu = sum(r.get("loop_cpu_ms", 0) for r in runs)
    process_cpu = sum(r.get("process_cpu_ms", 0) for r in runs)
    print(
        f"in those stretches the loop's thread ran {loop_cpu / starts:.1f} ms of CPU per start, "
        f"the server process {process_cpu / starts:.1f} ms; the rest of the wall time it "
        "waited for the GIL or a CPU"
    )
    ordered = sorted(r["ms"] for r in runs)
    if ordered:
        print(
            f"longest {ordered[-1]:.1f} ms, median {ordered[len(ordered) // 2]:.1f} ms; "
            f"over 10 ms: {sum(1 for v in ordered if v > 10)}"
        )

    print(
        "\nlongest stretches: ms, loop CPU ms, process CPU ms, samples, the callbacks they ran "
        "(samples each)"
    )
    for run in sorted(runs, key=lambda r: -r["ms"])[: args.longest]:
        stacks = run["stacks"]
        callbacks = collections.Counter(entry(s) for s in stacks).most_common(3)
        print(
            f"{run['ms']:7.1f} {run.get('loop_cpu_ms', 0):6.1f} {run.get('process_cpu_ms', 0):6.1f}"
            f" {len(stacks):4d}  " + "; ".join(f"{name} ({n})" for name, n in callbacks)
        )

    by_callback: collections.Counter[str] = collections.Counter()
    for run in runs:
        for stack in run["stacks"]:
            by_callback[entry(stack)] += run["ms"] / len(run["stacks"])
    print(f"\nbusy ms per kernel start, by the callback the loop ran (top {args.top // 2})")
    for name, ms in by_callback.most_common(args.top // 2):
        print(f"{ms / starts:8.2f}  {name}")

    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for run in runs:
        stacks = run["stacks"]
        if not stacks:
            continue
        per_sample = run["ms"] / len(stacks)
        for stack in stacks:
            own[function(stack[0])] += per_sample
            for name in {function(w) for w in stack if not plumbing(w)}:
                inclusive[name] += per_sample
    print(f"\ninclusive ms per kernel start (top {args.top})")
    for name, ms in inclusive.most_common(args.top):
        print(f"{ms / starts:8.2f}  {name}")
    print(f"\nown (innermost frame) ms per kernel start (top {args.top // 2})")
    for name, ms in own.most_common(args.top // 2):
        print(f"{ms / starts:8.2f}  {name}")

    threads: collections.Counter[str] = collections.Counter()
    for run in runs:
        stacks = run["stacks"]
        if not stacks:
            continue
        per_sample = run["ms"] / len(stacks)
        for found in run.get("others", ()):
            for name in {_ours_or_top(stack) for stack in found}:
                threads[name] += per_sample
    print(
        f"\nother threads running Python while the loop was busy (may hold the GIL it waits "
        f"for), ms per kernel start (top {args.top // 2})"
    )
    for name, ms in threads.most_common(args.top // 2):
        print(f"{ms / starts:8.2f}  {name}")


def _ours_or_top(stack: str) -> str:
    """A worker thread's stack (innermost first, " <- "-joined): its innermost frame of this
    package, else its innermost frame, without line numbers."""
    frames = stack.split(" <- ")
    mine = next((f for f in frames if "jupyter_gpu_sessions" in f), None)
    top = function(frames[0])
    return f"{top} in {function(mine)}" if mine and mine != frames[0] else top


def report_steps(path: str, windows: list[tuple[float, float]], top: int, threshold: float) -> None:
    """The loop's callbacks that used the most CPU, by what they were."""
    if not os.path.exists(path):
        return
    starts = 4 * len(windows)
    groups: dict[str, list[float]] = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            step = json.loads(line)
            if any(a <= step["at"] <= b for a, b in windows):
                name = step["what"]
                if step["from"] or step["to"]:
                    name += f"  [{step['from']} -> {step['to']}]"
                groups[name].append(step["cpu_ms"])
    total = sum(sum(v) for k, v in groups.items() if not k.startswith("(garbage"))
    every = sorted(x for v in groups.values() for x in v)
    print(
        f"\nloop callbacks of >= {threshold:g} ms CPU: {len(every)}, "
        f"{total / starts:.1f} ms CPU per start (garbage collections also count inside the "
        "callback they interrupted)" + (f", longest {every[-1]:.1f} ms" if every else "")
    )
    print(f"{'ms/start':>8} {'n':>5} {'max ms':>7}  callback [resumed at -> stopped at]")
    ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]
    for name, values in ranked:
        print(f"{sum(values) / starts:8.2f} {len(values):5d} {max(values):7.2f}  {name}")


def report_probes(steps_path: str, windows: list[tuple[float, float]], top: int) -> None:
    """The slowest 1% of the probes sent during the rounds, and what the loop ran while each
    waited: the callbacks (and garbage collections) that overlapped it, by CPU."""
    inside = [p for p in PROBES if any(a <= p[0] <= b for a, b in windows)]
    if not inside:
        return
    inside.sort(key=lambda p: p[1] - p[0])
    slow = inside[-max(1, len(inside) // 100) :]
    steps = []
    with open(steps_path) as f:
        for line in f:
            step = json.loads(line)
            if any(a - 1 <= step["at"] <= b + 1 for a, b in windows):
                steps.append(step)
    blame: collections.Counter[str] = collections.Counter()
    seen: collections.Counter[str] = collections.Counter()
    accounted = []
    for sent, answered in slow:
        cpu = 0.0
        for step in steps:
            ended = step["at"] + step["wall_ms"] / 1000
            if step["at"] < answered and ended > sent:
                name = step["what"]
                if step["from"] or step["to"]:
                    name += f"  [{step['from']} -> {step['to']}]"
                blame[name] += step["cpu_ms"]
                seen[name] += 1
                if not step.get("gc"):
                    cpu += step["cpu_ms"]
        accounted.append((answered - sent) * 1000 - cpu)
    latencies = [(b - a) * 1000 for a, b in inside]
    print(
        f"\nprobes (GET /api/status back to back) during the rounds: {len(inside)}, p50 "
        f"{latencies[len(latencies) // 2]:.1f} ms, p99 {latencies[-len(slow)]:.1f} ms; the "
        f"slowest {len(slow)} ({latencies[-len(slow)]:.1f}-{latencies[-1]:.1f} ms) waited on "
        f"these callbacks (>= the step threshold), CPU ms summed over those probes; the rest "
        f"of their time (median {statistics.median(accounted):.1f} ms each) was smaller "
        "callbacks, their own handling and waits for the GIL or a CPU"
    )
    print(f"{'cpu ms':>8} {'probes':>6}  callback")
    for name, ms in blame.most_common(top):
        print(f"{ms:8.1f} {seen[name]:6d}  {name}")


def report_profile(path: str, starts: int, top: int, what: str = "the loop thread") -> None:
    """CPU time by function (cumulative), per kernel start."""
    import pstats

    if not os.path.exists(path):
        print(f"\n(no CPU profile of {what} was written)")
        return
    stats = pstats.Stats(path)
    total = sum(tt for _cc, _nc, tt, _ct, _callers in stats.stats.values())
    print(
        f"\n{what}: CPU over the rounds (deterministic profile, CPU time; the profiler slows "
        f"it down several times): {total * 1000 / starts:.1f} ms per kernel start; cumulative "
        f"ms per start, calls per start (top {top})"
    )
    rows = []
    for (filename, line, name), (_cc, calls, _tt, cumulative, _callers) in stats.stats.items():
        parts = filename.split("/")
        where = "/".join(parts[-2:]) + f":{name}" if line else name
        if plumbing(where) or "asyncio/base_events.py" in where or "futures/thread.py" in where:
            continue
        rows.append((cumulative, calls, where))
    for cumulative, calls, where in sorted(rows, reverse=True)[:top]:
        print(f"{cumulative * 1000 / starts:8.2f} {calls / starts:8.1f}  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=2.0, help="ms")
    parser.add_argument(
        "--interval",
        type=float,
        default=0.5,
        help="ms between samples; 0: no sampler (its own CPU then stays out of the figures)",
    )
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--step-threshold", type=float, default=1.0, help="ms of CPU a callback must use"
    )
    parser.add_argument("--longest", type=int, default=15)
    parser.add_argument(
        "--cprofile",
        action="store_true",
        help="also profile the CPU of the loop thread and of worker threads by function "
        "(slows them several times)",
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="also send GET /api/status back to back (as server_responsiveness.py) and say "
        "what the loop ran while the slowest 1%% of them waited",
    )
    parser.add_argument("--keep", help="also copy the raw samples (JSON lines) to this file")
    args = parser.parse_args()
    with server_dir("jgs-loop-") as tmp:
        samples = os.path.join(tmp, "samples.jsonl")
        windows = asyncio.run(run(args, tmp, samples))
        report(samples, windows, args)
        report_steps(samples + ".steps", windows, args.top, args.step_threshold)
        if args.probe:
            report_probes(samples + ".steps", windows, args.top)
        if args.cprofile:
            report_profile(samples + ".pstats", 4 * len(windows), args.top)
            report_profile(
                samples + ".pstats.threads", 4 * len(windows), args.top, "worker threads"
            )
        if args.keep:
            shutil.copy(samples, args.keep)
            for suffix in (".pstats", ".pstats.threads", ".steps"):
                if os.path.exists(samples + suffix):
                    shutil.copy(samples + suffix, args.keep + suffix)
            with open(args.keep + ".windows", "w") as f:
                json.dump(windows, f)


if __name__ == "__main__":
    main()
