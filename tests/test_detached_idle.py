"""Kernels whose server is gone (JupyterHub mode): the manager service applies the owner's
``idle_timeout`` to the kernels no user's server is attached to any more, and keeps those
that are busy (a long training cell) or that their server re-attaches in time.

The decision itself is tested on a fake clock; the rest with real processes: the manager
service and a user's server in remote mode as subprocesses (tests/remote_support.py), real
containers, cells run over jupyter_server's kernel websocket.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
import zmq
from jupyter_client.session import Session as MessageSession
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from jupyter_gpu_sessions.manager.kernel_watch import (
    PROBE_TIMEOUT,
    Activity,
    Attachment,
    KernelChannels,
    decide,
    idle_reason,
)

from .remote_support import ManagerService, RemoteLab, running_manager, running_remote_lab
from .support import labelled_containers

TIMEOUT = 20.0  # the owners' idle_timeout (a restarted server must be back well within it)
# Long, so that an end well before it shows the server's own word (a clean shutdown)
# detached the kernel at once; a killed server's kernels are detached after it.
DETACHED_AFTER = 40.0
CELL = 45.0  # seconds a long cell runs (past the stop plus the timeout)
TERMINAL = {"TERMINATED", "CANCELLED", "ERROR"}


# -- the decision, on a fake clock ---------------------------------------------------------
def _decide(attachment: Attachment, activity: Activity | None, now: float):
    return decide(attachment, activity, now=now, detached_after=30, idle_timeout=60)


def test_a_kernel_polled_by_its_server_is_attached_and_detached_after_the_polls_stop():
    attachment = Attachment(noticed_at=1000)
    assert _decide(attachment, None, 1029).action == "attached"  # noticed just now
    assert _decide(attachment, None, 1030).action == "listen"  # never called on: detached
    attachment.seen(1031)
    assert _decide(attachment, None, 1040).action == "attached"
    assert _decide(attachment, None, 1060).action == "attached"  # 29 s without a poll
    assert attachment.detached_since(1061, 30) == 1031  # since its last poll
    assert _decide(attachment, None, 1061).action == "listen"


def test_a_kernel_let_go_of_is_detached_at_once_until_a_server_calls_again():
    attachment = Attachment(noticed_at=1000, seen_at=1100)
    attachment.let_go(1102)
    assert attachment.detached_since(1102, 30) == 1102
    assert _decide(attachment, None, 1102).action == "listen"
    attachment.seen(1110)  # a server re-attached it
    assert _decide(attachment, Activity(busy=False), 1111).action == "attached"
    # A let-go older than this process's first look counts from that look.
    late = Attachment(noticed_at=2000)
    late.let_go(1500)
    assert late.detached_since(2000, 30) == 2000


def test_an_idle_detached_kernel_ends_past_the_timeout_from_its_activity_or_detachment():
    attachment = Attachment(noticed_at=1000, seen_at=1000)
    attachment.let_go(1000)
    unknown = Activity()  # the probe has not answered yet
    assert _decide(attachment, unknown, 2000).action == "busy"  # never ended unknown
    idle = Activity(busy=False)
    assert _decide(attachment, idle, 1060).action == "idle"
    ended = _decide(attachment, idle, 1061)
    assert ended.action == "end" and ended.idle_for == 61
    # Activity after the detachment moves the clock.
    active = Activity(busy=False, last_at=1050)
    assert _decide(attachment, active, 1100).action == "idle"
    assert _decide(attachment, active, 1111).idle_for == 61
    # Activity from before the detachment does not.
    before = Activity(busy=False, last_at=900)
    assert _decide(attachment, before, 1061).action == "end"


def test_a_busy_detached_kernel_is_kept_and_no_timeout_keeps_every_kernel():
    attachment = Attachment(noticed_at=0, seen_at=0)
    attachment.let_go(0)
    assert _decide(attachment, Activity(busy=True, last_at=0), 10_000).action == "busy"
    verdict = decide(
        attachment, Activity(busy=False), now=10_000, detached_after=30, idle_timeout=None
    )
    assert verdict.action == "idle" and verdict.idle_for == 10_000


def test_the_reason_says_why_in_the_idle_timeout_style():
    assert idle_reason("ada", 61.4, 60) == (
        "idle-timeout: no server attached and no execution for 61s, past ada's idle_timeout "
        "of 60s; its devices are free again"
    )


def test_channels_read_activity_as_jupyter_server_does():
    """Status of a tracked request sets busy/idle; any tracked message is activity; the
    probe's own messages are not; an unanswered probe means a cell runs."""
    context = zmq.Context()
    connection = {"ip": "127.0.0.1", "key": "k" * 16, "iopub_port": 1, "shell_port": 2}
    channels = KernelChannels(context, connection, now=100.0)
    kernel = MessageSession(key=b"k" * 16)
    try:
        probe = {"msg_id": channels.probe_id, "msg_type": "kernel_info_request"}
        execute = {"msg_id": "e1", "msg_type": "execute_request"}

        def deliver(msg_type: str, content: dict, parent: dict, now: float, shell=False):
            channels.handle(kernel.msg(msg_type, content, parent=parent), shell=shell, now=now)

        deliver("iopub_welcome", {"subscription": ""}, {}, 100.05)  # greets our SUB
        deliver("status", {"execution_state": "busy"}, probe, 100.1)
        assert channels.activity == Activity(busy=None, last_at=None)
        channels.check_probe(100.0 + PROBE_TIMEOUT / 2)
        assert channels.activity.busy is None  # not answered yet, not late yet
        channels.check_probe(100.0 + PROBE_TIMEOUT + 1)
        assert channels.activity.busy is True  # a cell holds its shell
        deliver("stream", {"name": "stdout", "text": "epoch 3"}, execute, 110.0)
        assert channels.activity.last_at == 110.0
        deliver("status", {"execution_state": "idle"}, execute, 120.0)
        assert channels.activity == Activity(busy=False, last_at=120.0)
        deliver("kernel_info_reply", {"status": "ok"}, probe, 121.0, shell=True)
        # The probe's late answer: the kernel ran a cell until now.
        assert channels.activity == Activity(busy=False, last_at=121.0)
        deliver("status", {"execution_state": "idle"}, probe, 121.1)  # the probe's own
        # What a kernel_info or comm_info of someone else causes is not activity.
        other = {"msg_id": "k2", "msg_type": "comm_info_request"}
        deliver("status", {"execution_state": "busy"}, other, 130.0)
        assert channels.activity == Activity(busy=False, last_at=121.0)
        deliver("status", {"execution_state": "busy"}, execute | {"msg_id": "e2"}, 140.0)
        assert channels.activity == Activity(busy=True, last_at=140.0)
    finally:
        channels.close()
        context.term()


