"""The "GPU Sessions" sidebar in a real browser: a kernel holding a simulated GPU is listed
with it, terminated from the sidebar and gone (its GPU free); a vfolder made from the
sidebar is listed. Debian's chromium driven by Playwright, against a real `jupyter lab`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect, sync_playwright

from .browser_support import LabServer, Tab, launch_chromium, running_lab

pytestmark = pytest.mark.timeout(240)

API = "/gpu-sessions/api"
BASE_URL = "/user/ada/"
SIDEBAR = "#jp-gpu-sessions-sidebar"
SIDEBAR_TAB = '.jp-SideBar [data-id="jp-gpu-sessions-sidebar"]'
DIALOG = ".jp-Dialog"
PALETTE_INPUT = ".lm-CommandPalette-input"


# As in test_lab_browser.py: pytest_jupyter's loop fixtures would take Playwright's loop.
@pytest.fixture
def jp_asyncio_loop():
    return None


@pytest.fixture
def jp_server_cleanup():
    return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory, kernel_image) -> LabServer:
    # Under a JupyterHub-style base URL: every request of the sidebar must go through it.
    base = tmp_path_factory.mktemp("lab-sidebar")
    with running_lab(base, gpus="1xA100-80GB", base_url=BASE_URL) as server:
        yield server


@pytest.fixture
def tab(lab):
    with sync_playwright() as playwright:
        try:
            browser = launch_chromium(playwright)
        except FileNotFoundError as exc:
            pytest.fail(str(exc), pytrace=False)
        opened = Tab.open(browser)
        try:
            yield opened
        finally:
            opened.close()
            browser.close()
            lab.end_sessions()


def _running_session(lab: LabServer, kernel_id: str, timeout: float = 90) -> dict:
    """The session of `kernel_id` once it is RUNNING."""
    deadline = time.monotonic() + timeout
    while True:
        sessions = lab.api("GET", f"{API}/sessions?limit=50")["sessions"]
        found = [s for s in sessions if s["kernel_id"] == kernel_id]
        if found and found[0]["status"] == "RUNNING":
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(
                f"kernel {kernel_id} has no RUNNING session after {timeout:.0f} s: {found}; "
                f"lab log:\n{lab.log_tail()}"
            )
        time.sleep(0.5)


def _run_from_palette(page: Page, label: str) -> None:
    """Run a command as a keyboard user does: the command palette, its label, Enter. The
    palette closes when JupyterLab moves the focus (e.g. while it restores its layout just
    after loading): then it is opened again, up to three times."""
    for attempt in (1, 2, 3):
        try:
            page.keyboard.press("Control+Shift+c")
            palette = page.locator(PALETTE_INPUT)
            palette.fill(label, timeout=5_000)
            # The best match is the active item, which Enter runs.
            item = page.locator(".lm-CommandPalette-item.lm-mod-active", has_text=label)
            expect(item).to_be_visible(timeout=5_000)
            page.keyboard.press("Enter")
            return
        except (AssertionError, PlaywrightError):
            if attempt == 3:
                raise
            page.keyboard.press("Escape")


def _start_gpu_kernel(lab: LabServer) -> tuple[dict, dict]:
    kernel = lab.api("POST", "/api/kernels", {"name": "python3-gpu"}, timeout=90)
    lab.kernel_ids.add(kernel["id"])
    session = _running_session(lab, kernel["id"])
    assert session["allocations"], session
    return kernel, session


def test_sidebar_terminates_a_gpu_session_and_creates_a_vfolder(lab, tab, tmp_path: Path):
    """Open the sidebar from the command palette: a kernel holding the one simulated GPU is
    listed with it, and the GPU as held by it; its log opens in a tab; terminated from its
    row (keyboard, then the confirmation) it is gone and the GPU free. A vfolder created
    from the sidebar is listed with its quota. A kernel started meanwhile appears, and goes
    when it is shut down, with no refresh (the events websocket). Screenshots (light and
    dark theme) are kept in the test's tmp dir."""
    kernel, session = _start_gpu_kernel(lab)
    page: Page = tab.page
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    refused: list[str] = []  # answers of the API that were errors, or outside the base URL
    page.on(
        "response",
        lambda r: (
            "gpu-sessions/api" in r.url
            and (r.status >= 400 or not r.url.startswith(f"{lab.url}/"))
            and refused.append(f"{r.status} {r.request.method} {r.url}")
        ),
    )
    shots = tmp_path
    try:
        page.goto(f"{lab.url}/lab/workspaces/sidebar?token={lab.token}")
        # Once the sidebar's tab is in the left bar, its plugin has registered its commands.
        page.locator(SIDEBAR_TAB).wait_for(state="visible", timeout=60_000)
        _run_from_palette(page, "Open GPU Sessions Panel")
        sidebar = page.locator(SIDEBAR)
        expect(sidebar).to_be_visible(timeout=10_000)

        # The session, with its GPU; the GPU, held by it (the caller's own: "you").
        row = sidebar.locator(f'[data-kernel-id="{kernel["id"]}"]')
        expect(row).to_be_visible(timeout=20_000)
        expect(row).to_have_attribute("data-status", "RUNNING")
        expect(row).to_contain_text("1 GPU")
        expect(row).to_contain_text("GPU 0")
        gpu = sidebar.locator('[data-gpu-index="0"]')
        expect(gpu).to_have_attribute("data-held", "true")
        expect(gpu.locator(f'[data-session-id="{session["id"]}"]')).to_contain_text("you:")
        sidebar.screenshot(path=str(shots / "sidebar-session.png"))

        # Its log, in a tab of its own.
        row.get_by_role("button", name="Show logs").click()
        log = page.locator(".jp-gpu-sessions-logs")
        expect(log.locator(".jp-gpu-sessions-logs-status")).to_contain_text("live", timeout=15_000)
        expect(
            page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text="Log: ")
        ).to_be_visible()

        # Terminate it from its row, keyboard first: focus the button, confirm.
        row.get_by_role("button", name="Terminate").focus()
        page.keyboard.press("Enter")
        dialog = page.locator(DIALOG)
        expect(dialog).to_contain_text("Terminate")
        dialog.get_by_role("button", name="Terminate").click()
        expect(row).to_have_count(0, timeout=30_000)
        expect(gpu).to_have_attribute("data-held", "false", timeout=15_000)
        expect(gpu).to_contain_text("free")
        ended = lab.api("GET", f"{API}/sessions/{session['id']}")
        assert ended["status"] == "TERMINATED", ended

        # A vfolder made from the sidebar is listed, with its quota.
        sidebar.get_by_role("button", name="Create vfolder").click()
        expect(dialog).to_be_visible()
        dialog.locator('input[name="name"]').fill("sidebar-data")
        dialog.locator('input[name="quota"]').fill("1GiB")
        dialog.get_by_role("button", name="Create").click()
        folder = sidebar.locator('[data-vfolder="sidebar-data"]')
        expect(folder).to_be_visible(timeout=15_000)
        expect(folder).to_contain_text("/ 1 GiB")
        names = [v["name"] for v in lab.api("GET", f"{API}/vfolders")["vfolders"]]
        assert "sidebar-data" in names
        sidebar.screenshot(path=str(shots / "sidebar-vfolder.png"))

        # Live: a kernel started and shut down elsewhere comes and goes by itself.
        assert any(f"{BASE_URL}gpu-sessions/api/events" in url for url in sockets), sockets
        other, _ = _start_gpu_kernel(lab)
        other_row = sidebar.locator(f'[data-kernel-id="{other["id"]}"]')
        expect(other_row).to_have_attribute("data-status", "RUNNING", timeout=15_000)
        expect(gpu).to_have_attribute("data-held", "true", timeout=15_000)
        lab.api("DELETE", f"/api/kernels/{other['id']}", timeout=60)
        expect(other_row).to_have_count(0, timeout=15_000)
        expect(gpu).to_have_attribute("data-held", "false", timeout=15_000)

        # The dark theme: the sidebar follows JupyterLab's theme variables.
        _run_from_palette(page, "Use Theme: JupyterLab Dark")
        expect(page.locator("body")).to_have_attribute("data-jp-theme-light", "false")
        expect(folder).to_be_visible()
        sidebar.screenshot(path=str(shots / "sidebar-dark.png"))
        print(f"sidebar screenshots: {shots}/sidebar-*.png")
        assert not refused, refused
    except (AssertionError, PlaywrightError):
        try:
            page.screenshot(path=str(tmp_path / "failure.png"))
        except PlaywrightError:
            pass
        print(f"--- jupyter lab log, last lines:\n{lab.log_tail()}")
        print("--- browser console:", *tab.console[-30:], sep="\n")
        print(f"screenshot: {tmp_path / 'failure.png'}")
        raise
