"""The REST API over sessions, GPUs, quotas, policies and operations, on a real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
from tornado.websocket import websocket_connect

from jupyter_gpu_sessions.core.errors import PolicyViolation
from jupyter_gpu_sessions.core.models import ResourceRequest
from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.manager import GPUSessionManager, KernelLaunch
from jupyter_gpu_sessions.server.handlers import handlers

from .api_support import ADMIN, TOKENS, Api, server_fixtures, stored_session

jp_server_config, _ = server_fixtures()


@pytest.fixture
def api(jp_fetch, jp_serverapp) -> Api:
    return Api(jp_fetch)


@pytest.fixture
def manager(jp_serverapp) -> GPUSessionManager:
    return jp_serverapp.web_app.settings["gpu_sessions_engine"].manager


def _sample(pattern: str) -> str:
    return (
        pattern.replace("(restore|purge|clone)", "restore")
        .replace("(accept|decline)", "accept")
        .replace("([^/]+)", "0123456789abcdef0123456789abcdef")
    )


async def test_no_endpoint_answers_without_credentials(api, jp_fetch):
    """allow_unauthenticated_access=False, and every route refuses a request without a
    token (and with a wrong one) for every method: 401 and a JSON message (the events
    websocket, like jupyter_server's own, answers 403)."""
    answered = []
    for pattern, _ in handlers:
        path = _sample(pattern)
        expected = 403 if pattern == "events" else 401
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            for headers in ({}, {"Authorization": "token not-a-token"}):
                body = None if method in ("GET", "DELETE") else b"{}"
                response = await jp_fetch(
                    "gpu-sessions",
                    "api",
                    *path.split("/"),
                    method=method,
                    headers={"Authorization": "", **headers},
                    body=body,
                    raise_error=False,
                    allow_nonstandard_methods=True,
                )
                if response.code != expected:
                    answered.append((method, path, response.code))
                elif expected == 401:
                    assert "token" in json.loads(response.body)["message"]
                    assert response.headers["WWW-Authenticate"].startswith("token")
    assert not answered, answered


async def test_sessions_are_listed_paginated_and_filtered_per_owner(api, manager):
    mine = [stored_session(manager, "alice", SessionStatus.TERMINATED) for _ in range(5)]
    stored_session(manager, "alice", SessionStatus.CANCELLED)
    theirs = stored_session(manager, "bob", SessionStatus.TERMINATED, name="bob's secret")

    status, page = await api.get("sessions", params={"limit": 2, "status": "terminated"})
    assert status == 200
    assert page["total"] == 5 and len(page["sessions"]) == 2
    assert {s["owner"] for s in page["sessions"]} == {"alice"}
    # newest first; the next page continues where this one ended
    _, rest = await api.get("sessions", params={"limit": 10, "offset": 2, "status": "TERMINATED"})
    ids = [s["id"] for s in page["sessions"] + rest["sessions"]]
    assert sorted(ids) == sorted(s.id for s in mine) and len(set(ids)) == 5

    status, everything = await api.get("sessions", user=ADMIN, params={"owner": "bob"})
    assert status == 200 and [s["id"] for s in everything["sessions"]] == [theirs.id]

    # alice cannot see bob's session, nor list his sessions: "not found", nothing revealed
    for path in ("", "/logs", "/history", "/graph"):
        status, body = await api.get(f"sessions/{theirs.id}{path}")
        assert status == 404 and "bob" not in body["message"], (path, body)
    status, _ = await api.delete(f"sessions/{theirs.id}")
    assert status == 404
    status, body = await api.get("sessions", params={"owner": "bob"})
    assert status == 404
    assert manager.store.get(theirs.id).status == SessionStatus.TERMINATED


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "100000"},
        {"limit": "ten"},
        {"offset": "-1"},
        {"status": "SLEEPING"},
    ],
)
async def test_bad_list_parameters_are_refused_with_a_message(api, params):
    status, body = await api.get("sessions", params=params)
    assert status == 400 and body["message"] and body["reason"] == "invalid-request"


async def test_jupyterlabs_cache_buster_is_not_an_unknown_parameter(api):
    """JupyterLab's ServerConnection appends `?<milliseconds>` to every GET; a typo is still
    refused."""
    status, _ = await api.get("gpus", params={"1796183471675": ""})
    assert status == 200
    status, body = await api.get("gpus", params={"1796183471675": "x"})
    assert status == 400 and "1796183471675" in body["message"]


