"""Kernels started through the server: idle kernels give their GPUs back."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.manager import GPUSessionManager

from .api_support import ADMIN, Api, server_fixtures
from .support import make_notebook_dir, shipped_spec

IDLE_TIMEOUT = 3.0


jp_server_config, jp_auth_header = server_fixtures(
    GPUSessionManager={"policies": {"default": {"idle_timeout": f"{IDLE_TIMEOUT:g}s"}}},
    GPUSessionsExtension={"idle_check_interval": 0.5, "admin_users": [ADMIN]},
)


@pytest.fixture
def gpu_kernelspec(jp_data_dir, kernel_image):
    spec = shipped_spec("python3-gpu")
    spec["metadata"]["kernel_provisioner"]["config"].update(
        {"image": kernel_image, "cpus": 1, "memory": "1GiB"}
    )
    target = jp_data_dir / "kernels" / "gpu-idle"
    target.mkdir(parents=True)
    (target / "kernel.json").write_text(json.dumps(spec))
    return "gpu-idle"


async def _start(jp_fetch, kernels, name: str) -> str:
    """Start a kernel as a client does: POST answers once it is queued (a pending kernel);
    the client's websocket then waits until it runs."""
    response = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": name}))
    kernel_id = json.loads(response.body)["id"]
    await kernels.get_kernel(kernel_id).ready
    return kernel_id


async def test_an_idle_kernel_is_shut_down_and_frees_its_gpu_but_a_busy_one_is_not(
    jp_fetch, jp_serverapp, jp_root_dir, gpu_kernelspec, docker_client
):
    make_notebook_dir(jp_root_dir)
    await jp_serverapp.extension_manager.start_all_extensions()  # the culler's timer
    manager: GPUSessionManager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    kernels = jp_serverapp.kernel_manager
    idle_id = await _start(jp_fetch, kernels, gpu_kernelspec)
    busy_id = await _start(jp_fetch, kernels, gpu_kernelspec)
    try:
        idle_session = kernels.get_kernel(idle_id).provisioner.session
        busy_session = kernels.get_kernel(busy_id).provisioner.session
        assert idle_session.allocations and busy_session.allocations

        client = kernels.get_kernel(busy_id).client()
        client.start_channels()
        try:
            client.execute("import time; time.sleep(12)")
            deadline = time.monotonic() + 10
            while kernels.get_kernel(busy_id).execution_state != "busy":
                assert time.monotonic() < deadline, "the long cell never started"
                await asyncio.sleep(0.1)

            deadline = time.monotonic() + IDLE_TIMEOUT + 15
            while idle_id in kernels:
                assert time.monotonic() < deadline, "the idle kernel was not shut down"
                await asyncio.sleep(0.2)
            ended = manager.store.get(idle_session.id)
            assert ended.status == SessionStatus.TERMINATED
            assert ended.reason.startswith("idle-timeout")
            assert any(h.reason.startswith("idle-timeout") for h in ended.history)
            held = manager.held_devices()
            assert not any(sid == idle_session.id for sid in held.values())
            assert any(sid == busy_session.id for sid in held.values())
            assert "kernel shut down: idle-timeout" in manager.store.log_tail(idle_session.id)

            # the busy kernel outlives the timeout while its cell runs
            assert busy_id in kernels
            assert manager.store.get(busy_session.id).status == SessionStatus.RUNNING
        finally:
            client.stop_channels()

        api = Api(jp_fetch)
        status, logs = await api.get(f"sessions/{idle_session.id}/logs", user=ADMIN)
        assert status == 200 and "idle-timeout" in logs["logs"]

        # Ending the busy one through the sessions API shuts its kernel down too.
        status, live = await api.get(f"sessions/{busy_session.id}/logs", user=ADMIN)
        assert status == 200 and live["live"] is True
        status, body = await api.delete(f"sessions/{busy_session.id}", user=ADMIN)
        assert status == 200 and body["ended"][0]["status"] == "TERMINATED"
        assert busy_id not in kernels
        assert not manager.held_devices()
        assert not docker_client.containers.list(
            all=True, filters={"label": f"io.jupyter.gpu-sessions.session-id={busy_session.id}"}
        )
    finally:
        for kernel_id in (idle_id, busy_id):
            if kernel_id in kernels:
                await kernels.shutdown_kernel(kernel_id, now=True)