# -- real processes ------------------------------------------------------------------------
CONFIG = {
    "GPUSessionManager": {
        "policies": {"default": {"idle_timeout": f"{TIMEOUT:g}s"}},
        "detached_after": DETACHED_AFTER,
        "detached_check_interval": 0.5,
    }
}


@pytest.fixture(scope="module")
def service(tmp_path_factory, kernel_image):
    with running_manager(tmp_path_factory.mktemp("service"), config=CONFIG) as service:
        yield service


@pytest.fixture(scope="module")
def lab(tmp_path_factory, service):
    # The server's own culler (it culls its kernels past the same idle_timeout) is out of
    # the way: these tests are about the service's.
    args = ["--GPUSessionsExtension.idle_check_interval=3600"]
    with running_remote_lab(tmp_path_factory.mktemp("lab"), service, extra_args=args) as lab:
        yield lab


@pytest.fixture
def clean(lab, service):
    """The test starts with the server up and no kernels, and leaves it so."""
    if not lab.running:
        lab.start()
    yield
    if not lab.running:
        lab.start()
    lab.end_sessions()
    service.end_live_sessions()


def wait_for(check, what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout:g}s")


def engine_session(service: ManagerService, kernel_id: str) -> dict[str, Any]:
    (found,) = [s for s in service.sessions() if s["kernel_id"] == kernel_id][:1]
    return found


