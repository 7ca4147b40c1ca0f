"""One session lifecycle under faults: deletes mid-start, crashes, OOM kills, races, refused
starts, through a real server, the real Docker engine and simulated GPUs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

from jupyter_gpu_sessions.core.errors import StartCancelled
from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.manager import GPUSessionManager
from jupyter_gpu_sessions.runtime.base import RuntimeHandle
from jupyter_gpu_sessions.runtime.docker import DockerRuntime

from .api_support import ADMIN, Api, api_config, reset_manager
from .support import (
    labelled_containers,
    make_notebook_dir,
    run_code,
    shipped_spec,
    until,
    wait_for_iopub,
    write_kernelspec,
)
from .test_queue import _child, gpu_spec

S = SessionStatus
GPU_LABEL = "io.jupyter.gpu-sessions.gpus"
# A container that runs a while before its kernel answers: a wide PREPARING window.
SLOW_ARGV = [
    "python3",
    "-c",
    "import runpy, sys, time; time.sleep(6); sys.argv = ['ipykernel_launcher'] + sys.argv[1:]; "
    "runpy.run_module('ipykernel_launcher', run_name='__main__')",
    "-f",
    "{connection_file}",
]


@pytest.fixture
def jp_server_config(request, tmp_path, fake_gpu_nodes):
    """One simulated GPU with fake device nodes, a fast reconcile pass and a restarter that
    notices a death within half a second and gives up after one restart."""
    reset_manager()
    overrides = getattr(request, "param", {})
    config = api_config(
        tmp_path,
        GPUSessionManager={
            "simulated_gpus": "1xA100-80GB",
            "simulated_device_dir": str(fake_gpu_nodes),
            "reconcile_interval": 1.0,
            **overrides.get("GPUSessionManager", {}),
        },
        KernelRestarter={"time_to_dead": 0.5, "restart_limit": 1},
    )
    yield config
    reset_manager()


@pytest.fixture
def jp_auth_header():
    from .api_support import TOKENS

    return {"Authorization": f"token {TOKENS[ADMIN]}"}


@pytest.fixture
def kernels(jp_data_dir, jp_root_dir, kernel_image):
    """Kernelspecs in the server's data dir: name → provisioner config overrides."""
    make_notebook_dir(jp_root_dir)

    def add(name: str, argv: list[str] | None = None, **config) -> str:
        spec = shipped_spec("python3-gpu")
        spec["metadata"]["kernel_provisioner"]["config"] = {
            "gpus": 1,
            "cpus": 1,
            "memory": "1GiB",
            "image": kernel_image,
            **config,
        }
        if argv is not None:
            spec["argv"] = argv
        target = jp_data_dir / "kernels" / name
        target.mkdir(parents=True, exist_ok=True)
        (target / "kernel.json").write_text(json.dumps(spec))
        return name

    return add


class GPUWatch:
    """Polls Docker every 50 ms: records any GPU seen in two running containers at once."""

    def __init__(self, client, store_id: str) -> None:
        self.client, self.store_id = client, store_id
        self.overlaps: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            seen: dict[str, str] = {}
            for c in self.client.containers.list(
                filters={"label": f"io.jupyter.gpu-sessions.store={self.store_id}"},
                ignore_removed=True,
            ):
                for gpu in filter(None, c.labels.get(GPU_LABEL, "").split(",")):
                    if gpu in seen:
                        self.overlaps.append(f"{gpu}: {seen[gpu]} and {c.name}")
                    seen[gpu] = c.name

    def __enter__(self) -> GPUWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)


async def open_notebook(jp_fetch, path: str, kernel: str) -> dict:
    body = {"path": path, "type": "notebook", "name": path, "kernel": {"name": kernel}}
    response = await jp_fetch("api", "sessions", method="POST", body=json.dumps(body))
    assert response.code == 201
    return json.loads(response.body)


def session_of(manager: GPUSessionManager, kernel_id: str):
    found = manager.store.list(kernel_id=kernel_id)
    return found[-1] if found else None


def state_dir(manager: GPUSessionManager, session_id: str) -> Path:
    return Path(manager.state_root) / session_id


async def one_running_one_queued(jp_fetch, jp_serverapp, kernels):
    """Two notebooks on the one GPU: the first running, the second queued behind it."""
    name = kernels("gpu-one")
    manager: GPUSessionManager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    km = jp_serverapp.kernel_manager
    holder = await open_notebook(jp_fetch, "holder.ipynb", name)
    await km.get_kernel(holder["kernel"]["id"]).ready
    waiting = await open_notebook(jp_fetch, "waiting.ipynb", name)
    await until(
        lambda: (s := session_of(manager, waiting["kernel"]["id"])) and s.status == S.PENDING,
        what="the second kernel queueing",
    )
    return manager, km, holder, waiting


