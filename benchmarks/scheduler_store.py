"""A whole scheduling pass through the store, against the pure pass, in the same run.

What a real pass costs: one SQLite write transaction that loads the queue, the live
allocations and every owner's usage, runs ``schedule()`` and writes placements and changed
waiting reasons back. Same host and queue shapes as ``benchmarks/scheduler.py`` (1,000
GPUs, 100 owners); the ratio column is the store pass against the pure ``schedule()`` on
the same data. The first pass reads the whole queue and writes every waiting session's
reasons; later passes update the manager's in-memory queue from what changed: ``again``
with nothing released in between, ``release`` after one running session ended.

    .venv/bin/python benchmarks/scheduler_store.py [--sizes 1000,10000] [--strategy fifo]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

from sqlalchemy import insert

sys.path.insert(0, os.path.dirname(__file__))

from scheduler import (  # noqa: E402 - the sibling benchmark's data generators
    DEPENDENCIES,
    TOTALS,
    inventory,
    policy_for,
    queue,
    running,
)

from jupyter_gpu_sessions.core.status import SessionStatus  # noqa: E402
from jupyter_gpu_sessions.devices import GPUInventory  # noqa: E402
from jupyter_gpu_sessions.manager import GPUSessionManager  # noqa: E402
from jupyter_gpu_sessions.scheduler import Capacity, schedule  # noqa: E402
from jupyter_gpu_sessions.store.db import write_transaction  # noqa: E402
from jupyter_gpu_sessions.store.tables import allocations, sessions  # noqa: E402


class FixedInventory(GPUInventory):
    kind = "simulated"

    def __init__(self, devices):
        self._devices = devices

    def devices(self):
        return list(self._devices)

    def utilization(self):
        return {}

    def driver_version(self):
        return None


def row(session_id, owner, request, status, created_at, depends_on=()):
    return {
        "id": session_id,
        "name": "",
        "owner": owner,
        "kind": "interactive",
        "kernel_id": None,
        "image": "img",
        "runtime": "docker",
        "request": request.to_dict(),
        "status": status,
        "reason": "",
        "devices": [],
        "depends_on": list(depends_on),
        "scheduler": {},
        "exit_code": None,
        "oom_killed": False,
        "container_id": None,
        "process_host": "bench",
        "process_pid": os.getpid(),
        "process_started": 0.0,
        "created_at": created_at,
    }


def fill(manager: GPUSessionManager, size: int, strategy: str):
    rng = random.Random(size)
    devices = inventory()
    held, usage = running(devices, rng)
    pending = queue(size, rng, shuffle=False)
    owners = sorted(usage)
    from jupyter_gpu_sessions.core.models import ResourceRequest

    rows, alloc_rows = [], []
    for n, a in enumerate(held):
        rows.append(
            row(a.session_id, owners[n % len(owners)], ResourceRequest(gpus=1), "RUNNING", 1.0)
        )
        alloc_rows.append(
            {
                "session_id": a.session_id,
                "gpu_uuid": a.gpu_uuid,
                "device_uuid": a.device_uuid,
                "kind": a.kind,
                "fraction": a.fraction,
            }
        )
    for name, (status, code) in DEPENDENCIES.items():
        if any(r["id"] == name for r in rows):
            continue  # "run1" is one of the running sessions
        rows.append(
            row(name, owners[0], ResourceRequest(), status.value, 0.5) | {"exit_code": code}
        )
    rows += [row(p.id, p.owner, p.request, "PENDING", p.created_at, p.depends_on) for p in pending]
    with write_transaction(manager.store.engine) as conn:
        conn.execute(insert(sessions), rows)
        conn.execute(insert(allocations), alloc_rows)
    manager._inventory = FixedInventory(devices)
    manager.policy_for = policy_for  # the benchmark's own policies, as in scheduler.py
    manager.scheduler_strategy = strategy

    def pure() -> float:
        capacity = Capacity(devices, held)
        started = time.perf_counter()
        schedule(
            pending, capacity, usage, policy_for, DEPENDENCIES, strategy=strategy, totals=TOTALS
        )
        return time.perf_counter() - started

    return pure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--strategy", default="fifo", choices=("fifo", "drf"))
    args = parser.parse_args()
    print(f"1000 GPUs, 100 owners, strategy {args.strategy}; SQLite (WAL) in a temp dir")
    print(
        f"{'pending':>8} {'pure ms':>9} {'first pass ms':>14} {'again ms':>9} "
        f"{'release ms':>11} {'release/pure':>13}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            manager = GPUSessionManager(db_url=f"sqlite:///{tmp}/bench.sqlite")
            pure = fill(manager, size, args.strategy)
            pure_ms = sorted(pure() for _ in range(3))[1] * 1000
            started = time.perf_counter()
            manager.schedule_pass()
            first_ms = (time.perf_counter() - started) * 1000
            again = []
            for _ in range(3):
                started = time.perf_counter()
                manager.schedule_pass()
                again.append((time.perf_counter() - started) * 1000)
            after_release = []
            for n in range(1, 4):
                manager.store.transition(f"run{n * 7}", SessionStatus.TERMINATING, "bench")
                manager.store.transition(f"run{n * 7}", SessionStatus.TERMINATED, "bench")
                started = time.perf_counter()
                manager.schedule_pass()
                after_release.append((time.perf_counter() - started) * 1000)
            again_ms, release_ms = sorted(again)[1], sorted(after_release)[1]
            print(
                f"{size:>8} {pure_ms:>9.1f} {first_ms:>14.1f} {again_ms:>9.1f} "
                f"{release_ms:>11.1f} {release_ms / pure_ms:>13.1f}"
            )
            manager.close()


if __name__ == "__main__":
    main()
