"""Kernels outlive their server (JupyterHub mode): a user's server in remote mode that
stops (SIGTERM by the Hub, a crash, the idle-server culler) leaves its kernels running in
the manager service, and the server started again re-attaches them: the same jupyter
session and kernel ids for the open notebook, its variables still there.

Real processes throughout: the manager service and the user's server are subprocesses
(tests/remote_support.py), the kernels real containers, the notebook's kernel reached over
jupyter_server's kernel websocket.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from typing import Any

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.store import SessionStore

from .browser_support import running_lab
from .remote_support import RemoteLab, manager_service, remote_lab  # noqa: F401 - fixtures
from .support import labelled_containers, make_notebook_dir

KERNEL = "python3-container"
TERMINAL = {s.value for s in SessionStatus if s.is_terminal}


# -- helpers -------------------------------------------------------------------------------
async def _execute(lab: RemoteLab, kernel_id: str, code: str, timeout: float = 90) -> str:
    """Run ``code`` over the kernel's websocket (as JupyterLab does); its result's text."""
    url = lab.url.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels"
    client_session = uuid.uuid4().hex
    ws = await websocket_connect(
        HTTPRequest(
            f"{url}?session_id={client_session}",
            headers={"Authorization": f"token {lab.token}"},
            request_timeout=timeout,
        )
    )
    msg_id = uuid.uuid4().hex
    request = {
        "header": {
            "msg_id": msg_id,
            "msg_type": "execute_request",
            "session": client_session,
            "username": "test",
            "version": "5.3",
            "date": "",
        },
        "parent_header": {},
        "metadata": {},
        "content": {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        "channel": "shell",
        "buffers": [],
    }
    try:
        await ws.write_message(json.dumps(request))
        result, replied, idle = "", None, False
        deadline = time.monotonic() + timeout
        while replied is None or not idle:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no answer to {code!r} within {timeout:g}s")
            raw = await asyncio.wait_for(ws.read_message(), left)
            if raw is None:
                raise AssertionError(f"the kernel websocket closed while running {code!r}")
            msg = json.loads(raw)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "execute_result":
                result = content["data"]["text/plain"]
            elif kind == "stream":
                result += content["text"]
            elif kind == "error":
                result += "\n".join(content["traceback"])
            elif kind == "execute_reply":
                replied = content
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
        assert replied["status"] == "ok", (replied, result)
        return result
    finally:
        ws.close()


def execute(lab: RemoteLab, kernel_id: str, code: str) -> str:
    return asyncio.run(_execute(lab, kernel_id, code))


def wait_for(check, what: str, timeout: float = 60.0) -> Any:
    """Until ``check()`` is truthy (polled); its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout:g}s")


def service_session(service, kernel_id: str) -> dict[str, Any]:
    """The service's newest session of ``kernel_id`` (as its owner sees it)."""
    (found,) = [s for s in service.sessions() if s["kernel_id"] == kernel_id][:1]
    return found


def kept_attachment(service, kernel_id: str) -> dict[str, Any] | None:
    """What the service keeps for re-attaching ``kernel_id`` (read from its store)."""
    store = SessionStore(service.db_url)
    try:
        session = store.list(kernel_id=kernel_id)[-1]  # the newest
        with store.engine.connect() as conn:
            text = conn.exec_driver_sql(
                "SELECT launch FROM sessions WHERE id = ?", (session.id,)
            ).scalar()
    finally:
        store.close()
    kept = json.loads(text) if text else None
    return (kept or {}).get("attachment")


def jupyter_sessions(lab: RemoteLab) -> list[dict[str, Any]]:
    status, sessions = lab.api("GET", "api/sessions")
    assert status == 200, sessions
    return sessions


def notebook_session(lab: RemoteLab, path: str, kernel: str = KERNEL) -> dict[str, Any]:
    session = lab.kernel_session(kernel, path=path)
    assert session["path"] == path
    return session


@pytest.fixture(autouse=True)
def _clean(remote_lab, manager_service):  # noqa: F811 - the fixture
    """Each test starts with the service and the server up and no kernels; leaves it so."""
    if not manager_service.running:
        manager_service.start()
    if not remote_lab.running:
        remote_lab.start()
    remote_lab.end_sessions()
    yield
    if not manager_service.running:
        manager_service.start()
    if not remote_lab.running:
        remote_lab.start()
    remote_lab.end_sessions()
    manager_service.end_live_sessions()


