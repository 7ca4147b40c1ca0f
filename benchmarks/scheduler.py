"""Scheduling pass time: 1,000 simulated GPUs, 100 owners, 1k / 10k / 100k pending sessions.

The queue is handed over oldest first, as the store reads it (``--shuffle`` for unordered).
The host has plain GPUs (handed out whole or in shares) and GPUs in MIG mode, and is
pre-filled so most of the queue waits, as on a busy day. Each run builds a fresh
:class:`Capacity` with the same running allocations and times one ``schedule()`` call,
for ``fifo`` and ``drf``; the table shows the median ms per pass and, per 1k pending
sessions, the ratio to the 1k run measured in the same process (a flat ratio is linear
growth).

    /tmp/venv/bin/python benchmarks/scheduler.py [--runs 5] [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from jupyter_gpu_sessions.core.models import Allocation, GPUDevice, MigInstance, ResourceRequest
from jupyter_gpu_sessions.core.policy import Policy
from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.scheduler import (
    Capacity,
    HostTotals,
    OwnerUsage,
    PendingSession,
    schedule,
)

GIB = 1024**3
GPUS = 1_000
MIG_GPUS = 300
OWNERS = [f"user{n:03d}" for n in range(100)]
LAYOUTS = (
    ("1g.10gb",) * 7,
    ("3g.40gb", "3g.40gb", "1g.10gb"),
    ("2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"),
)


def inventory() -> list[GPUDevice]:
    devices = []
    for index in range(GPUS):
        uuid = f"GPU-{index:04d}"
        instances: tuple[MigInstance, ...] = ()
        if index >= GPUS - MIG_GPUS:
            layout = LAYOUTS[index % len(LAYOUTS)]
            instances = tuple(
                MigInstance(f"MIG-{index:04d}-{n}", profile, 10 * GIB, n)
                for n, profile in enumerate(layout)
            )
        devices.append(GPUDevice(index, uuid, "A100-80GB", 80 * GIB, index, None, True, instances))
    return devices


def running(devices: list[GPUDevice], rng: random.Random) -> tuple[list[Allocation], dict]:
    """The sessions already running: nearly every slot held. → allocations, usage."""
    allocations: list[Allocation] = []
    usage: dict[str, OwnerUsage] = {}
    count = 0

    def hold(kind: str, gpu: str, device: str, fraction: float) -> None:
        nonlocal count
        count += 1
        owner = rng.choice(OWNERS)
        allocations.append(Allocation(f"run{count}", gpu, device, kind, fraction))
        use = usage.get(owner, OwnerUsage())
        usage[owner] = OwnerUsage(use.sessions + 1, use.gpus + fraction, use.cpus + 4, use.memory)

    for device in devices:
        if device.mig_enabled:
            for instance in device.mig_instances:
                if rng.random() < 0.97:
                    slices = int(instance.profile[0])
                    hold("mig", device.uuid, instance.uuid, slices / 7)
        elif device.index % 10 == 0:
            used = 0.0
            for share in (0.5, 0.25, 0.125):
                if rng.random() < 0.8:
                    hold("share", device.uuid, device.uuid, share)
                    used += share
        elif rng.random() < 0.98:
            hold("gpu", device.uuid, device.uuid, 1.0)
    return allocations, usage


def request(rng: random.Random) -> ResourceRequest:
    roll = rng.random()
    cpus, memory = rng.choice((None, 2.0, 8.0)), rng.choice((None, 16 * GIB, 64 * GIB))
    if roll < 0.45:
        return ResourceRequest(gpus=1, cpus=cpus, memory=memory)
    if roll < 0.60:
        return ResourceRequest(gpus=rng.choice((2, 4, 8)), cpus=cpus, memory=memory)
    if roll < 0.83:
        profile = rng.choice(("1g.10gb", "2g.20gb", "3g.40gb"))
        return ResourceRequest(gpu_profile=profile, cpus=cpus, memory=memory)
    if roll < 0.98:
        return ResourceRequest(gpu_share=rng.choice((0.1, 0.125, 0.25, 0.5)), cpus=cpus)
    return ResourceRequest(cpus=1.0)


def queue(size: int, rng: random.Random, shuffle: bool) -> list[PendingSession]:
    pending = []
    for n in range(size):
        roll = rng.random()
        depends_on: tuple[str, ...] = ()
        if roll < 0.02:
            depends_on = ("run1",)  # running: waits
        elif roll < 0.03:
            depends_on = ("done-ok",)
        elif roll < 0.035:
            depends_on = ("done-failed",)
        pending.append(
            PendingSession(
                id=f"p{n:06d}",
                owner=rng.choice(OWNERS),
                request=request(rng),
                created_at=1_000_000.0 + n * 0.01,
                attempts=rng.choice((0, 0, 0, 1, 2, 5)),
                depends_on=depends_on,
            )
        )
    if shuffle:  # the store hands them over oldest first; shuffled costs a real sort
        rng.shuffle(pending)
    return pending


POLICIES = {
    0: Policy(max_concurrent_sessions=40),
    1: Policy(max_gpus=16.0),
    2: Policy(max_cpus=64.0, max_memory=512 * GIB),
}


def policy_for(owner: str) -> Policy:
    return POLICIES.get(int(owner[4:]) % 10, Policy())


DEPENDENCIES = {
    "run1": (SessionStatus.RUNNING, None),
    "done-ok": (SessionStatus.TERMINATED, 0),
    "done-failed": (SessionStatus.TERMINATED, 1),
}
TOTALS = HostTotals(gpus=float(GPUS), cpus=256.0, memory=2048 * GIB)


def measure(size: int, strategy: str, runs: int, shuffle: bool) -> tuple[float, int, int]:
    rng = random.Random(size)
    devices = inventory()
    held, usage = running(devices, rng)
    pending = queue(size, rng, shuffle)
    times = []
    result = None
    for _ in range(runs):
        capacity = Capacity(devices, held)
        started = time.perf_counter()
        result = schedule(
            pending,
            capacity,
            usage,
            policy_for,
            DEPENDENCIES,
            strategy=strategy,
            totals=TOTALS,
        )
        times.append(time.perf_counter() - started)
    assert result is not None
    return statistics.median(times) * 1000, len(result.placed), len(result.waiting)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per cell (median)")
    parser.add_argument("--sizes", default="1000,10000,100000", help="pending queue sizes")
    parser.add_argument(
        "--shuffle", action="store_true", help="hand the queue over unordered (not oldest first)"
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{GPUS} GPUs ({MIG_GPUS} in MIG mode), {len(OWNERS)} owners, median of {args.runs}")
    header = f"{'strategy':>8} {'pending':>8} {'placed':>7} {'waiting':>8} {'ms/pass':>9}"
    print(header + f" {'ms per 1k':>10} {'ratio vs 1k':>12}")
    for strategy in ("fifo", "drf"):
        baseline = None
        for size in sizes:
            runs = args.runs if size <= 10_000 else max(1, args.runs // 2 + 1)
            ms, placed, waiting = measure(size, strategy, runs, args.shuffle)
            per_1k = ms / (size / 1000)
            if baseline is None:
                baseline = per_1k
            print(
                f"{strategy:>8} {size:>8} {placed:>7} {waiting:>8} {ms:>9.2f} "
                f"{per_1k:>10.3f} {per_1k / baseline:>12.2f}"
            )


if __name__ == "__main__":
    main()
