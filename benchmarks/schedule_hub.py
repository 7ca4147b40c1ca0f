"""A lab's scheduling pass on PostgreSQL against the same pass on SQLite, in the same run.

The JupyterHub shape of issue 12: one host of 16 GPUs shared by 30 users, each with 4
kernels pending (120 queued) under a per-user cap of 2 concurrent sessions, DRF across
users, 8 kernels already running. Each store gets the same rows; the table shows the
median ms of a whole pass (one write transaction: queue, allocations, usage, placements)
for the first pass, a pass with nothing changed, and a pass after one running kernel
ended, and the PostgreSQL/SQLite ratio of each.

    .venv/bin/python benchmarks/schedule_hub.py --postgres URL [--runs 5]

Without ``--postgres`` (or $JGS_TEST_POSTGRES_URL) a throwaway cluster is started with
``scripts/lib.sh``'s ``start_test_postgres`` and removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from sqlalchemy import insert, text

sys.path.insert(0, os.path.dirname(__file__))

from scheduler_store import FixedInventory, row  # noqa: E402 - the sibling benchmark's rows

from jupyter_gpu_sessions.core.models import GPUDevice, ResourceRequest  # noqa: E402
from jupyter_gpu_sessions.core.policy import Policy  # noqa: E402
from jupyter_gpu_sessions.core.status import SessionStatus  # noqa: E402
from jupyter_gpu_sessions.manager import GPUSessionManager  # noqa: E402
from jupyter_gpu_sessions.store.db import write_transaction  # noqa: E402
from jupyter_gpu_sessions.store.tables import allocations, sessions  # noqa: E402

GIB = 1024**3
USERS = [f"user{n:02d}" for n in range(30)]
PENDING_EACH = 4
GPUS = 16
LIB = os.path.join(os.path.dirname(__file__), "..", "scripts", "lib.sh")


def devices() -> list[GPUDevice]:
    return [
        GPUDevice(i, f"GPU-{i:02d}", "A100-80GB", 80 * GIB, i, None, True, ()) for i in range(GPUS)
    ]


def fill(manager: GPUSessionManager) -> None:
    rows, alloc_rows = [], []
    # 8 running kernels, one GPU each, of the first 8 users.
    for n in range(8):
        sid = f"run{n:02d}"
        rows.append(row(sid, USERS[n], ResourceRequest(gpus=1), "RUNNING", 1.0))
        alloc_rows.append(
            {
                "session_id": sid,
                "gpu_uuid": f"GPU-{n:02d}",
                "device_uuid": f"GPU-{n:02d}",
                "kind": "gpu",
                "fraction": 1.0,
            }
        )
    created = 2.0
    for k in range(PENDING_EACH):
        for user in USERS:
            created += 0.001
            gpus = 1 + (k % 2)
            rows.append(row(f"{user}-p{k}", user, ResourceRequest(gpus=gpus), "PENDING", created))
    with write_transaction(manager.store.engine) as conn:
        conn.execute(insert(sessions), rows)
        conn.execute(insert(allocations), alloc_rows)
    manager._inventory = FixedInventory(devices())
    cap = Policy(max_concurrent_sessions=2)
    manager.policy_for = lambda owner: cap
    manager.scheduler_strategy = "drf"


def measure(url: str, runs: int) -> dict[str, float]:
    manager = GPUSessionManager(db_url=url)
    try:
        fill(manager)
        first = []
        started = time.perf_counter()
        manager.schedule_pass()
        first.append(time.perf_counter() - started)
        again = []
        for _ in range(runs):
            started = time.perf_counter()
            manager.schedule_pass()
            again.append(time.perf_counter() - started)
        release = []
        placed = [s for s in manager.store.live() if s.status == SessionStatus.PREPARING]
        for session in placed[:runs]:
            manager.store.transition(session.id, SessionStatus.TERMINATING, "bench")
            manager.store.transition(session.id, SessionStatus.TERMINATED, "bench")
            started = time.perf_counter()
            manager.schedule_pass()
            release.append(time.perf_counter() - started)
        return {
            "first": statistics.median(first) * 1000,
            "again": statistics.median(again) * 1000,
            "release": statistics.median(release) * 1000 if release else float("nan"),
            "placed": float(len(placed)),
        }
    finally:
        manager.close()


def throwaway_postgres(folder: str) -> str:
    out = subprocess.run(
        ["bash", "-c", f'source "{LIB}"; start_test_postgres "$1"', "bash", folder],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def empty_database(url: str) -> None:
    """A fresh schema per run, so both stores start from the same rows."""
    from sqlalchemy import create_engine

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=os.environ.get("JGS_TEST_POSTGRES_URL", ""))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    cluster = None
    url = args.postgres
    if not url:
        cluster = tempfile.mkdtemp(prefix="jgs-bench-pg.")
        url = throwaway_postgres(cluster)
    try:
        empty_database(url)
        with tempfile.TemporaryDirectory() as tmp:
            lite = measure(f"sqlite:///{tmp}/bench.sqlite", args.runs)
        pg = measure(url, args.runs)
    finally:
        if cluster:
            subprocess.run(
                ["bash", "-c", f'source "{LIB}"; stop_test_postgres "$1"', "bash", cluster],
                check=False,
            )
    print(
        f"{len(USERS)} users x {PENDING_EACH} pending kernels, {GPUS} GPUs, per-user cap 2, "
        f"DRF; {lite['placed']:.0f} placed by the first pass"
    )
    print(f"{'pass':>8} {'SQLite ms':>10} {'PostgreSQL ms':>14} {'pg/sqlite':>10}")
    for key in ("first", "again", "release"):
        print(f"{key:>8} {lite[key]:>10.1f} {pg[key]:>14.1f} {pg[key] / lite[key]:>10.2f}")


if __name__ == "__main__":
    main()