def _outlives(lab: RemoteLab, service, docker_client, stop) -> None:
    session = notebook_session(lab, "nb.ipynb")
    kernel_id = session["kernel"]["id"]
    assert execute(lab, kernel_id, "x = 41\nprint('set')").strip() == "set"
    noted = wait_for(lambda: kept_attachment(service, kernel_id), "the attachment noted")
    wait_for(
        lambda: (kept_attachment(service, kernel_id) or {}).get("sessions"),
        "the session row noted",
    )
    assert noted["kernel_name"] == KERNEL
    engine_session = service_session(service, kernel_id)

    stop(lab)

    # The kernel runs on in the service: its container, its session RUNNING.
    assert service_session(service, kernel_id)["status"] == "RUNNING"
    (container,) = labelled_containers(docker_client, **{"session-id": engine_session["id"]})
    container.reload()
    assert container.status == "running"

    lab.start()
    (restored,) = jupyter_sessions(lab)
    assert restored["id"] == session["id"]
    assert restored["kernel"]["id"] == kernel_id
    assert (restored["path"], restored["name"], restored["type"]) == (
        "nb.ipynb",
        "nb.ipynb",
        "notebook",
    )
    assert execute(lab, kernel_id, "x + 1") == "42"
    assert service_session(service, kernel_id)["id"] == engine_session["id"]

    # Shutting it down on purpose still ends it: container gone, session over.
    status, _ = lab.api("DELETE", f"api/sessions/{session['id']}", timeout=60)
    assert status == 204
    assert labelled_containers(docker_client, **{"session-id": engine_session["id"]}) == []
    assert service_session(service, kernel_id)["status"] in TERMINAL


# -- tests ---------------------------------------------------------------------------------
def test_a_kernel_outlives_its_server_stopped_with_sigterm(
    remote_lab,  # noqa: F811
    manager_service,  # noqa: F811
    docker_client,
):
    _outlives(remote_lab, manager_service, docker_client, lambda lab: lab.stop())


def test_a_kernel_outlives_its_server_killed(
    remote_lab,  # noqa: F811
    manager_service,  # noqa: F811
    docker_client,
):
    _outlives(remote_lab, manager_service, docker_client, lambda lab: lab.kill())


def test_two_kernels_are_re_attached_at_once_and_a_restored_kernel_restarts(
    remote_lab,  # noqa: F811
    manager_service,  # noqa: F811
):
    make_notebook_dir(remote_lab.root / "sub")
    first = notebook_session(remote_lab, "first.ipynb")
    second = notebook_session(remote_lab, "sub/second.ipynb")
    for session, value in ((first, 1), (second, 2)):
        execute(remote_lab, session["kernel"]["id"], f"x = {value}")
        wait_for(
            lambda s=session: (kept_attachment(manager_service, s["kernel"]["id"]) or {}).get(
                "sessions"
            ),
            "the session row noted",
        )
    remote_lab.stop()
    remote_lab.start()

    restored = {s["id"]: s for s in jupyter_sessions(remote_lab)}
    assert set(restored) == {first["id"], second["id"]}
    for session, value in ((first, 1), (second, 2)):
        kernel_id = session["kernel"]["id"]
        assert restored[session["id"]]["kernel"]["id"] == kernel_id
        assert restored[session["id"]]["path"] == session["path"]
        assert execute(remote_lab, kernel_id, "x") == str(value)

    # A re-attached kernel restarts as any other: same kernel id, same session, state gone.
    kernel_id = second["kernel"]["id"]
    engine_session = service_session(manager_service, kernel_id)["id"]
    status, _ = remote_lab.api("POST", f"api/kernels/{kernel_id}/restart", timeout=120)
    assert status == 200
    assert execute(remote_lab, kernel_id, "'x' in globals()") == "False"
    assert service_session(manager_service, kernel_id)["id"] == engine_session
    assert service_session(manager_service, kernel_id)["status"] == "RUNNING"
    # ... and its working directory is still the notebook's.
    assert execute(remote_lab, kernel_id, "import os; os.getcwd()").strip("'").endswith("/sub")


