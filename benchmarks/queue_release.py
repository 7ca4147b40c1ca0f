"""From a release to the next queued kernel answering ``kernel_info``, against a plain start.

One simulated GPU. Kernel A holds it; kernel B (same kernelspec) waits in the queue. A is
shut down; the clock runs from the moment A's session ended (its TERMINATED record, which
frees the GPU in the same transaction) to B's ``kernel_info`` reply. The baseline, in the
same run, is a start → ``kernel_info`` of the same kernelspec with the GPU free. Needs
Docker and the default image (`jupyter gpu-sessions image build`).

    .venv/bin/python benchmarks/queue_release.py [--rounds 5] [--runtime docker|local]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.engine import current_engine

REPO = Path(__file__).resolve().parent.parent


async def ready(name: str, ksm, cwd: str):
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
    await km.start_kernel(cwd=cwd)
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=120)  # sends kernel_info and waits for the reply
    return km, kc


async def stop(km, kc) -> None:
    kc.stop_channels()
    await km.shutdown_kernel()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", default="docker", choices=("docker", "local"))
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="jgs-bench-")
    os.chmod(tmp, 0o755)
    if os.geteuid() == 0:
        os.chown(tmp, 1000, 1000)
    # The process's engine (which the provisioner of every kernel below uses), configured
    # as a deployer would.
    engine = current_engine(
        Config(
            GPUSessionManager={
                "db_url": f"sqlite:///{tmp}/sessions.sqlite",
                "simulated_gpus": "1xT4-16GB",
            }
        )
    )
    manager = engine.manager
    spec = json.loads((REPO / "provisioners" / "python3-gpu" / "kernel.json").read_text())
    config = {"gpus": 1, "cpus": 1, "memory": "1GiB", "runtime": args.runtime}
    spec["metadata"]["kernel_provisioner"]["config"] = config
    (Path(tmp) / "kernels" / "gpu").mkdir(parents=True)
    (Path(tmp) / "kernels" / "gpu" / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[f"{tmp}/kernels"])

    await stop(*await ready("gpu", ksm, tmp))  # warm-up
    plain, queued = [], []
    for _ in range(args.rounds):
        started = time.time()
        first = await ready("gpu", ksm, tmp)
        plain.append(time.time() - started)

        waiting = asyncio.create_task(ready("gpu", ksm, tmp))
        while not manager.store.list(statuses=[SessionStatus.PENDING]):
            await asyncio.sleep(0.01)
        holder = first[0].provisioner.session.id
        await stop(*first)
        second = await waiting
        answered = time.time()
        released = manager.store.get(holder).ended_at
        queued.append(answered - released)
        await stop(*second)

    p, q = statistics.median(plain), statistics.median(queued)
    print(f"rounds: {args.rounds}, runtime {args.runtime}, one simulated GPU; median seconds")
    print(f"{'start → kernel_info, GPU free':42}{p:8.3f}")
    print(f"{'release → queued kernel answers kernel_info':42}{q:8.3f}")
    print(f"{'ratio queued/plain':42}{q / p:8.2f}")
    manager.close()


if __name__ == "__main__":
    asyncio.run(main())
