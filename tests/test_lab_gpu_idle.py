"""GPU-idle reclaim as a person sees it in JupyterLab, in a real browser: a notebook whose
GPU kernel keeps the CPU busy and its GPU idle gets the warning in the running cell's
output and as a notification, then its kernel is shut down and the notification says why.
A screenshot of the page with the warning is kept under the test's tmp dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from playwright.sync_api import expect

from .browser_support import LabServer, running_lab
from .test_lab_statusbar import (
    EDITOR,
    FIRST_CELL,
    KERNEL_STATUS,
    READY_TIMEOUT_MS,
    open_notebook,
)

pytestmark = pytest.mark.timeout(300)

# Long enough for the cell to be typed and run before the first warning comes.
WINDOW = "15s"
GRACE = "6s"
POLICIES = {"default": {"gpu_idle_threshold": "5%", "gpu_idle_window": WINDOW}}
TOAST = ".Toastify__toast"


@pytest.fixture
def jp_asyncio_loop():
    return None  # as in test_lab_browser: Playwright's loop is not pytest_jupyter's


@pytest.fixture
def jp_server_cleanup():
    return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory, kernel_image) -> LabServer:
    base = tmp_path_factory.mktemp("lab-gpu-idle")
    (base / "config").mkdir()
    config = {
        "GPUSessionManager": {
            "policies": POLICIES,
            "gpu_idle_check_interval": 0.5,
            "gpu_idle_grace": GRACE,
        }
    }
    (base / "config" / "jupyter_server_config.json").write_text(json.dumps(config))
    with running_lab(base, gpus="1xA100-80GB") as server:
        yield server


def test_an_idle_gpu_notebook_is_warned_in_its_cell_and_by_a_notification(
    lab, open_tab, tmp_path: Path
):
    page = open_notebook(open_tab(), lab, "idle-gpu.ipynb", "python3-gpu")
    expect(page.locator(KERNEL_STATUS)).to_contain_text("Idle", timeout=READY_TIMEOUT_MS)
    cell = page.locator(FIRST_CELL)
    editor = cell.locator(EDITOR)
    editor.click()
    code = "import time\nt = time.time()\nwhile time.time() - t < 120: pass"
    page.keyboard.insert_text(code)
    expect(editor).to_have_text(code.replace("\n", ""), timeout=5_000)
    page.keyboard.press("Shift+Enter")

    # The busy cell shows the kernel's own warning (stderr, while it keeps running).
    warning = cell.locator(".jp-OutputArea-output").filter(has_text="[jupyter-gpu-sessions]")
    expect(warning).to_contain_text("under 5% of its GPU", timeout=60_000)
    expect(warning).to_contain_text("will be shut down")
    # And JupyterLab says it too, naming the notebook.
    toast = page.locator(TOAST).filter(has_text="will be shut down")
    expect(toast).to_contain_text("idle-gpu.ipynb", timeout=30_000)
    page.screenshot(path=str(tmp_path / "gpu-idle-warning.png"))
    print(f"screenshot: {tmp_path / 'gpu-idle-warning.png'}")

    # Then the kernel is shut down: the warning goes, the end is said once.
    ended = page.locator(TOAST).filter(has_text="its kernel was shut down")
    expect(ended).to_contain_text("gpu-idle:", timeout=60_000)
    expect(page.locator(TOAST).filter(has_text="will be shut down")).to_have_count(0)
    sessions = lab.api("GET", "/gpu-sessions/api/sessions?status=TERMINATED")["sessions"]
    assert [s["reason"].split(":")[0] for s in sessions] == ["gpu-idle"]
    assert not lab.api("GET", "/gpu-sessions/api/gpus")["gpus"][0]["holders"]
