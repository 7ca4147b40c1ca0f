"""Chaos against a real server: random starts, deletes at every status, `docker kill`s and
kernel shutdowns on 2 simulated GPUs, watched through `docker events` and the store
(benchmarks/chaos.py, here with a 30 s budget and a fixed seed)."""

from __future__ import annotations

import json
import subprocess
import sys

from .support import REPO

SEED = 20261201
BUDGET = 30


def test_chaos_never_puts_a_gpu_in_two_containers_nor_holds_one_for_a_gone_kernel(kernel_image):
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "chaos.py"),
            "--budget",
            str(BUDGET),
            "--seed",
            str(SEED),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=BUDGET + 240,
    )
    out = run.stdout
    report = json.loads(out[out.index("{") :]) if "{" in out else {}
    print(out)  # the seed, operations and figures, shown with -s or on failure
    assert run.returncode == 0, f"{out}\n{run.stderr[-6000:]}"
    assert report["violations"] == []
    assert report["leftovers"] == {}
    assert report["http_5xx"] == 0
    assert sum(report["ops"].values()) >= 20
    assert report["longest_held_not_running"] <= report["reconcile_interval"]
