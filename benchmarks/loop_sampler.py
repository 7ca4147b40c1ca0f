"""A sampling profiler of an event loop's busy stretches, loaded into another process.

A daemon thread looks at the main thread's Python stack every ``interval`` seconds. While
the loop waits for I/O its innermost frame is ``selectors.*Selector.select``; anything else
is the loop running a callback (or waiting for the GIL a worker thread holds). Each busy
stretch of at least ``threshold`` seconds is written as one JSON line: when it began
(``time.monotonic()``, comparable across processes), how long it lasted and the stacks
sampled meanwhile. ``benchmarks/loop_blocking.py`` loads it into a server through a
``sitecustomize`` module and reads the lines back. It can also profile the main thread's
CPU time between two SIGUSR2 signals (``install_profile_toggle``).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

ENV = "JGS_LOOP_SAMPLES"  # where to write; the sampler starts only when it is set
MAX_DEPTH = 80
# Innermost frames of a thread that waits without the GIL (a lock, a queue, a socket).
_WAITS = (
    "threading.py:wait",
    "queue.py:get",
    "thread.py:_worker",  # an idle pool worker: in SimpleQueue.get
    "selectors.py:select",
    "socket.py:readinto",
)


def _idle(frame) -> bool:
    code = frame.f_code
    return code.co_name == "select" and code.co_filename.endswith("selectors.py")


def _where(frame) -> str:
    code = frame.f_code
    parts = code.co_filename.replace("\\", "/").split("/")
    short = "/".join(parts[-2:])
    return f"{short}:{code.co_name}:{frame.f_lineno}"


def _stack(frame) -> list[str]:
    stack = []
    while frame is not None and len(stack) < MAX_DEPTH:
        stack.append(_where(frame))
        frame = frame.f_back
    return stack  # innermost first


def _others(frames: dict, skip: set[int]) -> list[str]:
    """Where the other threads that may be running Python code stand (a few frames each):
    who may hold the GIL the loop waits for."""
    found = []
    for ident, frame in frames.items():
        if ident in skip:
            continue
        where = _where(frame)
        if not where.rsplit(":", 1)[0].endswith(_WAITS):
            found.append(" <- ".join(_stack(frame)[:8]))
    return found


def _sample(path: str, interval: float, threshold: float) -> None:
    main = threading.main_thread().ident
    skip = {main, threading.get_ident()}
    main_clock = time.pthread_getcpuclockid(main)

    def cpu() -> tuple[float, float]:
        """CPU seconds of the loop's thread, and of the whole process."""
        return time.clock_gettime(main_clock), time.clock_gettime(time.CLOCK_PROCESS_CPUTIME_ID)

    last_idle = time.monotonic()
    cpu_at_idle = cpu()
    stacks: list[list[str]] = []
    others: list[list[str]] = []
    with open(path, "a", buffering=1) as out:
        while True:
            time.sleep(interval)
            frames = sys._current_frames()
            frame = frames.get(main)
            now = time.monotonic()
            if frame is None:
                return
            if _idle(frame):
                now_cpu = cpu()
                if stacks:
                    busy = now - last_idle
                    if busy >= threshold:
                        out.write(
                            json.dumps(
                                {
                                    "at": last_idle,
                                    "ms": busy * 1000,
                                    # what the loop's thread and the whole process ran
                                    # meanwhile: the rest of ``ms`` the loop waited (for
                                    # the GIL, or for a CPU)
                                    "loop_cpu_ms": (now_cpu[0] - cpu_at_idle[0]) * 1000,
                                    "process_cpu_ms": (now_cpu[1] - cpu_at_idle[1]) * 1000,
                                    "stacks": stacks,
                                    "others": others,
                                }
                            )
                            + "\n"
                        )
                    stacks, others = [], []
                last_idle, cpu_at_idle = now, now_cpu
            else:
                stacks.append(_stack(frame))
                others.append(_others(frames, skip))
            del frame, frames


def install(path: str, interval: float = 0.001, threshold: float = 0.003) -> None:
    thread = threading.Thread(
        target=_sample, args=(path, interval, threshold), name="loop-sampler", daemon=True
    )
    thread.start()


