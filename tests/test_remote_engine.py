"""Remote mode: a jupyter server whose engine is a manager service over HTTP (RemoteEngine).
Its kernels start, run and end in the service; its gpu-sessions API answers what the
service answers, errors included; the service going away does not end a kernel, and a
server going away does not end a start."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import docker
import pytest

from .remote_support import ManagerService, RemoteLab, running_manager, running_remote_lab

API = "gpu-sessions/api"


def wait_for(check, timeout: float = 90.0, what: str = "the condition"):
    """Until ``check()`` is truthy: the state a test needs, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout:g}s")


def service_session_of(service: ManagerService, kernel_id: str) -> dict | None:
    for session in service.sessions():
        if session["kernel_id"] == kernel_id:
            return session
    return None


def running_in_service(service: ManagerService, kernel_id: str) -> dict:
    def check():
        session = service_session_of(service, kernel_id)
        return session if session and session["status"] == "RUNNING" else None

    return wait_for(check, what=f"kernel {kernel_id[:8]} running in the service")


def container_of(session_id: str):
    client = docker.from_env()
    try:
        found = client.containers.list(
            all=True, filters={"label": f"io.jupyter.gpu-sessions.session-id={session_id}"}
        )
        return found[0] if found else None
    finally:
        client.close()


def test_container_kernel_starts_in_the_service_and_runs_code(remote_lab, manager_service):
    session = remote_lab.kernel_session()
    kernel_id = session["kernel"]["id"]
    reply, out = remote_lab.execute(kernel_id, "import os; print(6 * 7, os.getuid() != 0)")
    assert reply["status"] == "ok", out
    assert out.strip() == "42 True"
    # The kernel is a session of the service's, owned by the service's view of the caller.
    stored = running_in_service(manager_service, kernel_id)
    assert stored["owner"] == "root"
    assert container_of(stored["id"]).status == "running"
    # The user's server holds nothing of the engine: no store, no API socket of its own.
    assert not (remote_lab.base / "must-not-exist.sqlite").exists()
    assert "GPU sessions API for container kernels on" not in remote_lab.log_path.read_text()
    # Its kernel reaches the service's API with its session's own token.
    reply, out = remote_lab.execute(
        kernel_id,
        "import os; print(os.environ.get('JUPYTER_GPU_SESSIONS_URL', ''))",
    )
    assert reply["status"] == "ok", out
    status, _ = remote_lab.api("DELETE", f"api/sessions/{session['id']}", timeout=60)
    assert status == 204
    ended = wait_for(
        lambda: (
            (s := service_session_of(manager_service, kernel_id))
            and s["status"] == "TERMINATED"
            and s
        ),
        what="the session to end in the service",
    )
    assert ended["status"] == "TERMINATED"
    assert container_of(ended["id"]) is None


def test_interrupt_and_restart_go_through_the_service(remote_lab, manager_service):
    """An interrupt reaches the kernel (a signal sent by the service); a restart keeps the
    session (same id, same devices) and the new kernel answers."""
    session = remote_lab.kernel_session(path="restart.ipynb")
    kernel_id = session["kernel"]["id"]
    reply, _ = remote_lab.execute(kernel_id, "x = 1")
    assert reply["status"] == "ok"
    before = running_in_service(manager_service, kernel_id)

    interrupted: list = []

    def sleep_cell() -> None:
        interrupted.append(remote_lab.execute(kernel_id, "import time; time.sleep(120)"))

    cell = threading.Thread(target=sleep_cell)
    cell.start()
    wait_for(
        lambda: remote_lab.api("GET", f"api/kernels/{kernel_id}")[1]["execution_state"] == "busy",
        what="the cell to run",
    )
    status, _ = remote_lab.api("POST", f"api/kernels/{kernel_id}/interrupt")
    assert status == 204
    cell.join(60)
    reply, out = interrupted[0]
    assert reply["status"] == "error" and "KeyboardInterrupt" in out

    status, _ = remote_lab.api("POST", f"api/kernels/{kernel_id}/restart", timeout=120)
    assert status == 200
    reply, out = remote_lab.execute(kernel_id, "print('x' in dir())")
    assert out.strip() == "False"  # a new kernel process
    after = running_in_service(manager_service, kernel_id)
    assert after["id"] == before["id"]
    assert after["allocations"] == before["allocations"]
    _, history = manager_service.api("GET", f"{API}/sessions/{after['id']}/history")
    assert "RESTARTING" in [h["status"] for h in history["history"]]
    status, _ = remote_lab.api("DELETE", f"api/sessions/{session['id']}", timeout=60)
    assert status == 204