async def test_session_detail_history_and_graph(api, manager):
    first = stored_session(manager, "alice", SessionStatus.TERMINATED, name="prepare")
    second = stored_session(manager, "alice", SessionStatus.CANCELLED, depends_on=(first.id,))

    status, detail = await api.get(f"sessions/{first.id}")
    assert status == 200 and detail["name"] == "prepare"
    assert [h["status"] for h in detail["history"]] == [
        "PENDING",
        "PREPARING",
        "RUNNING",
        "TERMINATING",
        "TERMINATED",
    ]
    status, history = await api.get(f"sessions/{second.id}/history")
    assert status == 200 and history["history"][-1]["status"] == "CANCELLED"
    status, graph = await api.get(f"sessions/{second.id}/graph")
    assert status == 200
    assert {n["id"] for n in graph["nodes"]} == {first.id, second.id}
    assert graph["edges"] == [{"from": first.id, "to": second.id}]
    assert all(n["resources"]["gpus"] == 0 for n in graph["nodes"])
    status, up = await api.get(f"sessions/{first.id}/graph", params={"direction": "up"})
    assert status == 200 and [n["id"] for n in up["nodes"]] == [first.id] and up["edges"] == []
    status, down = await api.get(f"sessions/{first.id}/graph", params={"direction": "down"})
    assert status == 200 and {n["id"] for n in down["nodes"]} == {first.id, second.id}
    status, body = await api.get(f"sessions/{first.id}/graph", params={"direction": "sideways"})
    assert status == 400 and "use up (what the session depends on)" in body["message"]
    status, body = await api.get("sessions/not-an-id")
    assert status == 404


async def test_logs_of_a_session_that_never_ran_is_a_conflict_not_an_error(api, manager):
    cancelled = stored_session(manager, "alice", SessionStatus.CANCELLED)
    status, body = await api.get(f"sessions/{cancelled.id}/logs")
    assert status == 409 and "never ran" in body["message"]

    ended = stored_session(manager, "alice", SessionStatus.TERMINATED)
    manager.store.save_log_tail(ended.id, "line 1\nline 2\nline 3\n")
    status, body = await api.get(f"sessions/{ended.id}/logs", params={"tail": 2})
    assert status == 200 and body["logs"] == "line 2\nline 3\n" and body["live"] is False


async def test_deleting_a_session_with_dependents_needs_recursive(api, manager):
    first = stored_session(manager, "alice", SessionStatus.PENDING)
    then = stored_session(manager, "alice", SessionStatus.PENDING, depends_on=(first.id,))
    status, body = await api.delete(f"sessions/{first.id}")
    assert status == 409 and "recursive=true" in body["message"]
    assert manager.store.get(first.id).status in (SessionStatus.PENDING, SessionStatus.PREPARING)

    status, body = await api.delete(f"sessions/{first.id}", params={"recursive": "true"})
    assert status == 200
    assert {s["id"] for s in body["ended"]} == {first.id, then.id}
    for session_id in (first.id, then.id):
        ended = manager.store.get(session_id)
        assert ended.status == SessionStatus.CANCELLED and "alice" in ended.reason


async def test_gpus_show_holders_but_hide_other_users_session_names(api, manager):
    holder = stored_session(manager, "bob", SessionStatus.PENDING, name="bob-training", gpus=1)
    await manager.schedule_now()
    assert manager.store.get(holder.id).status == SessionStatus.PREPARING

    status, body = await api.get("gpus")
    assert status == 200 and len(body["gpus"]) == 4
    held = [g for g in body["gpus"] if g["holders"]]
    assert len(held) == 1
    assert held[0]["holders"][0]["owner"] is None
    assert "bob-training" not in json.dumps(body)

    _, as_admin = await api.get("gpus", user=ADMIN)
    held = [g for g in as_admin["gpus"] if g["holders"]]
    assert held[0]["holders"][0]["name"] == "bob-training"
    assert held[0]["holders"][0]["owner"] == "bob"


