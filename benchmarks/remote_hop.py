"""What the remote hop costs a kernel start: POST /api/sessions → the kernel's kernel_info
reply over its websocket (as JupyterLab opens a notebook), through a `jupyter server` in
remote mode (the engine is a manager service over HTTP, `jupyter gpu-sessions manager`)
against the same `jupyter server` with the engine in its own process (embedded), in the
same run, interleaved; container kernels (`python3-container`), simulated GPUs. Prints the
medians, their difference in ms (the issue's target: under 100 ms) and their ratio.

    .venv/bin/python benchmarks/remote_hop.py [--rounds 10]

Needs Docker and the default kernel image (`jupyter gpu-sessions image build`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.remote_support import (  # noqa: E402
    RemoteLab,
    running_embedded_server,
    running_manager,
    running_remote_lab,
)


def one_start(server: RemoteLab, index: int) -> float:
    """Seconds from the session's POST to the kernel's kernel_info reply; then shut down."""
    started = time.monotonic()
    session = server.kernel_session("python3-container", f"hop-{index}.ipynb")
    reply = server.kernel_info(session["kernel"]["id"])
    elapsed = time.monotonic() - started
    assert reply["status"] == "ok", reply
    status, _ = server.api("DELETE", f"api/sessions/{session['id']}", timeout=60)
    assert status == 204, status
    return elapsed


def rpc_round_trip(service) -> float:
    """Seconds one engine RPC takes (RemoteEngine → service → answer), median of 50."""
    from jupyter_gpu_sessions.remote import RemoteEngine

    engine = RemoteEngine(url=service.api_url, token=service.token)

    async def measure() -> float:
        times = []
        for _ in range(50):
            started = time.perf_counter()
            await engine.call("whoami")
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    try:
        return asyncio.run(measure())
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jgs-hop-") as tmp:
        base = Path(tmp)
        with (
            running_manager(base / "service") as service,
            running_remote_lab(base / "remote", service) as remote,
            running_embedded_server(base / "embedded") as embedded,
        ):
            one_start(remote, -1), one_start(embedded, -1)  # warm-up: image cache, imports
            rpc = rpc_round_trip(service)
            times: dict[str, list[float]] = {"remote": [], "embedded": []}
            for index in range(args.rounds):
                # Interleaved, and which goes first alternates: both see the same load.
                order = [("remote", remote), ("embedded", embedded)]
                for name, server in order if index % 2 == 0 else reversed(order):
                    times[name].append(one_start(server, index))
    remote_median = statistics.median(times["remote"])
    embedded_median = statistics.median(times["embedded"])
    print(f"rounds: {args.rounds} (interleaved), start → kernel_info, median seconds")
    print(f"  remote mode (manager service over HTTP): {remote_median:.3f}")
    print(f"  embedded (engine in the server):         {embedded_median:.3f}")
    paired = statistics.median(
        r - e for r, e in zip(times["remote"], times["embedded"], strict=True)
    )
    print(f"  remote hop: {(remote_median - embedded_median) * 1000:+.0f} ms (target < 100 ms)")
    print(f"  median of the paired differences: {paired * 1000:+.0f} ms")
    print(f"  one engine RPC (whoami, median of 50): {rpc * 1000:.1f} ms")
    print(f"  ratio remote / embedded: {remote_median / embedded_median:.2f}")
    print(
        "  all remote:   " + ", ".join(f"{t:.3f}" for t in times["remote"]),
        "\n  all embedded: " + ", ".join(f"{t:.3f}" for t in times["embedded"]),
    )


if __name__ == "__main__":
    main()
