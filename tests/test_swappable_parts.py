"""Swappable parts are Type traits chosen by config: the engine, the GPU inventory, the
runtimes and the scheduling strategy — no singleton to reset, no monkeypatching."""

from __future__ import annotations

import os
import time

from traitlets.config import Config

from jupyter_gpu_sessions.core.identity import Identity
from jupyter_gpu_sessions.core.models import ProcessRef, ResourceRequest, Session
from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.devices import SimulatedInventory
from jupyter_gpu_sessions.engine import current_engine, use_engine
from jupyter_gpu_sessions.manager import GPUSessionManager
from jupyter_gpu_sessions.manager.engine import LocalEngine
from jupyter_gpu_sessions.runtime.local import LocalRuntime
from jupyter_gpu_sessions.scheduler import SchedulingStrategy
from jupyter_gpu_sessions.vfolders.backends import DirectoryBackend

from .api_support import ADMIN, Api, server_fixtures

jp_server_config, jp_auth_header = server_fixtures(
    EngineChooser={"engine_class": "tests.test_swappable_parts.CountingEngine"},
)


class CountingEngine(LocalEngine):
    """The in-process engine, counting what the server asks of it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.asked: list[str] = []

    async def gpus(self, who):
        self.asked.append(f"gpus for {who.username}")
        return await super().gpus(who)


class NewestFirst(SchedulingStrategy):
    """Tries the newest session first (the opposite of FIFO)."""

    name = "newest-first"

    def serve(self, run, order, blocked, max_head_attempts):
        run.fifo(list(reversed(order)), blocked, max_head_attempts)
        return list(run.waiting)


class RecordingDirectoryBackend(DirectoryBackend):
    """The directory backend, recording the vfolders it made."""

    made: list[str] = []

    def create(self, vfolder):
        RecordingDirectoryBackend.made.append(vfolder.name)
        return super().create(vfolder)


class QuietRuntime(LocalRuntime):
    """A local runtime subclass, to show the runtime class comes from config."""


async def test_the_server_uses_the_engine_class_its_config_names(jp_fetch, jp_serverapp):
    engine = jp_serverapp.web_app.settings["gpu_sessions_engine"]
    assert type(engine) is CountingEngine
    # The provisioner of every kernel this server starts finds the same engine.
    assert current_engine() is engine
    status, body = await Api(jp_fetch).get("gpus", user=ADMIN)
    assert status == 200, body
    assert engine.asked == [f"gpus for {ADMIN}"]


def test_inventory_runtimes_and_strategy_come_from_config(tmp_path):
    config = Config(
        {
            "GPUSessionManager": {
                "db_url": f"sqlite:///{tmp_path}/swap.sqlite",
                "inventory_class": "jupyter_gpu_sessions.devices.SimulatedInventory",
                "simulated_gpus": "1xT4-16GB",
                "runtime_classes": {"local": "tests.test_swappable_parts.QuietRuntime"},
                "strategy_class": "tests.test_swappable_parts.NewestFirst",
            }
        }
    )
    previous = use_engine(None)
    try:
        engine = current_engine(config)
        manager: GPUSessionManager = engine.manager
        assert isinstance(manager.inventory, SimulatedInventory)
        assert [d.name for d in manager.inventory.devices()] == ["Simulated T4-16GB"]
        assert type(manager.runtime("local")) is QuietRuntime
        assert manager.runtime("docker").name == "docker"  # the others keep their default

        # Two sessions wait for the one GPU; NewestFirst places the younger one.
        for n, name in enumerate(("older", "younger")):
            manager.store.add(
                Session(
                    id=name,
                    owner="ada",
                    image="img",
                    request=ResourceRequest(gpus=1),
                    runtime="local",
                    process=ProcessRef("host", os.getpid(), 0.0),
                    created_at=time.time() + n,
                )
            )
        decision = manager.schedule_pass()
        assert sorted(decision.placed) == ["younger"]
        assert manager.store.get("older").status == SessionStatus.PENDING
    finally:
        engine = use_engine(previous)
        if engine is not None:
            engine.close()


def test_a_vfolder_backend_class_comes_from_config(tmp_path):
    config = Config(
        {
            "GPUSessionManager": {"db_url": f"sqlite:///{tmp_path}/swap.sqlite"},
            "VFolderService": {
                "root": str(tmp_path / "vfolders"),
                "backend_classes": {
                    "directory": "tests.test_swappable_parts.RecordingDirectoryBackend"
                },
            },
        }
    )
    previous = use_engine(None)
    try:
        engine = current_engine(config)
        vfolders = engine.vfolders
        assert type(vfolders.backend("directory")) is RecordingDirectoryBackend
        vfolders.create(Identity("ada"), "data")
        assert RecordingDirectoryBackend.made == ["data"]
        assert (tmp_path / "vfolders").is_dir()
    finally:
        engine = use_engine(previous)
        if engine is not None:
            engine.close()
