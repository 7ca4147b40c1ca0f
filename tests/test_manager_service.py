"""The manager service (`jupyter gpu-sessions manager`) and its engine RPC, called as users'
servers call it: over real HTTP, by several users (each with their own token), each acting
as the identity its authentication gives and never as one named in the body."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jupyter_gpu_sessions.remote import wire

from .browser_support import free_port
from .remote_support import ManagerService, running_manager
from .support import REPO, make_notebook_dir

API = "gpu-sessions/api"
TOKENS = {"alice": "alice-" + "a" * 24, "bob": "bob-" + "b" * 24}
ROOT_TOKEN = "root-" + "r" * 24


@pytest.fixture(scope="module")
def service(tmp_path_factory, kernel_image):
    """A service that knows alice, bob and an admin (root) by token."""
    users = {token: user for user, token in TOKENS.items()}
    users[ROOT_TOKEN] = "root"
    config = {
        "ServerApp": {"identity_provider_class": "tests.identity.TokenUsers"},
        "TokenUsers": {"users": users},
        "GPUSessionsExtension": {"admin_users": ["root"], "username_source": "identity"},
    }
    with running_manager(
        tmp_path_factory.mktemp("service"),
        config=config,
        token=ROOT_TOKEN,
        extra_env={"PYTHONPATH": str(REPO)},
    ) as svc:
        yield svc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return make_notebook_dir(tmp_path_factory.mktemp("work") / "notebooks")


def call(service: ManagerService, method: str, user: str = "alice", **args):
    return service.call(method, args, token=TOKENS[user] if user != "root" else ROOT_TOKEN)


def launch_json(workdir: Path, image: str, *, gpus: int = 0, runtime: str = "docker", **extra):
    """A kernel launch as a provisioner makes it: ports, key, connection file, argv."""
    kernel_id = secrets.token_hex(16)
    connection_file = str(workdir / f"kernel-{kernel_id}.json")
    info = {
        "transport": "tcp",
        "ip": "127.0.0.1",
        "key": secrets.token_hex(16).encode(),
        "signature_scheme": "hmac-sha256",
        **{
            name: free_port()
            for name in ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")
        },
    }
    from jupyter_gpu_sessions.core.models import ResourceRequest
    from jupyter_gpu_sessions.engine import KernelLaunch

    launch = KernelLaunch(
        kernel_id=kernel_id,
        owner="someone-else",
        image=image,
        argv=["python3", "-m", "ipykernel_launcher", "-f", connection_file],
        env={},
        explicit_env={},
        cwd=str(workdir),
        request=ResourceRequest(gpus=gpus),
        runtime=runtime,
        connection_file=connection_file,
        connection_info=info,
        launch_timeout=60.0,
        labels={"io.jupyter.gpu-sessions.owner": "someone-else"},
    )
    data = wire.launch_to_wire(launch)
    data.update(extra)
    return data


# -- what the service serves ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "api/contents"),
        ("GET", "api/contents/etc/passwd"),
        ("GET", "files/etc/passwd"),
        ("GET", "api/kernels"),
        ("POST", "api/kernels"),
        ("GET", "api/sessions"),
        ("GET", "api/kernelspecs"),
        ("GET", "api/terminals"),
        ("GET", "api/config/notebook"),
        ("PATCH", "api/config/notebook"),
        ("GET", "nbconvert/html/x.ipynb"),
        ("GET", "lab"),
        ("GET", "tree"),
        ("POST", "api/shutdown"),
    ],
)
def test_the_service_serves_no_files_kernels_terminals_or_config(service, method, path):
    status, _ = service.api(method, path, {} if method != "GET" else None)
    assert status == 404, path


def test_the_service_serves_its_api_and_health(service):
    assert service.api("GET", "api/status")[0] == 200
    status, quota = service.api("GET", f"{API}/quota", token=TOKENS["bob"])
    assert status == 200 and quota["user"] == "bob" and not quota["admin"]
    assert "GPU sessions API for container kernels on" in service.log_path.read_text()
    assert "extension was successfully loaded" in service.log_path.read_text()
    assert "jupyterlab" not in service.log_path.read_text()


# -- who calls ----------------------------------------------------------------------------------
def test_the_engine_answers_only_authenticated_callers(service):
    status, answer = service.call("whoami", token=None)
    assert status in (401, 403), answer
    status, answer = service.call("whoami", token="not-a-token")
    assert status in (401, 403), answer


def test_session_tokens_may_not_call_the_engine(service):
    status, answer = service.call("whoami", token="jgs_" + "x" * 40)
    assert status == 403
    assert "session's token may not call the engine" in answer["message"]


def test_the_host_checks_are_for_admins(service):
    status, answer = call(service, "diagnose", "bob")
    assert status == 403 and answer["error"] == "Forbidden"
    status, answer = call(service, "diagnose", "root")
    assert status == 200 and any("session store" in what for _, what, _ in answer["result"])


def test_callers_are_who_their_token_says(service):
    for user in ("alice", "bob"):
        status, me = call(service, "whoami", user)
        assert status == 200 and me["result"]["username"] == user
        assert not me["result"]["is_admin"]
    assert call(service, "whoami", "root")[1]["result"]["is_admin"]
    status, answer = call(service, "user_groups", "bob", username="alice", hub_groups=None)
    assert status == 404 and "your own groups" in answer["message"]


# -- bad calls ----------------------------------------------------------------------------------
def test_unknown_methods_are_404(service):
    for method in ("nope", "_start", "manager", "close", "serve_api"):
        status, answer = call(service, method)
        assert status == 404, method
        assert answer["error"] == "NotFound"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"args": [1]}', "args must be a JSON object"),
        (b'{"args": {}, "method": "x"}', "Unknown field"),
        (b"", "Send a JSON object"),
    ],
)
def test_bad_bodies_are_400(service, body, message):
    status, answer = service.api("POST", f"{API}/engine/whoami", body, token=TOKENS["alice"])
    assert status == 400 and message in answer["message"], answer


@pytest.mark.parametrize(
    ("method", "args", "message"),
    [
        ("get_session", {}, "args.session_id is required"),
        ("get_session", {"session_id": 7}, "args.session_id is of the wrong type"),
        ("signal", {"session_id": "0" * 32, "signum": "9"}, "args.signum"),
        ("sessions_page", {"limit": 10, "offset": 0, "statuses": ["NOPE"]}, "statuses"),
        ("wait_kernel", {"session_id": "0" * 32, "wait": 3600}, "args.wait"),
        ("submit", {"launch": {"kernel_id": "k"}}, "launch lacks"),
        ("submit", {"launch": {"evil": 1}}, "unknown field"),
        ("clear_history", {"retention": "forever", "vacuum": False}, "args.retention"),
    ],
)
def test_bad_arguments_are_400(service, method, args, message):
    status, answer = call(service, method, "root", **args)
    assert status == 400, answer
    assert message in answer["message"]
    assert answer["error"] == "InvalidRequest"


def test_a_bad_resource_value_is_400_with_the_engines_message(service, workdir, kernel_image):
    launch = launch_json(workdir, kernel_image)
    launch["request"]["gpus"] = -1
    status, answer = call(service, "submit", launch=launch)
    assert status == 400 and "gpus" in answer["message"], answer


# -- what the engine lets a caller do -----------------------------------------------------------
def test_submit_refuses_the_local_runtime(service, workdir, kernel_image):
    status, answer = call(
        service, "submit", launch=launch_json(workdir, kernel_image, runtime="local")
    )
    assert status == 403
    assert answer["error"] == "PolicyViolation" and answer["reason"] == "runtime-not-allowed"
    assert "run in containers" in answer["message"]


def test_submit_holds_any_image_but_the_default_to_the_allowlist(service, workdir, kernel_image):
    launch = launch_json(workdir, "busybox:latest")  # "not chosen", says the caller
    status, answer = call(service, "submit", launch=launch)
    assert status == 403 and answer["reason"] == "image-not-allowed", answer


def test_submit_makes_the_caller_the_owner(service, workdir, kernel_image):
    launch = launch_json(workdir, kernel_image)
    status, answer = call(service, "submit", "alice", launch=launch)
    assert status == 200, answer
    session = wire.session_from_wire(answer["result"])
    try:
        assert session.owner == "alice"  # not the "someone-else" the launch named
        # Bob neither sees it nor can end it; root (an admin) sees it.
        assert call(service, "get_session", "bob", session_id=session.id)[0] == 404
        assert call(service, "get_session", "root", session_id=session.id)[0] == 200
        status, page = call(service, "sessions_page", "bob", limit=100, offset=0, owner=None)
        assert session.id not in {s["id"] for s in page["result"]["sessions"]}
    finally:
        status, ended = call(
            service, "end_session", "alice", session_id=session.id, reason="test", own=True
        )
        assert status == 200 and ended["result"]["status"] == "CANCELLED"


KERNEL_OPS = [
    ("poll", {}),
    ("signal", {"signum": 9}),
    ("expect_stop", {}),
    ("note_exit", {"state": {"exit_code": 1}}),
    ("stop_kernel", {"restart": False, "reason": "x"}),
    ("set_stop_reason", {"reason": "x"}),
    ("adopt", {"handle": {"runtime": "docker", "id": "someone-elses-container"}}),
    ("end_session", {"reason": "x", "own": True}),
    ("note_attachment", {"attachment": {"kernel_name": "python3-container"}}),
    ("wait_kernel", {"seen": 0, "wait": 0}),
]


def test_kernel_operations_act_only_on_the_callers_own_sessions(service, workdir, kernel_image):
    status, answer = call(service, "submit", "alice", launch=launch_json(workdir, kernel_image))
    assert status == 200, answer
    session_id = answer["result"]["id"]
    try:
        for user in ("bob", "root"):  # an admin too: kernel operations are one's own
            for method, args in KERNEL_OPS:
                status, answer = call(service, method, user, session_id=session_id, **args)
                assert status == 404, (user, method, answer)
                assert answer["error"] in ("SessionNotFound", "NotFound"), (method, answer)
        launch = launch_json(workdir, kernel_image)
        status, answer = call(service, "start_kernel", "bob", session_id=session_id, launch=launch)
        assert status == 404
        # Nothing of that touched the session: still queued, alice's.
        status, stored = call(service, "get_session", "alice", session_id=session_id)
        assert stored["result"]["status"] == "PENDING" and stored["result"]["owner"] == "alice"
        # An admin may end anyone's session through the API (not as their own kernel).
        status, ended = call(
            service, "end_session", "root", session_id=session_id, reason="by root", own=False
        )
        assert status == 200 and ended["result"]["status"] == "CANCELLED"
    finally:
        call(service, "end_session", "root", session_id=session_id, reason="test")


def test_status_changes_and_idle_timeouts_are_the_callers_own(service, workdir, kernel_image):
    marker = call(service, "status_marker", "bob")[1]["result"]
    status, answer = call(service, "submit", "alice", launch=launch_json(workdir, kernel_image))
    session_id = answer["result"]["id"]
    call(service, "end_session", "alice", session_id=session_id, reason="test", own=True)
    for user, sees in (("bob", False), ("alice", True), ("root", True)):
        rows = call(service, "status_changes", user, since=marker)[1]["result"]
        assert (session_id in {r["session_id"] for r in rows}) is sees, user
    status, timeouts = call(service, "idle_timeouts", "bob", owners=["alice", "bob"])
    assert set(timeouts["result"]) == {"bob"}


def test_a_kernel_start_runs_in_the_service_and_is_followed_by_long_polls(
    service, workdir, kernel_image
):
    """submit begins the start; two waiters follow it at once and both get the kernel; a
    restart goes through start_kernel; the caller's end ends it."""
    launch = launch_json(workdir, kernel_image, gpus=1)
    status, answer = call(service, "submit", "alice", launch=launch, start=True)
    assert status == 200, answer
    session_id = answer["result"]["id"]
    results: list = []

    def follow() -> None:
        seen, lines = 0, []
        while True:
            status, answer = call(service, "wait_kernel", "alice", session_id=session_id, seen=seen)
            assert status == 200, answer
            lines += answer["result"]["lines"]
            seen += len(answer["result"]["lines"])
            if answer["result"]["done"]:
                results.append((answer["result"], lines))
                return

    waiters = [threading.Thread(target=follow) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join(120)
    try:
        assert len(results) == 2
        for result, _lines in results:
            assert result["session"]["status"] == "RUNNING"
            assert result["session"]["owner"] == "alice"
            assert result["handle"]["runtime"] == "docker"
        assert results[0][0]["handle"] == results[1][0]["handle"]
        # Not bob's to follow.
        assert call(service, "wait_kernel", "bob", session_id=session_id, seen=0)[0] == 404
        status, polled = call(service, "poll", "alice", session_id=session_id)
        assert status == 200 and polled["result"] is None
        # What a server needs to re-attach later: noted by the owner, listed to the owner.
        attachment = {"kernel_name": "python3-container", "cwd": str(workdir)}
        status, _ = call(
            service, "note_attachment", "alice", session_id=session_id, attachment=attachment
        )
        assert status == 200
        for user, listed in (("alice", True), ("bob", False), ("root", False)):
            status, kernels = call(service, "running_kernels", user)
            assert status == 200
            assert (session_id in {k["session_id"] for k in kernels["result"]}) is listed, user
        # A forged handle is never taken: the service keeps its own.
        forged = {"runtime": "docker", "id": "0" * 64, "name": "someone-elses"}
        status, adopted = call(service, "adopt", "alice", session_id=session_id, handle=forged)
        assert status == 200 and adopted["result"]["handle"] == results[0][0]["handle"]
    finally:
        status, ended = call(
            service, "end_session", "alice", session_id=session_id, reason="test", own=True
        )
    assert status == 200 and ended["result"]["status"] == "TERMINATED"


def test_a_queued_start_ended_by_its_owner_answers_start_cancelled(service, workdir, kernel_image):
    """Four GPUs held by one start, a second queues; ending it interrupts its start, and
    the waiter gets the engine's own StartCancelled with its message."""
    first = call(
        service, "submit", "alice", launch=launch_json(workdir, kernel_image, gpus=4), start=True
    )
    assert first[0] == 200, first
    first_id = first[1]["result"]["id"]
    try:
        second = call(
            service,
            "submit",
            "alice",
            launch=launch_json(workdir, kernel_image, gpus=4),
            start=True,
        )
        assert second[0] == 200, second
        second_id = second[1]["result"]["id"]
        # It waits: a bounded long poll answers with its progress (its place in the queue).
        status, answer = call(service, "wait_kernel", "alice", session_id=second_id, seen=0, wait=2)
        assert status == 200 and not answer["result"]["done"]
        failed: list = []

        def follow() -> None:  # until the start ends: here, with an error
            seen = len(answer["result"]["lines"])
            while True:
                status, got = call(service, "wait_kernel", "alice", session_id=second_id, seen=seen)
                if status != 200 or got["result"]["done"]:
                    failed.append((status, got))
                    return
                seen += len(got["result"]["lines"])

        waiter = threading.Thread(target=follow)
        waiter.start()
        status, ended = call(
            service,
            "end_session",
            "alice",
            session_id=second_id,
            reason="changed my mind",
            own=True,
        )
        assert status == 200 and ended["result"]["status"] == "CANCELLED"
        waiter.join(60)
        status, answer = failed[0]
        assert status == 409 and answer["error"] == "StartCancelled", answer
        assert "changed my mind" in answer["message"]
        # The same error class and message on the client's side of the wire.
        error = wire.error_from_wire(status, answer)
        assert type(error).__name__ == "StartCancelled" and error.message == answer["message"]
    finally:
        call(service, "end_session", "alice", session_id=first_id, reason="test", own=True)


def test_the_manager_command_takes_hub_settings_from_the_environment(tmp_path):
    """Run by JupyterHub: JUPYTERHUB_SERVICE_URL gives the address, _PREFIX the base URL."""
    port = free_port()
    env = {
        "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
        "JUPYTERHUB_SERVICE_PREFIX": "/services/gpu-sessions/",
    }
    code = (
        "from jupyter_gpu_sessions.server.service import ManagerApp\n"
        "app = ManagerApp()\n"
        "print(app.ip, app.port, app.base_url, app.allow_root, app.terminals_enabled,"
        " app.identity_provider_class.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "127.0.0.1",
        str(port),
        "/services/gpu-sessions/",
        "True",
        "False",
        "PasswordIdentityProvider",
    ]
    # With the Hub's token and the service's name: Hub OAuth decides who calls.
    hub = {**env, "JUPYTERHUB_API_TOKEN": "x" * 32, "JUPYTERHUB_SERVICE_NAME": "gpu-sessions"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **hub},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "HubIdentityProvider"


# -- the codec ----------------------------------------------------------------------------------
def test_the_codec_round_trips_what_crosses_the_wire(tmp_path):
    from jupyter_gpu_sessions.core.models import (
        Allocation,
        ExitState,
        ProcessRef,
        ResourceRequest,
        RuntimeHandle,
        Session,
        StatusChange,
    )
    from jupyter_gpu_sessions.core.status import SessionStatus

    session = Session(
        id="a" * 32,
        owner="alice",
        image="img",
        request=ResourceRequest(gpus=2, cpus=1.5, memory=1 << 30),
        runtime="docker",
        process=ProcessRef("host", 12, 3.5),
        kernel_id="k",
        status=SessionStatus.RUNNING,
        allocations=(Allocation("a" * 32, "GPU-1", "GPU-1", "gpu", 1.0),),
        container_id="c" * 64,
        history=[StatusChange(SessionStatus.PENDING, 1.0, "queued")],
    )
    back = wire.session_from_wire(json.loads(json.dumps(wire.session_to_wire(session))))
    assert back == session
    state = ExitState(137, oom_killed=True, error="x")
    assert wire.exit_from_wire(wire.exit_to_wire(state)) == state
    assert wire.exit_from_wire(None) is None
    handle = RuntimeHandle("docker", "id", "name", "digest", {"ports": [1, 2]})
    assert wire.handle_from_wire(json.loads(json.dumps(wire.handle_to_wire(handle)))) == handle
    launch = launch_json(tmp_path, "img", gpus=1)
    decoded = wire.launch_from_wire(json.loads(json.dumps(launch)))
    assert isinstance(decoded.connection_info["key"], bytes)
    assert wire.launch_to_wire(decoded) == launch


@pytest.mark.parametrize(
    ("status", "body", "klass", "reason"),
    [
        (
            404,
            {"message": "m", "reason": "not-found", "error": "SessionNotFound"},
            "SessionNotFound",
            "not-found",
        ),
        (
            403,
            {"message": "m", "reason": "policy", "error": "PolicyViolation"},
            "PolicyViolation",
            "policy",
        ),
        (
            409,
            {"message": "m", "reason": "illegal-transition", "error": "IllegalTransition"},
            "IllegalTransition",
            "illegal-transition",
        ),
        (
            503,
            {"message": "m", "reason": "runtime-unavailable", "error": "RuntimeUnavailable"},
            "RuntimeUnavailable",
            "runtime-unavailable",
        ),
        (400, {"message": "m", "reason": "invalid-request"}, "InvalidRequest", "invalid-request"),
        (
            500,
            {"message": "m", "reason": "internal-error"},
            "RuntimeUnavailable",
            "service-unavailable",
        ),
        (502, "<html>bad gateway</html>", "RuntimeUnavailable", "service-unavailable"),
    ],
)
def test_errors_come_back_as_the_class_the_service_raised(status, body, klass, reason):
    error = wire.error_from_wire(status, body)
    assert type(error).__name__ == klass and error.reason == reason
    if reason == "service-unavailable":  # not the engine's error: the service's failure
        assert f"answered {status}" in error.message
    else:
        assert error.message == "m"