# -- case 0 and 1: a kernel deleted while it starts ----------------------------------------
async def test_a_gpu_kernel_deleted_while_its_container_starts_keeps_its_gpu_until_the_container_is_gone(  # noqa: E501
    jp_fetch, jp_serverapp, kernels, docker_client
):
    slow = kernels("gpu-slow", SLOW_ARGV)
    fast = kernels("gpu-fast")
    manager: GPUSessionManager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    km = jp_serverapp.kernel_manager
    api = Api(jp_fetch)
    with GPUWatch(docker_client, manager.store_id) as watch:
        started = time.monotonic()
        first = await open_notebook(jp_fetch, "first.ipynb", slow)
        # Answered at once (a pending kernel), the kernel shown as starting.
        assert time.monotonic() - started < 5
        assert first["kernel"]["execution_state"] == "starting"
        kernel_id = first["kernel"]["id"]
        session = await until(
            lambda: (
                (s := session_of(manager, kernel_id))
                and s.status == S.PREPARING
                and labelled_containers(docker_client, **{"session-id": s.id})
                and s
            ),
            what="the slow kernel's container",
        )
        (container,) = labelled_containers(docker_client, **{"session-id": session.id})
        assert container.status == "running"

        status, body = await api.delete(f"sessions/{session.id}", user=ADMIN)
        assert status == 200
        assert body["ended"][0]["status"] in ("TERMINATING", "CANCELLED")
        # Asked to stop: its GPU stays held for as long as its container exists.
        deadline = time.monotonic() + 30
        while not (final := manager.store.get(session.id)).status.is_terminal:
            assert time.monotonic() < deadline, "the deleted session never ended"
            if labelled_containers(docker_client, **{"session-id": session.id}):
                assert session.id in manager.held_devices().values()
            await asyncio.sleep(0.05)
        assert final.status == S.CANCELLED
        assert "deleted through the API" in final.reason
        assert labelled_containers(docker_client, **{"session-id": session.id}) == []
        assert manager.held_devices() == {}
        assert not state_dir(manager, session.id).exists()
        # The deleted start ended quietly: its kernel left the server's map.
        await until(lambda: kernel_id not in km, what="the deleted kernel leaving the map")

        second = await open_notebook(jp_fetch, "second.ipynb", fast)
        await km.get_kernel(second["kernel"]["id"]).ready
        running = session_of(manager, second["kernel"]["id"])
        assert running.status == S.RUNNING and len(running.allocations) == 1
        # A third waits in the queue: jupyter_server's DELETE ends it at once.
        third = await open_notebook(jp_fetch, "third.ipynb", fast)
        queued = await until(
            lambda: (
                (s := session_of(manager, third["kernel"]["id"])) and s.status == S.PENDING and s
            ),
            what="the third kernel queueing",
        )
        started = time.monotonic()
        await jp_fetch("api", "sessions", third["id"], method="DELETE")
        assert time.monotonic() - started < 5
        assert manager.store.get(queued.id).status == S.CANCELLED
        assert third["kernel"]["id"] not in km
        assert labelled_containers(docker_client, **{"session-id": queued.id}) == []
        await jp_fetch("api", "sessions", second["id"], method="DELETE")
        assert manager.held_devices() == {}
    assert watch.overlaps == []


async def test_a_cell_run_while_the_kernel_queues_runs_once_it_starts(
    jp_fetch, jp_serverapp, kernels
):
    """What JupyterLab does: connect and execute before the kernel has started (here, while
    it waits for the only GPU); the request is answered once the kernel runs."""
    manager, km, holder, waiting = await one_running_one_queued(jp_fetch, jp_serverapp, kernels)
    kernel_id = waiting["kernel"]["id"]
    response = await jp_fetch("api", "kernels", kernel_id)
    assert json.loads(response.body)["execution_state"] == "starting"

    async def run_when_up():
        kernel = km.get_kernel(kernel_id)
        await kernel.ready  # what the websocket waits for
        client = kernel.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=60)
            return await run_code(client, "print(6*7)")
        finally:
            client.stop_channels()

    cell = asyncio.ensure_future(run_when_up())
    await asyncio.sleep(1.0)
    assert not cell.done()
    await jp_fetch("api", "sessions", holder["id"], method="DELETE")
    reply, out = await asyncio.wait_for(cell, 60)
    assert reply["status"] == "ok" and out.strip() == "42"
    await jp_fetch("api", "sessions", waiting["id"], method="DELETE")
    assert manager.held_devices() == {}


