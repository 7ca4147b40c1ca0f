"""GPU-aware idle reclaim: a kernel holding GPUs that leaves them idle (its processes' SM use
under its owner's gpu_idle_threshold for gpu_idle_window) is warned — in its notebook, also
while a cell keeps the CPU busy, and on the events websocket — then ended ``gpu-idle`` and
its GPU freed. Use above the threshold, a restart, no GPU, a place in the queue: left alone.

Real containers and a real server; the GPUs are simulated, and so is their per-process
utilization (SimulatedInventory's processes file)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import time
import uuid
from pathlib import Path

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from jupyter_gpu_sessions.core.gpu_idle import (
    GPUIdleClock,
    notice_event,
    parse_warning,
    warning_reason,
    withdrawn_reason,
)
from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.kernel.notices import NoticeWatcher, notice_path
from jupyter_gpu_sessions.kernel.render import quota_table
from jupyter_gpu_sessions.manager import GPUSessionManager
from jupyter_gpu_sessions.manager.gpu_idle import NOTICE_JSON, parse_grace

from .api_support import ADMIN, TOKENS, Api, server_fixtures
from .remote_support import running_manager, running_remote_lab
from .support import make_notebook_dir, shipped_spec

# -- the decision, on a fake clock ----------------------------------------------------------


def _observe(clock: GPUIdleClock, now: float, utilization: int | None, run: str = "c1"):
    return clock.observe(
        run=run, utilization=utilization, threshold=10, window=60, grace=6, now=now
    )


def test_the_clock_warns_after_the_window_then_ends_after_the_grace():
    clock = GPUIdleClock("c1")
    assert _observe(clock, 1000, 0).action == ""  # idle from now on
    assert _observe(clock, 1030, 9).action == ""  # still under 10%
    warned = _observe(clock, 1060, 3)
    assert warned.action == "warn" and warned.idle_for == 60 and warned.ends_at == 1066
    assert _observe(clock, 1063, 0).action == ""  # warned once, not again
    ended = _observe(clock, 1066, 0)
    assert ended.action == "end" and ended.idle_for == 66


def test_use_at_the_threshold_withdraws_the_warning_and_starts_over():
    clock = GPUIdleClock("c1")
    _observe(clock, 0, 0)
    assert _observe(clock, 60, 0).action == "warn"
    assert _observe(clock, 62, 10).action == "withdraw"  # 10% is not under 10%
    assert _observe(clock, 63, 0).action == ""
    assert _observe(clock, 122, 0).action == ""  # the window counts from 63
    assert _observe(clock, 123, 0).action == "warn"


def test_a_restart_starts_the_clock_over():
    clock = GPUIdleClock("c1")
    _observe(clock, 0, 0)
    assert _observe(clock, 60, 0).action == "warn"
    assert _observe(clock, 61, 0, run="c2").action == "withdraw"  # a new container
    assert _observe(clock, 120, 0, run="c2").action == ""
    assert _observe(clock, 121, 0, run="c2").action == "warn"


def test_unknown_utilization_or_no_policy_is_never_reclaimed():
    clock = GPUIdleClock("c1")
    for now in range(0, 600, 5):
        assert _observe(clock, now, None).action == ""
    _observe(clock, 600, 0)
    assert _observe(clock, 660, 0).action == "warn"
    assert _observe(clock, 661, None).action == "withdraw"
    unlimited = clock.observe(run="c1", utilization=0, threshold=None, window=60, grace=6, now=9e9)
    assert unlimited.action == ""


def test_warnings_travel_as_history_entries_and_read_back_as_events():
    reason = warning_reason(5, 61.25, 6)
    assert parse_warning(reason) == {"threshold": 5.0, "idle_seconds": 61.2, "grace_seconds": 6.0}
    row = {"session_id": "s" * 32, "kernel_id": "k", "name": "n.ipynb", "owner": "ada"}
    event = notice_event({**row, "status": "RUNNING", "reason": reason, "at": 100.0})
    assert event["type"] == "gpu-idle-warning" and event["ends_at"] == 106.0
    assert event["threshold"] == 5.0 and event["idle_seconds"] == 61.2
    withdrawn = notice_event({**row, "reason": withdrawn_reason(5, 40), "at": 101.0})
    assert withdrawn["type"] == "gpu-idle-withdrawn" and "40%" in withdrawn["message"]
    assert notice_event({**row, "status": "RUNNING", "reason": "started", "at": 1.0}) is None


def test_the_grace_is_a_duration_or_a_percent_of_the_window(tmp_path):
    assert parse_grace("10%") == ("percent", 10.0)
    assert parse_grace("2m") == ("seconds", 120.0)
    for bad in ("0%", "150%", "soon"):
        with pytest.raises(Exception, match="gpu_idle_grace"):
            parse_grace(bad)
    manager = GPUSessionManager(
        db_url=f"sqlite:///{tmp_path}/g.sqlite", gpu_idle_check_interval=5.0
    )
    try:
        assert manager.gpu_idle_grace_for(600) == 60  # 10% by default
        assert manager.gpu_idle_grace_for(20) == 5  # never under one check interval
    finally:
        manager.close()


def test_the_kernel_side_watcher_prints_each_new_notice_once(tmp_path):
    info = tmp_path / "session.json"
    path = notice_path({"JUPYTER_GPU_SESSIONS_INFO": str(info)})
    assert path == str(tmp_path / NOTICE_JSON)
    assert notice_path({}) is None
    Path(path).write_text(json.dumps({"id": "old", "message": "meant for the last kernel"}))
    out = io.StringIO()
    watcher = NoticeWatcher(path, stream=out)
    assert watcher.check() is None  # there before this kernel: not shown
    Path(path).write_text(json.dumps({"id": "n1", "message": "GPU idle: ending soon"}))
    assert watcher.check() == "GPU idle: ending soon"
    assert watcher.check() is None
    Path(path).write_text("{half a fi")
    assert watcher.check() is None
    Path(path).write_text(json.dumps({"id": "n2", "message": "withdrawn"}))
    assert watcher.check() == "withdrawn"
    assert out.getvalue().splitlines() == [
        "[jupyter-gpu-sessions] GPU idle: ending soon",
        "[jupyter-gpu-sessions] withdrawn",
    ]


# -- through a server, with container kernels ----------------------------------------------

WINDOW = 2.0
GRACE = 3.0
THRESHOLD = 10


@pytest.fixture
def processes_file(tmp_path) -> Path:
    path = tmp_path / "gpu-processes.json"
    path.write_text("[]")
    return path


jp_server_config_base, jp_auth_header = server_fixtures()


@pytest.fixture
def jp_server_config(jp_server_config_base, processes_file):
    config = jp_server_config_base
    config.GPUSessionManager.update(
        {
            "simulated_processes": str(processes_file),
            "gpu_idle_check_interval": 0.5,
            "gpu_idle_grace": f"{GRACE:g}s",
            "policies": {
                "default": {
                    "gpu_idle_threshold": f"{THRESHOLD}%",
                    "gpu_idle_window": f"{WINDOW:g}s",
                }
            },
        }
    )
    return config


def _spec(kernel_image: str, gpus: int) -> dict:
    spec = shipped_spec("python3-gpu" if gpus else "python3-container")
    config = spec["metadata"]["kernel_provisioner"]["config"]
    config.update({"image": kernel_image, "cpus": 1, "memory": "1GiB"})
    if gpus:
        config["gpus"] = gpus
    return spec


@pytest.fixture
def kernelspecs(jp_data_dir, kernel_image) -> dict[str, str]:
    names = {}
    for gpus, name in ((1, "idle-1gpu"), (4, "idle-4gpu"), (0, "idle-nogpu")):
        target = jp_data_dir / "kernels" / name
        target.mkdir(parents=True)
        (target / "kernel.json").write_text(json.dumps(_spec(kernel_image, gpus)))
        names[gpus] = name
    return names


@pytest.fixture
def server(jp_serverapp, jp_root_dir):
    make_notebook_dir(jp_root_dir)
    return jp_serverapp


@contextlib.asynccontextmanager
async def running(serverapp):
    """The server's extensions started (the engine's threads); its kernels shut down after."""
    await serverapp.extension_manager.start_all_extensions()
    kernels = serverapp.kernel_manager
    try:
        yield serverapp
    finally:
        for kernel_id in list(kernels.list_kernel_ids()):
            await kernels.shutdown_kernel(kernel_id, now=True)


def _manager(serverapp) -> GPUSessionManager:
    return serverapp.web_app.settings["gpu_sessions_engine"].manager


async def _start(jp_fetch, serverapp, name: str, *, ready: bool = True) -> str:
    response = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": name}))
    kernel_id = json.loads(response.body)["id"]
    if ready:
        await serverapp.kernel_manager.get_kernel(kernel_id).ready
    return kernel_id


def _session(serverapp, kernel_id: str):
    return serverapp.kernel_manager.get_kernel(kernel_id).provisioner.session


async def _until(what: str, check, timeout: float):
    """``check()``'s first true answer, looked at every 0.1 s (a state in the store or the
    server, not an event this test could await)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