@pytest.mark.parametrize(
    "path",
    ["quota", "policies", "scheduler/health", "sessions?limit=50", "launcher", "vfolders"],
)
def test_the_api_through_the_user_server_is_the_services(remote_lab, manager_service, path):
    status, through_server = remote_lab.api("GET", f"{API}/{path}")
    direct_status, direct = manager_service.api("GET", f"{API}/{path}")
    assert (status, direct_status) == (200, 200), (through_server, direct)
    if path == "scheduler/health":  # heartbeats move between the two calls
        through_server = [m["id"] for m in through_server["managers"]]
        direct = [m["id"] for m in direct["managers"]]
    if path == "launcher":  # the user server asks for its own kernelspecs
        through_server = sorted(k["name"] for k in through_server["kernelspecs"])
        direct = sorted(k["name"] for k in direct["kernelspecs"])
    assert through_server == direct


def test_gpus_through_the_user_server_are_the_services(remote_lab, manager_service):
    _, through_server = remote_lab.api("GET", f"{API}/gpus")
    _, direct = manager_service.api("GET", f"{API}/gpus")
    assert [g["uuid"] for g in through_server["gpus"]] == [g["uuid"] for g in direct["gpus"]]
    assert through_server["inventory"] == direct["inventory"] == "SimulatedInventory"


@pytest.mark.parametrize(
    ("method", "path", "body", "code"),
    [
        ("GET", f"{API}/sessions/{'0' * 32}", None, 404),
        ("GET", f"{API}/sessions/no-such-name", None, 404),
        ("PUT", f"{API}/policies/user:someone", {"max_gpus": "lots"}, 400),
        ("PUT", f"{API}/policies/user:someone", {"max_gpuz": 1}, 400),
        ("GET", f"{API}/policies/user:nobody-at-all", None, 404),
        ("GET", f"{API}/vfolders/no-such-folder", None, 404),
        ("POST", f"{API}/vfolders", {"name": "bad/name"}, 400),
        ("POST", f"{API}/sessions", {"command": []}, 400),
    ],
)
def test_errors_keep_their_code_and_message_across_the_hop(
    remote_lab, manager_service, method, path, body, code
):
    through_server = remote_lab.api(method, path, body)
    direct = manager_service.api(method, path, body)
    assert through_server[0] == direct[0] == code, (through_server, direct)
    assert through_server[1]["message"] == direct[1]["message"]
    assert through_server[1]["reason"] == direct[1]["reason"]


def test_a_policy_refusal_of_a_kernel_start_keeps_its_403(remote_lab, manager_service):
    status, _ = manager_service.api("PUT", f"{API}/policies/user:root", {"max_gpus": 0})
    assert status == 200
    try:
        status, answer = remote_lab.api(
            "POST",
            "api/sessions",
            {
                "path": "gpu.ipynb",
                "type": "notebook",
                "name": "gpu.ipynb",
                "kernel": {"name": "python3-gpu"},
            },
            timeout=60,
        )
        assert status == 403, answer
        assert "max_gpus" in answer["message"]
    finally:
        manager_service.api("DELETE", f"{API}/policies/user:root")
    assert not [s for s in manager_service.sessions() if s["status"] in ("PENDING", "RUNNING")]


