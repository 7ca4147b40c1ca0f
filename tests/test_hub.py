"""The manager service under a real JupyterHub: identity, groups and admins from the Hub,
isolation of users' servers, kernel uids, and the service surviving ``kill -9``.

Everything runs for real (tests/hub_support.py): the example deployment, its proxy, a
PostgreSQL store, OS users, their single-user servers and Docker.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import requests
import sqlalchemy as sa
import websocket
from traitlets import TraitError

from jupyter_gpu_sessions.core.errors import InvalidRequest
from jupyter_gpu_sessions.core.models import Allocation, ProcessRef, ResourceRequest, Session
from jupyter_gpu_sessions.core.status import SessionStatus as S
from jupyter_gpu_sessions.manager import GPUSessionManager
from jupyter_gpu_sessions.scheduler import PassDecision
from jupyter_gpu_sessions.store import SessionStore

from .hub_support import (
    ADMIN,
    SERVICE,
    Hub,
    ensure_os_user,
    execute,
    hub_fixture,  # noqa: F401 - the `hub` fixture
    proc_environ,
    proc_status,
    rpc_result,
    start_kernel,
    until,
)

ADA, BOB = "jgs-ada", "jgs-bob"


def sessions_of(hub: Hub, token: str, **params: str) -> list[dict]:
    reply = hub.call(token, "GET", "sessions", params=params)
    assert reply.status_code == 200, reply.text
    return reply.json()["sessions"]


def batch(hub: Hub, user: str, name: str, command: str) -> dict:
    reply = hub.call(
        hub.user_token(user), "POST", "sessions", json={"name": name, "command": command}
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


def ended(hub: Hub, user: str, session_id: str, timeout: float = 120) -> dict:
    token = hub.user_token(user)

    def done() -> dict | None:
        session = hub.call(token, "GET", f"sessions/{session_id}").json()
        return session if session["status"] in ("TERMINATED", "ERROR", "CANCELLED") else None

    return until(done, timeout, f"session {session_id[:12]} to end")


def logs_of(hub: Hub, user: str, session_id: str) -> str:
    reply = hub.call(hub.user_token(user), "GET", f"sessions/{session_id}/logs")
    assert reply.status_code == 200, reply.text
    return reply.json()["logs"]


# -- who calls ------------------------------------------------------------------------------
def test_a_user_logs_in_through_the_hub_login_page_and_reaches_the_service(hub):
    wrong = hub.login(ADA, password="not-the-password")
    assert "jupyterhub-hub-login" not in wrong.cookies

    browser = hub.login(ADA)
    assert browser.login_reply.status_code == 302, browser.login_reply.text
    assert "jupyterhub-hub-login" in browser.cookies

    # The API never redirects: a browser without the service's cookie is told to log in.
    assert browser.get(hub.api_url("sessions", direct=False), timeout=30).status_code == 401
    # Through the service's login: the Hub's OAuth, the service's callback and its cookie.
    page = hub.browse_service(browser, "gpu-sessions/api/sessions")
    assert page.status_code == 200, page.text
    assert page.json()["sessions"] == [] or {s["owner"] for s in page.json()["sessions"]} == {ADA}
    # A write with the service's cookie but no XSRF token (another site's form) is refused.
    forged = browser.post(
        hub.api_url("sessions", direct=False), json={"name": "x", "command": "true"}, timeout=30
    )
    assert forged.status_code == 403, forged.text
    me = browser.get(f"{hub.url}{hub.service_prefix}api/me", timeout=30)
    assert me.status_code == 200, me.text
    assert me.json()["identity"]["username"] == ADA


def test_a_browser_without_a_hub_login_is_sent_to_the_hub_login_page(hub):
    stranger = requests.Session()
    page = stranger.get(f"{hub.url}{hub.service_prefix}login", timeout=30)
    assert page.url.startswith(f"{hub.url}/hub/login"), page.url
    assert 'name="_xsrf"' in page.text


def test_a_users_token_acts_as_that_user_with_hub_groups_and_admin(hub):
    ada = rpc_result(hub.rpc(hub.user_token(ADA), "whoami"))
    assert ada["username"] == ADA
    assert "ml" in ada["groups"]  # a Hub group (load_groups in the example)
    assert ada["is_admin"] is False
    bob = rpc_result(hub.rpc(hub.user_token(BOB), "whoami"))
    assert bob["username"] == BOB and "ml" not in bob["groups"]
    cy = rpc_result(hub.rpc(hub.user_token(ADMIN), "whoami"))
    assert cy["username"] == ADMIN and cy["is_admin"] is True  # a Hub admin


def test_access_without_the_service_scope_is_refused(hub):
    # A real Hub token of ada's, without access:services!service=gpu-sessions.
    narrow = hub.token(ADA, scopes=["read:users:name!user"])
    reply = hub.call(narrow, "GET", "sessions")
    assert reply.status_code == 403, reply.text
    assert f"access:services!service={SERVICE}" in reply.json()["message"]
    assert hub.rpc(narrow, "whoami").status_code == 403
    # Nobody, and a token the Hub does not know: not authenticated.
    assert hub.call(None, "GET", "sessions").status_code == 401
    assert hub.call("not-a-hub-token", "GET", "sessions").status_code == 401
    # Another service's token acts for no user.
    assert hub.call(hub.admin_token, "GET", "sessions").status_code == 403
    # The websocket says the same before its upgrade.
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        hub.events(narrow)
    assert refused.value.status_code == 403


# -- what each user sees --------------------------------------------------------------------
def test_an_admin_sees_both_users_sessions_and_a_user_only_their_own(hub):
    ada_events, bob_events, cy_events = (hub.events(hub.user_token(u)) for u in (ADA, BOB, ADMIN))
    try:
        for ws, user in ((ada_events, ADA), (bob_events, BOB), (cy_events, ADMIN)):
            hello = json.loads(ws.recv())
            assert hello["type"] == "hello" and hello["user"] == user
            assert hello["admin"] is (user == ADMIN)

        first = batch(hub, ADA, "ada-job", "true")
        second = batch(hub, BOB, "bob-job", "true")

        ada_ids = {s["id"] for s in sessions_of(hub, hub.user_token(ADA))}
        bob_ids = {s["id"] for s in sessions_of(hub, hub.user_token(BOB))}
        everyone = {s["id"] for s in sessions_of(hub, hub.user_token(ADMIN))}
        assert first["id"] in ada_ids and second["id"] not in ada_ids
        assert second["id"] in bob_ids and first["id"] not in bob_ids
        assert {first["id"], second["id"]} <= everyone
        # Another user's session is not found; the admin's view holds it.
        assert hub.call(hub.user_token(BOB), "GET", f"sessions/{first['id']}").status_code == 404
        assert hub.call(hub.user_token(BOB), "DELETE", f"sessions/{first['id']}").status_code == 404
        assert (
            hub.call(hub.user_token(BOB), "GET", "sessions", params={"owner": ADA}).status_code
            == 404
        )
        assert hub.call(hub.user_token(ADMIN), "GET", f"sessions/{first['id']}").status_code == 200
        # The admin in a browser, logged in through the Hub's page and OAuth, sees both.
        admin_browser = hub.login(ADMIN)
        assert admin_browser.login_reply.status_code == 302
        page = hub.browse_service(admin_browser, "gpu-sessions/api/sessions")
        assert {first["id"], second["id"]} <= {s["id"] for s in page.json()["sessions"]}

        def seen_until(ws, wanted: set[str]) -> set[str]:
            """Session ids of the status events ``ws`` gets, until all of ``wanted``."""
            ids: set[str] = set()
            while not wanted <= ids:
                event = json.loads(ws.recv())
                if event.get("type") == "status":
                    ids.add(event["session_id"])
            return ids

        # Each user's stream: their own sessions' events, none of the other's (the other's
        # came first, so it would have been sent before the user's own); the admin's: all.
        third = batch(hub, ADA, "ada-job-2", "true")
        assert first["id"] not in seen_until(bob_events, {second["id"]})
        assert second["id"] not in seen_until(ada_events, {first["id"], third["id"]})
        assert seen_until(cy_events, {first["id"], second["id"], third["id"]})
    finally:
        for ws in (ada_events, bob_events, cy_events):
            ws.close()


def test_a_user_cannot_see_read_or_mount_another_users_vfolder(hub):
    ada, bob = hub.user_token(ADA), hub.user_token(BOB)
    reply = hub.call(ada, "POST", "vfolders", json={"name": "ada-private", "quota": "16MiB"})
    assert reply.status_code == 201, reply.text
    try:
        upload = hub.call(
            ada, "PUT", "vfolders/ada-private/upload", params={"path": "s.txt"}, data=b"secret"
        )
        assert upload.status_code in (200, 201), upload.text
        listed = hub.call(bob, "GET", "vfolders").json()["vfolders"]
        assert "ada-private" not in {v["name"] for v in listed}
        for method, path in (
            ("GET", "vfolders/ada-private"),
            ("GET", "vfolders/ada-private/files"),
            ("GET", "vfolders/ada-private/download?path=s.txt"),
            ("DELETE", "vfolders/ada-private"),
        ):
            refused = hub.call(bob, method, path)
            assert refused.status_code == 404, (path, refused.status_code, refused.text)
        # Nor mounted into Bob's session: refused before anything is queued.
        mount = hub.call(
            bob,
            "POST",
            "sessions",
            json={
                "name": "peek",
                "command": "cat /home/work/ada-private/s.txt",
                "vfolders": ["ada-private"],
            },
        )
        assert mount.status_code in (403, 404), mount.text
        assert "ada-private" in mount.json()["message"]
        # Ada herself reads it back.
        mine = hub.call(ada, "GET", "vfolders/ada-private/download", params={"path": "s.txt"})
        assert mine.status_code == 200 and mine.content == b"secret"
    finally:
        hub.call(ada, "DELETE", "vfolders/ada-private")
        hub.call(ada, "POST", "vfolders/ada-private/purge")


# -- users' servers -------------------------------------------------------------------------
def _secrets_of_others(hub: Hub, user: str) -> dict[str, str]:
    """Tokens that must never reach ``user``'s server: the service's, the tests' admin
    client's, the proxy's, and the other users' servers'."""
    found = {"the service's token": hub.service_token(), "an admin token": hub.admin_token}
    for pid in hub.process_children():
        proxy = proc_environ(pid).get("CONFIGPROXY_AUTH_TOKEN")
        if proxy:
            found["the proxy's token"] = proxy
    for other in (ADA, BOB):
        if other != user:
            other_env = proc_environ(hub.server_pid(other))
            found[f"{other}'s server token"] = other_env["JUPYTERHUB_API_TOKEN"]
    return found


def _files_holding(root: str, needles: dict[str, str], owner: int | None = None) -> list[str]:
    """Regular files under ``root`` (of ``owner`` only, if given) holding any of
    ``needles`` (name → secret)."""
    hits = []
    tree = os.walk(root) if os.path.isdir(root) else [(os.path.dirname(root), [], [root])]
    for folder, _dirs, files in tree:
        for name in files:
            path = os.path.join(folder, name)
            try:
                info = os.lstat(path)
                if not stat.S_ISREG(info.st_mode) or info.st_size > 4 << 20:
                    continue
                if owner is not None and info.st_uid != owner:
                    continue
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            hits += [
                f"{path}: {what}" for what, secret in needles.items() if secret.encode() in data
            ]
    return hits


def test_a_users_server_runs_as_its_user_without_the_docker_socket_or_other_tokens(hub):
    hub.start_server(ADA)
    hub.start_server(BOB)
    account = hub.users[ADA]
    pid = hub.server_pid(ADA)
    status = proc_status(pid)
    assert status["Uid"].split() == [str(account.pw_uid)] * 4
    assert status["Gid"].split() == [str(account.pw_gid)] * 4
    groups = [int(g) for g in status["Groups"].split()]
    docker_gid = os.stat("/var/run/docker.sock").st_gid
    assert docker_gid not in groups, "the user's server is in the Docker socket's group"

    # With exactly the server's credentials, the Docker socket cannot be opened.
    probe = (
        "import socket\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect('/var/run/docker.sock')\n"
        "except PermissionError:\n"
        "    print('refused')\n"
        "else:\n"
        "    print('connected')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=groups,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "refused", done.stdout + done.stderr
    # Nor could it reach the engine any other way: no DOCKER_HOST, no store.
    env = proc_environ(pid)
    assert "DOCKER_HOST" not in env
    assert "JUPYTER_GPU_SESSIONS_DB_URL" not in env
    assert env["JUPYTER_GPU_SESSIONS_SERVICE_URL"] == hub.api_url()

    # Its environment and its files hold no token that could act for anyone else.
    others = _secrets_of_others(hub, ADA)
    leaked = [what for what, secret in others.items() if secret in "\0".join(env.values())]
    assert not leaked, f"ada's server's environment holds {leaked}"
    assert not _files_holding(account.pw_dir, others)
    for entry in os.scandir("/tmp"):  # what the user made in /tmp (e.g. runtime files)
        if entry.stat(follow_symlinks=False).st_uid == account.pw_uid:
            assert not _files_holding(entry.path, others, owner=account.pw_uid)
    # Its own token acts as its user, and only as them.
    own = env["JUPYTERHUB_API_TOKEN"]
    assert rpc_result(hub.rpc(own, "whoami"))["username"] == ADA
    bobs = batch(hub, BOB, "bob-private", "true")
    assert hub.call(own, "GET", f"sessions/{bobs['id']}").status_code == 404
    assert hub.call(own, "GET", "sessions", params={"owner": BOB}).status_code == 404


def test_kernels_run_as_the_uid_of_their_hub_user(hub, docker_client):
    account = hub.users[ADA]
    # A batch session through the service's REST API.
    job = batch(hub, ADA, "whoami", "id -u; id -g")
    assert ended(hub, ADA, job["id"])["status"] == "TERMINATED"
    assert logs_of(hub, ADA, job["id"]).split()[:2] == [str(account.pw_uid), str(account.pw_gid)]
    # A notebook's kernel, started by ada's server in remote mode.
    hub.start_server(ADA)
    kernel_id = start_kernel(hub, ADA)
    try:
        out = execute(hub, ADA, kernel_id, "import os; print(os.getuid(), os.getgid())")
        assert out.split() == [str(account.pw_uid), str(account.pw_gid)]
        (container,) = hub.containers(
            docker_client, label=[f"io.jupyter.gpu-sessions.kernel-id={kernel_id}"]
        )
        assert container.attrs["Config"]["User"] == f"{account.pw_uid}:{account.pw_gid}"
        assert container.labels["io.jupyter.gpu-sessions.owner"] == ADA
        assert container.labels["io.jupyter.gpu-sessions.service"] == SERVICE
        _connection_files_are_the_users_alone(hub, container, kernel_id)
    finally:
        hub.shutdown_kernel(ADA, kernel_id)


def _connection_files_are_the_users_alone(hub: Hub, container, kernel_id: str) -> None:
    """Ada's kernel's connection files — her server's (in her runtime directory) and the
    service's copy (in the session's state directory, mounted into the container) — are
    hers alone: owned by her uid, no access for group or others; Bob cannot read them."""
    account = hub.users[ADA]
    state = next(
        m["Source"]
        for m in container.attrs["Mounts"]
        if m["Destination"] == "/run/jupyter-gpu-sessions"
    )
    info = os.stat(state)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (account.pw_uid, 0o700), state
    copies = [os.path.join(state, n) for n in os.listdir(state) if n.endswith(".json")]
    runtime = os.path.join(account.pw_dir, ".local/share/jupyter/runtime")
    servers = [os.path.join(runtime, n) for n in os.listdir(runtime) if kernel_id in n]
    assert copies and servers, (os.listdir(state), os.listdir(runtime))
    for path in copies + servers:
        info = os.stat(path)
        assert info.st_uid == account.pw_uid, path
        assert stat.S_IMODE(info.st_mode) & 0o077 == 0, (path, oct(info.st_mode))
        peek = subprocess.run(
            ["runuser", "-u", BOB, "--", "cat", path], capture_output=True, text=True
        )
        assert peek.returncode != 0 and '"key"' not in peek.stdout, path


# -- the service killed ---------------------------------------------------------------------
def _store_rows(hub: Hub, sql: str) -> list[tuple]:
    engine = sa.create_engine(hub.db_url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(sql)]
    finally:
        engine.dispose()


def _session_of_kernel(hub: Hub, kernel_id: str) -> dict:
    found = [s for s in sessions_of(hub, hub.user_token(ADMIN)) if s.get("kernel_id") == kernel_id]
    assert len(found) == 1, found
    return found[0]


def test_the_service_killed_and_restarted_adopts_running_kernels_and_ends_the_rest(
    hub, docker_client
):
    """``kill -9`` of the manager service: the Hub starts it again; the new process adopts
    the running kernel of its predecessor (same container, same GPU, its state kept, its
    user's server still using it) and ends what it cannot adopt (a kernel whose container
    went away meanwhile, a batch session, a queued one), freeing their devices; no device
    is held twice."""
    hub.start_server(ADA)
    hub.start_server(BOB)
    kept = start_kernel(hub, ADA, "python3-gpu")
    lost = start_kernel(hub, BOB, "python3-gpu")
    try:
        execute(hub, ADA, kept, "x = 6 * 7")
        execute(hub, BOB, lost, "y = 1")
        kept_session = _session_of_kernel(hub, kept)
        lost_session = _session_of_kernel(hub, lost)
        assert kept_session["status"] == lost_session["status"] == "RUNNING"
        kept_devices = [a["device_uuid"] for a in kept_session["allocations"]]
        assert kept_devices and not set(kept_devices) & {
            a["device_uuid"] for a in lost_session["allocations"]
        }
        # Ada's second allowed session is a running batch job; her third one queues
        # (max_concurrent_sessions = 2 in the example's policy).
        running_job = batch(hub, ADA, "long-job", "sleep 600")
        until(
            lambda: (
                hub.call(hub.user_token(ADA), "GET", f"sessions/{running_job['id']}").json()[
                    "status"
                ]
                == "RUNNING"
            ),
            120,
            "the batch job to run",
        )
        queued_job = batch(hub, ADA, "queued-job", "true")
        (kept_container,) = hub.containers(
            docker_client, label=[f"io.jupyter.gpu-sessions.kernel-id={kept}"]
        )

        old = hub.service_pid()
        os.kill(old, signal.SIGKILL)
        # While it is down, bob's kernel's container goes away.
        (lost_container,) = hub.containers(
            docker_client, label=[f"io.jupyter.gpu-sessions.kernel-id={lost}"]
        )
        lost_container.remove(force=True)
        # The Hub notices its managed service died and starts it again.
        new = (
            until(
                lambda: [p for p in hub.service_pids() if p != old] and hub.service_answers(),
                120,
                "the Hub to restart the manager service",
            )
            and hub.service_pid()
        )
        assert new != old

        def settled() -> bool:
            statuses = {s["id"]: s["status"] for s in sessions_of(hub, hub.user_token(ADMIN))}
            return (
                statuses[lost_session["id"]] in ("ERROR", "TERMINATED")
                and statuses[running_job["id"]] in ("ERROR", "TERMINATED")
                and statuses[queued_job["id"]] == "CANCELLED"
            )

        until(settled, 120, "the restarted service to end what it cannot adopt")
        adopted = _session_of_kernel(hub, kept)
        assert adopted["status"] == "RUNNING"
        assert adopted["exit_code"] is None  # never taken for dead meanwhile
        assert [a["device_uuid"] for a in adopted["allocations"]] == kept_devices
        # The new service process supervises it, in the same container.
        (row,) = _store_rows(hub, f"SELECT process_pid FROM sessions WHERE id = '{adopted['id']}'")
        assert row[0] == new
        (container,) = hub.containers(
            docker_client, label=[f"io.jupyter.gpu-sessions.kernel-id={kept}"]
        )
        assert container.id == kept_container.id and container.status == "running"
        assert not hub.containers(
            docker_client, label=[f"io.jupyter.gpu-sessions.session-id={running_job['id']}"]
        )
        # Nothing held twice, nothing of the ended sessions held.
        held = _store_rows(hub, "SELECT device_uuid, session_id FROM allocations")
        devices = [device for device, _ in held]
        assert len(devices) == len(set(devices)), held
        assert {session for _, session in held} == {adopted["id"]}
        # The kernel kept its state, and ada's server still reaches it.
        assert execute(hub, ADA, kept, "print(x)").strip() == "42"
        # A new GPU kernel gets another device.
        fresh = start_kernel(hub, BOB, "python3-gpu")
        try:
            execute(hub, BOB, fresh, "pass")
            fresh_devices = {
                a["device_uuid"] for a in _session_of_kernel(hub, fresh)["allocations"]
            }
            assert fresh_devices and not fresh_devices & set(kept_devices)
        finally:
            hub.shutdown_kernel(BOB, fresh)
    finally:
        hub.shutdown_kernel(ADA, kept)
        hub.shutdown_kernel(BOB, lost)


# -- one GPU pool for the lab: the cap, fair turns, idle GPUs, servers that restart ----------
def _status(hub: Hub, session_id: str) -> dict:
    reply = hub.call(hub.user_token(ADMIN), "GET", f"sessions/{session_id}")
    assert reply.status_code == 200, reply.text
    return reply.json()


def _running_kernels_of(hub: Hub, kernel_ids: list[str]) -> set[str]:
    by_kernel = {s.get("kernel_id"): s for s in sessions_of(hub, hub.user_token(ADMIN))}
    return {k for k in kernel_ids if by_kernel[k]["status"] == "RUNNING"}


def _gpu_job(hub: Hub, name: str) -> dict:
    """The admin holds two GPUs with a batch job (so that kernels queue for GPUs)."""
    reply = hub.call(
        hub.user_token(ADMIN),
        "POST",
        "sessions",
        json={"name": name, "command": "sleep 600", "resources": {"gpus": 2}},
    )
    assert reply.status_code == 201, reply.text
    job = reply.json()
    until(lambda: _status(hub, job["id"])["status"] == "RUNNING", 120, f"{name} to run")
    return job


def test_two_users_gpu_kernels_are_served_in_turn_and_a_third_queues_at_the_cap(hub):
    """Ada and Bob log in through the Hub's page and start GPU kernels in their own servers
    while the admin's jobs hold all four GPUs: Ada's two kernels queue first, then Bob's.
    Each freed pair of GPUs goes to one kernel of each (DRF: the user holding less comes
    first; first-come-first-served would give both to Ada). A third kernel of Ada's then
    queues under the per-user cap of 2 and names that limit."""
    for user in (ADA, BOB):
        assert hub.login(user).login_reply.status_code == 302
        hub.start_server(user)
    admin = hub.user_token(ADMIN)
    # The admin may hold all four GPUs (the example's default policy allows 2).
    reply = hub.call(admin, "PUT", f"policies/user:{ADMIN}", json={"max_gpus": 4})
    assert reply.status_code == 200, reply.text
    fills = [_gpu_job(hub, "fill-1"), _gpu_job(hub, "fill-2")]
    kernels: dict[str, list[str]] = {ADA: [], BOB: []}
    third = None
    try:
        for user in (ADA, ADA, BOB, BOB):
            kernels[user].append(start_kernel(hub, user, "python3-gpu"))
        every = kernels[ADA] + kernels[BOB]
        for kernel in every:
            session = _session_of_kernel(hub, kernel)
            assert session["status"] == "PENDING", session
        assert _running_kernels_of(hub, every) == set()

        hub.call(hub.user_token(ADMIN), "DELETE", f"sessions/{fills[0]['id']}")
        first_turn = until(
            lambda: (r := _running_kernels_of(hub, every)) and len(r) == 2 and r,
            180,
            "two queued kernels to get the freed GPUs",
        )
        assert first_turn == {kernels[ADA][0], kernels[BOB][0]}, "DRF serves each user in turn"

        hub.call(hub.user_token(ADMIN), "DELETE", f"sessions/{fills[1]['id']}")
        until(
            lambda: _running_kernels_of(hub, every) == set(every),
            180,
            "the other two kernels to get the GPUs",
        )
        # Each user's kernels run in that user's server and answer there.
        assert execute(hub, ADA, kernels[ADA][1], "print('ada')").strip() == "ada"
        assert execute(hub, BOB, kernels[BOB][1], "print('bob')").strip() == "bob"

        # The cap: a third kernel of Ada's queues (it does not fail), saying why.
        third = start_kernel(hub, ADA, "python3-container")
        queued = until(
            lambda: (
                (s := _session_of_kernel(hub, third))
                and "max_concurrent_sessions" in (s.get("queue_message") or "")
                and s
            ),
            60,
            "the third kernel's queue message to name the cap",
        )
        assert queued["status"] == "PENDING", queued
        hub.shutdown_kernel(ADA, kernels[ADA].pop(0))
        until(
            lambda: _session_of_kernel(hub, third)["status"] == "RUNNING",
            180,
            "the capped kernel to start once one of Ada's ended",
        )
    finally:
        hub.call(admin, "DELETE", f"policies/user:{ADMIN}")
        for fill in fills:
            hub.call(admin, "DELETE", f"sessions/{fill['id']}")
        for user, ids in kernels.items():
            for kernel in ids + ([third] if third and user == ADA else []):
                hub.shutdown_kernel(user, kernel)


def test_a_users_server_stopped_and_started_through_the_hub_keeps_its_kernel(hub, docker_client):
    """A Hub restart of Ada's server (stop, start, through the Hub API) leaves her kernel
    running in the service; the restarted server re-attaches it under the same jupyter
    session and kernel ids, and a variable set before is still there. Bob's kernel is
    never touched."""
    hub.start_server(ADA)
    hub.start_server(BOB)
    headers = {"Authorization": f"token {hub.user_token(ADA)}"}
    reply = requests.post(
        f"{hub.server_url(ADA)}api/sessions",
        json={"path": "train.ipynb", "type": "notebook", "kernel": {"name": "python3-container"}},
        headers=headers,
        timeout=120,
    )
    assert reply.status_code == 201, reply.text
    notebook = reply.json()
    kernel = notebook["kernel"]["id"]
    bobs = start_kernel(hub, BOB, "python3-container")
    try:
        execute(hub, ADA, kernel, "x = 41")
        execute(hub, BOB, bobs, "pass")
        (before,) = hub.containers(
            docker_client, label=[f"io.jupyter.gpu-sessions.kernel-id={kernel}"]
        )
        (bob_before,) = hub.containers(
            docker_client, label=[f"io.jupyter.gpu-sessions.kernel-id={bobs}"]
        )
        old_pid = hub.server_pid(ADA)

        hub.stop_server(ADA)
        with pytest.raises(ProcessLookupError):
            os.kill(old_pid, 0)
        assert _session_of_kernel(hub, kernel)["status"] == "RUNNING"
        before.reload()
        assert before.status == "running"

        hub.start_server(ADA)
        listed = requests.get(f"{hub.server_url(ADA)}api/sessions", headers=headers, timeout=30)
        assert listed.status_code == 200, listed.text
        (again,) = [s for s in listed.json() if s["path"] == "train.ipynb"]
        assert again["id"] == notebook["id"] and again["kernel"]["id"] == kernel
        assert execute(hub, ADA, kernel, "print(x + 1)").strip() == "42"
        (after,) = hub.containers(
            docker_client, label=[f"io.jupyter.gpu-sessions.kernel-id={kernel}"]
        )
        assert after.id == before.id
        # Bob's kernel: the same container, never restarted.
        (bob_after,) = hub.containers(
            docker_client, label=[f"io.jupyter.gpu-sessions.kernel-id={bobs}"]
        )
        assert bob_after.id == bob_before.id
        assert bob_after.attrs["State"]["StartedAt"] == bob_before.attrs["State"]["StartedAt"]
        assert execute(hub, BOB, bobs, "print('still')").strip() == "still"
    finally:
        requests.delete(
            f"{hub.server_url(ADA)}api/sessions/{notebook['id']}", headers=headers, timeout=120
        )
        hub.shutdown_kernel(BOB, bobs)
    assert _session_of_kernel(hub, kernel)["status"] == "TERMINATED"
    assert not hub.containers(docker_client, label=[f"io.jupyter.gpu-sessions.kernel-id={kernel}"])


def test_an_idle_gpu_kernel_in_a_hub_is_warned_then_reclaimed(hub):
    """Bob's policy says a GPU idle under 5% for 3 s is wasted: his GPU kernel (its GPU
    at 0% on these simulated GPUs) is warned on his events websocket, then ended with
    reason gpu-idle, and its GPU is free again."""
    admin = hub.user_token(ADMIN)
    scope = f"user:{BOB}"
    reply = hub.call(
        admin,
        "PUT",
        f"policies/{scope}",
        json={"gpu_idle_threshold": 5, "gpu_idle_window": "3s"},
    )
    assert reply.status_code == 200, reply.text
    hub.start_server(BOB)
    events = hub.events(hub.user_token(BOB))
    kernel = None
    try:
        kernel = start_kernel(hub, BOB, "python3-gpu")
        execute(hub, BOB, kernel, "pass")
        session = _session_of_kernel(hub, kernel)
        devices = {a["device_uuid"] for a in session["allocations"]}
        assert devices
        warned = None
        while warned is None:
            event = json.loads(events.recv())
            if event.get("type") == "gpu-idle-warning" and event.get("session_id") == session["id"]:
                warned = event
        ended_session = ended(hub, BOB, session["id"])
        assert ended_session["status"] == "TERMINATED"
        assert ended_session["reason"].startswith("gpu-idle"), ended_session["reason"]
        gpus = hub.call(admin, "GET", "gpus").json()["gpus"]
        held = {h["session_id"] for g in gpus for h in g.get("holders") or []}
        assert session["id"] not in held
        assert not {s["session_id"] for s in _allocations(hub)} & {session["id"]}
    finally:
        events.close()
        hub.call(admin, "DELETE", f"policies/{scope}")
        if kernel:
            hub.shutdown_kernel(BOB, kernel)


def _allocations(hub: Hub) -> list[dict]:
    return [
        {"device_uuid": d, "session_id": s}
        for d, s in _store_rows(hub, "SELECT device_uuid, session_id FROM allocations")
    ]


# -- the pieces, without a Hub ----------------------------------------------------------------
@pytest.fixture
def store(db_url):
    """A store on SQLite or on PostgreSQL (every test that takes it runs on both)."""
    store = SessionStore(db_url)
    yield store
    store.close()


def test_a_restarted_service_takes_over_a_running_session_once(store):
    dead = ProcessRef("host", 4242, 17.5)
    restarted = ProcessRef("host", 4343, 99.25)
    rival = ProcessRef("host", 4444, 100.0)
    for name, status in (("run", S.RUNNING), ("prep", S.PREPARING)):
        store.add(
            Session(
                id=name,
                owner="ada",
                image="img",
                request=ResourceRequest(gpus=1),
                runtime="docker",
                process=dead,
            )
        )
        store.schedule(
            lambda _, n=name: PassDecision(
                placed={n: [Allocation(n, f"GPU-{n}", f"GPU-{n}", "gpu", 1.0)]}
            )
        )
        if status == S.RUNNING:
            store.transition(name, S.RUNNING, "kernel ready")
    taken = store.take_over("run", dead, restarted)
    assert taken is not None and taken.process == restarted and taken.status == S.RUNNING
    # Its devices stay where they were: nothing is allocated again.
    assert [a.device_uuid for a in taken.allocations] == ["GPU-run"]
    assert sorted(a.device_uuid for a in store.allocations()) == ["GPU-prep", "GPU-run"]
    # Asked again by the same process: still its own; by another: not taken twice.
    assert store.take_over("run", dead, restarted) is not None
    assert store.take_over("run", dead, rival) is None
    assert store.get("run").process == restarted
    # Only a running session is taken over (a start under way ends instead).
    assert store.take_over("prep", dead, restarted) is None
    assert store.get("prep").process == dead


def test_kernel_user_map_then_the_os_user_then_never_the_directory_in_the_service(tmp_path):
    ada = ensure_os_user(ADA)
    bob = ensure_os_user(BOB)
    owned_by_bob = tmp_path / "bob-notebooks"
    owned_by_bob.mkdir()
    os.chown(owned_by_bob, bob.pw_uid, bob.pw_gid)

    def manager(**traits) -> GPUSessionManager:
        return GPUSessionManager(db_url=f"sqlite:///{tmp_path}/s.sqlite", **traits)

    embedded = manager(kernel_user_map={"grace": "2001:2002", "alan": 2003})
    assert embedded._kernel_user("grace", str(owned_by_bob)) == (2001, 2002)
    assert embedded._kernel_user("alan", str(owned_by_bob)) == (2003, 2003)
    # Default: the OS user of the owner's name (ada's kernel in bob's directory is ada's).
    assert embedded._kernel_user(ADA, str(owned_by_bob)) == (ada.pw_uid, ada.pw_gid)
    # Nobody of that name: an embedded server's kernel belongs to its directory's owner…
    assert embedded._kernel_user("nobody-here", str(owned_by_bob)) == (bob.pw_uid, bob.pw_gid)
    # …but never in the manager service, whose callers name the directory themselves.
    service = manager(service_name=SERVICE, fallback_uid=1999)
    assert service._kernel_user("nobody-here", str(owned_by_bob)) == (1999, 1999)
    assert service._kernel_user(ADA, str(owned_by_bob)) == (ada.pw_uid, ada.pw_gid)

    def mapping(owner: str):
        return (3001, 3002) if owner == ADA else None

    mapped = manager(service_name=SERVICE, kernel_user_map=mapping, fallback_uid=1999)
    assert mapped._kernel_user(ADA, str(owned_by_bob)) == (3001, 3002)
    assert mapped._kernel_user(BOB, str(owned_by_bob)) == (bob.pw_uid, bob.pw_gid)
    # Root is never a kernel's uid, from a map or a callable.
    with pytest.raises(TraitError, match="never run as root"):
        manager(kernel_user_map={ADA: "0:0"})
    with pytest.raises(TraitError, match="uid:gid"):
        manager(kernel_user_map={ADA: "ada"})
    rooted = manager(kernel_user_map=lambda owner: (0, 0))
    with pytest.raises(InvalidRequest, match="never run as root"):
        rooted._kernel_user(ADA, str(owned_by_bob))
