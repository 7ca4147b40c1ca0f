"""GPU inventories: the simulated-GPU grammar with MIG, and the NVML adapter against a fake
libnvidia-ml.so.1 (tests/fake_nvml/fake_nvml.c) loaded by the real nvidia-ml-py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jupyter_gpu_sessions.core.errors import InvalidRequest
from jupyter_gpu_sessions.devices.inventory import (
    SIMULATED_DEVICE_DIR_ENV,
    SIMULATED_GPUS_ENV,
    NoGPUInventory,
    SimulatedGPU,
    SimulatedInventory,
    mig_profile_from_name,
    parse_simulated_gpus,
)

GiB = 1024**3
MiB = 1024**2
FAKE_NVML_DIR = Path(__file__).parent / "fake_nvml"


# -- simulated GPUs -----------------------------------------------------------------------


def test_plain_simulated_gpus():
    gpus = parse_simulated_gpus("4xA100-80GB")
    assert gpus == [SimulatedGPU("A100-80GB", 80 * GiB)] * 4
    inventory = SimulatedInventory("4xA100-80GB")
    assert [d.index for d in inventory.devices()] == [0, 1, 2, 3]
    assert not any(d.mig_enabled for d in inventory.devices())


def test_simulated_mig_gpus():
    inventory = SimulatedInventory("2xA100-80GB,1xA100-80GB:mig=1g.10gb*7")
    devices = inventory.devices()
    assert [d.mig_enabled for d in devices] == [False, False, True]
    mig = devices[2].mig_instances
    assert [m.profile for m in mig] == ["1g.10gb"] * 7
    assert [m.index for m in mig] == list(range(7))
    assert {m.memory for m in mig} == {10 * GiB}
    assert len({m.uuid for m in mig}) == 7
    assert all(m.uuid.startswith("MIG-") and len(m.uuid) == 40 for m in mig)
    assert devices[2].uuid.startswith("GPU-") and devices[2].memory == 80 * GiB
    assert "MIG: 7 instances" in inventory.describe()


def test_simulated_mixed_mig_profiles():
    (gpu,) = parse_simulated_gpus("1xA100-80GB:mig=3g.40gb*1+1g.10gb*4")
    assert gpu == SimulatedGPU("A100-80GB", 80 * GiB, ("3g.40gb",) + ("1g.10gb",) * 4)
    (device,) = SimulatedInventory("1xA100-80GB:mig=3g.40gb*1+1g.10gb*4").devices()
    assert [(m.index, m.profile, m.memory // GiB) for m in device.mig_instances] == [
        (0, "3g.40gb", 40),
        (1, "1g.10gb", 10),
        (2, "1g.10gb", 10),
        (3, "1g.10gb", 10),
        (4, "1g.10gb", 10),
    ]


def test_simulated_mig_spacing_and_case_are_forgiven():
    (gpu,) = parse_simulated_gpus(" A100-80GB : MIG = 2G.20GB * 2 + 1g.10gb*1 ")
    assert gpu.mig == ("2g.20gb", "2g.20gb", "1g.10gb")


def test_simulated_mig_uuids_are_stable_across_processes():
    spec = "1xA100-80GB,2xA100-80GB:mig=3g.40gb*1+1g.10gb*4"
    here = [d.to_dict() for d in SimulatedInventory(spec).devices()]
    code = (
        "import json, sys\n"
        "from jupyter_gpu_sessions.devices.inventory import SimulatedInventory\n"
        "print(json.dumps([d.to_dict() for d in SimulatedInventory(sys.argv[1]).devices()]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, spec], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == here
    uuids = [m["uuid"] for d in here for m in d["mig_instances"]]
    assert len(uuids) == 10 and len(set(uuids)) == 10  # distinct across GPUs and slots


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("1xA100-80GB:mig=1g.10gb*8", "more than 7 compute slices"),
        ("1xA100-80GB:mig=4g.40gb*1+4g.40gb*1", "use 8 compute slices"),
        ("1xA100-80GB:mig=9g.10gb*1", "9 compute slices"),
        ("1xA100-80GB:mig=0g.10gb*1", "0 compute slices"),
        ("1xA100-80GB:mig=1g.10gb", "are not PROFILE*N"),
        ("1xA100-80GB:mig=1g.10gb*", "are not PROFILE*N"),
        ("1xA100-80GB:mig=1g.10gb*0", "asks for no instances"),
        ("1xA100-80GB:mig=1g.10gb*2+", "are not PROFILE*N"),
        ("1xA100-80GB:mig=", "lists no instances"),
        ("1xA100-80GB:mig", "unknown option"),
        ("1xA100-80GB:", "unknown option"),
        ("1xA100-80GB:mig=1g*1", "is not a MIG profile"),
        ("1xA100-80GB:mig=1g.0gb*1", "has no memory"),
        ("1xA100-40GB:mig=1g.10gb*7", "need 70GiB, more than the GPU's 40GiB"),
        ("1xA100-80GB:mig=3g.50gb*2", "need 100GiB, more than the GPU's 80GiB"),
        ("1xA100-80GB:foo=1", "unknown option 'foo=1'"),
        ("1xA100-80GB:mig=1g.10gb*1:foo=1", "are not PROFILE*N"),
    ],
)
def test_bad_simulated_mig_specs_say_how_to_write_them(spec, words):
    with pytest.raises(InvalidRequest) as caught:
        parse_simulated_gpus(f"2xT4-16GB,{spec}")
    message = str(caught.value)
    assert message.startswith(f"simulated GPUs {spec!r}")  # names the bad item only
    assert words in message
    assert "mig=PROFILE*N[+PROFILE*N...]" in message and "1g.10gb*7" in message
    with pytest.raises(InvalidRequest, match="simulated GPUs"):
        SimulatedInventory(spec)


def test_bad_simulated_gpu_items_say_how_to_write_them():
    for bad in ("4x", "0xA100", "A100 80GB", "2xA100;rm", ":mig=1g.10gb*1"):
        with pytest.raises(InvalidRequest, match="simulated GPUs") as caught:
            parse_simulated_gpus(bad)
        assert "COUNTxMODEL[-MEMORY][:mig=PROFILE*N" in str(caught.value)
    with pytest.raises(InvalidRequest, match="at most 64 GPUs in all"):
        parse_simulated_gpus("40xA100,40xA100")


_profile_terms = st.lists(
    st.tuples(
        st.integers(1, 7),  # compute slices
        st.sampled_from([5, 10, 20, 40, 80]),  # GiB
        st.integers(1, 8),  # instances
    ),
    min_size=1,
    max_size=4,
)


@given(terms=_profile_terms, gpu_memory=st.sampled_from([40, 80]))
def test_simulated_mig_limits_hold_exactly(terms, gpu_memory):
    """A MIG spec parses if and only if it fits 7 slices and the GPU's memory."""
    spec = f"1xA100-{gpu_memory}GB:mig=" + "+".join(f"{s}g.{m}gb*{n}" for s, m, n in terms)
    fits = sum(s * n for s, _, n in terms) <= 7 and sum(m * n for _, m, n in terms) <= gpu_memory
    if not fits:
        with pytest.raises(InvalidRequest, match="simulated GPUs"):
            parse_simulated_gpus(spec)
        return
    (device,) = SimulatedInventory(spec).devices()
    expected = [f"{s}g.{m}gb" for s, m, n in terms for _ in range(n)]
    assert [m.profile for m in device.mig_instances] == expected
    assert [m.index for m in device.mig_instances] == list(range(len(expected)))
    assert sum(m.memory for m in device.mig_instances) <= device.memory


