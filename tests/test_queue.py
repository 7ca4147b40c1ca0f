"""The queue, policies and recovery, with real kernels on simulated GPUs and one shared store."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from jupyter_client.manager import AsyncKernelManager

from jupyter_gpu_sessions.core.errors import (
    KernelLaunchError,
    PolicyViolation,
    UnsatisfiableRequest,
)
from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.runtime.base import SESSION_LABEL, STORE_LABEL

from .support import (
    labelled_containers,
    run_code,
    shipped_spec,
    start_kernel,
    stop_kernel,
    until,
)
from .support import write_kernelspec as write_spec

DEVICES = (
    "import os\n"
    "print(os.environ.get('CUDA_VISIBLE_DEVICES'), "
    "sorted(d for d in os.listdir('/dev') if d.startswith('nvidia')))\n"
)


def gpu_spec(runtime="docker", **config):
    spec = shipped_spec("python3-gpu")
    base = {"cpus": 1, "memory": "1GiB"} if runtime == "docker" else {"runtime": "local"}
    spec["metadata"]["kernel_provisioner"]["config"] = {"gpus": 1, **base, **config}
    return spec


async def wait_for_status(manager, kernel_id, status, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = manager.store.list(kernel_id=kernel_id)
        if found and found[-1].status == status:
            return found[-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"kernel {kernel_id} never reached {status}")


async def test_a_third_kernel_waits_until_gpus_are_free_then_starts_within_a_second(
    kernel_dir, notebook_dir, kernel_image, fake_gpu_nodes, fresh_manager, docker_client
):
    manager = fresh_manager(simulated_gpus="4xA100-80GB", simulated_device_dir=str(fake_gpu_nodes))
    ksm = write_spec(kernel_dir, "two", gpu_spec(gpus=2))
    first = await start_kernel("two", notebook_dir, kernel_spec_manager=ksm)
    second = await start_kernel("two", notebook_dir, kernel_spec_manager=ksm)
    third_km = AsyncKernelManager(kernel_name="two", kernel_spec_manager=ksm)
    third = asyncio.create_task(third_km.start_kernel(cwd=str(notebook_dir)))
    try:
        pending = await until(
            lambda: [
                s
                for s in manager.store.list(statuses=[SessionStatus.PENDING])
                if (s.scheduler or {}).get("position")
            ],
            what="the third kernel's place in the queue",
        )
        assert len(pending) == 1 and not third.done()
        queued = pending[0]
        assert queued.scheduler["position"] == 1
        assert "waiting for 2 GPUs" in manager.queue_message(queued)
        assert labelled_containers(docker_client, **{"session-id": queued.id}) == []

        first_session = first[0].provisioner.session.id
        await stop_kernel(*first)
        await third
        released = manager.store.get(first_session).ended_at  # the GPUs' release
        running = manager.store.get(queued.id).history[-1]
        assert running.status == SessionStatus.RUNNING
        assert running.at - released < 1.0
        kc = third_km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        _, out = await run_code(kc, DEVICES)
        first_devices = {a.device_uuid for a in manager.store.get(first_session).allocations}
        assert set(out.split()[0].split(",")) == first_devices
        history = [c.status for c in manager.store.get(queued.id).history]
        assert history[:3] == [
            SessionStatus.PENDING,
            SessionStatus.PREPARING,
            SessionStatus.RUNNING,
        ]
        await stop_kernel(third_km, kc)
    finally:
        if not third.done():
            third.cancel()
        elif third_km.has_kernel:  # an assertion above failed: leave no container behind
            await third_km.shutdown_kernel(now=True)
        await stop_kernel(*second)
    assert manager.held_devices() == {}


async def test_a_queued_kernel_cancelled_or_abandoned_never_gets_a_container(
    kernel_dir, tmp_path, fresh_manager, docker_client
):
    manager = fresh_manager(simulated_gpus="1xT4-16GB")
    ksm = write_spec(kernel_dir, "one", gpu_spec("local"))
    holder = await start_kernel("one", tmp_path, kernel_spec_manager=ksm)
    try:
        # Cancelled through the manager (what the sessions API's DELETE does).
        queued_km = AsyncKernelManager(kernel_name="one", kernel_spec_manager=ksm)
        start = asyncio.create_task(queued_km.start_kernel(cwd=str(tmp_path)))
        (queued,) = await until(
            lambda: manager.store.list(statuses=[SessionStatus.PENDING]), what="a queued start"
        )
        await manager.cancel(queued.id, "cancelled by ada")
        with pytest.raises(KernelLaunchError, match="cancelled while queued: cancelled by ada"):
            await start
        assert not queued_km.has_kernel
        # Abandoned: the start itself is cancelled (Ctrl-C in nbclient, a server shutdown).
        abandoned_km = AsyncKernelManager(kernel_name="one", kernel_spec_manager=ksm)
        start = asyncio.create_task(abandoned_km.start_kernel(cwd=str(tmp_path)))
        (abandoned,) = await until(
            lambda: manager.store.list(statuses=[SessionStatus.PENDING]), what="a queued start"
        )
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        for session_id, reason in [
            (queued.id, "cancelled by ada"),
            (abandoned.id, "start abandoned while queued"),
        ]:
            ended = manager.store.get(session_id)
            assert ended.status == SessionStatus.CANCELLED and ended.reason == reason
            assert ended.container_id is None and ended.allocations == ()
            assert [c.status for c in ended.history] == [
                SessionStatus.PENDING,
                SessionStatus.CANCELLED,
            ]
    finally:
        await stop_kernel(*holder)


async def test_a_queued_kernel_is_cancelled_after_its_queue_timeout(
    kernel_dir, tmp_path, fresh_manager
):
    manager = fresh_manager(simulated_gpus="1xT4-16GB")
    ksm = write_spec(kernel_dir, "one", gpu_spec("local"))
    write_spec(kernel_dir, "impatient", gpu_spec("local", queue_timeout=1))
    holder = await start_kernel("one", tmp_path, kernel_spec_manager=ksm)
    try:
        started = time.monotonic()
        with pytest.raises(KernelLaunchError, match=r"waited 1s in the queue") as info:
            await start_kernel("impatient", tmp_path, kernel_spec_manager=ksm)
        assert time.monotonic() - started < 5
        assert "#1 in the queue" in str(info.value)
        (ended,) = manager.store.list(statuses=[SessionStatus.CANCELLED])
        assert ended.reason.startswith("queue-timeout")
    finally:
        await stop_kernel(*holder)


async def test_requests_larger_than_host_or_policy_are_refused_at_once(
    kernel_dir, tmp_path, fresh_manager
):
    owner = os.environ.get("JUPYTERHUB_USER") or __import__("getpass").getuser()
    manager = fresh_manager(
        simulated_gpus="4xA100-80GB",
        policies={"default": {"max_gpus": 2, "max_pending_sessions": 1}},
    )
    ksm = write_spec(kernel_dir, "five", gpu_spec("local", gpus=5))
    with pytest.raises(UnsatisfiableRequest, match="asks for 5 GPUs, but this host has 4"):
        await start_kernel("five", tmp_path, kernel_spec_manager=ksm)
    write_spec(kernel_dir, "three", gpu_spec("local", gpus=3))
    with pytest.raises(
        PolicyViolation,
        match=rf"3 GPUs, more than {owner}'s policy allows "
        r"\(max_gpus = 2\)",
    ):
        await start_kernel("three", tmp_path, kernel_spec_manager=ksm)
    assert manager.store.list() == []  # nothing was queued

    write_spec(kernel_dir, "two", gpu_spec("local", gpus=2))
    holders = [await start_kernel("two", tmp_path, kernel_spec_manager=ksm)]
    # The owner holds 2 GPUs, their max: the next waits (a soft check), and a second
    # waiting one passes max_pending_sessions (a hard one).
    waiting_km = AsyncKernelManager(kernel_name="two", kernel_spec_manager=ksm)
    waiting = asyncio.create_task(waiting_km.start_kernel(cwd=str(tmp_path)))
    try:
        (pending,) = await until(
            lambda: [
                s
                for s in manager.store.list(statuses=[SessionStatus.PENDING])
                if (s.scheduler or {}).get("failed")
            ],
            what="a pass saying why the start waits",
        )
        assert {f["check"] for f in pending.scheduler["failed"]} == {"max_gpus"}
        with pytest.raises(PolicyViolation, match=r"max_pending_sessions \(1\)"):
            await start_kernel("two", tmp_path, kernel_spec_manager=ksm)
    finally:
        await manager.cancel(pending.id)
        with pytest.raises(KernelLaunchError):
            await waiting
        for km, kc in holders:
            await stop_kernel(km, kc)


async def test_mig_profiles_and_gpu_shares_land_where_they_belong(
    kernel_dir, tmp_path, fresh_manager
):
    manager = fresh_manager(simulated_gpus="1xA100-80GB,1xA100-80GB:mig=1g.10gb*7")
    devices = manager.inventory.devices()
    ksm = write_spec(kernel_dir, "mig", gpu_spec("local", gpus=0, gpu_profile="1g.10gb"))
    write_spec(kernel_dir, "half", gpu_spec("local", gpus=0, gpu_share=0.5))
    mig = await start_kernel("mig", tmp_path, kernel_spec_manager=ksm)
    halves = [await start_kernel("half", tmp_path, kernel_spec_manager=ksm) for _ in range(2)]
    try:
        _, out = await run_code(mig[1], "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])")
        assert out.strip() in {m.uuid for m in devices[1].mig_instances}
        seen = set()
        for _, kc in halves:
            _, out = await run_code(
                kc,
                "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], "
                "os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])",
            )
            uuid, fraction = out.split()
            seen.add(uuid)
            assert fraction == "0.5"
        assert seen == {devices[0].uuid}  # both shares packed onto the one plain GPU
    finally:
        for km, kc in [mig, *halves]:
            await stop_kernel(km, kc)
    assert manager.held_devices() == {}


async def test_every_status_change_is_an_event(kernel_dir, tmp_path, fresh_manager):
    manager = fresh_manager()
    events = []

    async def listener(logger, schema_id, data):
        events.append((data["status"], data["previous_status"]))

    manager.event_logger.add_listener(
        schema_id="https://events.jupyter.org/jupyter_gpu_sessions/session-status",
        listener=listener,
    )
    spec = shipped_spec()
    spec["metadata"]["kernel_provisioner"]["config"] = {"runtime": "local"}
    ksm = write_spec(kernel_dir, "local", spec)
    km, kc = await start_kernel("local", tmp_path, kernel_spec_manager=ksm)
    await km.restart_kernel()
    await kc.wait_for_ready(timeout=30)
    await stop_kernel(km, kc)
    await until(lambda: len(events) >= 7, what="every status event")  # listeners are tasks
    assert [status for status, _ in events] == [
        "PENDING",
        "PREPARING",
        "RUNNING",
        "RESTARTING",
        "RUNNING",
        "TERMINATING",
        "TERMINATED",
    ]
    assert events[1] == ("PREPARING", "PENDING")


async def test_a_session_past_its_lifetime_ends_and_frees_its_gpu(
    kernel_dir, notebook_dir, kernel_image, fake_gpu_nodes, fresh_manager, docker_client
):
    manager = fresh_manager(
        simulated_gpus="1xT4-16GB",
        simulated_device_dir=str(fake_gpu_nodes),
        policies={"default": {"max_session_lifetime": "2s"}},
        reconcile_interval=0.5,
    )
    ksm = write_spec(kernel_dir, "one", gpu_spec())
    km, kc = await start_kernel("one", notebook_dir, kernel_spec_manager=ksm)
    session_id = km.provisioner.session.id
    try:
        ended = await wait_for_status(manager, km.kernel_id, SessionStatus.TERMINATED, 15)
        assert ended.reason.startswith("lifetime-exceeded")
        assert manager.held_devices() == {}
        assert labelled_containers(docker_client, **{"session-id": session_id}) == []
        assert await km.provisioner.poll() is not None  # jupyter sees the kernel gone
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    async def one(ksm, cwd, hold):
        km = AsyncKernelManager(kernel_name=sys.argv[2], kernel_spec_manager=ksm)
        await km.start_kernel(cwd=cwd)
        kc = km.client(); kc.start_channels(); await kc.wait_for_ready(timeout=60)
        started = time.time()
        reply = await kc.execute_interactive(
            "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])", timeout=30,
            output_hook=lambda m: out.append(m['content'].get('text', '')))
        print(json.dumps({"event": "running", "gpu": "".join(out).strip(), "pid": os.getpid()}),
              flush=True)
        if hold < 0:
            await asyncio.sleep(3600)  # until killed
        await asyncio.sleep(hold)
        ended = time.time()
        kc.stop_channels(); await km.shutdown_kernel()
        return {"gpu": "".join(out).strip(), "start": started, "end": ended}

    out = []
    async def main():
        ksm = KernelSpecManager(kernel_dirs=[sys.argv[1]])
        hold = float(sys.argv[4])
        results = []
        for _ in range(int(sys.argv[3])):
            out.clear()
            results.append(await one(ksm, os.getcwd(), hold))
        print(json.dumps({"event": "done", "results": results}), flush=True)

    asyncio.run(main())
    """
)


