"""Kernel start time: container kernel vs local ipykernel, interleaved in one run.

Measures the time from `start_kernel()` to the `kernel_info` reply (what a notebook waits
for), and the time of a restart, over N rounds that alternate container and local so both
see the same machine load. Prints medians and the container/local ratio.

    .venv/bin/python benchmarks/kernel_start.py [--rounds 10] [--kernel python3-container]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from jupyter_client.manager import AsyncKernelManager


async def one_round(kernel_name: str, cwd: str) -> tuple[float, float]:
    km = AsyncKernelManager(kernel_name=kernel_name)
    started = time.perf_counter()
    await km.start_kernel(cwd=cwd)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)  # sends kernel_info, waits for the reply
        start = time.perf_counter() - started
        restarted = time.perf_counter()
        await km.restart_kernel()
        await kc.wait_for_ready(timeout=120)
        restart = time.perf_counter() - restarted
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    return start, restart


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kernel", default="python3-container")
    parser.add_argument("--baseline", default="python3", help="the local ipykernel's kernelspec")
    args = parser.parse_args()

    cwd = tempfile.mkdtemp(prefix="jgs-bench-")
    if os.geteuid() == 0:
        os.chown(cwd, 1000, 1000)
    await one_round(args.kernel, cwd)  # warm-up: page cache, image layers, imports
    await one_round(args.baseline, cwd)
    results: dict[str, list[tuple[float, float]]] = {args.kernel: [], args.baseline: []}
    for _ in range(args.rounds):
        for name in (args.kernel, args.baseline):
            results[name].append(await one_round(name, cwd))

    def medians(name: str) -> tuple[float, float]:
        starts, restarts = zip(*results[name], strict=True)
        return statistics.median(starts), statistics.median(restarts)

    container, local = medians(args.kernel), medians(args.baseline)
    print(f"rounds: {args.rounds} (interleaved), median seconds")
    print(f"{'':28}{'start→kernel_info':>20}{'restart':>12}")
    print(f"{args.kernel + ' (container)':28}{container[0]:>20.3f}{container[1]:>12.3f}")
    print(f"{args.baseline + ' (local ipykernel)':28}{local[0]:>20.3f}{local[1]:>12.3f}")
    print(
        f"{'ratio container/local':28}{container[0] / local[0]:>20.2f}"
        f"{container[1] / local[1]:>12.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