async def test_quota_shows_my_usage_against_my_policy(api, manager):
    status, _ = await api.put(
        "policies/group:ml", user=ADMIN, body={"max_gpus": 2, "max_vfolder_count": 3}
    )
    assert status == 200
    stored_session(manager, "alice", SessionStatus.RUNNING, gpus=1)
    status, quota = await api.get("quota")
    assert status == 200
    assert quota["user"] == "alice" and "ml" in quota["groups"] and quota["admin"] is False
    assert quota["policy"]["max_gpus"] == 2 and quota["policy"]["max_vfolder_count"] == 3
    assert quota["usage"]["sessions"] == 1 and quota["usage"]["gpus"] == 1
    assert quota["usage"]["vfolder_count"] == 0


async def test_policies_are_for_admins_and_apply_to_the_next_kernel_start(api, manager, tmp_path):
    status, body = await api.put("policies/user:alice", body={"max_gpus": 0})
    assert status == 403 and body["reason"] == "forbidden"
    status, _ = await api.get("policies", user="alice")
    assert status == 403

    launch = KernelLaunch(
        kernel_id="k1",
        owner="alice",
        image="ignored",
        argv=["python3"],
        env={},
        explicit_env={},
        cwd=str(tmp_path),
        request=ResourceRequest(gpus=1),
        runtime="local",
        connection_file="",
        connection_info={},
        launch_timeout=5,
    )
    session = await manager.submit(launch)  # allowed: no policy yet
    await manager.cancel(session.id)

    status, body = await api.put("policies/user:alice", user=ADMIN, body={"max_gpus": 0})
    assert status == 200 and body["limits"]["max_gpus"] == 0
    with pytest.raises(PolicyViolation, match="max_gpus"):
        await manager.submit(launch)

    status, listing = await api.get("policies", user=ADMIN)
    assert {"scope": "user:alice", "source": "api"}.items() <= listing["policies"][0].items()
    status, _ = await api.delete("policies/user:alice", user=ADMIN)
    assert status == 204
    session = await manager.submit(launch)
    await manager.cancel(session.id)
    status, _ = await api.delete("policies/user:alice", user=ADMIN)
    assert status == 404


@pytest.mark.parametrize(
    "scope, body",
    [
        ("user:alice", {"max_gpus": "lots"}),
        ("user:alice", {"max_memory": "10XB"}),
        ("user:alice", {"max_memory": -1}),
        ("user:alice", {"max_wings": 2}),
        ("root", {"max_gpus": 1}),
        ("user:", {"max_gpus": 1}),
    ],
)
async def test_bad_policies_are_refused_and_nothing_changes(api, manager, scope, body):
    status, answer = await api.put(f"policies/{scope}", user=ADMIN, body=body)
    assert status == 400 and answer["message"], answer
    assert manager.admin.policies() == {}


async def test_scheduler_health_and_trigger(api, manager):
    status, health = await api.get("scheduler/health")
    assert status == 200
    mine = [m for m in health["managers"] if m["id"] == health["this_manager"]]
    assert mine, health
    status, _ = await api.post("scheduler/trigger")
    assert status == 403
    status, result = await api.post("scheduler/trigger", user=ADMIN)
    assert status == 200 and result["duration"] is not None
    _, health = await api.get("scheduler/health")
    mine = [m for m in health["managers"] if m["id"] == health["this_manager"]][0]
    assert mine["schedule"] <= time.time() and mine["schedule_duration"] >= 0


async def test_clear_history_deletes_only_old_ended_sessions(api, manager):
    old = stored_session(manager, "alice", SessionStatus.TERMINATED)
    live = stored_session(manager, "alice", SessionStatus.RUNNING)
    with manager.store.engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE sessions SET ended_at = ? WHERE id = ?", (time.time() - 40 * 86400, old.id)
        )
    recent = stored_session(manager, "bob", SessionStatus.TERMINATED)

    status, _ = await api.post("admin/clear-history", body={"retention": "30d"})
    assert status == 403
    for bad in ({"retention": "30 parsecs"}, {"retention": -5}, {}, {"retention": "1d", "x": 1}):
        status, body = await api.post("admin/clear-history", user=ADMIN, body=bad)
        assert status == 400 and body["message"], bad
    status, body = await api.post(
        "admin/clear-history", user=ADMIN, body={"retention": "30d", "vacuum": True}
    )
    assert status == 200 and body["deleted"] == 1 and body["vacuumed"] is True
    remaining = {s.id for s in manager.store.list()}
    assert old.id not in remaining and {live.id, recent.id} <= remaining