class Events:
    """The events websocket as the admin sees it, read into ``seen`` in the background."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[dict] = []
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Events:
        request = HTTPRequest(self.url, headers={"Authorization": f"token {TOKENS[ADMIN]}"})
        self.ws = await websocket_connect(request)
        assert json.loads(await self.ws.read_message())["type"] == "hello"
        self._task = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        while (message := await self.ws.read_message()) is not None:
            self.seen.append(json.loads(message))

    def of(self, kind: str, session_id: str) -> list[dict]:
        return [e for e in self.seen if e["type"] == kind and e.get("session_id") == session_id]

    async def __aexit__(self, *exc) -> None:
        self.ws.close()
        if self._task is not None:
            self._task.cancel()


@pytest.fixture
def events_url(jp_http_port, jp_base_url) -> str:
    return f"ws://127.0.0.1:{jp_http_port}{jp_base_url}gpu-sessions/api/events"


async def _set_utilization(manager: GPUSessionManager, path: Path, *uses: tuple) -> None:
    """The simulated processes file: each session's kernel processes (host PIDs) on its
    GPU, the first with the given SM percent (a session's use is its processes' sum)."""
    by_uuid = {d.uuid: d.index for d in manager.inventory.devices()}
    entries = []
    for session, utilization in uses:
        pids = await manager.runtime("docker").pids(manager.handle(session))
        assert pids, f"no processes found for session {session.id}"
        gpu = by_uuid[session.allocations[0].gpu_uuid]
        entries += [
            {"gpu": gpu, "pid": pid, "memory_used": "1GiB", "utilization": 0 if n else utilization}
            for n, pid in enumerate(pids)
        ]
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(entries))
    os.replace(partial, path)


def _gpu_idle_entries(manager: GPUSessionManager, session_id: str) -> list[str]:
    history = manager.store.get(session_id).history
    return [h.reason for h in history if h.reason.startswith("gpu-idle")]


async def test_a_cpu_busy_kernel_with_an_idle_gpu_is_warned_in_its_cell_then_ended(
    server, jp_fetch, kernelspecs, events_url
):
    manager = _manager(server)
    kernels = server.kernel_manager
    async with running(server), Events(events_url) as events:
        kernel_id = await _start(jp_fetch, server, kernelspecs[1])
        session = _session(server, kernel_id)
        assert len(session.allocations) == 1
        # A kernel waiting for all four GPUs while one is held: queued, never warned.
        queued_id = await _start(jp_fetch, server, kernelspecs[4], ready=False)
        queued = await _until("the 4-GPU kernel to queue", lambda: _session(server, queued_id), 30)
        assert manager.store.get(queued.id).status == SessionStatus.PENDING

        client = kernels.get_kernel(kernel_id).client()
        client.start_channels()
        try:
            started = time.monotonic()
            msg_id = client.execute("print('busy on the CPU', flush=True)\nwhile True: pass")
            warning = None
            while warning is None:
                message = await client.get_iopub_msg(timeout=WINDOW + GRACE + 20)
                content = message["content"]
                if (
                    message["parent_header"].get("msg_id") == msg_id
                    and message["msg_type"] == "stream"
                    and "[jupyter-gpu-sessions]" in content["text"]
                ):
                    warning = content
            assert warning["name"] == "stderr"
            assert f"under {THRESHOLD}% of its GPU" in warning["text"]
            assert "will be shut down" in warning["text"]
            assert time.monotonic() - started >= WINDOW
            assert kernels.get_kernel(kernel_id).execution_state == "busy"  # the cell still runs
        finally:
            client.stop_channels()

        warned = await _until(
            "the warning on the events websocket",
            lambda: events.of("gpu-idle-warning", session.id),
            10,
        )
        assert warned[0]["kernel_id"] == kernel_id
        assert warned[0]["idle_seconds"] >= WINDOW
        assert warned[0]["ends_at"] >= warned[0]["at"] + GRACE - 0.6

        ended = await _until(
            "the idle kernel's end",
            lambda: (s := manager.store.get(session.id)).status.is_terminal and s,
            GRACE + 20,
        )
        assert ended.status == SessionStatus.TERMINATED
        assert ended.reason == (
            f"gpu-idle: GPU utilization under {THRESHOLD}% for "
            f"{float(ended.reason.split(' for ')[1].split('s;')[0]):.0f}s; its devices are "
            "free again"
        )
        assert not any(sid == session.id for sid in manager.held_devices().values())
        # The server lets go of it: the kernel is not restarted into a new session.
        await _until("the server to drop the kernel", lambda: kernel_id not in kernels, 20)
        live_for_kernel = [s for s in manager.store.live() if s.kernel_id == kernel_id]
        assert live_for_kernel == []

        # Its GPU went to the queue: the 4-GPU kernel starts, never warned while it waited.
        await kernels.get_kernel(queued_id).ready
        started = manager.store.get(queued.id)
        assert started.status == SessionStatus.RUNNING
        waited = [h for h in started.history if h.status == SessionStatus.PENDING]
        assert waited and not any(h.reason.startswith("gpu-idle") for h in waited)
        status, gpus = await Api(jp_fetch).get("gpus", user=ADMIN)
        assert status == 200
        holders = [{h["session_id"] for h in g["holders"]} for g in gpus["gpus"]]
        assert holders == [{queued.id}] * 4  # the idle kernel's GPU among them
        order = [
            e["type"] if e["type"] != "status" else e["status"]
            for e in events.seen
            if e.get("session_id") == session.id
        ]
        assert order.index("gpu-idle-warning") < order.index("TERMINATING")
        assert order[-1] == "TERMINATED"


async def test_only_the_idle_kernel_ends_busy_and_gpu_less_kernels_stay(
    server, jp_fetch, kernelspecs, events_url, processes_file, caplog
):
    manager = _manager(server)
    async with running(server), Events(events_url) as events:
        idle_id = await _start(jp_fetch, server, kernelspecs[1])
        busy_id = await _start(jp_fetch, server, kernelspecs[1])
        cpu_id = await _start(jp_fetch, server, kernelspecs[0])
        idle, busy, cpu = (_session(server, k) for k in (idle_id, busy_id, cpu_id))
        assert not cpu.allocations
        await _set_utilization(manager, processes_file, (busy, 50), (idle, THRESHOLD - 1))

        await _until(
            "the idle kernel's end",
            lambda: manager.store.get(idle.id).status.is_terminal,
            WINDOW + GRACE + 20,
        )
        assert manager.store.get(idle.id).reason.startswith("gpu-idle:")
        for kept in (busy, cpu):
            assert manager.store.get(kept.id).status == SessionStatus.RUNNING
            assert _gpu_idle_entries(manager, kept.id) == []
        assert busy_id in server.kernel_manager and cpu_id in server.kernel_manager

        # The busy one goes idle: warned; busy again before its grace is over: withdrawn.
        await _set_utilization(manager, processes_file, (busy, 0))
        await _until(
            "the busy kernel's warning",
            lambda: events.of("gpu-idle-warning", busy.id),
            WINDOW + 20,
        )
        await _set_utilization(manager, processes_file, (busy, 80))
        withdrawn = await _until(
            "the withdrawal", lambda: events.of("gpu-idle-withdrawn", busy.id), 10
        )
        assert "80%" in withdrawn[0]["message"]
        assert manager.store.get(busy.id).status == SessionStatus.RUNNING
        assert [r.split(":")[0] for r in _gpu_idle_entries(manager, busy.id)] == [
            "gpu-idle-warning",
            "gpu-idle-withdrawn",
        ]
        notice = json.loads(
            (Path(manager.state_root) / busy.id / NOTICE_JSON).read_text(encoding="utf-8")
        )
        assert notice["kind"] == "gpu-idle-withdrawn"
        assert manager.store.get(cpu.id).status == SessionStatus.RUNNING

        # A GPU that does not report its processes' use: never reclaimed, said once.
        await _set_utilization(manager, processes_file, (busy, None))
        unknown = "cannot be read"
        await _until(
            "the log line about the unreadable use",
            lambda: any(unknown in r.getMessage() for r in caplog.records),
            10,
        )
        quiet_until = time.monotonic() + WINDOW + GRACE + 2
        while time.monotonic() < quiet_until:  # longer than a window and a grace
            assert manager.store.get(busy.id).status == SessionStatus.RUNNING
            await asyncio.sleep(0.2)
        said = [
            r for r in caplog.records if unknown in r.getMessage() and r.levelno >= logging.INFO
        ]
        assert len(said) == 1 and busy.id[:12] in said[0].getMessage()
        assert len(_gpu_idle_entries(manager, busy.id)) == 2  # nothing since the withdrawal


async def test_a_restart_starts_the_gpu_idle_clock_over(server, jp_fetch, kernelspecs, events_url):
    manager = _manager(server)
    async with running(server), Events(events_url) as events:
        kernel_id = await _start(jp_fetch, server, kernelspecs[1])
        session = _session(server, kernel_id)
        warned = await _until(
            "the first warning", lambda: events.of("gpu-idle-warning", session.id), WINDOW + 20
        )
        await jp_fetch("api", "kernels", kernel_id, "restart", method="POST", body="{}")
        restarted_at = time.time()
        withdrawn = await _until(
            "the withdrawal after the restart",
            lambda: events.of("gpu-idle-withdrawn", session.id),
            10,
        )
        assert "restarted" in withdrawn[0]["message"]
        # Still running past the end the first warning announced.
        await _until(
            "a second warning",
            lambda: events.of("gpu-idle-warning", session.id)[1:],
            WINDOW + 20,
        )
        assert time.time() > warned[0]["ends_at"]
        second = events.of("gpu-idle-warning", session.id)[1]
        assert second["at"] - restarted_at >= WINDOW - 1.0  # counted from the restart
        assert manager.store.get(session.id).status == SessionStatus.RUNNING


async def test_gpu_idle_limits_through_the_policies_api(server, jp_fetch):
    api = Api(jp_fetch)  # no kernel: the extension need not even be started
    status, body = await api.put(
        "policies/group:ml",
        user=ADMIN,
        body={"gpu_idle_threshold": "3%", "gpu_idle_window": "45m"},
    )
    assert status == 200, body
    assert body["limits"]["gpu_idle_threshold"] == 3.0
    assert body["limits"]["gpu_idle_window"] == 2700.0
    status, quota = await api.get("quota", user="alice")  # alice is in ml
    assert status == 200
    assert quota["policy"]["gpu_idle_threshold"] == 3.0
    assert quota["policy"]["gpu_idle_window"] == 2700.0
    # What `%session quota` (and the CLI) show of it.
    assert "GPU idle reclaim" in quota_table(quota).text()
    assert "under 3% for 45m" in quota_table(quota).text()
    status, listed = await api.get("policies", user=ADMIN)
    assert any(
        p["scope"] == "group:ml" and p["limits"]["gpu_idle_window"] == 2700
        for p in listed["policies"]
    )
    status, refused = await api.put(
        "policies/group:ml", user=ADMIN, body={"gpu_idle_threshold": 250}
    )
    assert status == 400
    assert "group:ml.gpu_idle_threshold" in refused["message"]
    assert "0 to 100" in refused["message"]


# -- in the manager service, for a server in remote mode -----------------------------------


async def _watch_remote_reclaim(lab, kernel_id: str, timeout: float) -> tuple[str, list[dict]]:
    """Run a CPU-bound cell in ``lab``'s kernel through its websocket (as JupyterLab does)
    while reading the lab's events websocket: the warning the cell printed, and the events
    seen until the kernel's end was announced."""
    ws_base = lab.url.replace("http://", "ws://", 1)
    auth = {"Authorization": f"token {lab.token}"}
    events_ws = await websocket_connect(
        HTTPRequest(f"{ws_base}/gpu-sessions/api/events", headers=auth)
    )
    kernel_ws = await websocket_connect(
        HTTPRequest(f"{ws_base}/api/kernels/{kernel_id}/channels", headers=auth)
    )
    seen: list[dict] = []

    async def read_events() -> None:
        while (raw := await events_ws.read_message()) is not None:
            seen.append(json.loads(raw))

    reader = asyncio.ensure_future(read_events())
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": "execute_request",
        "username": "test",
        "session": uuid.uuid4().hex,
        "date": "",
        "version": "5.3",
    }
    code = "import time\nt = time.time()\nwhile time.time() - t < 120: pass"
    content = {"code": code, "silent": False, "store_history": False, "user_expressions": {}}
    kernel_ws.write_message(
        json.dumps(
            {
                "header": header,
                "parent_header": {},
                "metadata": {},
                "content": content,
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    warning = ""
    try:
        deadline = time.monotonic() + timeout
        while not warning:
            raw = await asyncio.wait_for(kernel_ws.read_message(), deadline - time.monotonic())
            assert raw is not None, "the kernel's websocket closed before the warning"
            msg = json.loads(raw)
            if (
                msg.get("parent_header", {}).get("msg_id") == msg_id
                and msg["msg_type"] == "stream"
                and "[jupyter-gpu-sessions]" in msg["content"]["text"]
            ):
                warning = msg["content"]["text"]
        await _until(
            "the end on the lab's events websocket",
            lambda: any(e.get("status") == "TERMINATED" for e in seen),
            timeout,
        )
    finally:
        reader.cancel()
        events_ws.close()
        kernel_ws.close()
    return warning, seen


def test_the_manager_service_reclaims_an_idle_gpu_kernel_of_a_remote_server(tmp_path, kernel_image):
    config = {
        "GPUSessionManager": {
            "gpu_idle_check_interval": 0.5,
            "gpu_idle_grace": f"{GRACE:g}s",
            "policies": {
                "default": {"gpu_idle_threshold": THRESHOLD, "gpu_idle_window": f"{WINDOW:g}s"}
            },
        }
    }
    with (
        running_manager(tmp_path / "service", config=config) as service,
        running_remote_lab(tmp_path / "lab", service) as lab,
    ):
        session = lab.kernel_session(kernel_name="python3-gpu", path="idle.ipynb")
        kernel_id = session["kernel"]["id"]
        assert lab.kernel_info(kernel_id)["status"] == "ok"
        warning, seen = asyncio.run(_watch_remote_reclaim(lab, kernel_id, WINDOW + GRACE + 60))
        assert f"under {THRESHOLD}% of its GPU" in warning
        warned = [e for e in seen if e["type"] == "gpu-idle-warning"]
        assert warned and warned[0]["kernel_id"] == kernel_id
        ended = next(s for s in service.sessions() if s["kernel_id"] == kernel_id)
        assert ended["status"] == "TERMINATED" and ended["reason"].startswith("gpu-idle:")
        assert "its devices are free again" in ended["reason"]
        status, gpus = service.api("GET", "gpu-sessions/api/gpus")
        assert status == 200 and not any(g["holders"] for g in gpus["gpus"])

        def dropped():  # the lab's kernel is dead, not restarted into a new session
            status, kernels = lab.api("GET", "api/kernels")
            return status == 200 and kernel_id not in {k["id"] for k in kernels}

        deadline = time.monotonic() + 30
        while not dropped():
            assert time.monotonic() < deadline, "the lab kept (or restarted) the kernel"
            time.sleep(0.2)
        live = [s for s in service.sessions() if s["kernel_id"] == kernel_id]
        assert [s["status"] for s in live] == ["TERMINATED"]
