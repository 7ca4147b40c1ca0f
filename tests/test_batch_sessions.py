"""Batch sessions with dependencies, through the REST API of a real server, on real Docker:
pipelines run in dependency order, failures cancel their dependents, cycles and unknown
dependencies are refused, ends leave no container and no device held."""

from __future__ import annotations

import asyncio
import time

import pytest

from jupyter_gpu_sessions.core.status import TERMINAL_STATUSES
from jupyter_gpu_sessions.manager import GPUSessionManager
from jupyter_gpu_sessions.runtime.base import SESSION_LABEL

from .api_support import Api, server_fixtures

# A short grace after SIGTERM, so the test of a command that ignores it stays quick.
jp_server_config, _ = server_fixtures(GPUSessionManager={"batch_stop_timeout": 2.0})
ENDED = {s.value for s in TERMINAL_STATUSES}


@pytest.fixture
def api(jp_fetch, jp_serverapp, kernel_image) -> Api:
    return Api(jp_fetch)


@pytest.fixture
def manager(jp_serverapp) -> GPUSessionManager:
    return jp_serverapp.web_app.settings["gpu_sessions_engine"].manager


def job(name: str, code: str = "pass", **fields) -> dict:
    """A batch session running ``code`` in the default image."""
    return {"type": "batch", "name": name, "command": ["python3", "-c", code], **fields}