def test_clear_history_command_line(tmp_path, session_store):
    url = f"sqlite:///{tmp_path}/cli.sqlite"
    manager = GPUSessionManager(db_url=url)
    try:
        old = stored_session(manager, "alice", SessionStatus.TERMINATED)
        with manager.store.engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE sessions SET ended_at = ? WHERE id = ?", (time.time() - 400 * 86400, old.id)
            )
        keep = stored_session(manager, "alice", SessionStatus.TERMINATED)
    finally:
        manager.close()
    command = [sys.executable, "-m", "jupyter_gpu_sessions.cli", "clear-history"]
    env = {"JUPYTER_GPU_SESSIONS_DB_URL": url, "PATH": "/usr/bin:/bin"}
    bad = subprocess.run([*command, "--retention", "1 fortnight"], env=env, capture_output=True)
    assert bad.returncode != 0 and b"not a duration" in bad.stderr
    done = subprocess.run(
        [*command, "--retention", "1yr", "--vacuum"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "1 ended session" in done.stdout
    manager = GPUSessionManager(db_url=url)
    try:
        assert [s.id for s in manager.store.list()] == [keep.id]
    finally:
        manager.close()


async def test_events_stream_my_status_changes_and_gpu_ticks_only(
    jp_serverapp, jp_fetch, jp_http_port, jp_base_url, manager
):
    url = f"ws://127.0.0.1:{jp_http_port}{jp_base_url}gpu-sessions/api/events"
    upgrade = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    for auth in ("", "token nobody"):
        refused = await jp_fetch(
            "gpu-sessions",
            "api",
            "events",
            headers={"Authorization": auth, **upgrade},
            raise_error=False,
        )
        assert refused.code == 403

    from tornado.httpclient import HTTPRequest

    request = HTTPRequest(url, headers={"Authorization": f"token {TOKENS['alice']}"})
    ws = await websocket_connect(request)
    try:
        hello = json.loads(await ws.read_message())
        assert hello == {"type": "hello", "user": "alice", "admin": False}
        stored_session(manager, "bob", SessionStatus.CANCELLED)
        mine = stored_session(manager, "alice", SessionStatus.CANCELLED)
        seen = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(
            e.get("type") == "status" and e["status"] == "CANCELLED" for e in seen
        ):
            message = await asyncio.wait_for(ws.read_message(), 15)
            seen.append(json.loads(message))
        statuses = [e for e in seen if e["type"] == "status"]
        assert [e["status"] for e in statuses] == ["PENDING", "CANCELLED"]
        assert {e["session_id"] for e in statuses} == {mine.id}
        events = jp_serverapp.web_app.settings["gpu_sessions_events"]
        await events.tick()
        while (event := json.loads(await asyncio.wait_for(ws.read_message(), 10)))[
            "type"
        ] != "gpus":
            assert event["owner"] == "alice"
        assert len(event["gpus"]) == 4 and "utilization" in event["gpus"][0]
    finally:
        ws.close()


async def test_the_sessions_list_is_never_stale(api, manager):
    """Pages are reused only while nothing listed changed, in any process."""
    session = stored_session(manager, "alice", SessionStatus.RUNNING)
    _, first = await api.get("sessions")
    assert [s["status"] for s in first["sessions"]] == ["RUNNING"]
    assert (await api.get("sessions"))[1] == first

    manager.store.transition(session.id, SessionStatus.TERMINATING, "test")
    _, second = await api.get("sessions")
    assert [s["status"] for s in second["sessions"]] == ["TERMINATING"]

    manager.store.transition(session.id, SessionStatus.TERMINATED, "test")
    with manager.store.engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE sessions SET ended_at = ? WHERE id = ?", (time.time() - 86400, session.id)
        )
    manager.store.clear_history(time.time() - 3600)
    _, third = await api.get("sessions")
    assert third["sessions"] == [] and third["total"] == 0


async def test_another_process_changing_a_session_shows_within_a_second(api, manager):
    from jupyter_gpu_sessions.store import SessionStore

    session = stored_session(manager, "alice", SessionStatus.RUNNING)
    _, first = await api.get("sessions")
    assert [s["status"] for s in first["sessions"]] == ["RUNNING"]
    other = SessionStore(manager.db_url)  # as nbclient in another process would write
    try:
        other.transition(session.id, SessionStatus.TERMINATING, "from another process")
    finally:
        other.close()
    await asyncio.sleep(1.1)
    _, later = await api.get("sessions")
    assert [s["status"] for s in later["sessions"]] == ["TERMINATING"]