def _child(kernel_dir, kernel, count, hold, env, cwd):
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(kernel_dir), kernel, str(count), str(hold)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def test_processes_sharing_a_store_never_hold_more_gpus_than_exist(kernel_dir, tmp_path, db_url):
    """Three processes on one store, SQLite or PostgreSQL: their write transactions
    serialize every allocation, so no GPU is ever out twice."""
    db = db_url
    env = {
        **os.environ,
        "JUPYTER_GPU_SESSIONS_DB_URL": db,
        "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS": "2xT4-16GB",
    }
    write_spec(kernel_dir, "one", gpu_spec("local"))
    children = [_child(kernel_dir, "one", 2, 0.7, env, tmp_path) for _ in range(3)]
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=240)
        assert child.returncode == 0, stderr[-3000:]
        results += json.loads(stdout.splitlines()[-1])["results"]
    assert len(results) == 6
    # Never two kernels on one GPU at once, so never more than the two GPUs out.
    for a in results:
        for b in results:
            if a is not b and a["gpu"] == b["gpu"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)
    assert {r["gpu"] for r in results} <= {
        line.split()[1]
        for line in subprocess.run(
            [sys.executable, "-m", "jupyter_gpu_sessions.cli", "gpus"],
            env=env,
            capture_output=True,
            text=True,
        ).stdout.splitlines()[1:]
    }


