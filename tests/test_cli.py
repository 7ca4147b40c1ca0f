"""`jupyter gpu-sessions …` as a person runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from jupyter_gpu_sessions.image import default_image
from jupyter_gpu_sessions.kernelspecs import PROVISIONER_NAME


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jupyter_gpu_sessions.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_doctor_reports_engine_image_gpus_and_kernelspecs(kernel_image):
    result = cli("doctor", env={"JUPYTER_GPU_SESSIONS_SIMULATED_GPUS": "2xA100-80GB"})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "[ok  ] Docker engine" in out
    assert f"[ok  ] default kernel image {kernel_image} present" in out
    assert "simulated GPUs configured: 2 simulated GPU(s)" in out
    assert "[ok  ] session store sqlite:///" in out
    assert "[ok  ] vfolder root " in out
    assert "[ok  ] loopback vfolders (hard quotas) available" in out  # root, as in CI
    assert "[ok  ] server extension jupyter_gpu_sessions enabled" in out
    assert "kernelspec python3-container installed" in out
    assert "kernelspec python3-gpu installed" in out
    assert out.rstrip().endswith("All set.")


def test_doctor_names_the_fix_for_an_unreachable_engine():
    result = cli("doctor", env={"DOCKER_HOST": "unix:///nonexistent.sock"})
    assert result.returncode == 1
    assert "[FAIL] Docker engine not reachable" in result.stdout
    assert "fix: Cannot reach the Docker engine at unix:///nonexistent.sock" in result.stdout


def test_kernelspec_install_writes_a_gpu_kernelspec(tmp_path):
    result = cli(
        "kernelspec",
        "install",
        "--name",
        "python3-2gpu",
        "--gpus",
        "2",
        "--cpus",
        "4",
        "--memory",
        "16GiB",
        "--image",
        "lab/torch:2.5",
        "--prefix",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    spec = json.loads((tmp_path / "share/jupyter/kernels/python3-2gpu/kernel.json").read_text())
    assert spec["display_name"] == "Python 3 (2 GPUs, lab/torch:2.5)"
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": PROVISIONER_NAME,
        "config": {"gpus": 2, "cpus": 4.0, "memory": "16GiB", "image": "lab/torch:2.5"},
    }


def test_kernelspec_install_refuses_bad_values_and_writes_nothing(tmp_path):
    for args, words in [
        (("--name", "x", "--memory", "8XB"), "memory '8XB' has an unknown unit"),
        (("--name", "x", "--gpus", "-1"), "gpus -1 is out of range"),
        (("--name", "../evil"), "kernel name '../evil' is not valid"),
        (("--name", "x", "--runtime", "podman"), "runtime 'podman' is unknown"),
        ((), "--name is required"),
    ]:
        result = cli("kernelspec", "install", *args, "--prefix", str(tmp_path))
        assert result.returncode == 1, args
        assert words in result.stderr
    assert not (tmp_path / "share").exists()


def test_gpus_lists_devices_and_who_holds_them():
    result = cli("gpus", env={"JUPYTER_GPU_SESSIONS_SIMULATED_GPUS": "2xT4-16GB"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["#", "UUID", "NAME", "MEMORY", "UTIL", "USED", "HELD", "BY"]
    assert len(lines) == 3 and "Simulated T4-16GB" in lines[1] and "16GiB" in lines[1]
    assert lines[1].rstrip().endswith("free")
    empty = cli("gpus", env={"JUPYTER_GPU_SESSIONS_SIMULATED_GPUS": ""})
    assert "No GPUs" in empty.stdout


def test_image_build_does_nothing_when_the_tag_is_present(kernel_image):
    result = cli("image", "build")
    assert result.returncode == 0, result.stderr
    assert f"Kernel image {kernel_image} is already present" in result.stdout
    assert result.stdout.strip().endswith(default_image())


def test_image_dockerfile_prints_the_cuda_recipe():
    result = cli("image", "dockerfile")
    assert result.returncode == 0, result.stderr
    assert "ARG CUDA_IMAGE=nvidia/cuda:" in result.stdout
    assert 'pip install "ipykernel>=7.1,<8"' in result.stdout