def test_a_kernel_restarted_with_a_new_choice_is_re_attached_in_its_new_session(
    remote_lab,  # noqa: F811
    manager_service,  # noqa: F811
):
    _write_notebook(remote_lab, "choice.ipynb", 0)
    session = notebook_session(remote_lab, "choice.ipynb")
    kernel_id = session["kernel"]["id"]
    execute(remote_lab, kernel_id, "1")
    before = service_session(manager_service, kernel_id)
    assert before["allocations"] == []

    # The notebook now asks for a GPU: the restart ends the session and starts a new one.
    _write_notebook(remote_lab, "choice.ipynb", 1)
    status, _ = remote_lab.api("POST", f"api/kernels/{kernel_id}/restart", timeout=120)
    assert status == 200
    after = service_session(manager_service, kernel_id)
    assert after["id"] != before["id"] and len(after["allocations"]) == 1
    wait_for(
        lambda: (kept_attachment(manager_service, kernel_id) or {}).get("sessions"),
        "the new session's attachment noted",
    )
    execute(remote_lab, kernel_id, "y = 7")

    remote_lab.stop()
    remote_lab.start()
    (restored,) = jupyter_sessions(remote_lab)
    assert (restored["id"], restored["kernel"]["id"]) == (session["id"], kernel_id)
    assert execute(remote_lab, kernel_id, "y * 6") == "42"
    assert service_session(manager_service, kernel_id)["id"] == after["id"]


def test_a_server_that_starts_before_the_service_is_back_re_attaches_once_it_is(
    remote_lab,  # noqa: F811
    manager_service,  # noqa: F811
):
    """A Hub restart: the user's server and the manager service restart together, the
    server first. Its kernel endpoints wait (``restore_wait``) until it re-attached."""
    session = notebook_session(remote_lab, "together.ipynb")
    kernel_id = session["kernel"]["id"]
    execute(remote_lab, kernel_id, "x = 41")
    wait_for(
        lambda: (kept_attachment(manager_service, kernel_id) or {}).get("sessions"),
        "the session row noted",
    )
    remote_lab.stop()
    manager_service.stop()  # its kernels keep running; the next service adopts them

    remote_lab.start()  # the service does not answer yet
    manager_service.start()
    (restored,) = jupyter_sessions(remote_lab)
    assert (restored["id"], restored["kernel"]["id"]) == (session["id"], kernel_id)
    assert execute(remote_lab, kernel_id, "x + 1") == "42"


def test_a_re_attached_kernel_that_crashes_is_restarted_on_its_own_ports(
    remote_lab,  # noqa: F811
    manager_service,  # noqa: F811
    docker_client,
):
    session = notebook_session(remote_lab, "crash.ipynb")
    kernel_id = session["kernel"]["id"]
    execute(remote_lab, kernel_id, "x = 1")
    wait_for(
        lambda: (kept_attachment(manager_service, kernel_id) or {}).get("sessions"),
        "the session row noted",
    )
    remote_lab.stop()
    remote_lab.start()
    (restored,) = jupyter_sessions(remote_lab)  # answered once it is re-attached
    assert restored["kernel"]["id"] == kernel_id
    connection_file = remote_lab.base / "runtime" / f"kernel-{kernel_id}.json"
    ports = {k: v for k, v in json.loads(connection_file.read_text()).items() if "port" in k}

    # Its container dies (an OOM kill, say): jupyter_server's restarter starts it again,
    # on the same ports (clients made before keep them), in the same session.
    engine_session = service_session(manager_service, kernel_id)["id"]
    (container,) = labelled_containers(docker_client, **{"session-id": engine_session})
    container.kill()
    wait_for(
        lambda: (
            (s := service_session(manager_service, kernel_id))["status"] == "RUNNING"
            and s["reason"] == "kernel restarted"
        ),
        "the kernel restarted",
    )
    assert execute(remote_lab, kernel_id, "'x' in globals()") == "False"
    after = {k: v for k, v in json.loads(connection_file.read_text()).items() if "port" in k}
    assert after == ports
    assert service_session(manager_service, kernel_id)["id"] == engine_session