async def test_jupyter_servers_culler_leaves_a_queued_kernel_alone(jp_fetch, jp_serverapp, kernels):
    manager, km, holder, waiting = await one_running_one_queued(jp_fetch, jp_serverapp, kernels)
    kernel_id = waiting["kernel"]["id"]
    km.cull_idle_timeout = 1
    await asyncio.sleep(1.5)
    # What the culler's timer runs, until the idle running kernel is culled (its last
    # activity may come late on a loaded machine); the one waiting for its GPU never is.
    deadline = time.monotonic() + 30
    while True:
        await km.cull_kernels()
        assert kernel_id in km
        if holder["kernel"]["id"] not in km:
            break
        assert time.monotonic() < deadline, "the idle running kernel was never culled"
        await asyncio.sleep(0.5)
    assert not session_of(manager, kernel_id).status.is_terminal
    km.cull_idle_timeout = 0
    await jp_fetch("api", "sessions", waiting["id"], method="DELETE")
    assert manager.held_devices() == {}


async def test_a_server_stopping_while_kernels_queue_and_start_leaves_nothing_behind(
    jp_fetch, jp_serverapp, kernels, docker_client
):
    """What the server's own shutdown does (shutdown_all): a kernel starting and one queued
    behind it are ended, their containers removed and the GPU freed, without errors."""
    slow = kernels("gpu-slow", SLOW_ARGV)
    manager: GPUSessionManager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    km = jp_serverapp.kernel_manager
    starting = await open_notebook(jp_fetch, "starting.ipynb", slow)
    queued = await open_notebook(jp_fetch, "queued.ipynb", slow)
    first = await until(
        lambda: (
            (s := session_of(manager, starting["kernel"]["id"]))
            and s.status == S.PREPARING
            and labelled_containers(docker_client, **{"session-id": s.id})
            and s
        ),
        what="the first kernel's container",
    )
    second = session_of(manager, queued["kernel"]["id"])
    assert second.status == S.PENDING
    await km.shutdown_all()
    assert list(km.list_kernel_ids()) == []
    for session in (first, second):
        ended = manager.store.get(session.id)
        assert ended.status == S.CANCELLED, (ended.status, ended.reason)
        assert labelled_containers(docker_client, **{"session-id": session.id}) == []
    assert manager.held_devices() == {}


# -- case 2: the restarter gives up ----------------------------------------------------------
async def test_a_kernel_the_restarter_gives_up_on_frees_its_gpu_at_once(
    jp_fetch, jp_serverapp, kernels, docker_client
):
    name = kernels("gpu-crashy")
    manager: GPUSessionManager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    km = jp_serverapp.kernel_manager
    opened = await open_notebook(jp_fetch, "crashy.ipynb", name)
    kernel_id = opened["kernel"]["id"]
    await km.get_kernel(kernel_id).ready
    session = session_of(manager, kernel_id)
    for kill in range(2):  # restart_limit 1: the second death is the last
        (container,) = labelled_containers(docker_client, **{"session-id": session.id})
        await until(lambda c=container: (c.reload(), c.status == "running")[1], what="running")
        container.kill()
        if kill == 0:
            await until(
                lambda: [h for h in manager.store.get(session.id).history if h.status == S.RUNNING][
                    1:
                ],
                what="the restart",
            )
    ended = await until(
        lambda: (s := manager.store.get(session.id)).status.is_terminal and s,
        timeout=10,
        what="the session's end after the restarter gave up",
    )
    assert ended.status == S.ERROR, ended.history
    assert ended.reason.startswith("exited 137"), ended.history
    assert "not restarted" in ended.reason
    assert ended.exit_code == 137
    reasons = [h.reason for h in ended.history]
    assert any(r.startswith("exited 137") for r in reasons[:-1])  # the first death, restarted
    assert manager.held_devices() == {}
    assert labelled_containers(docker_client, **{"session-id": session.id}) == []
    assert kernel_id not in km
    response = await jp_fetch("api", "kernels", kernel_id, raise_error=False)
    assert response.code == 404
    # The next GPU kernel gets the GPU at once.
    again = await open_notebook(jp_fetch, "again.ipynb", name)
    await asyncio.wait_for(km.get_kernel(again["kernel"]["id"]).ready, 60)
    await jp_fetch("api", "sessions", again["id"], method="DELETE")