async def wait_for(api: Api, ref: str, statuses=ENDED, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, session = await api.get(f"sessions/{ref}")
        assert status == 200, session
        if session["status"] in statuses:
            return session
        if time.monotonic() > deadline:
            raise AssertionError(f"{ref} is still {session['status']}: {session['reason']}")
        await asyncio.sleep(0.05)


def containers_of(docker_client, *session_ids: str) -> list:
    return [
        c
        for c in docker_client.containers.list(
            all=True, filters={"label": SESSION_LABEL}, ignore_removed=True
        )
        if c.labels.get(SESSION_LABEL) in session_ids
    ]


async def test_a_pipeline_runs_in_dependency_order_and_a_failure_cancels_its_dependents(
    api, manager, docker_client
):
    pipeline = [
        job("A", "print('A made the data')"),
        job("B", "import time; time.sleep(0.3); print('B done')", depends_on=["A"]),
        job("C", "print('C done')", depends_on=["A"]),
        job("D", "print('D saw B and C')", depends_on=["B", "C"]),
        job("F", "import sys; print('F fails'); sys.exit(3)"),
        job("E", "print('never')", depends_on=["F"]),
        job("G", "print('never either')", depends_on=["E"]),
    ]
    status, body = await api.post("sessions", body={"sessions": pipeline})
    assert status == 201, body
    created = {s["name"]: s for s in body["sessions"]}
    assert list(created) == ["A", "B", "C", "D", "F", "E", "G"]
    assert created["D"]["depends_on"] == [created["B"]["id"], created["C"]["id"]]
    assert created["A"]["kind"] == "batch" and created["A"]["command"][0] == "python3"

    ended = {name: await wait_for(api, name) for name in ("D", "G", "A", "B", "C", "E", "F")}
    for name in "ABCD":
        assert ended[name]["status"] == "TERMINATED", ended[name]
        assert ended[name]["exit_code"] == 0 and ended[name]["reason"] == "command finished"
    # D started only after both B and C had succeeded; B and C only after A.
    assert ended["D"]["started_at"] >= max(ended["B"]["ended_at"], ended["C"]["ended_at"])
    assert min(ended["B"]["started_at"], ended["C"]["started_at"]) >= ended["A"]["ended_at"]
    assert ended["F"]["status"] == "TERMINATED" and ended["F"]["exit_code"] == 3
    assert ended["F"]["reason"] == "command exited with code 3"
    for name, cause in (("E", "F"), ("G", "E")):
        assert ended[name]["status"] == "CANCELLED", ended[name]
        assert ended[name]["reason"].startswith(
            f"dependency-failed: {cause} ({created[cause]['id'][:12]})"
        ), ended[name]["reason"]
        assert ended[name]["started_at"] is None
    assert "exited with code 3" in ended["E"]["reason"]

    # Logs are kept after the containers are gone; names work on every route.
    status, logs = await api.get("sessions/B/logs")
    assert status == 200 and not logs["live"] and "B done" in logs["logs"], logs
    assert "command finished" in logs["logs"]
    _, logs = await api.get("sessions/F/logs")
    assert "F fails" in logs["logs"]
    status, history = await api.get("sessions/D/history")
    assert status == 200 and [h["status"] for h in history["history"]] == [
        "PENDING",
        "PREPARING",
        "RUNNING",
        "TERMINATING",
        "TERMINATED",
    ]
    status, graph = await api.get("sessions/A/graph", params={"direction": "down"})
    assert status == 200
    assert sorted(n["name"] for n in graph["nodes"]) == ["A", "B", "C", "D"]
    assert len(graph["edges"]) == 4
    status, _ = await api.get("sessions/A", user="bob")
    assert status == 404  # bob has no session named A: alice's is not found for him
    assert not containers_of(docker_client, *(s["id"] for s in created.values()))


async def test_a_recursive_delete_ends_a_running_pipeline_and_leaves_no_container(
    api, docker_client
):
    long_a = job("A", "import time; print('A up', flush=True); time.sleep(120)")
    rest = [
        job("B", depends_on=["A"]),
        job("C", depends_on=["A"]),
        job("D", depends_on=["B", "C"]),
    ]
    status, body = await api.post("sessions", body={"sessions": [long_a, *rest]})
    assert status == 201, body
    ids = [s["id"] for s in body["sessions"]]
    await wait_for(api, "A", {"RUNNING"})
    status, logs = await api.get("sessions/A/logs")
    deadline = time.monotonic() + 10
    while "A up" not in logs["logs"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        status, logs = await api.get("sessions/A/logs")
    assert status == 200 and logs["live"] and "A up" in logs["logs"]
    assert len(containers_of(docker_client, ids[0])) == 1

    status, body = await api.delete("sessions/A")
    assert status == 409 and "recursive=true" in body["message"]
    started = time.monotonic()
    status, body = await api.delete("sessions/A", params={"recursive": "true"})
    assert status == 200, body
    assert [s["name"] for s in body["ended"]][-1] == "A"
    ended = {name: await wait_for(api, name) for name in "ABCD"}
    assert time.monotonic() - started < 10  # SIGTERM ended it: no kill after a grace
    assert ended["A"]["status"] == "TERMINATED"
    assert ended["A"]["reason"].startswith("deleted through the API")
    assert {ended[n]["status"] for n in "BCD"} == {"CANCELLED"}
    assert not containers_of(docker_client, *ids)


async def test_a_command_that_ignores_sigterm_is_killed_after_the_grace(
    api, manager, docker_client
):
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ignoring', flush=True); time.sleep(120)"
    )
    status, session = await api.post("sessions", body=job("stubborn", code))
    assert status == 201, session
    await wait_for(api, "stubborn", {"RUNNING"})
    deadline = time.monotonic() + 10
    while "ignoring" not in (await api.get("sessions/stubborn/logs"))[1]["logs"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    started = time.monotonic()
    status, body = await api.delete(f"sessions/{session['id']}")
    assert status == 200, body
    ended = await wait_for(api, "stubborn")
    took = time.monotonic() - started
    assert 1.5 <= took < 10, took  # batch_stop_timeout (2 s), then killed
    assert ended["status"] == "TERMINATED" and ended["exit_code"] == 137
    assert not containers_of(docker_client, session["id"])
    assert session["id"] not in manager._batches


async def test_cycles_and_unknown_dependencies_are_refused_and_nothing_is_created(api):
    cases = [
        (
            [job("a", depends_on=["b"]), job("b", depends_on=["c"]), job("c", depends_on=["a"])],
            ["a → b → c → a", "cycle"],
        ),
        ([job("solo", depends_on=["solo"])], ["solo depends on itself"]),
        ([job("x"), job("y", depends_on=["x", "nowhere"])], ["'nowhere'", "y depends on"]),
        ([job("z", depends_on=["0123456789abcdef0123456789abcdef"])], ["0123456789abcdef"]),
    ]
    for specs, words in cases:
        status, body = await api.post("sessions", body={"sessions": specs})
        assert status == 400, (specs, body)
        for word in words:
            assert word in body["message"], (word, body["message"])
    status, page = await api.get("sessions")
    assert status == 200 and page["total"] == 0


@pytest.mark.parametrize(
    ("spec", "status", "words"),
    [
        (job("bad name!"), 400, ["name 'bad name!'"]),
        ({"type": "batch", "command": ["true"]}, 400, ["needs a name"]),
        (job("e", command=[]), 400, ["list of strings"]),
        ({"type": "batch", "name": "e", "command": "   "}, 400, ["command is empty"]),
        (job("g", resources={"gpus": -1}), 400, ["gpus"]),
        (job("g", resources={"gpus": 1, "flops": 3}), 400, ["'flops'"]),
        (job("u", colour="blue"), 400, ["'colour'"]),
        (job("l", runtime="local"), 400, ["containers"]),
        (job("v", env={"A": 1}), 400, ["env A"]),
        (job("v", env={"1A": "x"}), 400, ["'1A'"]),
        (job("i", image="no-such-image:nowhere"), 422, ["not on this host"]),
        (job("t", type="interactive"), 400, ["kernels"]),
        (job("big", resources={"gpus": 64}), 422, ["GPU"]),
    ],
)
async def test_bad_batch_requests_are_refused_with_a_message(api, spec, status, words):
    if "command" in spec and spec["command"] == []:
        spec = {**spec, "command": []}
    answer, body = await api.post("sessions", body=spec)
    assert answer == status, body
    for word in words:
        assert word in body["message"], (word, body["message"])
    _, page = await api.get("sessions")
    assert page["total"] == 0


async def test_a_live_name_is_taken_and_names_find_the_newest_session(api):
    status, first = await api.post("sessions", body=job("once", "import time; time.sleep(60)"))
    assert status == 201
    status, body = await api.post("sessions", body=job("once"))
    assert status == 409 and "once" in body["message"] and body["reason"] == "name-taken"
    status, _ = await api.delete("sessions/once")
    assert status == 200
    await wait_for(api, first["id"])
    status, second = await api.post("sessions", body=job("once", "print('second')"))
    assert status == 201
    status, found = await api.get("sessions/once")
    assert found["id"] == second["id"]  # the newest of that name
    # A later session may depend on an earlier one by name or by id.
    status, third = await api.post("sessions", body=job("after", depends_on=["once", first["id"]]))
    assert status == 201 and third["depends_on"] == [second["id"], first["id"]]
    ended = await wait_for(api, "after")
    # its dependency `first` was deleted while running: TERMINATED with SIGTERM's code
    assert ended["status"] == "CANCELLED" and "dependency-failed: once" in ended["reason"]


async def test_gpu_batch_sessions_get_their_devices_and_free_them_at_the_end(api, manager):
    code = "import os; print('sees', os.environ['CUDA_VISIBLE_DEVICES'])"
    status, body = await api.post(
        "sessions",
        body={
            "sessions": [
                job("train", code, resources={"gpus": 2}),
                job("eval", code, resources={"gpus": 1}, depends_on=["train"]),
            ]
        },
    )
    assert status == 201, body
    ended = await wait_for(api, "eval")
    assert ended["status"] == "TERMINATED" and ended["exit_code"] == 0
    train = await wait_for(api, "train")
    devices = [a["device_uuid"] for a in train["allocations"]]
    assert len(devices) == 2
    _, logs = await api.get("sessions/train/logs")
    assert f"sees {','.join(devices)}" in logs["logs"]
    assert manager.store.allocations() == []
    _, gpus = await api.get("gpus")
    assert all(not g["holders"] for g in gpus["gpus"])


async def test_the_server_shutting_down_ends_its_batch_sessions(api, jp_serverapp, docker_client):
    status, body = await api.post(
        "sessions",
        body={
            "sessions": [
                job("long", "import time; time.sleep(120)"),
                job("next", depends_on=["long"]),
            ]
        },
    )
    assert status == 201
    ids = [s["id"] for s in body["sessions"]]
    await wait_for(api, "long", {"RUNNING"})
    engine = jp_serverapp.web_app.settings["gpu_sessions_engine"]
    await engine.shutdown()
    long, after = [await wait_for(api, i) for i in ids]
    assert long["status"] == "TERMINATED" and long["reason"].startswith("server-shutdown")
    assert after["status"] == "CANCELLED"
    assert not containers_of(docker_client, *ids)
    assert engine.manager.store.allocations() == []


async def test_a_batch_whose_server_died_is_ended_by_the_reconcile_pass(
    api, manager, docker_client
):
    status, session = await api.post("sessions", body=job("orphan", "import time; time.sleep(120)"))
    assert status == 201
    await wait_for(api, "orphan", {"RUNNING"})
    assert containers_of(docker_client, session["id"])
    # As if the process that runs it had died: its task gone, its row naming a dead pid.
    manager._batches[session["id"]].cancel()
    from sqlalchemy import update

    from jupyter_gpu_sessions.store.tables import sessions

    with manager.store.engine.begin() as conn:
        conn.execute(
            update(sessions).where(sessions.c.id == session["id"]).values(process_pid=2**22 + 1)
        )
    done = await manager.reconcile_async()
    assert any("owner-gone" in line for line in done), done
    ended = await wait_for(api, "orphan")
    assert ended["status"] == "ERROR" and ended["reason"].startswith("owner-gone")
    assert not containers_of(docker_client, session["id"])


async def test_deletes_at_every_step_of_a_start_leave_nothing_behind(api, manager, docker_client):
    """Ends racing the queue, the placement, the container's start and its run."""
    delays = [0.0, 0.01, 0.03, 0.08, 0.15, 0.3, 0.6]
    specs = [
        job(f"race-{i}", "import time; time.sleep(60)", resources={"gpus": 1})
        for i in range(len(delays))
    ]
    status, body = await api.post("sessions", body={"sessions": specs})
    assert status == 201, body
    ids = [s["id"] for s in body["sessions"]]

    async def end_after(session_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        answer, ended = await api.delete(f"sessions/{session_id}")
        assert answer == 200, ended

    await asyncio.gather(*(end_after(i, d) for i, d in zip(ids, delays, strict=True)))
    ended = [await wait_for(api, i) for i in ids]
    assert {e["status"] for e in ended} <= {"CANCELLED", "TERMINATED"}, ended
    assert not containers_of(docker_client, *ids)
    assert manager.store.allocations() == []
    assert not set(ids) & set(manager._batches)


async def test_two_requests_for_one_name_at_once_create_one_session(api):
    answers = await asyncio.gather(
        *(api.post("sessions", body=job("twin", "import time; time.sleep(30)")) for _ in range(2))
    )
    assert sorted(status for status, _ in answers) == [201, 409], answers
    status, _ = await api.delete("sessions/twin")
    assert status == 200
    await wait_for(api, "twin")


async def test_an_admin_finds_a_users_session_by_name_and_other_users_do_not(api):
    status, mine = await api.post("sessions", body=job("shared-name"))
    assert status == 201
    status, found = await api.get("sessions/shared-name", user="root")
    assert status == 200 and found["id"] == mine["id"]
    for path in ("", "/logs", "/history", "/graph"):
        status, body = await api.get(f"sessions/shared-name{path}", user="bob")
        assert status == 404 and "alice" not in body["message"], (path, body)
    status, body = await api.get("sessions/-not a name-")
    assert status == 404 and "32 hexadecimal digits" in body["message"]
    await wait_for(api, "shared-name")


async def test_oversized_commands_and_environments_are_refused(api):
    for spec, words in (
        (job("long", "x" * (70 * 1024)), ["too long"]),
        (job("many", env={f"V{i}": "x" for i in range(300)}), ["env"]),
        (job("nul", env={"A": "a\x00b"}), ["NUL"]),
        (job("deps", depends_on=[f"d{i}" for i in range(65)]), ["depends_on"]),
    ):
        status, body = await api.post("sessions", body=spec)
        assert status == 400, body
        for word in words:
            assert word in body["message"], (word, body["message"])
    status, body = await api.post("sessions", body={"sessions": [job("x"), job("x")]})
    assert status == 400 and "'x'" in body["message"]
    status, body = await api.post("sessions", body={"sessions": []})
    assert status == 400
    _, page = await api.get("sessions")
    assert page["total"] == 0


async def test_a_pipeline_passes_files_through_a_vfolder_mounted_as_asked(api, docker_client):
    status, body = await api.post("vfolders", body={"name": "data"})
    assert status == 201, body
    write = "open('/home/work/data/out.txt', 'w').write('from the first step')"
    read = (
        "print(open('/home/work/data/out.txt').read())\n"
        "try:\n    open('/home/work/data/more.txt', 'w')\n"
        "except OSError as exc:\n    print('read-only:', exc.errno)"
    )
    status, body = await api.post(
        "sessions",
        body={
            "sessions": [
                job("write", write, vfolders=["data"]),
                job("read", read, vfolders=["data:ro"], depends_on=["write"]),
            ]
        },
    )
    assert status == 201, body
    ended = await wait_for(api, "read")
    assert ended["status"] == "TERMINATED" and ended["exit_code"] == 0, ended
    _, logs = await api.get("sessions/read/logs")
    assert "from the first step" in logs["logs"] and "read-only: 30" in logs["logs"], logs
    status, body = await api.post("sessions", body=job("nope", vfolders=["missing"]))
    assert status == 404 and "missing" in body["message"]


async def test_more_gpu_batch_sessions_than_gpus_queue_and_all_run(api, manager):
    """Eight sessions of 2 GPUs each on 4 GPUs: two at a time, each placed by the pass the
    end of another runs; never more held than the host has."""
    specs = [
        job(f"sweep-{i}", "import time; time.sleep(0.2)", resources={"gpus": 2}) for i in range(8)
    ]
    status, body = await api.post("sessions", body={"sessions": specs})
    assert status == 201, body
    most = 0
    deadline = time.monotonic() + 60
    while True:
        most = max(most, len(manager.store.allocations()))
        _, page = await api.get("sessions", params={"status": "TERMINATED"})
        if page["total"] == 8:
            break
        assert time.monotonic() < deadline, page
        await asyncio.sleep(0.05)
    assert most <= 4
    ended = sorted(page["sessions"], key=lambda s: s["started_at"])
    assert all(s["exit_code"] == 0 for s in ended)
    # the third started only after one of the first two had ended
    assert ended[2]["started_at"] >= min(ended[0]["ended_at"], ended[1]["ended_at"])


async def test_a_batch_session_is_held_to_its_owners_policy_like_a_kernel(api):
    status, _ = await api.put(
        "policies/user:alice", user="root", body={"max_gpus": 1, "max_pending_sessions": 2}
    )
    assert status == 200
    status, body = await api.post("sessions", body=job("greedy", resources={"gpus": 2}))
    assert status == 403 and "This batch session asks for 2 GPUs" in body["message"], body
    status, body = await api.post("sessions", body={"sessions": [job("p1"), job("p2"), job("p3")]})
    assert status == 403 and "max_pending_sessions" in body["message"], body
    _, page = await api.get("sessions")
    assert page["total"] == 0