def test_vfolder_files_stream_through_the_user_server(remote_lab, manager_service):
    status, created = remote_lab.api("POST", f"{API}/vfolders", {"name": "remote-data"})
    assert status == 201, created
    try:
        payload = bytes(range(256)) * 4096  # 1 MiB
        status, entry = remote_lab.api(
            "PUT", f"{API}/vfolders/remote-data/upload?path=blob.bin", payload, timeout=60
        )
        assert status == 201, entry
        assert entry["size"] == len(payload)
        _, listing = manager_service.api("GET", f"{API}/vfolders/remote-data/files")
        assert [e["name"] for e in listing["entries"]] == ["blob.bin"]
        status, body = remote_lab.api(
            "GET", f"{API}/vfolders/remote-data/download?path=blob.bin", raw=True
        )
        assert status == 200 and body == payload
        status, _ = remote_lab.api(
            "POST", f"{API}/vfolders/remote-data/mkdir", {"path": "sub/dir", "parents": True}
        )
        assert status == 201
    finally:
        remote_lab.api("DELETE", f"{API}/vfolders/remote-data")
        remote_lab.api("POST", f"{API}/vfolders/remote-data/purge")


def gpu_kernelspec(lab: RemoteLab, name: str, gpus: int) -> str:
    """A kernelspec of the user's server asking for ``gpus`` GPUs (in its data dir)."""
    folder = lab.base / "data" / "kernels" / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = json.loads(
        (
            Path(__file__).resolve().parent.parent
            / "provisioners"
            / "python3-container"
            / "kernel.json"
        ).read_text()
    )
    spec["display_name"] = name
    spec["metadata"]["kernel_provisioner"]["config"] = {"gpus": gpus}
    (folder / "kernel.json").write_text(json.dumps(spec))
    return name