def test_simulated_utilization_and_driver():
    inventory = SimulatedInventory("2xA100-80GB,1xT4-16GB")
    assert inventory.driver_version() is None
    assert inventory.utilization() == {
        d.uuid: {"gpu": 0, "memory_used": 0, "memory_total": d.memory} for d in inventory.devices()
    }


def test_no_gpu_inventory():
    inventory = NoGPUInventory()
    assert inventory.devices() == [] and inventory.utilization() == {}
    assert inventory.driver_version() is None and inventory.describe() == "no GPUs"
    inventory.close()


@pytest.mark.parametrize(
    ("name", "profile"),
    [
        ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", "1g.10gb"),
        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", "3g.40gb"),
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb+me", "1g.5gb"),
        ("NVIDIA A100-SXM4-40GB MIG 1c.3g.20gb", "3g.20gb"),
        ("NVIDIA A100-SXM4-80GB", None),
        ("", None),
    ],
)
def test_mig_profile_from_nvml_name(name, profile):
    assert mig_profile_from_name(name) == profile


# -- NVML through a fake libnvidia-ml.so.1 -------------------------------------------------


def _compile(source: Path, target_dir: Path, *flags: str) -> Path:
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / "libnvidia-ml.so.1"
    gcc = shutil.which("gcc") or shutil.which("cc")
    assert gcc, "a C compiler (gcc) is needed to build the fake NVML library"
    command = [gcc, "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", *flags]
    subprocess.run([*command, "-o", str(target), str(source)], check=True, capture_output=True)
    return target_dir


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory) -> Path:
    """A directory holding the fake libnvidia-ml.so.1, compiled once per session."""
    return _compile(FAKE_NVML_DIR / "fake_nvml.c", tmp_path_factory.mktemp("fake-nvml"))


