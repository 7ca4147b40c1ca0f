"""The pure layer: sizes, counts, the status machine, the simulated-GPU grammar, attachments."""

from __future__ import annotations

import pytest

from jupyter_gpu_sessions.core.errors import InvalidRequest
from jupyter_gpu_sessions.core.models import ExitState, GPUDevice, ResourceRequest
from jupyter_gpu_sessions.core.status import IllegalTransition, SessionStatus, check_transition
from jupyter_gpu_sessions.core.units import format_size, parse_cpus, parse_size
from jupyter_gpu_sessions.devices import SimulatedInventory, parse_simulated_gpus
from jupyter_gpu_sessions.devices.attach import attach_devices, choose_mode
from jupyter_gpu_sessions.image.build import manylinux_platforms
from jupyter_gpu_sessions.image.recipe import DEFAULT_RECIPE, build_hint, default_image

GiB = 1024**3


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("8GiB", 8 * GiB),
        ("8G", 8 * 10**9),
        ("512m", 512 * 10**6),
        ("1.5Gi", 3 * GiB // 2),
        ("1024", 1024),
        (4096, 4096),
        ("64 MiB", 64 * 1024**2),
        ("2tb", 2 * 10**12),
    ],
)
def test_sizes_parse_in_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("8XB", "unknown unit 'XB'"),
        ("-1", "not a size"),
        ("", "not a size"),
        ("ten", "not a size"),
        (1.5, "whole number"),
        ("0", "too small"),
        (True, "not a size"),
    ],
)
def test_bad_sizes_name_the_value(text, words):
    with pytest.raises(InvalidRequest, match=words):
        parse_size(text, what="memory")


def test_format_size_round_trips_binary_units():
    assert format_size(8 * GiB) == "8GiB"
    assert format_size(1536 * 1024**2) == "1.5GiB"
    assert parse_size(format_size(3 * 1024**2)) == 3 * 1024**2


@pytest.mark.parametrize("value", [-1, 0, "x", float("nan"), float("inf"), None, True])
def test_bad_cpu_counts_are_refused(value):
    with pytest.raises(InvalidRequest, match="cpus"):
        parse_cpus(value)


def test_resource_request_validates_every_field():
    request = ResourceRequest.parse(gpus="2", cpus="1.5", memory="8GiB", shm_size="1GiB")
    assert request == ResourceRequest(gpus=2, cpus=1.5, memory=8 * GiB, shm_size=GiB)
    assert request.describe() == "2 GPUs, 1.5 CPUs, 8GiB memory"
    with pytest.raises(InvalidRequest, match="gpus 65 is out of range"):
        ResourceRequest.parse(gpus=65)
    with pytest.raises(InvalidRequest, match="memory '1MiB' is too small"):
        ResourceRequest.parse(memory="1MiB")
    with pytest.raises(InvalidRequest, match="more than this host has"):
        ResourceRequest.parse(memory="2TiB").check_fits_host(host_cpus=2, host_memory=24 * GiB)


def test_status_machine_allows_restarts_and_refuses_illegal_moves():
    path = ["PENDING", "PREPARING", "RUNNING", "RESTARTING", "RUNNING", "TERMINATING", "TERMINATED"]
    for old, new in zip(path, path[1:], strict=False):
        check_transition(SessionStatus(old), SessionStatus(new))
    with pytest.raises(IllegalTransition, match="from TERMINATED to RUNNING"):
        check_transition(SessionStatus.TERMINATED, SessionStatus.RUNNING)
    with pytest.raises(IllegalTransition, match="allowed: CANCELLED, PREPARING"):
        check_transition(SessionStatus.PENDING, SessionStatus.RUNNING)
    for final in ("TERMINATED", "CANCELLED", "ERROR"):
        assert SessionStatus(final).is_terminal


def test_exit_states_say_what_happened():
    assert "running out of memory" in ExitState(137, oom_killed=True).describe()
    assert "SIGKILL" in ExitState(137).describe()
    assert "SIGTERM" in ExitState(143).describe()


