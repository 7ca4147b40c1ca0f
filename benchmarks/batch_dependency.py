"""From a batch session's end to its dependent's start, against a batch session's plain start.

A real Jupyter server with the extension on real Docker and the default image. Each round
creates a chain ``first → second`` through ``POST sessions`` (``second`` depends on
``first``; both run a Python one-liner) and reads both sessions' histories once they have
ended: the clock runs from ``first``'s end (its ``ended_at``, the TERMINATED record the
scheduling pass is run on) to ``second``'s placement (its PREPARING record) and to its
start (``started_at``: its container runs). The baseline, in the same run, is an
independent batch session: from its creation (``created_at``) to its start. Target: a
dependent starts under 1 s after its dependency ended.

    .venv/bin/python benchmarks/batch_dependency.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from api import free_port, server_dir, start_server, stop_server  # noqa: E402

TARGET = 1.0
ENDED = {"TERMINATED", "CANCELLED", "ERROR"}


class Client:
    def __init__(self, url: str, token: str) -> None:
        self.url = f"{url}/gpu-sessions/api/"
        self.token = token

    def call(self, method: str, path: str, body: object = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: {exc.code} {exc.read().decode()}") from None

    def wait_ended(self, ref: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            session = self.call("GET", f"sessions/{ref}")
            if session["status"] in ENDED:
                return session
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ref} still {session['status']} after {timeout:g}s")
            time.sleep(0.05)


def job(name: str, **fields) -> dict:
    return {"type": "batch", "name": name, "command": ["python3", "-c", "pass"], **fields}


def placed_at(session: dict) -> float:
    return next(h["at"] for h in session["history"] if h["status"] == "PREPARING")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    token = secrets.token_hex(16)
    port = free_port()
    with server_dir("jgs-bench-batch-") as tmp:
        docker_host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        proc = start_server(tmp, port, token, env={"DOCKER_HOST": docker_host})
        try:
            client = Client(f"http://127.0.0.1:{port}", token)
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.call("GET", "quota")
                    break
                except (urllib.error.URLError, ConnectionError):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the server did not start") from None
                    time.sleep(0.2)
            client.wait_ended(client.call("POST", "sessions", job("warm-up"))["id"])

            plain, placed, started = [], [], []
            for n in range(args.rounds):
                alone = client.call("POST", "sessions", job(f"alone-{n}"))
                alone = client.wait_ended(alone["id"])
                plain.append(alone["started_at"] - alone["created_at"])

                chain = client.call(
                    "POST",
                    "sessions",
                    {
                        "sessions": [
                            job(f"first-{n}"),
                            job(f"second-{n}", depends_on=[f"first-{n}"]),
                        ]
                    },
                )["sessions"]
                first = client.wait_ended(chain[0]["id"])
                second = client.wait_ended(chain[1]["id"])
                for session in (alone, first, second):
                    if session["status"] != "TERMINATED" or session["exit_code"] != 0:
                        raise RuntimeError(f"{session['name']} ended {session['status']}")
                placed.append(placed_at(second) - first["ended_at"])
                started.append(second["started_at"] - first["ended_at"])
        finally:
            stop_server(proc)

    p, q, s = (statistics.median(v) for v in (plain, placed, started))
    print(f"rounds: {args.rounds}, real Docker, default image; median seconds")
    print(f"{'independent batch: created → started':46}{p:8.3f}")
    print(f"{'dependency ended → dependent placed':46}{q:8.3f}")
    print(f"{'dependency ended → dependent started':46}{s:8.3f}")
    print(f"{'ratio started-after-dependency / plain':46}{s / p:8.2f}")
    print(
        f"{'target: dependent started under':46}{TARGET:8.3f}  {'met' if s < TARGET else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