def test_a_session_renamed_or_given_another_kernel_is_re_attached_as_it_is_now(
    remote_lab,  # noqa: F811
    manager_service,  # noqa: F811
):
    session = notebook_session(remote_lab, "before.ipynb")
    first_kernel = session["kernel"]["id"]
    # The notebook is renamed (JupyterLab PATCHes its session's path).
    status, patched = remote_lab.api(
        "PATCH", f"api/sessions/{session['id']}", {"path": "after.ipynb", "name": "after.ipynb"}
    )
    assert status == 200, patched
    wait_for(
        lambda: (
            [
                r["path"]
                for r in (kept_attachment(manager_service, first_kernel) or {}).get("sessions", [])
            ]
            == ["after.ipynb"]
        ),
        "the renamed row noted",
    )
    # ... then switched to a new kernel (the old one is shut down, its session ended).
    status, patched = remote_lab.api(
        "PATCH", f"api/sessions/{session['id']}", {"kernel": {"name": KERNEL}}, timeout=120
    )
    assert status == 200, patched
    second_kernel = patched["kernel"]["id"]
    assert second_kernel != first_kernel
    execute(remote_lab, second_kernel, "z = 5")
    wait_for(
        lambda: (kept_attachment(manager_service, second_kernel) or {}).get("sessions"),
        "the new kernel's row noted",
    )
    wait_for(
        lambda: service_session(manager_service, first_kernel)["status"] in TERMINAL,
        "the first kernel ended",
    )

    remote_lab.stop()
    remote_lab.start()
    (restored,) = jupyter_sessions(remote_lab)
    assert (restored["id"], restored["kernel"]["id"], restored["path"]) == (
        session["id"],
        second_kernel,
        "after.ipynb",
    )
    assert execute(remote_lab, second_kernel, "z * 2") == "10"


def test_a_kernel_that_died_while_its_server_was_away_is_not_re_attached(
    remote_lab,  # noqa: F811
    manager_service,  # noqa: F811
    docker_client,
):
    dying = notebook_session(remote_lab, "dying.ipynb")
    kernel_id = dying["kernel"]["id"]
    execute(remote_lab, kernel_id, "x = 1")
    wait_for(
        lambda: (kept_attachment(manager_service, kernel_id) or {}).get("sessions"),
        "the session row noted",
    )
    engine_session = service_session(manager_service, kernel_id)["id"]
    remote_lab.stop()
    (container,) = labelled_containers(docker_client, **{"session-id": engine_session})
    container.kill()  # the kernel dies with nobody watching
    remote_lab.start()

    assert jupyter_sessions(remote_lab) == []
    status, _ = remote_lab.api("GET", f"api/kernels/{kernel_id}")
    assert status == 404
    ended = wait_for(
        lambda: (s := service_session(manager_service, kernel_id))["status"] in TERMINAL and s,
        "its session ended",
    )
    assert ended["status"] == "ERROR", ended
    wait_for(
        lambda: labelled_containers(docker_client, **{"session-id": engine_session}) == [],
        "its container removed",
    )
    # The notebook gets a new kernel as usual.
    again = notebook_session(remote_lab, "dying.ipynb")
    assert again["kernel"]["id"] != kernel_id
    assert execute(remote_lab, again["kernel"]["id"], "1 + 1") == "2"