def install_profile_toggle(path: str) -> None:
    """SIGUSR2 toggles deterministic profiles that count CPU time (not wall time: neither
    waits for the GIL nor for a CPU count): of the main thread, written to ``path``, and of
    the work items of thread pools (``asyncio.to_thread``, ``run_in_executor``), written to
    ``path + ".threads"`` (pstats format); the second signal writes them."""
    import concurrent.futures.thread as pool
    import cProfile
    import pstats
    import signal

    state: dict[str, cProfile.Profile] = {}
    workers: list[cProfile.Profile] = []
    local = threading.local()
    run_item = pool._WorkItem.run

    def profiled_run(item) -> None:
        if "on" not in state:
            return run_item(item)
        profile = getattr(local, "profile", None)
        if profile is None or profile not in workers:
            profile = local.profile = cProfile.Profile(time.thread_time)
            workers.append(profile)
        profile.enable()
        try:
            return run_item(item)
        finally:
            profile.disable()

    pool._WorkItem.run = profiled_run

    def toggle(_signum, _frame) -> None:
        profile = state.pop("on", None)
        if profile is None:
            workers.clear()
            state["on"] = cProfile.Profile(time.thread_time)
            state["on"].enable()
            return
        profile.disable()
        if workers:
            merged = pstats.Stats(workers[0])
            for other in workers[1:]:
                merged.add(other)
            merged.dump_stats(path + ".threads")
        profile.dump_stats(path + ".tmp")
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR2, toggle)


def _task_where(task) -> str:
    """The innermost frame of a task's await chain (where it stands)."""
    coro = task.get_coro()
    frame = None
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or frame
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return _where(frame) if frame is not None else "?"


def install_step_timer(path: str, threshold: float = 0.001) -> None:
    """Time every callback the loop runs (its thread's CPU and wall time); each one that
    used at least ``threshold`` seconds of CPU is written as a JSON line: what it was (for a
    task step: the task's coroutine, where it resumed and where it stopped)."""
    import asyncio.events

    out = open(path, "a", buffering=1)  # noqa: SIM115 - for the life of the process
    run = asyncio.events.Handle._run

    def timed_run(handle) -> None:
        task = getattr(handle._callback, "__self__", None)
        if not hasattr(task, "get_coro"):
            task = None
        resumed = what = ""
        if task is not None:
            resumed = _task_where(task)
            coro = task.get_coro()
            what = getattr(coro, "__qualname__", repr(coro))
            frame = getattr(coro, "cr_frame", None)
            owner = frame.f_locals.get("self") if frame is not None else None
            if owner is not None and type(owner).__name__ not in what:
                what += f" ({type(owner).__name__})"
        wall, cpu = time.monotonic(), time.thread_time()
        try:
            run(handle)
        finally:
            used = time.thread_time() - cpu
            if used >= threshold:
                if task is not None:
                    stopped = _task_where(task) if not task.done() else "(done)"
                else:
                    what, stopped = repr(handle._callback)[:200], ""
                out.write(
                    json.dumps(
                        {
                            "at": wall,
                            "cpu_ms": used * 1000,
                            "wall_ms": (time.monotonic() - wall) * 1000,
                            "what": what,
                            "from": resumed,
                            "to": stopped,
                        }
                    )
                    + "\n"
                )

    asyncio.events.Handle._run = timed_run

    import gc

    main = threading.main_thread().ident
    started: dict[str, float] = {}

    def collected(phase: str, info: dict) -> None:
        """Garbage collections on the loop's thread, as steps of their own (they also count
        inside the callback they interrupted)."""
        if threading.get_ident() != main:
            return
        if phase == "start":
            started["wall"], started["cpu"] = time.monotonic(), time.thread_time()
        elif "cpu" in started:
            used = time.thread_time() - started.pop("cpu")
            wall = started.pop("wall")
            if used >= threshold:
                out.write(
                    json.dumps(
                        {
                            "at": wall,
                            "cpu_ms": used * 1000,
                            "wall_ms": (time.monotonic() - wall) * 1000,
                            "what": f"(garbage collection, generation {info['generation']})",
                            "from": "",
                            "to": "",
                            "gc": True,
                        }
                    )
                    + "\n"
                )

    gc.callbacks.append(collected)


def install_from_env() -> None:
    steps = os.environ.get(ENV + "_STEPS")
    if steps:
        install_step_timer(steps, float(os.environ.get(ENV + "_STEP_THRESHOLD", "0.001")))
    profile = os.environ.get(ENV + "_PROFILE")
    if profile:
        install_profile_toggle(profile)
    path = os.environ.get(ENV)
    if path:
        install(
            path,
            float(os.environ.get(ENV + "_INTERVAL", "0.001")),
            float(os.environ.get(ENV + "_THRESHOLD", "0.003")),
        )
