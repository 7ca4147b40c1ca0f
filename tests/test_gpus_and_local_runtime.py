"""GPUs reach kernels by identity (simulated inventory + fake device nodes); the local runtime."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from jupyter_client import AsyncKernelManager

from jupyter_gpu_sessions.core.errors import KernelLaunchError, UnsatisfiableRequest
from jupyter_gpu_sessions.core.status import SessionStatus

from .support import (
    labelled_containers,
    restart_kernel,
    run_code,
    shipped_spec,
    start_kernel,
    stop_kernel,
    write_kernelspec,
)

LIST_DEVICES = (
    "import os\n"
    "print(sorted(d for d in os.listdir('/dev') if d.startswith('nvidia')))\n"
    "print(os.environ.get('CUDA_VISIBLE_DEVICES'), os.environ.get('NVIDIA_VISIBLE_DEVICES'))\n"
)


async def test_a_gpu_kernel_sees_exactly_its_own_devices(
    kernel_dir, notebook_dir, kernel_image, fake_gpu_nodes, fresh_manager, docker_client
):
    manager = fresh_manager(simulated_gpus="4xA100-80GB", simulated_device_dir=str(fake_gpu_nodes))
    uuids = [d.uuid for d in manager.inventory.devices()]
    two = shipped_spec("python3-gpu")
    two["metadata"]["kernel_provisioner"]["config"].update(gpus=2, cpus=1, memory="1GiB")
    ksm = write_kernelspec(kernel_dir, "two-gpus", two)
    one = shipped_spec("python3-gpu")
    one["metadata"]["kernel_provisioner"]["config"].update(cpus=1, memory="1GiB")
    write_kernelspec(kernel_dir, "one-gpu", one)

    first = await start_kernel("two-gpus", notebook_dir, kernel_spec_manager=ksm)
    second = await start_kernel("one-gpu", notebook_dir, kernel_spec_manager=ksm)
    try:
        _, out1 = await run_code(first[1], LIST_DEVICES)
        _, out2 = await run_code(second[1], LIST_DEVICES)
        assert out1.splitlines() == [
            "['nvidia0', 'nvidia1']",
            f"{uuids[0]},{uuids[1]} {uuids[0]},{uuids[1]}",
        ]
        assert out2.splitlines() == ["['nvidia2']", f"{uuids[2]} {uuids[2]}"]
        (container,) = labelled_containers(docker_client, **{"kernel-id": first[0].kernel_id})
        assert container.labels["io.jupyter.gpu-sessions.gpus"] == f"{uuids[0]},{uuids[1]}"
        # Two more GPUs while only one is free: it waits, and says for what.
        two["metadata"]["kernel_provisioner"]["config"]["queue_timeout"] = 0.5
        write_kernelspec(kernel_dir, "two-gpus-impatient", two)
        with pytest.raises(KernelLaunchError, match="waiting for 2 GPUs: 1 of 4 GPUs free"):
            await start_kernel("two-gpus-impatient", notebook_dir, kernel_spec_manager=ksm)
        five = shipped_spec("python3-gpu")
        five["metadata"]["kernel_provisioner"]["config"].update(gpus=5)
        write_kernelspec(kernel_dir, "five", five)
        with pytest.raises(UnsatisfiableRequest, match="asks for 5 GPUs, but this host has 4"):
            await start_kernel("five", notebook_dir, kernel_spec_manager=ksm)
    finally:
        await stop_kernel(*first)
        await stop_kernel(*second)
    assert manager.held_devices() == {}


async def test_a_restarted_gpu_kernel_keeps_its_devices(
    kernel_dir, notebook_dir, kernel_image, fake_gpu_nodes, fresh_manager
):
    manager = fresh_manager(simulated_gpus="2xT4-16GB", simulated_device_dir=str(fake_gpu_nodes))
    spec = shipped_spec("python3-gpu")
    spec["metadata"]["kernel_provisioner"]["config"].update(cpus=1, memory="1GiB")
    ksm = write_kernelspec(kernel_dir, "gpu", spec)
    km, kc = await start_kernel("gpu", notebook_dir, kernel_spec_manager=ksm)
    try:
        held = manager.held_devices()
        await restart_kernel(km, kc)
        assert manager.held_devices() == held
        _, out = await run_code(kc, LIST_DEVICES)
        assert out.splitlines()[0] == "['nvidia0']"
    finally:
        await stop_kernel(km, kc)
    assert manager.held_devices() == {}


async def test_the_local_runtime_keeps_the_environment_rules_and_sets_cuda_devices(
    kernel_dir, tmp_path, fresh_manager, monkeypatch
):
    manager = fresh_manager(simulated_gpus="2xA100-80GB")
    monkeypatch.setenv("JGS_TEST_SERVER_SECRET", "must-not-reach-the-kernel")
    spec = shipped_spec("python3-gpu")
    spec["metadata"]["kernel_provisioner"]["config"] = {"gpus": 1, "runtime": "local"}
    spec["env"] = {"FROM_KERNELSPEC": "yes"}
    ksm = write_kernelspec(kernel_dir, "local-gpu", spec)
    km, kc = await start_kernel("local-gpu", tmp_path, kernel_spec_manager=ksm)
    try:
        _, out = await run_code(
            kc,
            "import os\n"
            "print(os.getpid(), os.getcwd(), os.environ.get('CUDA_VISIBLE_DEVICES'))\n"
            "print(os.environ.get('JGS_TEST_SERVER_SECRET'), os.environ.get('FROM_KERNELSPEC'))\n",
        )
        pid, cwd, cuda = out.splitlines()[0].split()
        assert int(pid) == int(manager.handle(km.provisioner.session).id)
        assert cwd == str(tmp_path)
        assert cuda == manager.inventory.devices()[0].uuid
        assert out.splitlines()[1] == "None yes"
        await restart_kernel(km, kc)
        _, out = await run_code(kc, "import os; print(os.getpid())")
        assert int(out) == int(manager.handle(km.provisioner.session).id) != int(pid)
    finally:
        await stop_kernel(km, kc)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)
    assert manager.held_devices() == {}


@pytest.mark.parametrize("runtime", ["local", "docker"])
async def test_a_kernel_whose_port_another_process_took_starts_on_fresh_ports(
    runtime, kernel_dir, tmp_path, fresh_manager, request
):
    """Two processes on a host pick kernel ports independently: one may take a port the
    other chose before its kernel binds it. A first start then takes fresh ports instead
    of failing, and the kernel manager's clients use those."""
    if runtime == "docker":
        request.getfixturevalue("kernel_image")
    manager = fresh_manager()
    spec = shipped_spec("python3-container")
    spec["metadata"]["kernel_provisioner"]["config"] = {"runtime": runtime}
    ksm = write_kernelspec(kernel_dir, f"taken-{runtime}", spec)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    km = AsyncKernelManager(kernel_name=f"taken-{runtime}", kernel_spec_manager=ksm)
    km.cache_ports = False  # the ports below are the kernel's, as another process chose them
    km.shell_port = taken
    kc = None
    try:
        await km.start_kernel(cwd=str(tmp_path))
        assert km.shell_port != taken
        assert json.loads(Path(km.connection_file).read_text())["shell_port"] == km.shell_port
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=60)
        _, out = await run_code(kc, "print(6 * 7)")
        assert out.strip() == "42"
        history = manager.store.get(km.provisioner.session.id).history
        assert [h.status for h in history][-1] == SessionStatus.RUNNING
    finally:
        squatter.close()
        if kc is not None:
            await stop_kernel(km, kc)
        elif km.has_kernel:
            await km.shutdown_kernel(now=True)