def _write_notebook(lab: RemoteLab, name: str, gpus: int) -> None:
    notebook = {
        "cells": [],
        "metadata": {
            "kernelspec": {"name": KERNEL, "display_name": KERNEL, "language": "python"},
            "jupyter-gpu-sessions": {"resources": {"gpus": gpus}},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (lab.root / name).write_text(json.dumps(notebook))


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_kernel_queued_in_the_service_when_its_server_stopped_is_re_attached(
    remote_lab,  # noqa: F811
    manager_service,  # noqa: F811
    docker_client,
    how,
):
    # Every GPU of the service held by one kernel; the next one queues for them.
    hold, queued = _queue_behind_a_holder(remote_lab, manager_service)
    kernel_id = queued["kernel"]["id"]

    if how == "sigterm":
        remote_lab.stop()
    else:
        remote_lab.kill()
    # Its start goes on in the service: once the GPUs are free, it runs.
    hold_session = service_session(manager_service, hold["kernel"]["id"])["id"]
    status, _ = manager_service.api("DELETE", f"gpu-sessions/api/sessions/{hold_session}")
    assert status == 200
    running = wait_for(
        lambda: (s := service_session(manager_service, kernel_id))["status"] == "RUNNING" and s,
        "the queued kernel's start, finished in the service",
    )
    assert len(running["allocations"]) == 4

    remote_lab.start()
    (restored,) = jupyter_sessions(remote_lab)
    assert (restored["id"], restored["kernel"]["id"]) == (queued["id"], kernel_id)
    assert execute(remote_lab, kernel_id, "import os; os.environ['CUDA_VISIBLE_DEVICES']")
    assert service_session(manager_service, kernel_id)["id"] == running["id"]


def _queue_behind_a_holder(lab: RemoteLab, service) -> tuple[dict, dict]:
    """A kernel holding every GPU of the service, and a kernel queued for them (noted)."""
    _write_notebook(lab, "hold.ipynb", 4)
    _write_notebook(lab, "queued.ipynb", 4)
    hold = notebook_session(lab, "hold.ipynb")
    execute(lab, hold["kernel"]["id"], "1")
    queued = notebook_session(lab, "queued.ipynb")
    kernel_id = queued["kernel"]["id"]
    assert service_session(service, kernel_id)["status"] == "PENDING"
    wait_for(
        lambda: (kept_attachment(service, kernel_id) or {}).get("sessions"),
        "the queued kernel's session row noted",
    )
    return hold, queued


def test_a_kernel_still_queued_when_its_server_comes_back_is_re_attached_starting(
    remote_lab,  # noqa: F811
    manager_service,  # noqa: F811
):
    hold, queued = _queue_behind_a_holder(remote_lab, manager_service)
    kernel_id = queued["kernel"]["id"]
    remote_lab.stop()
    remote_lab.start()

    # Both back: the holder running, the queued one starting (its start goes on).
    restored = {s["id"]: s for s in jupyter_sessions(remote_lab)}
    assert set(restored) == {hold["id"], queued["id"]}
    assert restored[queued["id"]]["kernel"]["id"] == kernel_id
    assert restored[queued["id"]]["kernel"]["execution_state"] == "starting"
    assert service_session(manager_service, kernel_id)["status"] == "PENDING"

    # The holder's notebook shuts its kernel down; the queued kernel gets the GPUs, and the
    # open notebook's websocket (which waited for it) runs its cell.
    status, _ = remote_lab.api("DELETE", f"api/sessions/{hold['id']}", timeout=60)
    assert status == 204
    devices = execute(remote_lab, kernel_id, "import os; os.environ['CUDA_VISIBLE_DEVICES']")
    assert len(devices.strip("'").split(",")) == 4
    (session,) = jupyter_sessions(remote_lab)
    assert (session["id"], session["kernel"]["id"]) == (queued["id"], kernel_id)
    assert session["kernel"]["execution_state"] == "idle"


def test_a_re_attached_kernel_still_queued_can_be_shut_down(
    remote_lab,  # noqa: F811
    manager_service,  # noqa: F811
):
    _hold, queued = _queue_behind_a_holder(remote_lab, manager_service)
    kernel_id = queued["kernel"]["id"]
    remote_lab.stop()
    remote_lab.start()

    status, _ = remote_lab.api("DELETE", f"api/sessions/{queued['id']}", timeout=60)
    assert status == 204
    assert service_session(manager_service, kernel_id)["status"] == "CANCELLED"
    assert [s["id"] for s in jupyter_sessions(remote_lab)] == [_hold["id"]]
    status, _ = remote_lab.api("GET", f"api/kernels/{kernel_id}")
    assert status == 404


def test_embedded_mode_still_ends_kernels_with_their_server(tmp_path, kernel_image):
    """Without a manager service, a server's kernels end with it (running_lab fails when
    any of its containers outlives it)."""
    with running_lab(tmp_path / "lab") as lab:
        status_session = lab.api(
            "POST",
            "/api/sessions",
            {
                "path": "nb.ipynb",
                "type": "notebook",
                "name": "nb.ipynb",
                "kernel": {"name": KERNEL},
            },
            timeout=120,
        )
        kernel_id = status_session["kernel"]["id"]
        assert asyncio.run(_execute(lab, kernel_id, "x = 41; x + 1")) == "42"
        # A kernel shut down while it starts leaves nothing that stops SIGTERM from
        # stopping the server (jupyter_client kept its finished start as pending).
        other = lab.api("POST", "/api/kernels", {"name": KERNEL}, timeout=120)
        lab.api("DELETE", f"/api/kernels/{other['id']}", timeout=60)
        lab.process.send_signal(signal.SIGTERM)
        assert lab.process.wait(30) == 0, lab.log_tail()
        assert "Exception in callback" not in lab.log_path.read_text()
    store = SessionStore(f"sqlite:///{tmp_path / 'lab'}/store.sqlite")
    try:
        (session,) = store.list(kernel_id=kernel_id)
        assert session.status.is_terminal, session.status
    finally:
        store.close()


def test_the_service_keeps_well_formed_attachments_of_its_callers_live_kernels(
    remote_lab,  # noqa: F811
    manager_service,  # noqa: F811
):
    session = notebook_session(remote_lab, "shape.ipynb")
    kernel_id = session["kernel"]["id"]
    execute(remote_lab, kernel_id, "1")
    wait_for(
        lambda: (kept_attachment(manager_service, kernel_id) or {}).get("sessions"),
        "the session row noted",
    )
    engine_session = service_session(manager_service, kernel_id)["id"]

    status, body = manager_service.call("running_kernels")
    assert status == 200, body
    (kernel,) = [k for k in body["result"] if k["kernel_id"] == kernel_id]
    assert set(kernel) == {
        "session_id",
        "kernel_id",
        "status",
        "runtime",
        "container_id",
        "container_name",
        "connection_info",
        "attachment",
    }
    assert (kernel["session_id"], kernel["status"], kernel["runtime"]) == (
        engine_session,
        "RUNNING",
        "docker",
    )
    info = kernel["connection_info"]
    assert info["key"] and info["transport"] == "tcp" and info["signature_scheme"]
    assert all(isinstance(info[p], int) for p in ("shell_port", "iopub_port", "hb_port"))
    assert kernel["attachment"] == {
        "server": "/",
        "kernel_name": KERNEL,
        "cwd": str(remote_lab.root),
        "sessions": [
            {"id": session["id"], "path": "shape.ipynb", "name": "shape.ipynb", "type": "notebook"}
        ],
    }

    # Malformed attachments are refused, naming what is wrong; nothing is kept of them.
    for bad, says in (
        ({"kernel_name": KERNEL, "extra": 1}, "unknown keys: extra"),
        ({"kernel_name": ""}, "kernel_name"),
        ({"kernel_name": KERNEL, "sessions": [{"path": "x"}]}, "each attachment session"),
        ({"kernel_name": KERNEL, "cwd": 7}, "cwd must be a string"),
    ):
        status, body = manager_service.call(
            "note_attachment", {"session_id": engine_session, "attachment": bad}
        )
        assert status == 400 and says in body["message"], (bad, status, body)
    assert kept_attachment(manager_service, kernel_id) == kernel["attachment"]
    status, body = manager_service.call(
        "note_attachment", {"session_id": "0" * 32, "attachment": {"kernel_name": KERNEL}}
    )
    assert status == 404, body

    # An ended kernel session takes none, and is no longer listed.
    status, _ = remote_lab.api("DELETE", f"api/sessions/{session['id']}", timeout=60)
    assert status == 204
    status, body = manager_service.call(
        "note_attachment", {"session_id": engine_session, "attachment": {"kernel_name": KERNEL}}
    )
    assert status == 200, body
    assert kept_attachment(manager_service, kernel_id) == kernel["attachment"]
    status, body = manager_service.call("running_kernels")
    assert kernel_id not in {k["kernel_id"] for k in body["result"]}


def test_a_plain_local_kernel_still_ends_with_its_server_in_remote_mode(
    remote_lab,  # noqa: F811
):
    session = notebook_session(remote_lab, "plain.ipynb", kernel="python3")
    pid = int(execute(remote_lab, session["kernel"]["id"], "import os; os.getpid()"))
    assert os.path.exists(f"/proc/{pid}")
    remote_lab.stop()
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "the local kernel ended")
    remote_lab.start()
    assert jupyter_sessions(remote_lab) == []