def test_concurrent_starts_and_a_start_interrupted_while_queued(remote_lab, manager_service):
    """Two 2-GPU kernels start at once and run; a third waits in the queue for them and is
    shut down while it waits: its session is cancelled in the service, nothing left."""
    spec = gpu_kernelspec(remote_lab, "python3-2gpu", 2)
    sessions: list[dict] = []
    errors: list[BaseException] = []

    def start(index: int) -> None:
        try:
            sessions.append(remote_lab.kernel_session(spec, f"concurrent-{index}.ipynb"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    for session in sessions:
        reply, out = remote_lab.execute(session["kernel"]["id"], "print('up')")
        assert out.strip() == "up", out
    queued = remote_lab.kernel_session(spec, "queued.ipynb")
    kernel_id = queued["kernel"]["id"]
    waiting = wait_for(
        lambda: (
            (s := service_session_of(manager_service, kernel_id)) and s["status"] == "PENDING" and s
        ),
        what="the third kernel to queue",
    )
    status, _ = remote_lab.api("DELETE", f"api/sessions/{queued['id']}", timeout=60)
    assert status == 204
    cancelled = wait_for(
        lambda: (
            (s := service_session_of(manager_service, kernel_id))
            and s["status"] == "CANCELLED"
            and s
        ),
        what="the queued kernel to be cancelled",
    )
    assert cancelled["id"] == waiting["id"] and not cancelled["allocations"]
    for session in sessions:
        remote_lab.api("DELETE", f"api/sessions/{session['id']}", timeout=60)
    wait_for(
        lambda: all(
            (s := service_session_of(manager_service, x["kernel"]["id"]))
            and s["status"] == "TERMINATED"
            for x in sessions
        ),
        what="both kernels to end",
    )


def test_a_start_goes_on_in_the_service_when_the_user_server_is_killed(remote_lab, manager_service):
    session = remote_lab.kernel_session(path="orphaned-start.ipynb")
    kernel_id = session["kernel"]["id"]
    remote_lab.kill()  # mid-start: the admission is answered, the container not yet up
    try:
        started = running_in_service(manager_service, kernel_id)
        assert container_of(started["id"]).status == "running"
        status, _ = manager_service.api("DELETE", f"{API}/sessions/{started['id']}", timeout=60)
        assert status == 200
    finally:
        remote_lab.start()  # at the same port, for the tests after this one
    assert remote_lab.api("GET", f"{API}/quota")[0] == 200


def test_a_service_outage_does_not_end_a_kernel(tmp_path, kernel_image):
    """The service dies (SIGKILL) under a running kernel: the user's server says it cannot
    see the kernel's container, but neither ends nor restarts it, and the kernel keeps
    its state and answers; the service restarted, the kernel goes on as before."""
    with running_manager(tmp_path / "service") as service:
        with running_remote_lab(tmp_path / "lab", service) as lab:
            session = lab.kernel_session(path="outage.ipynb")
            kernel_id = session["kernel"]["id"]
            reply, _ = lab.execute(kernel_id, "x = 42")
            assert reply["status"] == "ok"
            stored = running_in_service(service, kernel_id)
            service.kill()
            try:
                wait_for(
                    lambda: "cannot see its container" in lab.log_path.read_text(),
                    what="the server to notice the outage",
                )
                reply, out = lab.execute(kernel_id, "print(x)")
                assert out.strip() == "42"
                status, kernel = lab.api("GET", f"api/kernels/{kernel_id}")
                assert status == 200 and kernel["execution_state"] == "idle", kernel
                assert "restarting" not in lab.log_path.read_text().lower()
                assert container_of(stored["id"]).status == "running"
                # The user server's API says the service is unavailable, as a 503.
                status, answer = lab.api("GET", f"{API}/quota")
                assert status == 503 and "manager service" in answer["message"]
            finally:
                service.start()
            # The restarted service adopts the kernel its predecessor started: the same
            # container, the same session, its state kept, seen again by the server.
            adopted = running_in_service(service, kernel_id)
            assert adopted["id"] == stored["id"]
            wait_for(
                lambda: "the container engine answers again" in lab.log_path.read_text(),
                what="the server to see the kernel again",
            )
            reply, out = lab.execute(kernel_id, "print(x)")
            assert out.strip() == "42"
            assert container_of(stored["id"]).status == "running"
            assert "restarting" not in lab.log_path.read_text().lower()


def test_the_events_websocket_of_the_user_server_streams_the_services_changes(
    remote_lab, manager_service
):
    """Status changes of the service's store reach the user server's events websocket
    (status_marker / status_changes over the RPC), as the service's view of its user."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    async def run() -> tuple[dict, list[str]]:
        url = remote_lab.url.replace("http://", "ws://") + f"/{API}/events"
        request = HTTPRequest(url, headers={"Authorization": f"token {remote_lab.token}"})
        ws = await websocket_connect(request)
        try:
            hello = json.loads(await ws.read_message())
            loop = asyncio.get_running_loop()
            session = await loop.run_in_executor(
                None, lambda: remote_lab.kernel_session(path="events.ipynb")
            )
            kernel_id = session["kernel"]["id"]
            seen: list[str] = []
            while "RUNNING" not in seen:
                event = json.loads(await asyncio.wait_for(ws.read_message(), 90))
                if event["type"] == "status" and event.get("kernel_id") == kernel_id:
                    seen.append(event["status"])
            await loop.run_in_executor(
                None,
                lambda: remote_lab.api("DELETE", f"api/sessions/{session['id']}", timeout=60),
            )
            while "TERMINATED" not in seen:
                event = json.loads(await asyncio.wait_for(ws.read_message(), 90))
                if event["type"] == "status" and event.get("kernel_id") == kernel_id:
                    seen.append(event["status"])
            return hello, seen
        finally:
            ws.close()

    hello, seen = asyncio.run(run())
    assert hello == {"type": "hello", "user": "root", "admin": True}
    assert seen[-1] == "TERMINATED" and "RUNNING" in seen
