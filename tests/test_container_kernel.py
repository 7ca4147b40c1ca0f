"""A python3-container kernel behaves like a local kernel, and really runs in its container."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.engine import current_engine

from .support import (
    KERNEL_UID,
    labelled_containers,
    restart_kernel,
    run_code,
    start_kernel,
    stop_kernel,
)

SECRET = "JGS_TEST_SERVER_SECRET"


@pytest.fixture(scope="module")
def kernel(aloop, kernel_image, notebook_dir):
    """One container kernel shared by the tests that only run code in it."""
    os.environ[SECRET] = "must-not-reach-the-kernel"
    os.environ["TZ"] = "Europe/Paris"  # allowlisted: a kernel inherits it
    try:
        km, kc = aloop.run(start_kernel("python3-container", notebook_dir))
    finally:
        del os.environ[SECRET], os.environ["TZ"]
    yield km, kc
    aloop.run(stop_kernel(km, kc))


def test_code_runs_in_a_hardened_container_as_the_notebook_owner(
    kernel, aloop, docker_client, notebook_dir
):
    km, kc = kernel
    reply, out = aloop.run(
        run_code(
            kc,
            "import os, socket\n"
            "status = dict(l.split(':\\t') for l in open('/proc/self/status').read().splitlines()"
            " if l.startswith(('CapEff', 'NoNewPrivs')))\n"
            "print(socket.gethostname(), os.getuid(), os.getcwd(), sep='|')\n"
            "print(open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip())\n"
            "print(status['CapEff'], status['NoNewPrivs'], os.environ.get('HOME'), sep='|')\n"
            f"print(os.environ.get({SECRET!r}), os.environ.get('TZ'), sep='|')\n",
        )
    )
    assert reply["status"] == "ok", out
    lines = out.splitlines()
    hostname, uid, cwd = lines[0].split("|")
    assert hostname != socket.gethostname() and hostname.startswith("jgs-")
    assert int(uid) == KERNEL_UID
    assert cwd == str(notebook_dir)
    assert int(lines[1]) == 4 * 1024**3  # the kernelspec's memory: "4GiB"
    assert lines[2] == "0000000000000000|1|/home/work"
    assert lines[3] == "None|Europe/Paris"  # the server's environment stays out

    (container,) = labelled_containers(docker_client, **{"kernel-id": km.kernel_id})
    labels = container.labels
    assert labels["io.jupyter.gpu-sessions.session-id"] == km.provisioner.session.id
    assert labels["io.jupyter.gpu-sessions.owner"]
    host = container.attrs["HostConfig"]
    assert host["Init"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["PidsLimit"] > 0 and host["NanoCpus"] == 1_000_000_000
    bindings = [b for port in host["PortBindings"].values() for b in port]
    assert len(bindings) == 5 and {b["HostIp"] for b in bindings} == {"127.0.0.1"}
    ports = {int(b["HostPort"]) for b in bindings}
    assert ports == {km.shell_port, km.iopub_port, km.stdin_port, km.hb_port, km.control_port}


def test_relative_paths_and_written_files_belong_to_the_notebook_owner(kernel, aloop, notebook_dir):
    _, kc = kernel
    (notebook_dir / "input.csv").write_text("a,b\n1,2\n")
    reply, out = aloop.run(
        run_code(
            kc,
            "print(open('input.csv').read().splitlines()[1])\n"
            "open('result.txt', 'w').write('from the container')\n",
        )
    )
    assert reply["status"] == "ok", out
    assert out.strip() == "1,2"
    result = notebook_dir / "result.txt"
    assert result.read_text() == "from the container"
    assert result.stat().st_uid == KERNEL_UID


def test_interrupt_stops_a_sleeping_cell_within_two_seconds(kernel, aloop):
    km, kc = kernel

    async def interrupt_sleep():
        msg_id = kc.execute("import time; print('sleeping', flush=True); time.sleep(60)")
        # Interrupt once the cell is inside time.sleep: execute_input comes before the user's
        # code runs, and a SIGINT inside IPython's own machinery is another matter.
        while True:
            msg = await kc.get_iopub_msg(timeout=30)
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "stream"
                and "sleeping" in msg["content"]["text"]
            ):
                break
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await km.interrupt_kernel()
        while True:
            reply = await kc.get_shell_msg(timeout=10)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply, time.monotonic() - started

    reply, elapsed = aloop.run(interrupt_sleep())
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert elapsed < 2.0
    # The kernel lives on. A request that reaches it in the moment after the failed cell is
    # answered "aborted" (ipykernel's stop_on_error, a local kernel alike): not run, so
    # send it again, as a person would.
    for _ in range(10):
        reply = aloop.run(
            kc.execute_interactive("answer = 6 * 7", user_expressions={"a": "answer"})
        )
        if reply["content"]["status"] != "aborted":
            break
        time.sleep(0.1)
    assert reply["content"]["status"] == "ok", reply["content"]
    assert reply["content"]["user_expressions"]["a"]["data"]["text/plain"] == "42"


def test_restart_three_times_keeps_ports_and_session(
    aloop, kernel_image, notebook_dir, docker_client
):
    async def scenario():
        km, kc = await start_kernel("python3-container", notebook_dir)
        session = km.provisioner.session
        ports = (km.shell_port, km.iopub_port, km.stdin_port, km.hb_port, km.control_port)
        try:
            for n in range(3):
                await run_code(kc, f"x = {n}")
                await restart_kernel(km, kc)
                reply, out = await run_code(kc, "print('x' in dir())")
                assert reply["status"] == "ok"
                assert out.strip() == "False"  # a fresh interpreter each time
                assert km.provisioner.session.id == session.id
                assert (
                    km.shell_port,
                    km.iopub_port,
                    km.stdin_port,
                    km.hb_port,
                    km.control_port,
                ) == ports
            assert len(labelled_containers(docker_client, **{"session-id": session.id})) == 1
        finally:
            await stop_kernel(km, kc)
        return session

    session = aloop.run(scenario())
    session = current_engine().manager.store.get(session.id)
    statuses = [change.status for change in session.history]
    assert statuses == [
        SessionStatus.PENDING,
        SessionStatus.PREPARING,
        SessionStatus.RUNNING,
        *[SessionStatus.RESTARTING, SessionStatus.RUNNING] * 3,
        SessionStatus.TERMINATING,
        SessionStatus.TERMINATED,
    ]
    assert labelled_containers(docker_client, **{"session-id": session.id}) == []


def test_four_kernels_start_at_once_in_distinct_containers(
    aloop, kernel_image, notebook_dir, docker_client
):
    async def scenario():
        started = await asyncio.gather(
            *[start_kernel("python3-container", notebook_dir) for _ in range(4)]
        )
        try:
            outs = await asyncio.gather(
                *[run_code(kc, "import socket; print(socket.gethostname())") for _, kc in started]
            )
            ids = [km.kernel_id for km, _ in started]
        finally:
            await asyncio.gather(*[stop_kernel(km, kc) for km, kc in started])
        return ids, [out.strip() for _, out in outs]

    ids, hostnames = aloop.run(scenario())
    assert len(set(hostnames)) == 4
    for kernel_id in ids:
        assert labelled_containers(docker_client, **{"kernel-id": kernel_id}) == []


def test_a_container_killed_from_outside_is_seen_and_restarted(
    aloop, kernel_image, notebook_dir, docker_client
):
    from jupyter_client.ioloop import AsyncIOLoopKernelManager
    from traitlets.config import Config

    async def scenario():
        config = Config({"KernelRestarter": {"time_to_dead": 0.5}})
        # The class jupyter_server uses: it brings the restarter.
        km, kc = await start_kernel(
            "python3-container", notebook_dir, km_class=AsyncIOLoopKernelManager, config=config
        )
        restarts = []
        km.add_restart_callback(lambda: restarts.append("restart"), "restart")
        km.start_restarter()
        try:
            (container,) = labelled_containers(docker_client, **{"kernel-id": km.kernel_id})
            await asyncio.to_thread(container.kill)
            code = await km.provisioner.poll()
            assert code == 137
            deadline = time.monotonic() + 60
            while not restarts and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            await kc.wait_for_ready(timeout=60)
            reply, out = await run_code(kc, "print('back')")
            return code, restarts, out
        finally:
            km.stop_restarter()
            await stop_kernel(km, kc)

    code, restarts, out = aloop.run(scenario())
    assert code == 137 and restarts == ["restart"]
    # The first cell after the automatic restart also says why, on stderr (the two streams
    # may arrive in either order).
    assert sorted(out.strip().splitlines()) == [
        "[jupyter-gpu-sessions] The previous kernel died (exited 137: the kernel's process "
        "ended on its own) and was restarted: its variables are gone.",
        "back",
    ]


def test_provisioner_info_lets_another_provisioner_take_over_the_container(
    aloop, kernel_image, notebook_dir, docker_client
):
    from jupyter_client.provisioning import KernelProvisionerFactory

    async def scenario():
        km, kc = await start_kernel("python3-container", notebook_dir)
        kc.stop_channels()
        info = await km.provisioner.get_provisioner_info()
        assert info["container_id"] and info["session_id"] == km.provisioner.session.id
        # A new kernel manager (as after a server restart) re-attaches from the info alone.
        successor = type(km)(kernel_name="python3-container")
        successor.kernel_id = km.kernel_id
        provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
            km.kernel_id, successor.kernel_spec, parent=successor
        )
        await provisioner.load_provisioner_info(info)
        alive = await provisioner.poll()
        await provisioner.terminate()
        code = await provisioner.wait()
        await provisioner.cleanup(restart=False)
        return info, alive, code

    info, alive, code = aloop.run(scenario())
    assert alive is None and code == 143  # SIGTERM reached the kernel through tini
    assert labelled_containers(docker_client, **{"session-id": info["session_id"]}) == []
