"""Bad config and failed starts: a clear error, and nothing left behind."""

from __future__ import annotations

import os

import docker
import pytest
from jupyter_client.manager import AsyncKernelManager
from traitlets import TraitError

from jupyter_gpu_sessions.core.errors import (
    ImageNotFound,
    InvalidRequest,
    KernelLaunchError,
    RuntimeUnavailable,
    UnsatisfiableRequest,
)
from jupyter_gpu_sessions.engine import current_engine

from .support import labelled_containers, shipped_spec, write_kernelspec


def spec_with(argv=None, **config):
    spec = shipped_spec()
    spec["metadata"]["kernel_provisioner"]["config"].update(config)
    if argv is not None:
        spec["argv"] = argv
    return spec


async def attempt_start(kernel_dir, notebook_dir, spec):
    """Start a kernel that must fail; check the failure left nothing behind, then re-raise."""
    ksm = write_kernelspec(kernel_dir, "bad", spec)
    km = AsyncKernelManager(kernel_name="bad", kernel_spec_manager=ksm)
    try:
        await km.start_kernel(cwd=str(notebook_dir))
    except Exception:
        assert_nothing_left(km)
        raise
    await km.shutdown_kernel(now=True)
    raise AssertionError("the kernel started, but it should have failed")


def assert_nothing_left(km) -> None:
    assert not km.has_kernel
    manager = current_engine().manager
    sessions = manager.store.list(kernel_id=km.kernel_id) if km.kernel_id else []
    assert all(s.status.is_terminal for s in sessions)
    ids = {s.id for s in sessions}
    assert not ids & set(manager.held_devices().values())
    assert not any(os.path.exists(os.path.join(manager.state_root, i)) for i in ids)
    if km.kernel_id:
        client = docker.from_env()
        assert labelled_containers(client, **{"kernel-id": km.kernel_id}) == []


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"memory": "8XB"}, ["memory '8XB'", "unknown unit 'XB'", "8GiB"]),
        ({"memory": "-1"}, ["memory '-1'", "not a size"]),
        ({"cpus": -1}, ["cpus -1", "out of range", "positive"]),
        ({"cpus": "many"}, ["cpus 'many'", "not a number of CPUs"]),
        ({"gpus": -2}, ["gpus -2", "out of range"]),
        ({"shm_size": "lots"}, ["shm_size 'lots'"]),
        ({"launch_timeout": 0}, ["launch_timeout 0"]),
        ({"env": {"BAD NAME": "x"}}, ["'BAD NAME'"]),
        ({"runtime": "podman"}, ["runtime", "podman"]),
    ],
)
async def test_bad_kernelspec_config_is_refused_with_a_message(
    config, words, kernel_dir, tmp_path, docker_client
):
    with pytest.raises(TraitError) as info:
        await attempt_start(kernel_dir, tmp_path, spec_with(**config))
    for word in words:
        assert word in str(info.value)


async def test_more_cpus_than_the_host_has_is_refused(kernel_dir, tmp_path, docker_client):
    with pytest.raises(InvalidRequest, match=r"more than this host has \(\d+\)"):
        await attempt_start(kernel_dir, tmp_path, spec_with(cpus=(os.cpu_count() or 1) + 1))


async def test_a_missing_image_names_the_image_and_how_to_get_it(
    kernel_dir, tmp_path, docker_client
):
    with pytest.raises(ImageNotFound) as info:
        await attempt_start(kernel_dir, tmp_path, spec_with(image="example.org/no-such:1"))
    assert "'example.org/no-such:1' is not on this host" in str(info.value)
    assert "docker pull example.org/no-such:1" in str(info.value)
    assert "jupyter gpu-sessions image build" in str(info.value)
    with pytest.raises(ImageNotFound, match="Build it with: jupyter gpu-sessions image build"):
        await attempt_start(
            kernel_dir, tmp_path, spec_with(image="jupyter-gpu-sessions/python3:000000000000")
        )


async def test_a_kernel_that_never_answers_fails_at_launch_timeout_with_its_log(
    kernel_dir, notebook_dir, kernel_image, docker_client
):
    argv = ["python3", "-c", "import time; print('still booting', flush=True); time.sleep(600)"]
    with pytest.raises(KernelLaunchError) as info:
        await attempt_start(kernel_dir, notebook_dir, spec_with(argv=argv, launch_timeout=3))
    message = str(info.value)
    assert "did not answer within 3s (launch_timeout)" in message
    assert "is running" in message  # the container's state
    assert "still booting" in message  # the tail of its log
    assert "has been removed" in message
    assert info.value.reason == "launch-timeout"


async def test_a_kernel_that_dies_in_launch_reports_its_exit_and_log(
    kernel_dir, notebook_dir, kernel_image, docker_client
):
    argv = ["python3", "-c", "import sys; print('cannot import torch'); sys.exit(3)"]
    with pytest.raises(KernelLaunchError) as info:
        await attempt_start(kernel_dir, notebook_dir, spec_with(argv=argv, launch_timeout=30))
    assert "exited with code 3 before it was ready" in str(info.value)
    assert "cannot import torch" in str(info.value)


async def test_a_kernel_over_its_memory_limit_is_reported_as_oom_killed(
    kernel_dir, notebook_dir, kernel_image, docker_client
):
    argv = ["python3", "-c", "x = bytearray(512 * 1024 * 1024)"]
    with pytest.raises(KernelLaunchError) as info:
        await attempt_start(
            kernel_dir, notebook_dir, spec_with(argv=argv, memory="64MiB", launch_timeout=30)
        )
    assert "running out of memory" in str(info.value)


async def test_gpus_on_a_host_without_gpus_are_refused_clearly(
    kernel_dir, tmp_path, fresh_manager, monkeypatch, docker_client
):
    monkeypatch.delenv("JUPYTER_GPU_SESSIONS_SIMULATED_GPUS", raising=False)
    fresh_manager()
    with pytest.raises(UnsatisfiableRequest) as info:
        await attempt_start(kernel_dir, tmp_path, spec_with(gpus=1))
    assert "asks for 1 GPU, but this host has no GPUs" in str(info.value)
    assert "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS" in str(info.value)


async def test_an_unreachable_docker_engine_is_named_with_how_to_check(
    kernel_dir, tmp_path, fresh_manager
):
    fresh_manager(docker_url="unix:///nonexistent/docker.sock")
    with pytest.raises(RuntimeUnavailable) as info:
        await attempt_start(kernel_dir, tmp_path, spec_with())
    message = str(info.value)
    assert "Cannot reach the Docker engine at unix:///nonexistent/docker.sock" in message
    assert "docker info" in message


async def test_a_system_directory_is_never_mounted_as_working_dir(kernel_dir, docker_client):
    with pytest.raises(InvalidRequest, match="'/etc' is a system directory"):
        await attempt_start(kernel_dir, "/etc", spec_with())
