"""The shipped OpenAPI document against a live server: schemathesis finds no 5xx and no
response that breaks the document."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from jupyter_gpu_sessions.server import OPENAPI

from .openapi_check import NOT_FUZZED, fuzzed_operations

TOKEN = "schemathesis-token"
# The events websocket is in the document too; test_server_api exercises it.
schema = schemathesis.openapi.from_path(OPENAPI).exclude(path="/events")


def pytest_generate_tests(metafunc):
    """The fuzz's items parametrized by the live server's store. Besides naming it, this
    gives each operation's item a node id of its own (`...[GET /gpus][sqlite]`): under
    pytest 9.2 schemathesis' unparametrized items all share one node id, and pytest-xdist,
    which schedules by node id, then runs one of them (tests/openapi_check.py checks)."""
    if "live_server" in metafunc.fixturenames and metafunc.definition.name.startswith(
        "test_the_api_answers"
    ):
        metafunc.parametrize("live_server", ["sqlite"], indirect=True, scope="module")


def test_the_fuzz_covers_every_operation_of_the_document():
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert labels == fuzzed_operations(), f"not fuzzed by design: {NOT_FUZZED}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(request, tmp_path_factory):
    """A real `jupyter server` process with the extension, simulated GPUs, its own store and
    vfolder root, and small storage limits (fuzzed loopback vfolders stay small)."""
    assert request.param == "sqlite"
    base = tmp_path_factory.mktemp("live")
    config_dir = base / "config"
    config_dir.mkdir()
    policies = {"default": {"max_vfolder_size": "32MiB", "max_vfolder_count": 10}}
    (config_dir / "jupyter_server_config.json").write_text(
        json.dumps(
            {
                "ServerApp": {"jpserver_extensions": {"jupyter_gpu_sessions": True}},
                "GPUSessionManager": {"policies": policies},
                "VFolderService": {"root": str(base / "vfolders")},
            }
        )
    )
    (base / "root").mkdir()
    port = _free_port()
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(config_dir),
        "JUPYTER_DATA_DIR": str(base / "data"),
        "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
        "JUPYTER_GPU_SESSIONS_DB_URL": f"sqlite:///{base}/store.sqlite",
        "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS": "2xA100-80GB,1xA100-80GB:mig=1g.10gb*7",
    }
    log = open(base / "server.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            f"--ServerApp.port={port}",
            "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={TOKEN}",
            "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={base / 'root'}",
            "--ServerApp.allow_unauthenticated_access=False",
            "--allow-root",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            request = urllib.request.Request(
                f"{url}/gpu-sessions/api/quota", headers={"Authorization": f"token {TOKEN}"}
            )
            with urllib.request.urlopen(request, timeout=2):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log.close()
                pytest.fail(f"the server did not start:\n{(base / 'server.log').read_text()}")
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(30)
    log.close()
    _unmount_under(base / "vfolders")
    errors = [
        line
        for line in (base / "server.log").read_text().splitlines()
        if "Traceback" in line or " 500 " in line
    ]
    assert not errors, "\n".join(errors)


def _unmount_under(root: Path) -> None:
    """Loopback vfolders the fuzzing created: unmounted and their loop devices freed."""
    with open("/proc/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(str(root))]
    for point in points:
        subprocess.run(["umount", "-l", point], check=False)
    for image in (root / "images").glob("*.img") if (root / "images").is_dir() else ():
        found = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
        for line in found.stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], check=False)


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("JGS_SCHEMATHESIS_EXAMPLES", "15")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=os.environ.get("JGS_SCHEMATHESIS_RANDOM") != "1",
)
def test_the_api_answers_as_its_openapi_document_says(case, live_server):
    # Every check but positive_data_acceptance: a request the document allows may still
    # be refused for a rule no schema can say (a loopback quota under 16 MiB, a name taken).
    case.call_and_validate(
        base_url=f"{live_server}/gpu-sessions/api",
        headers={"Authorization": f"token {TOKEN}"},
        excluded_checks=[positive_data_acceptance],
        timeout=30,
    )