def test_simulated_gpu_grammar():
    gpus = parse_simulated_gpus("2xA100-80GB, 1xT4-16GB,H100")
    assert [gpu.model for gpu in gpus] == ["A100-80GB", "A100-80GB", "T4-16GB", "H100"]
    assert [gpu.memory // GiB for gpu in gpus] == [80, 80, 16, 16]
    assert all(gpu.mig == () for gpu in gpus)
    for bad in ("4x", "2x-80GB", "0xA100", "65xA100", "A100 80GB", "2xA100;rm"):
        with pytest.raises(InvalidRequest, match="simulated GPUs"):
            parse_simulated_gpus(bad)


def test_simulated_uuids_are_stable_and_nodes_found(fake_gpu_nodes):
    first = SimulatedInventory("2xA100-80GB", str(fake_gpu_nodes)).devices()
    again = SimulatedInventory("2xA100-80GB").devices()
    assert [d.uuid for d in first] == [d.uuid for d in again]
    assert len({d.uuid for d in first}) == 2 and first[0].uuid.startswith("GPU-")
    assert first[1].device_path == str(fake_gpu_nodes / "nvidia1")
    assert again[0].device_path is None


def _gpu(index, simulated=False):
    return GPUDevice(
        index=index,
        uuid=f"GPU-{index}",
        name="A100",
        memory=80 * GiB,
        minor=index,
        device_path=f"/dev/nvidia{index}",
        simulated=simulated,
    )


def test_gpus_are_attached_by_uuid_never_by_count():
    devices = [_gpu(2), _gpu(3)]
    nvidia = attach_devices(devices, "nvidia")
    assert nvidia.device_requests == [
        {"driver": "nvidia", "device_ids": ["GPU-2", "GPU-3"], "capabilities": [["gpu"]]}
    ]
    assert "count" not in nvidia.device_requests[0]
    cdi = attach_devices(devices, "cdi")
    assert cdi.device_requests[0]["device_ids"] == ["nvidia.com/gpu=GPU-2", "nvidia.com/gpu=GPU-3"]
    nodes = attach_devices([_gpu(1, simulated=True)], "nodes")
    assert nodes.device_nodes == [("/dev/nvidia1", "/dev/nvidia1")]
    assert nodes.env == {"NVIDIA_VISIBLE_DEVICES": "GPU-1", "CUDA_VISIBLE_DEVICES": "GPU-1"}
    assert attach_devices([], "auto").env == {"NVIDIA_VISIBLE_DEVICES": "void"}


def test_attach_mode_auto_prefers_the_toolkit_then_cdi_then_nodes():
    real = [_gpu(0)]
    assert choose_mode(real, "auto", nvidia_runtime=True, cdi=True) == "nvidia"
    assert choose_mode(real, "auto", nvidia_runtime=False, cdi=True) == "cdi"
    assert choose_mode(real, "auto", nvidia_runtime=False, cdi=False) == "nodes"
    assert choose_mode([_gpu(0, True)], "auto", nvidia_runtime=True, cdi=True) == "nodes"
    with pytest.raises(InvalidRequest, match="unknown"):
        choose_mode(real, "magic", nvidia_runtime=False, cdi=False)


def test_the_image_tag_follows_its_recipe():
    from dataclasses import replace

    # The default image is the recipe's base plus the kernel-side package's layer.
    from jupyter_gpu_sessions.image.recipe import kernel_package_digest

    assert default_image() == f"{DEFAULT_RECIPE.tag}-{kernel_package_digest()}"
    assert DEFAULT_RECIPE.tag.startswith("jupyter-gpu-sessions/python3:")
    changed = replace(DEFAULT_RECIPE, wheels=(*DEFAULT_RECIPE.wheels, "pandas"))
    assert changed.tag != DEFAULT_RECIPE.tag
    assert replace(DEFAULT_RECIPE).tag == DEFAULT_RECIPE.tag
    assert "jupyter gpu-sessions image build" in build_hint(default_image())
    assert "docker pull ghcr.io/x/y:1" in build_hint("ghcr.io/x/y:1")


def test_wheel_platforms_cover_every_manylinux_the_rootfs_can_load():
    tags = manylinux_platforms("2.36", "x86_64")
    assert "manylinux_2_36_x86_64" in tags and "manylinux_2_17_x86_64" in tags
    assert "manylinux_2_37_x86_64" not in tags and "manylinux2014_x86_64" in tags


def test_cdi_is_used_only_where_the_docker_daemon_supports_it(monkeypatch):
    from jupyter_gpu_sessions.runtime import docker as docker_runtime

    monkeypatch.setattr(docker_runtime, "cdi_available", lambda: True)  # a spec is installed
    runtime = docker_runtime.DockerRuntime()
    for version, supported in [
        ("20.10.24+dfsg1", False),
        ("24.0.7", False),
        ("25.0.1", True),
        ("27.3.1", True),
        ("", False),
    ]:
        runtime._engine_info = {"ServerVersion": version}
        assert runtime.cdi_supported() is supported, version