def ended(service: ManagerService, kernel_id: str) -> dict[str, Any] | None:
    session = engine_session(service, kernel_id)
    return session if session["status"] in TERMINAL else None


def noted(service: ManagerService, kernel_id: str) -> bool:
    """The service keeps what re-attaching the kernel needs, its notebook's row included."""
    status, kernels = service.call("running_kernels")
    assert status == 200, kernels
    return any(
        k["kernel_id"] == kernel_id and k["attachment"].get("sessions") for k in kernels["result"]
    )


def started_kernel(lab: RemoteLab, service: ManagerService, name: str, path: str) -> str:
    kernel_id = lab.kernel_session(name, path=path)["kernel"]["id"]
    reply, out = lab.execute(kernel_id, "x = 41\nprint('set')")
    assert reply["status"] == "ok" and out.strip() == "set"
    wait_for(lambda: noted(service, kernel_id), "the attachment noted", 30)
    return kernel_id


def assert_ended_idle(service: ManagerService, docker_client, kernel_id: str) -> dict:
    session = engine_session(service, kernel_id)
    assert session["status"] == "TERMINATED", session
    reason = session["reason"]
    assert reason.startswith("idle-timeout: no server attached and no execution for "), reason
    assert reason.endswith(f"idle_timeout of {TIMEOUT:g}s; its devices are free again"), reason
    assert labelled_containers(docker_client, **{"session-id": session["id"]}) == []
    status, gpus = service.api("GET", "gpu-sessions/api/gpus")
    assert status == 200 and not any(g["holders"] for g in gpus["gpus"]), gpus
    return session


def idle_seconds(reason: str) -> float:
    return float(reason.split("no execution for ")[1].split("s,")[0])


async def _start_cell(lab: RemoteLab, kernel_id: str, code: str) -> None:
    """Send ``code`` over the kernel's websocket and return once the kernel is busy with it
    (the cell runs on after the websocket closes)."""
    url = lab.url.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels"
    client = uuid.uuid4().hex
    ws = await websocket_connect(
        HTTPRequest(f"{url}?session_id={client}", headers={"Authorization": f"token {lab.token}"})
    )
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": "execute_request",
        "session": client,
        "username": "test",
        "version": "5.3",
        "date": "",
    }
    content = {
        "code": code,
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
    }
    message = {"header": header, "parent_header": {}, "metadata": {}, "content": content}
    try:
        await ws.write_message(json.dumps({**message, "channel": "shell", "buffers": []}))
        while True:
            raw = await asyncio.wait_for(ws.read_message(), 60)
            assert raw is not None, "the kernel websocket closed"
            msg = json.loads(raw)
            if (
                msg.get("parent_header", {}).get("msg_id") == msg_id
                and msg["msg_type"] == "execute_input"
            ):
                return
    finally:
        ws.close()


@pytest.mark.usefixtures("clean")
def test_a_kernel_whose_server_stopped_ends_idle_timeout_after_the_timeout(
    lab, service, docker_client
):
    kernel_id = started_kernel(lab, service, "python3-gpu", "stopped.ipynb")
    assert engine_session(service, kernel_id)["status"] == "RUNNING"

    lab.stop()  # SIGTERM: the server lets go of its kernels and says so
    stopped = time.monotonic()
    wait_for(lambda: ended(service, kernel_id), "the idle end", TIMEOUT + DETACHED_AFTER + 30)
    took = time.monotonic() - stopped

    session = assert_ended_idle(service, docker_client, kernel_id)
    assert TIMEOUT - 2 < idle_seconds(session["reason"]) < TIMEOUT + 3
    # Detached at once on the server's word, not after detached_after.
    assert TIMEOUT - 2 < took < DETACHED_AFTER, took