def test_a_killed_process_gives_back_its_gpus_and_containers(
    kernel_dir, notebook_dir, kernel_image, fresh_manager, docker_client, tmp_path
):
    db = f"sqlite:///{tmp_path}/shared.sqlite"
    manager = fresh_manager(db_url=db, simulated_gpus="1xT4-16GB")
    env = {
        **os.environ,
        "JUPYTER_GPU_SESSIONS_DB_URL": db,
        "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS": "1xT4-16GB",
    }
    write_spec(kernel_dir, "one", gpu_spec())
    child = _child(kernel_dir, "one", 1, -1, env, notebook_dir)
    line = json.loads(child.stdout.readline())
    assert line["event"] == "running"
    (session,) = manager.store.live()
    assert len(labelled_containers(docker_client, **{"session-id": session.id})) == 1
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # A container the store never heard of, labelled as this store's, is removed too.
    stray = docker_client.containers.create(
        manager.default_image,
        ["sleep", "60"],
        labels={SESSION_LABEL: "0" * 32, STORE_LABEL: manager.store_id},
    )
    done = manager.reconcile()
    assert any("owner-gone" in d for d in done) and any(stray.name in d for d in done)
    ended = manager.store.get(session.id)
    assert ended.status == SessionStatus.ERROR and ended.reason.startswith("owner-gone")
    assert manager.held_devices() == {}
    assert labelled_containers(docker_client, **{"session-id": session.id}) == []
    assert labelled_containers(docker_client, **{"session-id": "0" * 32}) == []