# -- case 3: OOM kills are facts -------------------------------------------------------------
async def test_an_oom_kill_under_the_server_is_recorded_and_told_to_the_user(
    jp_fetch, jp_serverapp, kernels, docker_client
):
    name = kernels("small", gpus=0, memory="256MiB")
    manager: GPUSessionManager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    km = jp_serverapp.kernel_manager
    opened = await open_notebook(jp_fetch, "hungry.ipynb", name)
    kernel_id = opened["kernel"]["id"]
    kernel = km.get_kernel(kernel_id)
    await kernel.ready
    session = session_of(manager, kernel_id)
    client = kernel.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        client.execute("x = bytearray(1 << 30)")
        restarted = await until(
            lambda: (
                (s := manager.store.get(session.id)).history[-1].reason == "kernel restarted" and s
            ),
            timeout=60,
            what="the automatic restart",
        )
        died = [h for h in restarted.history if h.status == S.RESTARTING][-1]
        assert died.reason == "oom-killed: limit 256MiB, exit code 137"
        assert restarted.oom_killed is True
        assert "kernel died: oom-killed: limit 256MiB" in manager.store.log_tail(session.id)
        # The first cell of the restarted kernel says why, on stderr.
        await wait_for_iopub(client)
        reply, out = await run_code(client, "print('after')")
        assert reply["status"] == "ok"
        assert "killed for running out of memory (limit 256MiB)" in out
        reply, out = await run_code(client, "print('again')")
        assert "jupyter-gpu-sessions" not in out  # said once
    finally:
        client.stop_channels()
    await jp_fetch("api", "sessions", opened["id"], method="DELETE")
    ended = manager.store.get(session.id)
    assert ended.status == S.TERMINATED and ended.oom_killed is True
    assert "kernel died: oom-killed: limit 256MiB" in manager.store.log_tail(session.id)


# -- case 6: refused starts are 4xx ----------------------------------------------------------
async def test_refused_starts_are_4xx_through_jupyter_servers_own_apis(
    jp_fetch, jp_serverapp, kernels, docker_client
):
    manager: GPUSessionManager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    cases = {
        kernels("too-many", gpus=5): (422, "this host has 1"),
        kernels("bad-memory", memory="8XB"): (400, "8XB"),
        kernels("no-image", image="jupyter-gpu-sessions/no-such-image:1"): (
            422,
            "jupyter gpu-sessions image build",
        ),
    }
    for name, (code, words) in cases.items():
        for route, body in (
            ("sessions", {"path": f"{name}.ipynb", "type": "notebook", "kernel": {"name": name}}),
            ("kernels", {"name": name}),
        ):
            response = await jp_fetch(
                "api", route, method="POST", body=json.dumps(body), raise_error=False
            )
            message = json.loads(response.body)["message"]
            assert response.code == code, (name, route, response.code, message)
            assert words in message, message
    assert list(jp_serverapp.kernel_manager.list_kernel_ids()) == []
    assert manager.store.live() == []

    # Cancelled while queued, with a client that waits for the start (no pending kernels).
    name = kernels("one-gpu")
    jp_serverapp.kernel_manager.use_pending_kernels = False
    holder = await open_notebook(jp_fetch, "holder.ipynb", name)
    body = {"path": "queued.ipynb", "type": "notebook", "kernel": {"name": name}}
    post = asyncio.ensure_future(
        jp_fetch("api", "sessions", method="POST", body=json.dumps(body), raise_error=False)
    )
    queued = await until(lambda: manager.store.list(statuses=[S.PENDING]), what="queueing")
    status, _ = await Api(jp_fetch).delete(f"sessions/{queued[0].id}", user=ADMIN)
    assert status == 200
    response = await asyncio.wait_for(post, 30)
    assert response.code == 409
    assert "cancelled while queued" in json.loads(response.body)["message"]
    await jp_fetch("api", "sessions", holder["id"], method="DELETE")


@pytest.mark.parametrize(
    "jp_server_config",
    [{"GPUSessionManager": {"docker_url": "unix:///nonexistent/docker.sock"}}],
    indirect=True,
)
async def test_a_start_with_docker_unreachable_is_a_503(jp_fetch, jp_serverapp, kernels):
    name = kernels("no-docker", gpus=0)
    body = {"path": "x.ipynb", "type": "notebook", "kernel": {"name": name}}
    response = await jp_fetch(
        "api", "sessions", method="POST", body=json.dumps(body), raise_error=False
    )
    assert response.code == 503
    assert "Cannot reach the Docker engine" in json.loads(response.body)["message"]


