"""The status bar item of the active notebook's kernel session, in a real browser: the GPU a
kernel runs on, a container kernel without GPU, and a kernel queued for more GPUs than are
free ("queued #1 · waiting for 2 GPUs") until the kernel holding one ends. Screenshots of
the status bar are kept under each test's tmp dir (their paths printed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from .browser_support import LabServer, Tab, running_lab

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"
FIRST_CELL = f"{PANEL} .jp-Notebook .jp-Cell >> nth=0"
EDITOR = ".jp-InputArea-editor .cm-content"
ITEM = ".jp-gpu-sessions-statusbar"
KERNEL_STATUS = '.jp-StatusBar-TextItem[title^="Change kernel"]'
STATUS_BAR = "#jp-main-statusbar"
DIALOG = ".jp-Dialog"
READY_TIMEOUT_MS = 90_000
TWO_GPUS = "python3-2gpus"
# Limits that apply, so the item shows the time left: the idle timeout comes first, counted
# from the kernel's last activity (as the server's culler counts it).
POLICIES = {"default": {"idle_timeout": "30m", "max_session_lifetime": "2h"}}
LEFT = r" · \d+m left"


@pytest.fixture
def jp_asyncio_loop():
    return None  # as in test_lab_browser: Playwright's loop is not pytest_jupyter's


@pytest.fixture
def jp_server_cleanup():
    return None


def two_gpu_kernelspec(data_dir: Path) -> None:
    """A kernelspec of the lab's own asking for two GPUs (the shipped python3-gpu, resized)."""
    spec = json.loads((REPO / "provisioners" / "python3-gpu" / "kernel.json").read_text())
    spec["display_name"] = "Python 3 (2 GPUs)"
    spec["metadata"]["kernel_provisioner"]["config"]["gpus"] = 2
    gpus = spec["metadata"].get("parameters", {}).get("properties", {}).get("gpus")
    if gpus is not None:
        gpus["default"] = 2
    target = data_dir / "kernels" / TWO_GPUS
    target.mkdir(parents=True)
    (target / "kernel.json").write_text(json.dumps(spec, indent=1))


@pytest.fixture(scope="module")
def lab(tmp_path_factory, kernel_image) -> LabServer:
    base = tmp_path_factory.mktemp("lab")
    two_gpu_kernelspec(base / "data")
    (base / "config").mkdir()
    (base / "config" / "jupyter_server_config.json").write_text(
        json.dumps({"GPUSessionManager": {"policies": POLICIES}})
    )
    with running_lab(base, gpus="2xA100-80GB") as server:
        yield server


def open_notebook(tab: Tab, lab: LabServer, name: str, kernel: str) -> Page:
    lab.write_notebook(name, kernel)
    page = tab.page
    page.goto(lab.lab_url(name, workspace=name.removesuffix(".ipynb")))
    page.locator(FIRST_CELL).locator(EDITOR).wait_for(state="visible", timeout=60_000)
    return page


def run_cell(page: Page, code: str, expected: str) -> None:
    """Once the kernel is up (what runs at once is test_lab_browser's subject)."""
    expect(page.locator(KERNEL_STATUS)).to_contain_text("Idle", timeout=READY_TIMEOUT_MS)
    cell = page.locator(FIRST_CELL)
    editor = cell.locator(EDITOR)
    editor.click()
    page.keyboard.insert_text(code)
    expect(editor).to_have_text(code, timeout=5_000)
    page.keyboard.press("Shift+Enter")
    output = cell.locator(".jp-OutputArea-output").filter(has_text=expected)
    expect(output).to_be_visible(timeout=READY_TIMEOUT_MS)


def keep_screenshot(page: Page, path: Path) -> None:
    page.locator(STATUS_BAR).screenshot(path=str(path))
    print(f"status bar screenshot: {path}")


def test_gpu_kernel_names_its_gpu(lab, open_tab, tmp_path: Path):
    page = open_notebook(open_tab(), lab, "status-gpu.ipynb", "python3-gpu")
    run_cell(page, "print(6*7)", "42")
    item = page.locator(ITEM)
    expect(item).to_be_visible(timeout=30_000)
    # One simulated A100-80GB: its name (as the inventory gives it), its utilization and the
    # GPU memory this kernel's processes use (none: it has not touched the GPU), and the
    # time left before its idle timeout.
    expect(item).to_have_text(
        re.compile(r"^Simulated A100-80GB · 0% · 0/80 GiB" + LEFT + "$"), timeout=30_000
    )
    keep_screenshot(page, tmp_path / "statusbar-gpu.png")

    # Clicking it opens the session's details.
    item.click()
    dialog = page.locator(DIALOG)
    expect(dialog).to_contain_text("GPU session", timeout=10_000)
    expect(dialog).to_contain_text("RUNNING")
    expect(dialog).to_contain_text("Asked for1 GPU")
    expect(dialog).to_contain_text("Simulated A100-80GB (gpu, 0%), 0/80 GiB")
    expect(dialog).to_contain_text("Idle shutdown in")
    page.keyboard.press("Escape")
    expect(dialog).to_have_count(0)


def test_container_kernel_without_gpu(lab, open_tab, tmp_path: Path):
    page = open_notebook(open_tab(), lab, "status-cpu.ipynb", "python3-container")
    run_cell(page, "print(6*7)", "42")
    expect(page.locator(ITEM)).to_have_text(
        re.compile(r"^container · no GPU" + LEFT + "$"), timeout=30_000
    )
    keep_screenshot(page, tmp_path / "statusbar-container.png")


def test_kernel_asking_for_more_gpus_than_free_shows_queued(lab, open_tab, tmp_path: Path):
    # One of the two GPUs held by a running kernel...
    first = open_notebook(open_tab(), lab, "status-hold.ipynb", "python3-gpu")
    run_cell(first, "print(6*7)", "42")
    expect(first.locator(ITEM)).to_contain_text("A100-80GB", timeout=30_000)
    holder = next(s for s in lab.api("GET", "/api/sessions") if s["path"] == "status-hold.ipynb")

    # ...so a kernel asking for two queues, and its status bar says so.
    page = open_notebook(open_tab(), lab, "status-queued.ipynb", TWO_GPUS)
    item = page.locator(ITEM)
    expect(item).to_have_text("queued #1 · waiting for 2 GPUs", timeout=60_000)
    expect(item).to_have_class(re.compile(r"\bjp-mod-queued\b"))
    keep_screenshot(page, tmp_path / "statusbar-queued.png")

    # Once the first kernel ends, it starts on both GPUs.
    lab.api("DELETE", f"/api/sessions/{holder['id']}", timeout=60)
    expect(item).to_have_text(
        re.compile(r"^2× Simulated A100-80GB · 0% · 0/160 GiB" + LEFT + "$"),
        timeout=READY_TIMEOUT_MS,
    )
    keep_screenshot(page, tmp_path / "statusbar-started.png")
