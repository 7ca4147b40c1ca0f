"""Per-session GPU use: NVML's processes (by host PID) attributed to the sessions whose
kernels they are. The NVML adapter against the fake libnvidia-ml.so.1 reporting running
processes; two container kernels sharing one fake-NVML GPU, each seeing its own memory and
nothing of the other's (GET sessions/{id}, GET gpus, the events websocket); a local kernel
and its child on simulated GPUs with simulated processes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import time
import types
from pathlib import Path

import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from jupyter_gpu_sessions.core.identity import Identity
from jupyter_gpu_sessions.core.models import (
    Allocation,
    GPUDevice,
    MigInstance,
    ProcessRef,
    ResourceRequest,
    RuntimeHandle,
    Session,
)
from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.devices import GPUProcess, NvmlInventory, SimulatedInventory
from jupyter_gpu_sessions.engine import current_engine
from jupyter_gpu_sessions.manager import GPUSessionManager
from jupyter_gpu_sessions.manager.gpu_usage import GPUUsage, UsageSweep, anonymous_usage
from jupyter_gpu_sessions.runtime.local import process_tree

from .api_support import ADMIN, TOKENS, Api, api_config, reset_manager
from .support import (
    labelled_containers,
    make_notebook_dir,
    run_code,
    shipped_spec,
    start_kernel,
    stop_kernel,
    write_kernelspec,
)
from .test_inventory import FAKE_NVML_DIR, _compile

GiB = 1024**3
MiB = 1024**2
A10 = "GPU-0a0a0a0a-1111-4222-8333-444444444444"  # the fake library's GPU 0
A100 = "GPU-1b1b1b1b-5555-4666-8777-888888888888"  # its GPU 1 (MIG mode)


# -- the fake library, loaded into this process ---------------------------------------------


@pytest.fixture(scope="module")
def fake_nvml_dir(tmp_path_factory) -> Path:
    return _compile(FAKE_NVML_DIR / "fake_nvml.c", tmp_path_factory.mktemp("fake-nvml-usage"))


@pytest.fixture
def processes_file(tmp_path) -> Path:
    return tmp_path / "nvml-processes"


@pytest.fixture
def nvml(fake_nvml_dir, processes_file, monkeypatch):
    """nvidia-ml-py bound to the fake library in this process (restored after the test),
    its processes read from ``processes_file``."""
    import pynvml

    library = ctypes.CDLL(str(fake_nvml_dir / "libnvidia-ml.so.1"))
    monkeypatch.setattr(pynvml, "nvmlLib", library)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
    monkeypatch.setattr(pynvml, "_nvmlLib_refcount", 0)
    monkeypatch.delenv("FAKE_NVML_INIT_RESULT", raising=False)
    monkeypatch.delenv("FAKE_NVML_NO_PROCESS_UTILIZATION", raising=False)
    monkeypatch.setenv("FAKE_NVML_PROCESSES", str(processes_file))
    return library


def write_processes(path: Path, *lines: tuple) -> None:
    """``GPU PID BYTES SM [KINDS]`` lines, replaced at once (the library re-reads the file
    at every call and must never see half of it)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(
        "# gpu pid bytes sm kinds\n" + "".join(" ".join(map(str, x)) + "\n" for x in lines)
    )
    os.replace(partial, path)


@pytest.fixture
def inventory(nvml):
    inv = NvmlInventory()
    yield inv
    inv.close()


def _by_pid(processes: list[GPUProcess]) -> dict[tuple[int, int], GPUProcess]:
    return {(p.gpu_index, p.pid): p for p in processes}


# -- the NVML adapter ----------------------------------------------------------------------


