"""The session store: migrations, the status machine, allocations freed with the status."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from jupyter_gpu_sessions.core.errors import PolicyViolation
from jupyter_gpu_sessions.core.models import Allocation, ProcessRef, ResourceRequest, Session
from jupyter_gpu_sessions.core.status import IllegalTransition, SessionStatus
from jupyter_gpu_sessions.scheduler import PassDecision
from jupyter_gpu_sessions.store import SessionStore
from jupyter_gpu_sessions.store.db import write_transaction
from jupyter_gpu_sessions.store.tables import allocations, queue_state

S = SessionStatus


@pytest.fixture
def store(db_url):
    """A store on SQLite or on PostgreSQL (every test that takes it runs on both)."""
    store = SessionStore(db_url)
    yield store
    store.close()


def new_session(session_id: str, owner: str = "ada", gpus: int = 1) -> Session:
    return Session(
        id=session_id,
        owner=owner,
        image="img",
        request=ResourceRequest(gpus=gpus),
        runtime="docker",
        process=ProcessRef("host", os.getpid(), 0.0),
        kernel_id=f"k-{session_id}",
    )


def place(store: SessionStore, session_id: str, *uuids: str) -> None:
    store.schedule(
        lambda _: PassDecision(
            placed={session_id: [Allocation(session_id, u, u, "gpu", 1.0) for u in uuids]}
        )
    )


def test_the_schema_is_migrated_with_alembic_and_reopening_is_harmless(db_url, store_backend):
    SessionStore(db_url).close()
    store = SessionStore(db_url)
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("select version_num from alembic_version")).scalar() == "0004"
        if store_backend == "sqlite":
            assert conn.execute(sa.text("pragma journal_mode")).scalar() == "wal"
    store.close()


def test_processes_opening_a_new_store_at_once_migrate_it_one_after_the_other(db_url):
    opening = "import sys; from jupyter_gpu_sessions.store import SessionStore; " + (
        "SessionStore(sys.argv[1]).close()"
    )
    children = [
        subprocess.Popen([sys.executable, "-c", opening, db_url], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [child.communicate(timeout=120)[1][-2000:] for child in children]
    assert [child.returncode for child in children] == [0] * 4, errors


def test_history_is_append_only_with_repeats_and_the_end_frees_devices(store):
    store.add(new_session("a"))
    place(store, "a", "GPU-1")
    assert store.allocations() == [Allocation("a", "GPU-1", "GPU-1", "gpu", 1.0)]
    for status in (S.RUNNING, S.RESTARTING, S.RUNNING, S.TERMINATING):
        store.transition("a", status, f"to {status.value}")
    ended = store.transition("a", S.TERMINATED, "shut down", exit_code=0)
    assert [c.status for c in ended.history] == [
        S.PENDING,
        S.PREPARING,
        S.RUNNING,
        S.RESTARTING,
        S.RUNNING,
        S.TERMINATING,
        S.TERMINATED,
    ]
    assert ended.started_at is not None and ended.ended_at >= ended.started_at
    assert ended.exit_code == 0
    assert store.allocations() == []  # released in the same transaction
    assert ended.allocations == (Allocation("a", "GPU-1", "GPU-1", "gpu", 1.0),)  # remembered


def test_an_illegal_transition_raises_and_changes_nothing(store):
    store.add(new_session("a"))
    with pytest.raises(IllegalTransition, match="from PENDING to RUNNING"):
        store.transition("a", S.RUNNING, "too early")
    assert store.get("a").status == S.PENDING
    assert len(store.get("a").history) == 1


def test_a_transition_lost_to_another_process_is_not_an_error(store):
    store.add(new_session("a"))
    store.transition("a", S.CANCELLED, "shut down while queued")
    assert store.transition("a", S.CANCELLED, "queue-timeout", only_from=[S.PENDING]) is None
    assert store.get("a").reason == "shut down while queued"


def test_the_database_refuses_one_device_for_two_sessions(store):
    store.add(new_session("a"))
    store.add(new_session("b"))
    place(store, "a", "GPU-1")
    with pytest.raises(IntegrityError):
        place(store, "b", "GPU-1")
    assert store.get("b").status == S.PENDING  # the whole pass was rolled back
    with write_transaction(store.engine) as conn:  # shares of one GPU may coexist
        for sid in ("a", "b"):
            conn.execute(
                sa.insert(allocations).values(
                    session_id=sid,
                    gpu_uuid="GPU-2",
                    device_uuid="GPU-2",
                    kind="share",
                    fraction=0.5,
                )
            )


def test_write_transactions_never_interleave_across_connections(db_url):
    """What keeps two processes from handing out one GPU: while one write transaction reads
    and then writes, no other one runs (BEGIN IMMEDIATE on SQLite, an advisory lock on
    PostgreSQL). Three stores with engines of their own, as three processes have, each read
    a counter, wait, and write it back plus one: no increment may be lost."""
    stores = [SessionStore(db_url) for _ in range(3)]
    counter = sa.select(queue_state.c.seq).where(queue_state.c.id == 1)

    def bump(store: SessionStore) -> None:
        for _ in range(4):
            with write_transaction(store.engine) as conn:
                seq = conn.execute(counter).scalar()
                time.sleep(0.02)
                conn.execute(
                    sa.update(queue_state).where(queue_state.c.id == 1).values(seq=seq + 1)
                )

    try:
        with stores[0].engine.connect() as conn:
            before = conn.execute(counter).scalar()
        threads = [threading.Thread(target=bump, args=(s,)) for s in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        with stores[0].engine.connect() as conn:
            assert conn.execute(counter).scalar() == before + 12
    finally:
        for store in stores:
            store.close()


def test_admission_runs_inside_the_write_transaction(store):
    def at_most_one_pending(totals):
        if totals.pending >= 1:
            raise PolicyViolation("one queued session at most")

    store.add(new_session("a"), admit=at_most_one_pending)
    with pytest.raises(PolicyViolation):
        store.add(new_session("b"), admit=at_most_one_pending)
    store.add(new_session("c", owner="grace"), admit=at_most_one_pending)
    assert [s.id for s in store.list()] == ["a", "c"]
    usage = store.usage()
    assert usage["ada"].pending == 1 and usage["grace"].pending == 1


def test_the_change_marker_moves_with_every_status_change(store):
    before = store.change_marker()
    store.add(new_session("a"))
    middle = store.change_marker()
    store.transition("a", S.CANCELLED, "bye")
    assert before < middle < store.change_marker()


def test_graph_pages_markers_and_clearing_history_with_vacuum(store):
    """The reads that compare or filter stored JSON, and VACUUM (outside a transaction)."""
    store.add(new_session("a"))
    store.add(replace(new_session("b"), depends_on=("a",)))
    store.add(new_session("c", owner="grace"))
    nodes, edges = store.graph("b")
    assert sorted(n.id for n in nodes) == ["a", "b"] and edges == [("a", "b")]
    page, total = store.page(owner="ada", limit=1)
    assert [s.id for s in page] == ["b"] and total == 2
    marker = store.list_marker()
    store.transition("c", S.CANCELLED, "bye")
    assert store.list_marker() > marker
    assert store.clear_history(time.time() + 1) == 1
    store.vacuum()
    assert sorted(s.id for s in store.list()) == ["a", "b"]


def test_incremental_passes_keep_the_same_picture_as_full_reads(db_url, monkeypatch):
    """Two managers (two processes) share one store; after every pass each one's in-memory
    queue equals a full read of the store, and no device is ever out twice."""
    import random

    from jupyter_gpu_sessions.manager import GPUSessionManager
    from jupyter_gpu_sessions.scheduler import QueueCache

    reads = []
    load = QueueCache._load

    def spy(cache, data, devices):
        reads.append(data.full)
        return load(cache, data, devices)

    monkeypatch.setattr(QueueCache, "_load", spy)
    url = db_url
    spec = "3xA100-80GB,1xA100-80GB:mig=1g.10gb*4+3g.40gb*1"
    managers = [GPUSessionManager(db_url=url, simulated_gpus=spec) for _ in range(2)]
    store = managers[0].store
    rng = random.Random(7)
    requests = [
        ResourceRequest(gpus=1),
        ResourceRequest(gpus=2),
        ResourceRequest(gpu_share=0.5),
        ResourceRequest(gpu_profile="1g.10gb"),
        ResourceRequest(gpu_profile="3g.40gb"),
        ResourceRequest(),
    ]

    def picture(cache: QueueCache):
        return (
            sorted((q.id, q.attempts) for q in cache.queued.values()),
            sorted(cache.holding),
            sorted((a.session_id, a.device_uuid) for a in cache.capacity.allocations()),
        )

    def full_picture(manager: GPUSessionManager):
        fresh = QueueCache()
        devices = manager.inventory.devices()
        store.schedule(lambda data: (fresh._load(data, devices), PassDecision())[1])
        return picture(fresh)

    for step in range(120):
        manager = rng.choice(managers)
        action = rng.random()
        if action < 0.45:
            request = rng.choice(requests)
            session = Session(
                id=f"s{step:03d}",
                owner=rng.choice(["ada", "grace", "alan"]),
                image="img",
                request=request,
                runtime="docker",
                process=ProcessRef("host", os.getpid(), 0.0),
            )
            store.add(session)
        elif action < 0.75:
            holding = store.list(statuses=[S.PREPARING, S.RUNNING])
            if holding:
                victim = rng.choice(holding)
                if victim.status == S.PREPARING:
                    store.transition(victim.id, S.RUNNING, "ready")
                store.transition(victim.id, S.TERMINATING, "bye")
                store.transition(victim.id, S.TERMINATED, "bye")
        manager.schedule_pass()
        assert picture(manager._queue) == full_picture(manager), f"step {step}"
        exclusive = [a.device_uuid for a in store.allocations() if a.kind != "share"]
        assert len(exclusive) == len(set(exclusive))
    assert reads.count(False) > 40  # most passes really were incremental
    for manager in managers:
        manager.close()


def test_the_migrations_build_exactly_the_declared_tables(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from jupyter_gpu_sessions.store.tables import metadata

    store = SessionStore(db_url)
    try:
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        store.close()
    assert diff == []


def test_a_store_of_the_previous_release_upgrades_with_its_sessions(db_url):
    """A 0001 database (issues 2 and 3) with a live allocation opens at the newest schema
    with every session, its history and its devices as they were."""
    from alembic import command
    from alembic.config import Config

    from jupyter_gpu_sessions.store.db import MIGRATIONS, make_engine

    url = db_url
    engine = make_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.commit()
    # What the previous release wrote: a running session holding a GPU, and an ended one.
    with engine.begin() as conn:
        for sid, status in (("live", "RUNNING"), ("done", "TERMINATED")):
            conn.execute(
                sa.text(
                    "INSERT INTO sessions (id, name, owner, kind, image, runtime, request, "
                    "status, reason, devices, depends_on, scheduler, attempts, oom_killed, "
                    "process_host, process_pid, process_started, created_at) VALUES (:id, '', "
                    "'ada', 'interactive', 'img', 'docker', '{\"gpus\": 1}', :status, 'r', "
                    ":devices, '[]', '{}', 0, false, 'h', 1, 0, 1.0)"
                ),
                {
                    "id": sid,
                    "status": status,
                    "devices": '[{"gpu_uuid": "GPU-1", "device_uuid": "GPU-1", "kind": "gpu", '
                    '"fraction": 1.0}]',
                },
            )
            conn.execute(
                sa.text(
                    "INSERT INTO session_status_history (session_id, status, reason, at) "
                    "VALUES (:id, :status, 'r', 1.0)"
                ),
                {"id": sid, "status": status},
            )
        conn.exec_driver_sql(
            "INSERT INTO allocations (session_id, gpu_uuid, device_uuid, kind, fraction) "
            "VALUES ('live', 'GPU-1', 'GPU-1', 'gpu', 1.0)"
        )
    engine.dispose()

    store = SessionStore(url)
    try:
        live = store.get("live")
        assert live.status == S.RUNNING and [a.device_uuid for a in live.allocations] == ["GPU-1"]
        assert [h.status for h in live.history] == [S.RUNNING]
        assert store.allocations() == [Allocation("live", "GPU-1", "GPU-1", "gpu", 1.0)]
        assert {s.id for s in store.list()} == {"live", "done"}
        assert store.list_marker()[1] == 0 and store.log_tail("done") is None
    finally:
        store.close()


def test_a_store_at_the_newest_migration_opens_without_loading_alembic(tmp_path):
    """Every open but the first sees the schema is current with one query: a fresh process
    (papermill's, nbclient's) does not pay for importing Alembic."""
    url = f"sqlite:///{tmp_path}/current.sqlite"
    SessionStore(url).close()  # the first open migrates
    code = (
        "import sys\n"
        "from jupyter_gpu_sessions.store import SessionStore\n"
        "SessionStore(sys.argv[1]).list()\n"
        "print('alembic' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, url], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"


def test_a_store_at_an_older_migration_is_still_upgraded(tmp_path):
    from alembic import command
    from alembic.config import Config as AlembicConfig
    from sqlalchemy import create_engine, inspect, text

    from jupyter_gpu_sessions.store.db import MIGRATIONS, head_revision

    url = f"sqlite:///{tmp_path}/old.sqlite"
    engine = create_engine(url)
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.commit()
    assert "vfolders" not in inspect(engine).get_table_names()
    engine.dispose()
    store = SessionStore(url)
    try:
        assert store.list() == []
        with store.engine.connect() as conn:
            stored = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        assert stored == head_revision() == "0004"
        assert "vfolders" in inspect(store.engine).get_table_names()
    finally:
        store.close()


def test_a_graph_follows_every_edge_up_down_or_both(store):
    """a → b, a → c, b → d, c → d (a diamond), and x → c: every edge is followed, not just
    the first, and each direction stops where it should."""
    store.add(new_session("a"))
    store.add(new_session("x"))
    store.add(replace(new_session("b"), depends_on=("a",)))
    store.add(replace(new_session("c"), depends_on=("a", "x")))
    store.add(replace(new_session("d"), depends_on=("b", "c")))
    store.add(new_session("lonely"))

    def ids(direction, root):
        nodes, edges = store.graph(root, direction)
        return sorted(n.id for n in nodes), edges

    assert ids("up", "d") == (
        ["a", "b", "c", "d", "x"],
        [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("x", "c")],
    )
    assert ids("down", "a") == (
        ["a", "b", "c", "d"],
        [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")],
    )
    # Both ways from b: a above, d below — not c's other dependency x (a sibling's parent).
    assert ids("both", "b") == (["a", "b", "d"], [("a", "b"), ("b", "d")])
    assert ids("down", "d") == (["d"], [])
    assert ids("both", "lonely") == (["lonely"], [])
    with pytest.raises(ValueError):
        store.graph("a", "sideways")
