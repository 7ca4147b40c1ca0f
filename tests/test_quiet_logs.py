"""Quiet logs: a queued kernel's place is said when it changes; an engine outage is one
warning, not a traceback per poll."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re

from jupyter_client.manager import AsyncKernelManager

from jupyter_gpu_sessions.core.status import SessionStatus

from .support import start_kernel, stop_kernel, write_kernelspec
from .test_queue import gpu_spec

DOCKER_SOCKET = "/var/run/docker.sock"


class DockerProxy:
    """A unix-socket proxy to the Docker engine that a test can take down and bring back:
    an engine outage without stopping the machine's engine."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.server = await asyncio.start_unix_server(self._serve, self.path)

    async def stop(self) -> None:
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(DOCKER_SOCKET)
        self.writers.update((writer, up_writer))

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def __aenter__(self) -> DockerProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            await self.stop()


def records(caplog, pattern: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if re.search(pattern, r.getMessage())]


async def test_an_engine_outage_is_one_warning_and_the_kernel_is_left_alone(
    kernel_dir, notebook_dir, kernel_image, fresh_manager, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    proxy = DockerProxy(str(tmp_path / "docker.sock"))
    async with proxy:
        manager = fresh_manager(docker_url=f"unix://{proxy.path}", reconcile_interval=0.2)
        ksm = write_kernelspec(kernel_dir, "box", gpu_spec(gpus=0, image=kernel_image))
        km, kc = await start_kernel("box", notebook_dir, kernel_spec_manager=ksm)
        session = km.provisioner.session
        try:
            await proxy.stop()
            for _ in range(8):  # the restarter's polls while the engine is away
                assert await km.is_alive()  # unknown is not dead: no restart of a live kernel
            await asyncio.sleep(1.0)  # several reconcile passes
            assert len(records(caplog, "cannot see its container")) == 1
            assert len(records(caplog, "Docker engine does not answer")) == 1
            assert not [r for r in caplog.records if r.exc_info]  # no tracebacks
            assert manager.store.get(session.id).status == SessionStatus.RUNNING
            await proxy.start()
            assert await km.is_alive()
            await asyncio.sleep(0.6)
            assert records(caplog, "answers again")
        finally:
            await stop_kernel(km, kc)
    ended = manager.store.get(session.id)
    assert ended.status == SessionStatus.TERMINATED, ended.history
    assert manager.held_devices() == {}


async def test_a_queued_kernel_says_its_place_when_it_changes_not_at_every_pass(
    kernel_dir, tmp_path, fresh_manager
):
    manager = fresh_manager(simulated_gpus="1xT4-16GB", schedule_interval=0.2)
    ksm = write_kernelspec(kernel_dir, "one", gpu_spec("local"))
    holder = await start_kernel("one", tmp_path, kernel_spec_manager=ksm)
    logs = []
    handler = logging.Handler()
    handler.emit = lambda record: logs.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("queue-test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    waiting = [
        AsyncKernelManager(kernel_name="one", kernel_spec_manager=ksm, log=logger) for _ in range(3)
    ]
    starts = []
    for km in waiting:
        starts.append(asyncio.ensure_future(km.start_kernel(cwd=str(tmp_path))))
        await asyncio.sleep(0.3)
    await asyncio.sleep(3.0)  # a dozen scheduling passes and more
    try:
        said = [m for m in logs if "Queued:" in m]
        # Each kernel said its place once (#1, #2, #3), however many passes ran.
        assert sorted(re.search(r"#(\d)", m).group(1) for m in said) == ["1", "2", "3"]
        await stop_kernel(*holder)
        await starts[0]
        await asyncio.sleep(1.0)
        moved = [m for m in logs if "Queued:" in m][len(said) :]
        # The two still waiting moved up one place each: said once each.
        assert sorted(re.search(r"#(\d)", m).group(1) for m in moved) == ["1", "2"]
    finally:
        for km, start in zip(waiting, starts, strict=True):
            if start.done() and not start.exception():
                await km.shutdown_kernel(now=True)
            else:
                start.cancel()
                with contextlib.suppress(BaseException):
                    await start
        logger.removeHandler(handler)
    assert [(s.status, s.reason) for s in manager.store.live()] == []
