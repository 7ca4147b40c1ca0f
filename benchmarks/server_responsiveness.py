"""Does the server keep answering while kernels start and uploads stream?

A real `jupyter server` with the extension and the real Docker engine. A client sends a
trivial authenticated request (`GET /api/status`) back to back and records its latency:

- idle;
- while four container kernels start at once (`POST /api/kernels`, until all four run);
- for reference, while four local ipykernels start (`--local-kernel`; each until it answers
  `kernel_info` on its websocket): the machine's own load of four kernels booting at once,
  which no change to the server removes;
- while a 1 GiB file streams into a vfolder (`PUT vfolders/bench/upload`).

It prints p50/p99 of each phase and the ratio of each busy p99 to the idle one (target:
within 1.5x). Phases are interleaved over several rounds so drift hits all alike.

    .venv/bin/python benchmarks/server_responsiveness.py [--rounds 3] [--upload-mib 1024]
        [--local-kernel python3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
import uuid

from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from api import (  # noqa: E402
    API,
    free_port,
    pct,
    server_dir,
    start_server,
    stop_server,
    wait_until_up,
)

KERNEL_UID = 1000
PROBE = "/api/status"
IDLE_SECONDS = 3.0
LOCAL_PHASE = "4 local kernels (ref.)"
CHUNK = 1024 * 1024


async def probe_while(api: API, busy) -> list[float]:
    """Latencies of back-to-back probes for as long as ``busy`` (a coroutine) runs."""
    stop = asyncio.Event()
    probes = asyncio.ensure_future(api.probe(PROBE, stop, clients=1))
    try:
        await busy
    finally:
        stop.set()
    return await probes


async def idle() -> None:
    await asyncio.sleep(IDLE_SECONDS)


async def four_kernels(api: API) -> None:
    ids = await asyncio.gather(
        *(api.json("/api/kernels", "POST", {"name": "python3-container"}, ok=201) for _ in range(4))
    )
    ids = {k["id"] for k in ids}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until the four sessions run
        page = await api.json("/gpu-sessions/api/sessions?status=RUNNING&limit=100")
        if ids <= {s["kernel_id"] for s in page["sessions"]}:
            break
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError("the four kernels did not all start within 120 s")
    await asyncio.gather(*(api.fetch(f"/api/kernels/{k}", "DELETE") for k in ids))


async def four_local_kernels(api: API, kernel: str) -> None:
    """The reference: four local ipykernels, each until it answers a kernel_info request on
    its websocket (their state in /api/kernels stays "starting" until a client talks)."""
    ids = await asyncio.gather(
        *(api.json("/api/kernels", "POST", {"name": kernel}, ok=201) for _ in range(4))
    )
    try:
        await asyncio.wait_for(asyncio.gather(*(kernel_info(api, k["id"]) for k in ids)), 120)
    finally:
        await asyncio.gather(*(api.fetch(f"/api/kernels/{k['id']}", "DELETE") for k in ids))


async def kernel_info(api: API, kernel_id: str) -> None:
    url = api.base.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
    ws = await websocket_connect(HTTPRequest(url, headers=api.headers))
    try:
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": "kernel_info_request", "session": msg_id}
        header.update(username="bench", version="5.3", date="")
        request = {"header": header, "parent_header": {}, "metadata": {}, "content": {}}
        await ws.write_message(json.dumps({**request, "channel": "shell"}))
        while True:
            message = await ws.read_message()
            if message is None:
                raise RuntimeError(f"kernel {kernel_id}: its websocket closed")
            reply = json.loads(message)
            if reply.get("parent_header", {}).get("msg_id") == msg_id:
                if reply["msg_type"] == "kernel_info_reply":
                    return
    finally:
        ws.close()


async def upload(api: API, mib: int) -> None:
    remaining = mib

    async def body(write):
        nonlocal remaining
        block = b"x" * CHUNK
        while remaining > 0:
            remaining -= 1
            await write(block)

    response = await api.http.fetch(
        HTTPRequest(
            api.base + "/gpu-sessions/api/vfolders/bench/upload?path=big.bin",
            method="PUT",
            headers={**api.headers, "Content-Length": str(mib * CHUNK)},
            body_producer=body,
            request_timeout=600,
        ),
        raise_error=False,
    )
    if response.code != 201:
        raise RuntimeError(f"the upload answered {response.code}: {response.body[:300]!r}")


async def run(args: argparse.Namespace, tmp: str) -> None:
    root = os.path.join(tmp, "root")
    os.makedirs(root, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(root, KERNEL_UID, KERNEL_UID)
    port, token = free_port(), secrets.token_hex(16)
    proc = start_server(
        tmp,
        port,
        token,
        env={"DOCKER_HOST": os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")},
    )
    api = API(port, token, clients=8)
    try:
        await wait_until_up(api, proc, tmp)
        await api.json("/gpu-sessions/api/vfolders", "POST", {"name": "bench"}, ok=201)
        phases: dict[str, list[float]] = {"idle": [], "4 kernels starting": []}
        if args.local_kernel:
            phases[LOCAL_PHASE] = []
        phases["upload"] = []
        for _ in range(args.rounds):
            phases["idle"] += await probe_while(api, idle())
            phases["4 kernels starting"] += await probe_while(api, four_kernels(api))
            if args.local_kernel:
                phases[LOCAL_PHASE] += await probe_while(
                    api, four_local_kernels(api, args.local_kernel)
                )
            phases["upload"] += await probe_while(api, upload(api, args.upload_mib))
        base = pct(phases["idle"], 99)
        print(f"GET {PROBE} latency, {args.rounds} interleaved rounds")
        print(f"{'phase':<22} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'p99/idle':>9}")
        for name, values in phases.items():
            p99 = pct(values, 99)
            print(
                f"{name:<22} {len(values):>6} {pct(values, 50):>8.2f} {p99:>8.2f} "
                f"{p99 / base:>9.2f}"
            )
    finally:
        api.close()
        stop_server(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upload-mib", type=int, default=1024)
    parser.add_argument(
        "--local-kernel",
        default="python3",
        help="kernelspec of the reference phase: four local ipykernels starting ('' skips it)",
    )
    args = parser.parse_args()
    with server_dir("jgs-responsive-") as tmp:
        asyncio.run(run(args, tmp))


if __name__ == "__main__":
    main()