def test_a_local_kernel_ends_with_the_process_that_started_it(kernel_dir, tmp_path, fresh_manager):
    db = f"sqlite:///{tmp_path}/shared.sqlite"
    manager = fresh_manager(db_url=db, simulated_gpus="1xT4-16GB")
    env = {
        **os.environ,
        "JUPYTER_GPU_SESSIONS_DB_URL": db,
        "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS": "1xT4-16GB",
    }
    write_spec(kernel_dir, "one", gpu_spec("local"))
    child = _child(kernel_dir, "one", 1, -1, env, tmp_path)
    assert json.loads(child.stdout.readline())["event"] == "running"
    (session,) = manager.store.live()
    kernel_pid = int(session.container_id)
    assert _alive(kernel_pid)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    # The kernel sees its parent go and exits: nothing keeps computing on the GPU that the
    # reconcile pass gives back to the queue.
    deadline = time.monotonic() + 30
    while _alive(kernel_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(kernel_pid)
    manager.reconcile()
    assert manager.store.get(session.id).reason.startswith("owner-gone")
    assert manager.held_devices() == {}


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_vanished_container_ends_its_session(
    kernel_dir, notebook_dir, kernel_image, fresh_manager, docker_client, aloop
):
    manager = fresh_manager(simulated_gpus="1xT4-16GB")
    write_spec(kernel_dir, "one", gpu_spec())

    async def scenario():
        from jupyter_client.kernelspec import KernelSpecManager

        ksm = KernelSpecManager(kernel_dirs=[str(kernel_dir)])
        return await start_kernel("one", notebook_dir, kernel_spec_manager=ksm)

    km, kc = aloop.run(scenario())
    session = km.provisioner.session
    (container,) = labelled_containers(docker_client, **{"session-id": session.id})
    container.remove(force=True)
    manager.reconcile()
    ended = manager.store.get(session.id)
    assert ended.status == SessionStatus.ERROR and ended.reason.startswith("container-vanished")
    assert manager.held_devices() == {}
    kc.stop_channels()
    aloop.run(km.shutdown_kernel(now=True))
