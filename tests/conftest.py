"""Shared fixtures: a real Docker engine, the built kernel image, kernels shared per module."""

from __future__ import annotations

import os
import stat
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import DockerException, ImageNotFound
from traitlets.config import Config

from jupyter_gpu_sessions.engine import current_engine, use_engine
from jupyter_gpu_sessions.image import default_image
from jupyter_gpu_sessions.manager import GPUSessionManager
from jupyter_gpu_sessions.runtime.base import SESSION_LABEL

from .support import LoopThread, make_notebook_dir

pytest_plugins = (
    "pytest_jupyter.jupyter_server",
    "tests.openapi_check",
    "tests.databases",
    "tests.remote_support",  # manager_service, remote_lab: the JupyterHub mode without a Hub
)


@pytest.fixture(scope="session", autouse=True)
def session_store(tmp_path_factory):
    """One session database per test process (xdist worker), as one user's data dir."""
    url = f"sqlite:///{tmp_path_factory.getbasetemp()}/gpu_sessions.sqlite"
    os.environ["JUPYTER_GPU_SESSIONS_DB_URL"] = url
    yield url
    engine = use_engine(None)
    if engine is not None:
        engine.close()


@pytest.fixture(scope="session")
def docker_client():
    """The real engine. Missing is a failure: the README's test command starts one."""
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except DockerException as exc:
        pytest.fail(
            f"No Docker engine ({exc}). Run the README's test command (scripts/test.sh), "
            "which installs and starts one.",
            pytrace=False,
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def kernel_image(docker_client) -> str:
    tag = default_image()
    try:
        docker_client.images.get(tag)
    except ImageNotFound:
        # The kernel-side package changed since the last build: its thin layer on the base
        # builds in seconds. A missing base (the recipe changed) is the build command's job.
        from jupyter_gpu_sessions.core.errors import ImageBuildError
        from jupyter_gpu_sessions.image import DEFAULT_RECIPE
        from jupyter_gpu_sessions.image.build import build_kernel_layer

        try:
            build_kernel_layer(DEFAULT_RECIPE.tag, tag, client=docker_client)
        except ImageBuildError as exc:
            pytest.fail(
                f"Kernel image {tag} is missing ({exc}): run `jupyter gpu-sessions image "
                "build` (scripts/test.sh does).",
                pytrace=False,
            )
    return tag


@pytest.fixture(scope="session")
def aloop():
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def notebook_dir(tmp_path_factory) -> Path:
    return make_notebook_dir(tmp_path_factory.mktemp("notebooks") / "project")


@pytest.fixture
def kernel_dir(tmp_path) -> Path:
    """A private kernelspec directory for specs made up by one test."""
    path = tmp_path / "kernels"
    path.mkdir()
    return path


@pytest.fixture
def fake_gpu_nodes(tmp_path) -> Path:
    """Fake device nodes nvidia0..3: character-device copies of /dev/null (DESIGN.md)."""
    path = tmp_path / "dev"
    path.mkdir()
    null = os.stat("/dev/null")
    for index in range(4):
        os.mknod(path / f"nvidia{index}", stat.S_IFCHR | 0o666, null.st_rdev)
    return path


@pytest.fixture
def fresh_manager(tmp_path):
    """Make the process's engine one whose manager is configured for a test (e.g. with
    GPUs), on its own database unless the test names one: swapped through config."""

    def reset() -> None:
        engine = use_engine(None)
        if engine is not None:
            engine.close()

    def make(**traits: Any) -> GPUSessionManager:
        reset()
        traits.setdefault("db_url", f"sqlite:///{tmp_path}/gpu_sessions.sqlite")
        engine = current_engine(Config({"GPUSessionManager": traits}))
        return engine.manager

    yield make
    reset()


RUN_STARTED = time.time()


# -- browser tests (tests/test_lab_*.py): each module defines its own `lab` ---------------
@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, driven by Playwright (imported here only when a test asks)."""
    from playwright.sync_api import sync_playwright

    from .browser_support import launch_chromium

    with sync_playwright() as playwright:
        try:
            chromium = launch_chromium(playwright)
        except FileNotFoundError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield chromium
        chromium.close()


@pytest.fixture
def open_tab(browser, lab):
    """Tabs (each in a browser context of its own); closed, and the module's lab's sessions
    ended, after the test."""
    from .browser_support import Tab

    tabs: list[Tab] = []

    def open_() -> Tab:
        tabs.append(Tab.open(browser))
        return tabs[-1]

    yield open_
    for tab in tabs:
        tab.close()
    lab.end_sessions()


def pytest_sessionfinish(session, exitstatus):
    """After the whole suite no container of this run may remain (checked on the xdist
    controller). Only containers created since this run started count, and, when the run
    has its own temp root (the test command gives it one), only those that mount something
    under it: another run on the same engine owns its own."""
    if hasattr(session.config, "workerinput"):
        return
    root = session.config.option.basetemp
    try:
        client = docker.from_env(timeout=30)
        left = [
            c
            for c in client.containers.list(
                all=True, filters={"label": SESSION_LABEL}, ignore_removed=True
            )
            if _created(c) >= RUN_STARTED - 1 and (not root or _mounts_under(c, str(root)))
        ]
    except DockerException:
        return
    if left:
        names = ", ".join(c.name for c in left)
        print(f"\nFAILED: containers left behind after the suite: {names}")
        for container in left:
            container.remove(force=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _created(container) -> float:
    created = container.attrs["Created"]  # e.g. 2026-11-25T06:07:46.123456789Z
    stamp = datetime.fromisoformat(created[:26].rstrip("Z") + "+00:00")
    return stamp.timestamp()


def _mounts_under(container, root: str) -> bool:
    root = os.path.realpath(root)
    return any(
        (m.get("Source") or "").startswith(root + "/") for m in container.attrs.get("Mounts", ())
    )