@pytest.mark.usefixtures("clean")
def test_a_kernel_whose_server_was_killed_ends_idle_timeout_after_detached_after(
    lab, service, docker_client
):
    kernel_id = started_kernel(lab, service, "python3-gpu", "killed.ipynb")

    lab.kill()  # SIGKILL: nobody says anything; the polls stop
    killed = time.monotonic()
    wait_for(lambda: ended(service, kernel_id), "the idle end", TIMEOUT + DETACHED_AFTER + 30)
    took = time.monotonic() - killed

    session = assert_ended_idle(service, docker_client, kernel_id)
    # Detached once no poll came for detached_after (the restarter polls every 3 s); idle
    # since its last poll.
    assert DETACHED_AFTER - 5 < took < DETACHED_AFTER + 10, took
    assert DETACHED_AFTER - 1 <= idle_seconds(session["reason"]) < DETACHED_AFTER + 5


@pytest.mark.usefixtures("clean")
def test_a_kernel_running_a_long_cell_is_kept_then_ends_once_idle_past_the_timeout(
    lab, service, docker_client
):
    kernel_id = started_kernel(lab, service, "python3-gpu", "training.ipynb")
    asyncio.run(_start_cell(lab, kernel_id, f"import time\ntime.sleep({CELL:g})\nx = 42"))
    cell_started = time.monotonic()

    lab.stop()
    stopped = time.monotonic()
    time.sleep(max(0.0, stopped + TIMEOUT + 6 - time.monotonic()))  # well past the timeout
    session = engine_session(service, kernel_id)
    assert session["status"] == "RUNNING", session  # busy: kept
    (container,) = labelled_containers(docker_client, **{"session-id": session["id"]})
    container.reload()
    assert container.status == "running"

    # Once the cell is done it is idle, and ends a timeout later.
    wait_for(lambda: ended(service, kernel_id), "the idle end", CELL + TIMEOUT + 30)
    took = time.monotonic() - cell_started
    assert took > CELL + TIMEOUT - 2, took
    session = assert_ended_idle(service, docker_client, kernel_id)
    assert TIMEOUT - 2 < idle_seconds(session["reason"]) < TIMEOUT + 3


@pytest.mark.usefixtures("clean")
def test_a_kernel_whose_server_comes_back_in_time_is_re_attached_and_kept(lab, service):
    kernel_id = started_kernel(lab, service, "python3-gpu", "back.ipynb")
    before = engine_session(service, kernel_id)

    lab.stop()
    stopped = time.monotonic()
    lab.start()  # re-attaches its kernel
    back = time.monotonic() - stopped
    assert back < TIMEOUT - 2, f"the server took {back:.1f}s to come back: too slow a machine"
    status, kernels = lab.api("GET", "api/kernels")
    assert status == 200 and kernel_id in {k["id"] for k in kernels}

    time.sleep(max(0.0, stopped + TIMEOUT + 6 - time.monotonic()))  # past the timeout
    session = engine_session(service, kernel_id)
    assert session["status"] == "RUNNING" and session["id"] == before["id"], session
    reply, out = lab.execute(kernel_id, "print(x + 1)")
    assert reply["status"] == "ok" and out.strip() == "42"


def test_note_detached_takes_the_callers_own_session_ids_only(service):
    status, answer = service.call("note_detached", {"session_ids": ["not-an-id"]})
    assert status == 400 and "32 hexadecimal digits" in answer["message"], answer
    status, answer = service.call("note_detached", {"session_ids": "0" * 32})
    assert status == 400, answer
    status, answer = service.call("note_detached", {"session_ids": ["0" * 32] * 300})
    assert status == 400 and "at most 256" in answer["message"], answer
    # An id of no session of the caller's: nothing to let go of, and nothing said about it.
    status, answer = service.call("note_detached", {"session_ids": ["0" * 32]})
    assert (status, answer) == (200, {"result": None})