@pytest.fixture(scope="session")
def unloadable_nvml(tmp_path_factory) -> Path:
    """A directory whose libnvidia-ml.so.1 fails to load: "no NVML" on any host, even one
    with a real driver (LD_LIBRARY_PATH is searched first)."""
    return _compile(
        FAKE_NVML_DIR / "unloadable_nvml.c",
        tmp_path_factory.mktemp("unloadable-nvml"),
        "-Wl,-z,now",
    )


def _run(script: str, library_dir: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter that loads NVML from ``library_dir``."""
    ours = (SIMULATED_GPUS_ENV, SIMULATED_DEVICE_DIR_ENV, "FAKE_NVML_INIT_RESULT")
    environ = {k: v for k, v in os.environ.items() if k not in ours}
    environ["LD_LIBRARY_PATH"] = str(library_dir)
    environ.update(env)
    prelude = (
        "import json, logging, sys\n"
        "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format='%(levelname)s "
        "%(name)s %(message)s')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


NVML_REPORT = """
    import pynvml
    from jupyter_gpu_sessions.devices.inventory import NvmlInventory, detect_inventory

    inventory = detect_inventory()
    assert isinstance(inventory, NvmlInventory), inventory
    report = {
        "library": pynvml.nvmlLib._name,
        "devices": [d.to_dict() for d in inventory.devices()],
        "mig_enabled": [d.mig_enabled for d in inventory.devices()],
        "utilization": inventory.utilization(),
        "driver_version": inventory.driver_version(),
        "describe": inventory.describe(),
    }
    print(json.dumps(report))
"""


def test_nvml_inventory_reads_the_fake_library(fake_nvml):
    report = json.loads(_run(NVML_REPORT, fake_nvml).stdout)
    assert report["library"] == "libnvidia-ml.so.1"
    plain, mig = report["devices"]
    assert plain == {
        "index": 0,
        "uuid": "GPU-0a0a0a0a-1111-4222-8333-444444444444",
        "name": "NVIDIA A10",
        "memory": 24576 * MiB,
        "minor": 0,
        "device_path": "/dev/nvidia0",
        "simulated": False,
        "mig_mode": False,
        "mig_instances": [],  # nvmlDeviceGetMigMode: NOT_SUPPORTED
    }
    assert mig == {
        "index": 1,
        "uuid": "GPU-1b1b1b1b-5555-4666-8777-888888888888",
        "name": "NVIDIA A100-SXM4-80GB",
        "memory": 81920 * MiB,
        "minor": 3,
        "device_path": "/dev/nvidia3",
        "simulated": False,
        # Slots 0 and 2 hold instances; slots 1 and 3..6 are empty (NOT_FOUND).
        "mig_mode": True,
        "mig_instances": [
            {
                "uuid": "MIG-5c1e2a3b-0000-4000-8000-000000000001",
                "profile": "1g.10gb",
                "memory": 9984 * MiB,
                "index": 0,
            },
            {
                "uuid": "MIG-5c1e2a3b-0000-4000-8000-000000000003",
                "profile": "3g.40gb",
                "memory": 40192 * MiB,
                "index": 2,
            },
        ],
    }
    assert report["mig_enabled"] == [False, True]
    assert report["utilization"] == {
        # GPU 0's nvmlDeviceGetUtilizationRates says NOT_SUPPORTED: None, memory still read.
        plain["uuid"]: {"gpu": None, "memory_used": 1024 * MiB, "memory_total": 24576 * MiB},
        mig["uuid"]: {"gpu": 42, "memory_used": 512 * MiB, "memory_total": 81920 * MiB},
    }
    assert report["driver_version"] == "550.54.15"
    assert report["describe"] == (
        "2 nvml GPU(s): #0 NVIDIA A10, #1 NVIDIA A100-SXM4-80GB (MIG: 2 instances)"
    )


def test_nvml_is_preferred_over_simulated_gpus(fake_nvml):
    out = _run(
        """
        from jupyter_gpu_sessions.devices.inventory import detect_inventory
        print(detect_inventory().kind)
        """,
        fake_nvml,
        **{SIMULATED_GPUS_ENV: "4xA100-80GB"},
    )
    assert out.stdout.strip() == "nvml"
    assert "No NVIDIA GPUs" not in out.stderr


def test_nvml_close_shuts_down_only_its_own_init(fake_nvml):
    out = _run(
        """
        import pynvml
        from jupyter_gpu_sessions.devices.inventory import NvmlInventory

        first, second = NvmlInventory.try_create(), NvmlInventory.try_create()
        first.close()
        first.close()  # a second close is a no-op, not a second nvmlShutdown
        assert len(second.devices()) == 2  # NVML still initialised for the other one
        try:
            first.devices()
        except RuntimeError as exc:
            assert "closed" in str(exc)
        else:
            raise AssertionError("a closed inventory answered")
        with second:
            assert second.driver_version() == "550.54.15"
        try:
            pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError_Uninitialized:
            print("shut down")
        """,
        fake_nvml,
    )
    assert out.stdout.strip() == "shut down"


DETECT_THREE_TIMES = """
    from jupyter_gpu_sessions.devices.inventory import NvmlInventory, detect_inventory

    kinds = [detect_inventory().kind for _ in range(3)]
    assert NvmlInventory.try_create() is None
    print(json.dumps(kinds))
"""


@pytest.mark.parametrize("simulated", ["", "2xA100-80GB,1xA100-80GB:mig=1g.10gb*7"])
def test_detect_without_nvml_library(unloadable_nvml, simulated):
    env = {SIMULATED_GPUS_ENV: simulated} if simulated else {}
    out = _run(DETECT_THREE_TIMES, unloadable_nvml, **env)
    expected = "simulated" if simulated else "none"
    assert json.loads(out.stdout) == [expected] * 3
    said = [line for line in out.stderr.splitlines() if line.startswith("INFO")]
    assert len(said) == 1, out.stderr  # once per process, not once per call
    assert said[0].startswith("INFO jupyter_gpu_sessions.devices.inventory No NVIDIA GPUs: ")
    assert "libnvidia-ml.so.1 was not found or could not be loaded" in said[0]
    assert out.stderr.count("No NVIDIA GPUs") == 4  # the repeats only at DEBUG
    assert "Traceback" not in out.stderr


def test_detect_with_driver_not_loaded(fake_nvml):
    out = _run(DETECT_THREE_TIMES, fake_nvml, FAKE_NVML_INIT_RESULT="9")
    assert json.loads(out.stdout) == ["none"] * 3
    said = [line for line in out.stderr.splitlines() if "No NVIDIA GPUs" in line]
    assert [line.split()[0] for line in said] == ["INFO", "DEBUG", "DEBUG", "DEBUG"]
    assert "the NVIDIA kernel driver is not loaded" in said[0]


def test_detect_without_nvidia_ml_py(unloadable_nvml):
    out = _run(
        """
        sys.modules["pynvml"] = None  # as if nvidia-ml-py were not installed
        from jupyter_gpu_sessions.devices.inventory import detect_inventory
        print(detect_inventory().kind, detect_inventory().kind)
        """,
        unloadable_nvml,
    )
    assert out.stdout.split() == ["none", "none"]
    said = [line for line in out.stderr.splitlines() if line.startswith("INFO")]
    assert len(said) == 1 and "nvidia-ml-py package (module pynvml) is not installed" in said[0]