def test_the_fake_library_keeps_nvmls_count_protocol(nvml, inventory, processes_file):
    """NULL array: SUCCESS with no processes, else INSUFFICIENT_SIZE and the count needed;
    a too small array: INSUFFICIENT_SIZE and the count; a large enough one: the processes."""
    import pynvml

    class Info(ctypes.Structure):
        _fields_ = [
            ("pid", ctypes.c_uint),
            ("usedGpuMemory", ctypes.c_ulonglong),
            ("gpuInstanceId", ctypes.c_uint),
            ("computeInstanceId", ctypes.c_uint),
        ]

    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    call = nvml.nvmlDeviceGetComputeRunningProcesses_v3
    count = ctypes.c_uint(0)
    assert call(handle, ctypes.byref(count), None) == pynvml.NVML_SUCCESS and count.value == 0
    write_processes(
        processes_file, (0, 11, GiB, 5), (0, 12, 2 * GiB, "-"), (0, 13, MiB, 1), (1, 14, 1, 1)
    )
    assert call(handle, ctypes.byref(count), None) == pynvml.NVML_ERROR_INSUFFICIENT_SIZE
    assert count.value == 3
    small = (Info * 2)()
    count = ctypes.c_uint(2)
    assert call(handle, ctypes.byref(count), small) == pynvml.NVML_ERROR_INSUFFICIENT_SIZE
    assert count.value == 3
    room = (Info * 8)()
    count = ctypes.c_uint(8)
    assert call(handle, ctypes.byref(count), room) == pynvml.NVML_SUCCESS and count.value == 3
    assert [(room[i].pid, room[i].usedGpuMemory) for i in range(3)] == [
        (11, GiB),
        (12, 2 * GiB),
        (13, MiB),
    ]
    assert room[0].gpuInstanceId == 0xFFFFFFFF  # "not available": not a MIG process
    # And as nvidia-ml-py itself reads it (the _v3 entry point).
    assert [p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)] == [11, 12, 13]
    # Per-process utilization: samples of the processes with one, none newer than asked.
    samples = pynvml.nvmlDeviceGetProcessUtilization(handle, 0)
    assert sorted((s.pid, s.smUtil) for s in samples) == [(11, 5), (13, 1)]
    with pytest.raises(pynvml.NVMLError_NotFound):
        pynvml.nvmlDeviceGetProcessUtilization(handle, int((time.time() + 60) * 1e6))


def test_nvml_processes_per_gpu_with_memory_and_utilization(inventory, processes_file):
    assert inventory.processes() == []  # no file yet: nothing runs
    write_processes(
        processes_file,
        (0, 100, GiB, 30),
        (0, 101, 2 * GiB, "-"),  # no recent sample: idle, 0 %
        (1, 200, 4 * MiB, 55, "CG"),  # in both lists: counted once
        (1, 201, 8 * MiB, 10, "G"),  # graphics only
    )
    found = _by_pid(inventory.processes())
    assert found == {
        (0, 100): GPUProcess(A10, 0, 100, GiB, 30),
        (0, 101): GPUProcess(A10, 0, 101, 2 * GiB, 0),
        (1, 200): GPUProcess(A100, 1, 200, 4 * MiB, 55),
        (1, 201): GPUProcess(A100, 1, 201, 8 * MiB, 10),
    }
    # Re-read at every call: a process that ended is gone, a new one shows.
    write_processes(processes_file, (1, 300, 5 * MiB, 99))
    assert inventory.processes() == [GPUProcess(A100, 1, 300, 5 * MiB, 99)]


def test_nvml_per_process_utilization_not_supported_is_unknown(
    inventory, processes_file, monkeypatch
):
    write_processes(processes_file, (0, 100, GiB, 30), (1, 200, MiB, 40))
    monkeypatch.setenv("FAKE_NVML_NO_PROCESS_UTILIZATION", "0")
    found = _by_pid(inventory.processes())
    assert found[(0, 100)].utilization is None and found[(0, 100)].memory_used == GiB
    assert found[(1, 200)].utilization == 40
    # No sample of any process (NVML says NOT_FOUND): idle, which is known, not unknown.
    monkeypatch.delenv("FAKE_NVML_NO_PROCESS_UTILIZATION")
    write_processes(processes_file, (0, 100, GiB, "-"))
    assert inventory.processes() == [GPUProcess(A10, 0, 100, GiB, 0)]


