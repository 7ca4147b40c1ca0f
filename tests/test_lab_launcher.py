"""The launcher's "GPU Sessions" category and its resource dialog, in a real browser: a card
per GPU session kernelspec with the GPUs free now; the dialog offers what the policy allows,
shows what it forbids disabled with the limit; its choice lands in the notebook's metadata
before the kernel starts, and the kernel gets it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from .browser_support import LabServer, Tab, running_lab

pytestmark = pytest.mark.timeout(300)

# Two simulated GPUs; the default policy allows one per person, so "2 GPUs" is forbidden
# (shown disabled with its limit) while "1 GPU" is allowed.
POLICIES = {"default": {"max_gpus": 1}}
CATEGORY = "GPU Sessions"
SECTION = ".jp-Launcher-section"
CARD = ".jp-LauncherCard"
DIALOG = ".jp-Dialog"
FORM = f"{DIALOG} .jp-gpu-sessions-resources"
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"
FIRST_CELL = f"{PANEL} .jp-Notebook .jp-Cell >> nth=0"
EDITOR = ".jp-InputArea-editor .cm-content"
KERNEL_STATUS = '.jp-StatusBar-TextItem[title^="Change kernel"]'
READY_TIMEOUT_MS = 90_000


@pytest.fixture
def jp_asyncio_loop():
    return None  # as in test_lab_browser: Playwright's loop is not pytest_jupyter's


@pytest.fixture
def jp_server_cleanup():
    return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory, kernel_image) -> LabServer:
    base = tmp_path_factory.mktemp("lab")
    (base / "config").mkdir()
    (base / "config" / "jupyter_server_config.json").write_text(
        json.dumps({"GPUSessionManager": {"policies": POLICIES}})
    )
    with running_lab(base, gpus="2xA100-80GB") as server:
        yield server


@pytest.fixture
def tab(browser, lab):
    one = Tab.open(browser)
    yield one
    one.close()
    lab.end_sessions()


def _open_launcher(page: Page, lab: LabServer, workspace: str) -> None:
    page.goto(f"{lab.url}/lab/workspaces/{workspace}?token={lab.token}")
    page.locator(SECTION).filter(has_text=CATEGORY).wait_for(state="visible", timeout=60_000)


def _gpu_card(page: Page, display_name: str):
    section = page.locator(SECTION).filter(has=page.locator("h2", has_text=CATEGORY))
    return section.locator(CARD).filter(has_text=display_name)


def _wait_until_idle(page: Page, timeout_ms: int = READY_TIMEOUT_MS) -> None:
    page.wait_for_function(
        "sel => /\\|\\s*Idle/.test(document.querySelector(sel)?.textContent ?? '')",
        arg=KERNEL_STATUS,
        timeout=timeout_ms,
    )


def _run(page: Page, code: str, expected: str, index: int = 0) -> str:
    cell = page.locator(f"{PANEL} .jp-Notebook .jp-Cell >> nth={index}")
    editor = cell.locator(EDITOR)
    editor.click()
    page.keyboard.insert_text(code)
    page.keyboard.press("Shift+Enter")
    output = cell.locator(".jp-OutputArea-output").filter(has_text=expected)
    output.wait_for(state="visible", timeout=45_000)
    return output.inner_text().strip()


def _open_notebook_path(page: Page) -> str:
    """The path of the notebook in the main area (from its tab's title)."""
    title = page.locator(".jp-mod-current .lm-TabBar-tabLabel").first.inner_text()
    return title.strip()


def test_card_dialog_and_kernel_get_the_choice(lab: LabServer, tab: Tab, tmp_path: Path):
    page = tab.page
    spec = lab.api("GET", "/api/kernelspecs")["kernelspecs"]["python3-gpu"]["spec"]
    display_name = spec["display_name"]
    _open_launcher(page, lab, "gpu-launcher")

    # The card says how many GPUs are free right now.
    card = _gpu_card(page, display_name)
    expect(card).to_contain_text(f"{display_name} · 2 GPUs free", timeout=30_000)

    card.click()
    form = page.locator(FORM)
    form.wait_for(state="visible", timeout=30_000)
    gpus = form.get_by_label("GPUs", exact=True)
    # Forbidden by the policy: disabled, with the limit.
    forbidden = gpus.locator("option[value='2']")
    expect(forbidden).to_be_disabled()
    expect(forbidden).to_contain_text("not allowed: max_gpus 1 (policy default)")
    expect(gpus.locator("option[value='1']")).to_be_enabled()
    gpus.select_option("1")
    shot = tmp_path / "resource-dialog.png"
    page.locator(DIALOG).locator(".jp-Dialog-content").screenshot(path=str(shot))
    print(f"screenshot of the resource dialog: {shot}")
    page.locator(f"{DIALOG} .jp-mod-accept").click()

    # A notebook opens on that kernelspec and its kernel gets one GPU.
    page.locator(FIRST_CELL).locator(EDITOR).wait_for(state="visible", timeout=60_000)
    _wait_until_idle(page)
    uuids = {g["uuid"] for g in lab.api("GET", "/gpu-sessions/api/gpus")["gpus"]}
    seen = _run(page, "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])", "GPU-")
    assert seen in uuids, f"the kernel sees {seen!r}, not one of this host's GPUs {uuids}"

    # The choice is in the notebook's saved metadata (the provisioner read it from there).
    name = _open_notebook_path(page)
    metadata = json.loads((lab.root / name).read_text())["metadata"]
    assert metadata["kernelspec"]["name"] == "python3-gpu"
    saved = metadata["jupyter-gpu-sessions"]
    assert saved["resources"]["gpus"] == 1, saved
    assert set(saved) <= {"resources", "image", "vfolders"}, saved

    # Kernel › Change GPU Resources…: prefilled from the notebook, saved into it, applied by
    # the restart it offers.
    page.locator(".lm-MenuBar-item", has_text="Kernel").click()
    page.locator(".lm-Menu-item", has_text="Change GPU Resources…").click()
    gpus = page.locator(FORM).get_by_label("GPUs", exact=True)
    expect(gpus).to_have_value("1")
    gpus.select_option("0")
    page.locator(f"{DIALOG} .jp-mod-accept", has_text="Save").click()
    restart = page.locator(f"{DIALOG} .jp-mod-accept", has_text="Restart")
    restart.click()
    expect(restart).to_have_count(0)
    _wait_until_idle(page)
    saved = json.loads((lab.root / name).read_text())["metadata"]["jupyter-gpu-sessions"]
    assert saved["resources"] == {"gpus": 0, "cpus": 2, "memory": "8GiB"}, saved
    code = "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES') or 'no GPU')"
    assert _run(page, code, "no GPU", index=1) == "no GPU"


def test_a_busy_choice_stays_enabled_and_says_where_it_queues(lab: LabServer, tab: Tab):
    """While this person's other notebook holds the one GPU their policy allows, a second
    GPU is merely busy for them: "1 GPU" stays enabled and says it will queue, and for what;
    the card counts the GPUs free."""
    lab.write_notebook("holder.ipynb", "python3-gpu")
    lab.api(
        "POST",
        "/api/sessions",
        {
            "path": "holder.ipynb",
            "type": "notebook",
            "name": "holder.ipynb",
            "kernel": {"name": "python3-gpu"},
        },
        timeout=60,
    )
    deadline = time.monotonic() + 60
    while lab.api("GET", "/gpu-sessions/api/launcher")["free"]["gpus"] != 1:
        assert time.monotonic() < deadline, "the other notebook's kernel never got its GPU"
        time.sleep(0.5)

    page = tab.page
    _open_launcher(page, lab, "gpu-launcher-busy")
    card = _gpu_card(page, "Python 3 (1 GPU)")
    expect(card).to_contain_text("1 GPU free", timeout=30_000)
    card.click()
    gpus = page.locator(FORM).get_by_label("GPUs", exact=True)
    option = gpus.locator("option[value='1']")
    expect(option).to_be_enabled()
    expect(option).to_contain_text("will queue: #1 in the queue")
    expect(option).to_contain_text("your own sessions to give back GPUs")
    gpus.select_option("1")
    status = page.locator(f"{FORM} [data-field='gpus'] .jp-gpu-sessions-option-status")
    expect(status).to_contain_text("Busy now: will queue")
    page.keyboard.press("Escape")
    expect(page.locator(DIALOG)).to_have_count(0)