# -- case 4: races between enders -------------------------------------------------------------
async def test_ending_a_session_at_every_step_of_its_start_leaves_nothing_behind(
    kernel_dir, notebook_dir, kernel_image, fresh_manager, docker_client, fake_gpu_nodes
):
    """Ended while queued, while its container starts, and while it runs, with the reconcile
    pass running every 0.2 s: the start fails with StartCancelled (never a state-machine
    error), and no container, device or state directory is left."""
    manager = fresh_manager(
        simulated_gpus="1xA100-80GB",
        simulated_device_dir=str(fake_gpu_nodes),
        reconcile_interval=0.2,
    )
    ksm = write_kernelspec(kernel_dir, "one", gpu_spec())
    slow_spec = gpu_spec()
    slow_spec["argv"] = SLOW_ARGV
    write_kernelspec(kernel_dir, "slow", slow_spec)
    manager.ensure_reconciler()

    async def start(name: str):
        km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=ksm)
        return km, asyncio.ensure_future(km.start_kernel(cwd=str(notebook_dir)))

    def sessions(status):
        return manager.store.list(statuses=[status])

    # While it runs.
    holder_km, holder = await start("one")
    await holder
    (running,) = sessions(S.RUNNING)
    # While queued, behind the holder.
    queued_km, queued_start = await start("one")
    (queued,) = await until(lambda: sessions(S.PENDING), what="queueing")
    await manager.end_session(queued.id, "ended while queued")
    with pytest.raises(StartCancelled, match="ended while queued"):
        await queued_start
    await manager.end_session(running.id, "ended while running")
    assert manager.store.get(running.id).status == S.TERMINATED
    await holder_km.shutdown_kernel(now=True)  # its client's own cleanup tolerates the end
    # While its container starts.
    slow_km, slow_start = await start("slow")
    (preparing,) = await until(
        lambda: (
            (p := sessions(S.PREPARING))
            and labelled_containers(docker_client, **{"session-id": p[0].id})
            and p
        ),
        what="the slow container",
    )
    await manager.end_session(preparing.id, "ended while starting")
    with pytest.raises(StartCancelled, match="ended while starting"):
        await slow_start
    for session, status in (
        (queued, S.CANCELLED),
        (running, S.TERMINATED),
        (preparing, S.CANCELLED),
    ):
        ended = manager.store.get(session.id)
        assert ended.status == status, (ended.status, ended.reason)
        assert labelled_containers(docker_client, **{"session-id": session.id}) == []
        assert not state_dir(manager, session.id).exists()
    assert manager.held_devices() == {}


async def test_docker_cleanup_tolerates_a_container_already_gone_or_being_removed(
    docker_client, kernel_image
):
    runtime = DockerRuntime()
    container = docker_client.containers.create(kernel_image, ["sleep", "60"])
    container.start()
    handle = RuntimeHandle("docker", container.id, container.name)
    # Three cleanups at once: each finishes, none raises Docker's 409 or 404.
    logs = await asyncio.gather(
        runtime.remove(handle), runtime.remove(handle), runtime.logs(handle)
    )
    assert isinstance(logs[2], str)
    await runtime.remove(handle)
    assert await runtime.logs(handle) == ""
    assert not docker_client.containers.list(all=True, filters={"id": container.id})


# -- case 5: a killed process leaves no keys behind -------------------------------------------
def test_a_killed_process_leaves_no_state_directory_behind(
    kernel_dir, tmp_path, notebook_dir, kernel_image, fresh_manager, docker_client
):
    runtime_dir = tmp_path / "runtime"
    db = f"sqlite:///{tmp_path}/shared.sqlite"
    manager = fresh_manager(
        db_url=db, simulated_gpus="1xT4-16GB", state_root=str(runtime_dir / "gpu-sessions")
    )
    env = {
        **os.environ,
        "JUPYTER_GPU_SESSIONS_DB_URL": db,
        "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS": "1xT4-16GB",
        "JUPYTER_RUNTIME_DIR": str(runtime_dir),
    }
    write_kernelspec(kernel_dir, "one", gpu_spec())
    child = _child(kernel_dir, "one", 1, -1, env, notebook_dir)
    assert json.loads(child.stdout.readline())["event"] == "running"
    (session,) = manager.store.live()
    folder = state_dir(manager, session.id)
    assert (folder / "notice.py").exists()  # the copy of the connection file lives here too
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done = manager.reconcile()
    assert any("owner-gone" in d for d in done)
    assert not folder.exists()
    assert labelled_containers(docker_client, **{"session-id": session.id}) == []
    assert manager.held_devices() == {}
    # A state directory an earlier crash left between two steps goes on the next pass.
    stray = runtime_dir / "gpu-sessions" / session.id
    stray.mkdir()
    assert any("state directory" in d for d in manager.reconcile())
    assert not stray.exists()