def test_nvml_retries_a_list_that_grew_and_falls_back_to_older_entry_points(
    inventory, processes_file, monkeypatch, caplog
):
    import pynvml

    write_processes(processes_file, (0, 100, GiB, 30))
    real_v3 = pynvml.nvmlDeviceGetComputeRunningProcesses_v3
    calls = []

    def grew_once(handle):  # processes started between NVML's count and its copy
        calls.append(handle)
        if len(calls) == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        return real_v3(handle)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses_v3", grew_once)
    assert [p.pid for p in inventory.processes()] == [100]
    assert len(calls) == 3  # GPU 0 twice, GPU 1 once

    def no_v3(handle):  # a driver older than the _v3 entry points
        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses_v3", no_v3)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetGraphicsRunningProcesses_v3", no_v3)
    assert inventory.processes() == [GPUProcess(A10, 0, 100, GiB, 30)]  # read through _v2

    def refused(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetComputeRunningProcesses_v3", refused)
    with caplog.at_level(logging.DEBUG, logger="jupyter_gpu_sessions.devices.inventory"):
        assert inventory.processes() == []
        assert inventory.processes() == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # once per GPU, not once per call
    assert "could not list the compute processes of GPU 0" in warnings[0].getMessage()


# -- simulated GPUs ------------------------------------------------------------------------


def test_simulated_processes_come_from_a_json_file(tmp_path, caplog):
    path = tmp_path / "processes.json"
    inventory = SimulatedInventory("2xA100-80GB", processes_file=str(path))
    gpus = inventory.devices()
    assert inventory.processes() == []  # no file: none
    path.write_text(
        json.dumps(
            [
                {"gpu": 0, "pid": 10, "memory_used": "2GiB", "utilization": 30},
                {"gpu": gpus[1].uuid, "pid": 11, "memory_used": 1024, "utilization": None},
                {"gpu": 0, "pid": 12, "memory_used": GiB, "utilization": 90},
            ]
        )
    )
    assert inventory.processes() == [
        GPUProcess(gpus[0].uuid, 0, 10, 2 * GiB, 30),
        GPUProcess(gpus[1].uuid, 1, 11, 1024, None),
        GPUProcess(gpus[0].uuid, 0, 12, GiB, 90),
    ]
    load = inventory.utilization()
    assert load[gpus[0].uuid] == {"gpu": 100, "memory_used": 3 * GiB, "memory_total": 80 * GiB}
    assert load[gpus[1].uuid] == {"gpu": 0, "memory_used": 1024, "memory_total": 80 * GiB}
    for bad, words in [
        ("{}", "JSON list"),
        ("[1]", "entry 0 is not an object"),
        ('[{"gpu": 7, "pid": 1}]', "no simulated GPU 7"),
        ('[{"gpu": 0, "pid": -1}]', "pid -1"),
        ('[{"gpu": 0, "pid": 1, "utilization": 101}]', "utilization 101"),
        ('[{"gpu": 0, "pid": 1, "memory_used": "lots"}]', "lots"),
        ("[{", "Expecting"),
    ]:
        path.write_text(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert inventory.processes() == []
            assert inventory.processes() == []  # the same problem is said once
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and words in said[0], (bad, said)


def test_simulated_processes_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    path.write_text('[{"gpu": 0, "pid": 5, "memory_used": "1GiB"}]')
    monkeypatch.setenv("JUPYTER_GPU_SESSIONS_SIMULATED_PROCESSES", str(path))
    (process,) = SimulatedInventory("1xT4-16GB").processes()
    assert process.pid == 5 and process.memory_used == GiB and process.utilization is None


# -- attribution, without kernels ------------------------------------------------------------


def _session(sid: str, owner: str, *allocations: Allocation, name: str = "") -> Session:
    return Session(
        id=sid,
        owner=owner,
        image="img",
        request=ResourceRequest(),
        runtime="docker",
        process=ProcessRef("h", 1, 0.0),
        name=name,
        status=SessionStatus.RUNNING,
        allocations=allocations,
    )


def test_a_sweep_attributes_by_pid_and_hides_other_users():
    mig = MigInstance("MIG-aaaa", "1g.10gb", 10 * GiB, 0)
    gpus = [
        GPUDevice(0, "GPU-0", "Card", 24 * GiB, 0, None),
        GPUDevice(1, "GPU-1", "Big", 80 * GiB, 1, None, mig_instances=(mig,), mig_mode=True),
    ]
    a = _session("a" * 32, "alice", Allocation("a" * 32, "GPU-0", "GPU-0", "share", 0.5), name="A")
    b = _session("b" * 32, "bob", Allocation("b" * 32, "GPU-0", "GPU-0", "share", 0.5), name="B")
    c = _session("c" * 32, "bob", Allocation("c" * 32, "GPU-1", "MIG-aaaa", "mig", 1 / 7))
    lost = _session("d" * 32, "carol", Allocation("d" * 32, "GPU-1", "GPU-1", "gpu", 1.0))
    processes = [
        GPUProcess("GPU-0", 0, 10, GiB, 30),
        GPUProcess("GPU-0", 0, 11, 2 * GiB, 80),
        GPUProcess("GPU-0", 0, 20, 3 * GiB, 50),
        GPUProcess("GPU-0", 0, 99, 5 * MiB, None),  # nobody's
        GPUProcess("GPU-1", 1, 30, 4 * GiB, None),
        GPUProcess("GPU-1", 1, 40, 7 * GiB, 3),  # carol's, but her PIDs could not be read
    ]
    sweep = UsageSweep(
        0.0,
        gpus,
        processes,
        {s.id: s for s in (a, b, c, lost)},
        owners={10: a.id, 11: a.id, 20: b.id, 30: c.id},
        known={a.id, b.id, c.id},
    )
    assert sweep.session_usage(a) == {
        "memory_used": 3 * GiB,
        "utilization": 100,  # 30 + 80, at most 100
        "devices": [
            {
                "uuid": "GPU-0",
                "index": 0,
                "name": "Card",
                "kind": "share",
                "memory_used": 3 * GiB,
                "memory_total": 24 * GiB,
                "utilization": 100,
            }
        ],
    }
    assert sweep.session_usage(c)["devices"] == [
        {
            "uuid": "MIG-aaaa",
            "index": 1,
            "name": "Big MIG 1g.10gb",
            "kind": "mig",
            "memory_used": 4 * GiB,
            "memory_total": 10 * GiB,
            "utilization": None,
        }
    ]
    assert sweep.session_usage(c)["utilization"] is None
    assert sweep.session_usage(lost) is None  # unknown, not a wrong 0
    assert sweep.session_usage(dataclasses.replace(a, status=SessionStatus.PENDING)) is None
    full = sweep.device_usage("GPU-0")
    assert full == [
        {
            "session_id": a.id,
            "name": "A",
            "owner": "alice",
            "memory_used": 3 * GiB,
            "utilization": 100,
        },
        {
            "session_id": b.id,
            "name": "B",
            "owner": "bob",
            "memory_used": 3 * GiB,
            "utilization": 50,
        },
        {
            "session_id": None,
            "name": "other",
            "owner": None,
            "memory_used": 5 * MiB,
            "utilization": None,
        },
    ]
    assert anonymous_usage(full, "alice") == [
        full[0],
        {
            "session_id": None,
            "name": "other",
            "owner": None,
            "memory_used": 3 * GiB + 5 * MiB,
            "utilization": None,
        },
    ]
    assert [e["session_id"] for e in sweep.device_usage("GPU-1")] == [c.id, lost.id, None]
    assert sweep.device_usage("GPU-1")[1]["memory_used"] is None  # carol's: unknown
    assert sweep.device_usage("GPU-1")[2]["memory_used"] == 7 * GiB  # her process: other
    assert anonymous_usage(sweep.device_usage("GPU-1"), "dave") == [
        {
            "session_id": None,
            "name": "other",
            "owner": None,
            "memory_used": 11 * GiB,
            "utilization": None,
        }
    ]


async def test_sweeps_are_cached_and_shared(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('[{"gpu": 0, "pid": 1, "memory_used": 5}]')
    manager = GPUSessionManager(
        db_url=f"sqlite:///{tmp_path}/s.sqlite",
        inventory_class=SimulatedInventory,
        simulated_gpus="1xT4-16GB",
        simulated_processes=str(path),
    )
    try:
        usage = GPUUsage(manager, max_age=30)
        first, second = await asyncio.gather(usage.sweep(), usage.sweep())
        assert first is second and first.processes[0].memory_used == 5
        path.write_text("[]")
        assert await usage.sweep() is first  # within max_age: no new NVML read
        usage.max_age = 0
        assert (await usage.sweep()).processes == []
        assert first.owners == {}  # PID 1 is nobody's session
    finally:
        manager.close()


class BrokenProcessesInventory(SimulatedInventory):
    def processes(self) -> list[GPUProcess]:
        raise RuntimeError("the inventory fell over")

    def utilization(self) -> dict:
        return {}


async def test_an_inventory_that_fails_leaves_use_unknown_not_the_api_down(
    tmp_path, fresh_manager, caplog
):
    fresh_manager(inventory_class=BrokenProcessesInventory, simulated_gpus="1xT4-16GB")
    engine = current_engine()
    with caplog.at_level(logging.WARNING):
        gpus = await engine.gpus(Identity("alice"))
    assert [g["usage"] for g in gpus["gpus"]] == [[]]
    assert any("the inventory fell over" in r.getMessage() for r in caplog.records)
    held = _session("e" * 32, "alice", Allocation("e" * 32, "GPU-x", "GPU-x", "gpu", 1.0))
    sweep = await engine.gpu_usage.sweep()
    assert sweep.session_usage(held) is None  # unknown, not 0


async def test_docker_pids_of_a_running_stopped_and_removed_container(docker_client, kernel_image):
    from jupyter_gpu_sessions.runtime.docker import DockerRuntime

    runtime = DockerRuntime()
    container = docker_client.containers.run(
        kernel_image, ["sleep", "300"], detach=True, init=True, labels={}
    )
    try:
        handle = RuntimeHandle("docker", container.id, container.name)
        container.reload()
        init = container.attrs["State"]["Pid"]
        children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
        assert sorted(await runtime.pids(handle)) == sorted([init, *map(int, children)])
        container.kill()
        container.wait(timeout=30)
        assert await runtime.pids(handle) == []  # stopped: the engine answers 409
    finally:
        container.remove(force=True)
    assert await runtime.pids(handle) == []  # gone


async def test_a_hanging_pid_lookup_leaves_only_that_session_unknown(tmp_path, caplog):
    """A runtime that hangs (a stuck Docker engine) holds nobody: after ``lookup_timeout``
    that session's use is unknown, the others' are told, and the sweep answers."""
    inventory = SimulatedInventory("1xT4-16GB", processes_file=str(tmp_path / "p.json"))
    gpu = inventory.devices()[0].uuid
    (tmp_path / "p.json").write_text(
        json.dumps(
            [{"gpu": 0, "pid": 7, "memory_used": 100}, {"gpu": 0, "pid": 8, "memory_used": 5}]
        )
    )
    stuck = _session("s" * 32, "alice", Allocation("s" * 32, gpu, gpu, "share", 0.5))
    fine = _session("f" * 32, "bob", Allocation("f" * 32, gpu, gpu, "share", 0.5))
    release = asyncio.Event()

    class Runtime:
        async def pids(self, handle):
            if handle.id == "stuck":
                await release.wait()
            return [8]

    manager = types.SimpleNamespace(
        inventory=inventory,
        store=types.SimpleNamespace(live=lambda: [stuck, fine]),
        runtime=lambda name: Runtime(),
        handle=lambda session: RuntimeHandle("docker", "stuck" if session is stuck else "ok"),
        store_id="x",
    )
    usage = GPUUsage(manager, lookup_timeout=0.3)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        sweep = await usage.sweep()
    assert time.monotonic() - started < 5
    assert sweep.session_usage(stuck) is None
    assert sweep.session_usage(fine)["memory_used"] == 5
    assert [(e["session_id"], e["memory_used"]) for e in sweep.device_usage(gpu)] == [
        (fine.id, 5),
        (stuck.id, None),
        (None, 100),
    ]
    assert "TimeoutError" in caplog.text
    release.set()


def test_process_tree_of_a_process_that_is_gone():
    assert process_tree(2**22 + 12345) == []
    assert os.getpid() in process_tree(os.getpid())


# -- two container kernels on one fake-NVML GPU, through the server ------------------------


class FakeNodesNvmlInventory(NvmlInventory):
    """The fake library's GPUs, each attached as the fake device node of its minor number
    in ``device_dir`` (no real /dev/nvidia* here)."""

    def __init__(self, device_dir: str | None = None) -> None:
        super().__init__()
        self.device_dir = device_dir

    def devices(self) -> list[GPUDevice]:
        return [
            dataclasses.replace(d, device_path=os.path.join(self.device_dir, f"nvidia{d.minor}"))
            for d in super().devices()
        ]


def _manager_config(fake_gpu_nodes: Path) -> dict:
    return {
        "inventory_class": f"{__name__}.FakeNodesNvmlInventory",
        "simulated_device_dir": str(fake_gpu_nodes),
        "gpu_attach_mode": "nodes",
    }


@pytest.fixture
def jp_server_config(tmp_path, fake_gpu_nodes, nvml):
    reset_manager()
    yield api_config(tmp_path, GPUSessionManager=_manager_config(fake_gpu_nodes))
    reset_manager()


@pytest.fixture
def jp_auth_header():
    return {"Authorization": f"token {TOKENS[ADMIN]}"}


@pytest.fixture
def share_kernelspec(jp_data_dir, kernel_image) -> str:
    spec = shipped_spec("python3-gpu")
    spec["metadata"]["kernel_provisioner"]["config"] = {
        "image": kernel_image,
        "gpu_share": 0.5,
        "cpus": 1,
        "memory": "1GiB",
    }
    target = jp_data_dir / "kernels" / "half-gpu"
    target.mkdir(parents=True)
    (target / "kernel.json").write_text(json.dumps(spec))
    return "half-gpu"


def _container_pids(docker_client, session_id: str) -> tuple[str, int, int]:
    """The container's id, its init's host PID and the kernel's (its init's child), read
    from the engine's inspect and /proc: not the way the manager finds them."""
    (container,) = labelled_containers(docker_client, **{"session-id": session_id})
    init = container.attrs["State"]["Pid"]
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    assert len(children) == 1, children
    return container.id, init, int(children[0])


async def _eventually(read, check, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {value!r}")
        await asyncio.sleep(0.1)


async def test_each_container_session_sees_its_own_gpu_use_and_nothing_of_the_others(
    jp_fetch,
    jp_serverapp,
    jp_root_dir,
    jp_http_port,
    jp_base_url,
    share_kernelspec,
    processes_file,
    fake_gpu_nodes,
    docker_client,
    monkeypatch,
):
    make_notebook_dir(jp_root_dir)
    api = Api(jp_fetch)
    engine = jp_serverapp.web_app.settings["gpu_sessions_engine"]
    engine.gpu_usage.max_age = 0.2  # so the test need not wait out the cache
    manager: GPUSessionManager = engine.manager
    kernels = jp_serverapp.kernel_manager
    started: list[str] = []

    async def start_as(owner: str) -> Session:
        monkeypatch.setenv("JUPYTERHUB_USER", owner)  # whose kernel this server starts
        response = await jp_fetch(
            "api", "kernels", method="POST", body=json.dumps({"name": share_kernelspec})
        )
        kernel_id = json.loads(response.body)["id"]
        started.append(kernel_id)
        await kernels.get_kernel(kernel_id).ready
        return kernels.get_kernel(kernel_id).provisioner.session

    try:
        a = await start_as("alice")
        b = await start_as("bob")
        assert (
            [x.device_uuid for x in a.allocations]
            == [A10]
            == [x.device_uuid for x in b.allocations]
        )
        a_container, a_init, a_kernel = _container_pids(docker_client, a.id)
        b_container, b_init, b_kernel = _container_pids(docker_client, b.id)
        stranger = os.getpid()  # on the GPU, but no session's
        write_processes(
            processes_file,
            (0, a_kernel, GiB, 30),
            (0, b_kernel, 3 * GiB, 50),
            (0, b_init, 256 * MiB, "-"),
            (0, stranger, 512 * MiB, 5),
        )

        def a_usage(utilization):
            return {
                "memory_used": GiB,
                "utilization": utilization,
                "devices": [
                    {
                        "uuid": A10,
                        "index": 0,
                        "name": "NVIDIA A10",
                        "kind": "share",
                        "memory_used": GiB,
                        "memory_total": 24 * GiB,
                        "utilization": utilization,
                    }
                ],
            }

        async def session(sid: str, user: str):
            status, body = await api.get(f"sessions/{sid}", user=user)
            assert status == 200, body
            return body

        body = await _eventually(
            lambda: session(a.id, "alice"),
            lambda s: s["gpu_usage"] == a_usage(30),
            "alice's session's GPU use",
        )
        assert body["status"] == "RUNNING"
        body = await session(b.id, "bob")
        assert body["gpu_usage"]["memory_used"] == 3 * GiB + 256 * MiB
        assert body["gpu_usage"]["utilization"] == 50
        assert [d["uuid"] for d in body["gpu_usage"]["devices"]] == [A10]
        assert (await api.get(f"sessions/{b.id}", user="alice"))[0] == 404

        # GET gpus: an admin sees every session; alice sees hers, the rest is "other".
        status, gpus = await api.get("gpus", user=ADMIN)
        assert status == 200
        usage = {g["uuid"]: g["usage"] for g in gpus["gpus"]}
        assert usage[A100] == []
        assert usage[A10] == [
            {
                "session_id": b.id,
                "name": b.name,
                "owner": "bob",
                "memory_used": 3 * GiB + 256 * MiB,
                "utilization": 50,
            },
            {
                "session_id": a.id,
                "name": a.name,
                "owner": "alice",
                "memory_used": GiB,
                "utilization": 30,
            },
            {
                "session_id": None,
                "name": "other",
                "owner": None,
                "memory_used": 512 * MiB,
                "utilization": 5,
            },
        ]
        _, gpus = await api.get("gpus", user="alice")
        (a10,) = [g for g in gpus["gpus"] if g["uuid"] == A10]
        assert a10["usage"] == [
            {
                "session_id": a.id,
                "name": a.name,
                "owner": "alice",
                "memory_used": GiB,
                "utilization": 30,
            },
            {
                "session_id": None,
                "name": "other",
                "owner": None,
                "memory_used": 3 * GiB + 768 * MiB,
                "utilization": 55,
            },
        ]
        assert "bob" not in json.dumps(gpus) and b.id not in json.dumps(gpus)

        # The events websocket's GPU ticks carry the same, as alice may see it.
        url = f"ws://127.0.0.1:{jp_http_port}{jp_base_url}gpu-sessions/api/events"
        ws = await websocket_connect(
            HTTPRequest(url, headers={"Authorization": f"token {TOKENS['alice']}"})
        )
        try:
            await asyncio.wait_for(ws.read_message(), 10)  # hello
            await jp_serverapp.web_app.settings["gpu_sessions_events"].tick()
            while (event := json.loads(await asyncio.wait_for(ws.read_message(), 10)))[
                "type"
            ] != "gpus":
                pass
            (ticked,) = [g for g in event["gpus"] if g["uuid"] == A10]
            assert ticked["usage"] == a10["usage"]
        finally:
            ws.close()

        # Another process on the same store finds the kernels by what the store recorded,
        # and by the session label when it recorded nothing.
        other = GPUSessionManager(db_url=manager.db_url, **_manager_config(fake_gpu_nodes))
        try:
            elsewhere = GPUUsage(other)
            assert await elsewhere.session_usage(other.store.get(a.id)) == a_usage(30)
            unrecorded = dataclasses.replace(other.store.get(b.id), container_id=None)
            assert set(await elsewhere._pids(unrecorded)) == {b_init, b_kernel}
        finally:
            other.inventory.close()
            other.close()

        # A GPU that does not report per-process utilization: memory still, load unknown.
        monkeypatch.setenv("FAKE_NVML_NO_PROCESS_UTILIZATION", "0")
        await _eventually(
            lambda: session(a.id, "alice"),
            lambda s: s["gpu_usage"] == a_usage(None),
            "alice's session without utilization",
        )
        monkeypatch.delenv("FAKE_NVML_NO_PROCESS_UTILIZATION")

        # A stopped kernel's use is gone: its PID (still listed) is nobody's now.
        status, _ = await api.delete(f"sessions/{a.id}", user="alice")
        assert status == 200
        body = await session(a.id, "alice")
        assert body["status"] == "TERMINATED" and body["gpu_usage"] is None
        assert await manager.runtime("docker").pids(RuntimeHandle("docker", a_container)) == []

        async def a10_usage():
            _, gpus = await api.get("gpus", user=ADMIN)
            return next(g["usage"] for g in gpus["gpus"] if g["uuid"] == A10)

        await _eventually(
            a10_usage,
            lambda u: (
                u
                == [
                    {
                        "session_id": b.id,
                        "name": b.name,
                        "owner": "bob",
                        "memory_used": 3 * GiB + 256 * MiB,
                        "utilization": 50,
                    },
                    {
                        "session_id": None,
                        "name": "other",
                        "owner": None,
                        "memory_used": GiB + 512 * MiB,
                        "utilization": 35,
                    },
                ]
            ),
            "GPU 0's use after alice's kernel ended",
        )
    finally:
        for kernel_id in started:
            if kernel_id in kernels:
                await kernels.shutdown_kernel(kernel_id, now=True)
    assert not manager.held_devices()


# -- a local kernel and its child, on simulated GPUs ---------------------------------------


async def test_a_local_kernel_and_its_children_are_attributed(kernel_dir, tmp_path, fresh_manager):
    path = tmp_path / "processes.json"
    manager = fresh_manager(simulated_gpus="2xA100-80GB", simulated_processes=str(path))
    engine = current_engine()
    engine.gpu_usage.max_age = 0.2
    spec = shipped_spec("python3-gpu")
    spec["metadata"]["kernel_provisioner"]["config"] = {"gpus": 1, "runtime": "local"}
    ksm = write_kernelspec(kernel_dir, "local-gpu", spec)
    km, kc = await start_kernel("local-gpu", tmp_path, kernel_spec_manager=ksm)
    session = km.provisioner.session
    owner = Identity(session.owner)
    try:
        (held,) = session.allocations
        device = next(d for d in manager.inventory.devices() if d.uuid == held.device_uuid)
        spare = next(d for d in manager.inventory.devices() if d.uuid != held.device_uuid)
        # Nothing on any GPU yet: a running session with GPUs uses 0 B of them.
        body = await engine.get_session(owner, session.id)
        assert body["gpu_usage"]["memory_used"] == 0
        assert body["gpu_usage"]["devices"][0]["uuid"] == device.uuid
        _, out = await run_code(
            kc,
            "import os, subprocess\n"
            "child = subprocess.Popen(['sleep', '300'])\n"
            "print(os.getpid(), child.pid)\n",
        )
        kernel_pid, child_pid = map(int, out.split())
        path.write_text(
            json.dumps(
                [
                    {
                        "gpu": device.index,
                        "pid": kernel_pid,
                        "memory_used": "1GiB",
                        "utilization": 20,
                    },
                    {
                        "gpu": device.index,
                        "pid": child_pid,
                        "memory_used": "2GiB",
                        "utilization": 30,
                    },
                    {"gpu": spare.index, "pid": os.getpid(), "memory_used": "4GiB"},
                ]
            )
        )

        async def mine():
            return (await engine.get_session(owner, session.id))["gpu_usage"]

        usage = await _eventually(mine, lambda u: u["memory_used"] == 3 * GiB, "the kernel's use")
        assert usage == {
            "memory_used": 3 * GiB,
            "utilization": 50,
            "devices": [
                {
                    "uuid": device.uuid,
                    "index": device.index,
                    "name": "Simulated A100-80GB",
                    "kind": "gpu",
                    "memory_used": 3 * GiB,
                    "memory_total": 80 * GiB,
                    "utilization": 50,
                }
            ],
        }
        stranger = await engine.gpus(Identity("nobody"))
        by_uuid = {g["uuid"]: g for g in stranger["gpus"]}
        other = {"session_id": None, "name": "other", "owner": None}
        assert by_uuid[device.uuid]["usage"] == [
            {**other, "memory_used": 3 * GiB, "utilization": 50}
        ]
        assert by_uuid[spare.uuid]["usage"] == [
            {**other, "memory_used": 4 * GiB, "utilization": None}
        ]
        assert by_uuid[device.uuid]["utilization"]["memory_used"] == 3 * GiB
    finally:
        await stop_kernel(km, kc)
    assert (await engine.get_session(owner, session.id))["gpu_usage"] is None
    gpus = await engine.gpus(Identity(owner.username, is_admin=True))
    by_uuid = {g["uuid"]: g for g in gpus["gpus"]}
    # The kernel has ended: its lines in the file are nobody's now.
    assert [e["session_id"] for e in by_uuid[device.uuid]["usage"]] == [None]
    with contextlib.suppress(ProcessLookupError):
        os.kill(child_pid, signal.SIGKILL)  # a child left behind by the kernel, if any
