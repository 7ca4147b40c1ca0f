"""What the remote hop costs a kernel start: POST /api/sessions → the kernel's kernel_info
reply over its websocket (as JupyterLab opens a notebook), through a `jupyter server` in
remote mode (the engine is a manager service over HTTP, `jupyter gpu-sessions manager`)
against the same `jupyter server` with the engine in its own process (embedded), in the
same run, interleaved; container kernels (`python3-container`), simulated GPUs. Prints the
medians, their difference in ms (the issue's target: under 100 ms) and their ratio.

    .venv/bin/python benchmarks/remote_hop.py [--rounds 10] [--hub]

``--hub`` (as root) adds the whole JupyterHub path, in the same interleaved rounds: the
example deployment (tests/hub_support.py: the Hub, configurable-http-proxy, the manager as
a Hub-managed service on PostgreSQL, Hub OAuth) and a user's single-user server, the
session posted through the proxy as a browser would.

Needs Docker and the default kernel image (`jupyter gpu-sessions image build`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.remote_support import (  # noqa: E402
    RemoteLab,
    _request,
    running_embedded_server,
    running_manager,
    running_remote_lab,
    shell_request_over_websocket,
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


class HubUserServer:
    """A user's single-user server under the example JupyterHub, reached through the proxy
    with the user's Hub token (what ``one_start`` needs of a server)."""

    def __init__(self, hub, user: str) -> None:
        hub.start_server(user)
        self.url = hub.server_url(user).rstrip("/")
        self.token = hub.user_token(user)

    def api(self, method: str, path: str, body=None, **kwargs):
        return _request(f"{self.url}/{path}", self.token, method, body, kwargs.get("timeout", 30))

    def kernel_session(self, kernel_name: str, path: str) -> dict:
        body = {"path": path, "type": "notebook", "name": path, "kernel": {"name": kernel_name}}
        status, session = self.api("POST", "api/sessions", body, timeout=120)
        assert status == 201, (status, session)
        return session

    def kernel_info(self, kernel_id: str) -> dict:
        reply, _ = asyncio.run(
            shell_request_over_websocket(
                self.url, self.token, kernel_id, "kernel_info_request", {}, 120
            )
        )
        return reply


@contextlib.contextmanager
def running_hub(enabled: bool):
    if not enabled:
        yield None
        return
    import docker

    from tests.hub_support import run_hub

    hubs = run_hub(docker.from_env())
    hub = next(hubs)
    try:
        yield HubUserServer(hub, "jgs-ada")
    finally:
        next(hubs, None)


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
    parser.add_argument("--hub", action="store_true", help="also through a real JupyterHub")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jgs-hop-") as tmp:
        base = Path(tmp)
        with (
            running_manager(base / "service") as service,
            running_remote_lab(base / "remote", service) as remote,
            running_embedded_server(base / "embedded") as embedded,
            running_hub(args.hub) as hub,
        ):
            order = [("remote", remote), ("embedded", embedded)]
            if hub is not None:
                order.append(("hub", hub))
            for _, server in order:
                one_start(server, -1)  # warm-up: image cache, imports
            rpc = rpc_round_trip(service)
            times: dict[str, list[float]] = {name: [] for name, _ in order}
            for index in range(args.rounds):
                # Interleaved, and which goes first alternates: all see the same load.
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
    if "hub" in times:
        hub_median = statistics.median(times["hub"])
        print(f"  through JupyterHub (proxy, Hub OAuth, service on PostgreSQL): {hub_median:.3f}")
        print(
            f"  hub path: {(hub_median - embedded_median) * 1000:+.0f} ms vs embedded, "
            f"ratio {hub_median / embedded_median:.2f}"
        )
        print("  all hub:      " + ", ".join(f"{t:.3f}" for t in times["hub"]))
    print(
        "  all remote:   " + ", ".join(f"{t:.3f}" for t in times["remote"]),
        "\n  all embedded: " + ", ".join(f"{t:.3f}" for t in times["embedded"]),
    )


if __name__ == "__main__":
    main()
