"""JupyterLab in a real browser, as a person uses it: Debian's chromium driven by Playwright
against a real `jupyter lab` run with the package's shipped configuration."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from .browser_support import LabServer, Tab, running_lab

pytestmark = pytest.mark.timeout(240)

KERNELS = ["python3", "python3-container", "python3-gpu"]
OUTPUT_TIMEOUT_MS = 45_000
# How long JupyterLab's request for a session may go unanswered before the test presses
# Shift+Enter anyway (the press lands 0.1-0.2 s later still). Measured here: a server that
# answers at once, with the kernel still starting (pending kernels), answers in 0.01-0.3 s;
# one that answers only when a container kernel is up takes 0.7-1.6 s, and a run made
# meanwhile is lost.
SESSION_ANSWER_S = 0.5

# JupyterLab 4's DOM: the open notebook's first cell, its editor; the notebook toolbar's
# kernel name; the status bar's kernel item ("Python 3 (container) | Starting").
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"
FIRST_CELL = f"{PANEL} .jp-Notebook .jp-Cell >> nth=0"
EDITOR = ".jp-InputArea-editor .cm-content"
TOOLBAR_KERNEL = f"{PANEL} .jp-NotebookPanel-toolbar .jp-Toolbar-kernelName"
KERNEL_STATUS = '.jp-StatusBar-TextItem[title^="Change kernel"]'
DIALOG = ".jp-Dialog"


# pytest_jupyter's autouse fixtures are off here: its loop fixture would take Playwright's
# loop (running in Playwright's greenlet) for its own and close it after each test, and
# there is no in-process server to clean up (the lab is a process of its own).
@pytest.fixture
def jp_asyncio_loop():
    return None


@pytest.fixture
def jp_server_cleanup():
    return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory, kernel_image) -> LabServer:
    with running_lab(tmp_path_factory.mktemp("lab")) as server:
        yield server


@dataclass
class Try:
    """One try at the run, and what it saw."""

    tab: Tab
    # JupyterLab's POST /api/sessions (request, time.monotonic() when seen), and when the
    # answers came
    session_requests: list = field(default_factory=list)
    answered: list[float] = field(default_factory=list)
    dismissed: list[str] = field(default_factory=list)  # dialogs dismissed before the run
    status_at_run: str = "(not run)"
    answered_at_run: bool = False
    ran: float | None = None  # time.time() of Shift+Enter


@pytest.mark.parametrize("kernel_name", KERNELS)
def test_first_cell_runs_when_run_at_once(kernel_name, lab, open_tab, tmp_path: Path):
    """Open a notebook whose metadata names the kernel, type into its first cell and press
    Shift+Enter at once, while the kernel is still starting: the run is not lost.

    "At once": as soon as the cell takes typing and JupyterLab has the session it asked the
    server for (the kernel is still starting then), or SESSION_ANSWER_S after it asked if
    the server has not answered by then. Never waiting for the kernel to be ready: that is
    the point. JupyterLab itself drops a run made while its request for a session is still
    unanswered (the cell stays `[ ]`), so the server must answer at once, with a kernel
    that is still starting, not when the kernel is up.

    Tried a second time only when Chromium saw the machine's network change during the
    first (it then fails requests with ERR_NETWORK_CHANGED, whatever the page does)."""
    display_name = lab.api("GET", "/api/kernelspecs")["kernelspecs"][kernel_name]["spec"][
        "display_name"
    ]
    for attempt in (1, 2):
        one = Try(open_tab())
        try:
            report = _run_first_cell_at_once(one, lab, kernel_name, display_name, attempt)
        except (AssertionError, PlaywrightError) as exc:
            failure = _explain(exc, one, lab, tmp_path / f"{kernel_name}-{attempt}.png")
            if attempt == 1 and one.tab.network_changed:
                print(f"Chromium saw the network change; trying again. First try: {failure}")
                one.tab.close()
                lab.end_sessions()
                continue
            raise AssertionError(failure) from exc
        print(report)
        return


def _run_first_cell_at_once(
    one: Try, lab: LabServer, kernel_name: str, display_name: str, attempt: int
) -> str:
    page: Page = one.tab.page
    name = f"first-cell-{kernel_name}-{attempt}.ipynb"
    lab.write_notebook(name, kernel_name, display_name)
    page.on(
        "request",
        lambda r: _is_new_session(r) and one.session_requests.append((r, time.monotonic())),
    )
    page.on(
        "requestfinished",
        lambda r: _is_new_session(r) and one.answered.append(time.monotonic()),
    )
    started = time.time()

    # A dialog before the run (none is expected) is noted and dismissed.
    dialog = page.locator(DIALOG)
    page.add_locator_handler(dialog, lambda found: _dismiss(found, one))
    page.goto(lab.lab_url(name, workspace=name.removesuffix(".ipynb")))
    cell = page.locator(FIRST_CELL)
    editor = cell.locator(EDITOR)
    editor.wait_for(state="visible", timeout=60_000)
    editor.click()
    page.keyboard.insert_text("print(6*7)")
    expect(editor).to_have_text("print(6*7)", timeout=5_000)
    page.remove_locator_handler(dialog)

    # JupyterLab shows the notebook's kernel once it has asked for a session.
    page.wait_for_function(
        "([sel, name]) => document.querySelector(sel)?.textContent === name",
        arg=[TOOLBAR_KERNEL, display_name],
        timeout=30_000,
    )
    _wait_until(page, lambda: one.session_requests, 30, "JupyterLab asked for no session")
    sent = one.session_requests[0][1]
    if _wait_until(page, lambda: one.answered, SESSION_ANSWER_S, since=sent):
        # Answered: JupyterLab has the session once it has named it (two PATCHes later).
        with contextlib.suppress(PlaywrightTimeoutError):
            page.wait_for_function(
                "sel => !/Initializing/.test(document.querySelector(sel)?.textContent ?? '')",
                arg=KERNEL_STATUS,
                timeout=10_000,
            )
    one.status_at_run = _text(page.locator(KERNEL_STATUS))
    one.answered_at_run = bool(one.answered)
    page.keyboard.press("Shift+Enter")
    one.ran = time.time()

    # The output, or anything JupyterLab asks instead (e.g. to select a kernel).
    output = cell.locator(".jp-OutputArea-output").filter(has_text="42")
    output.or_(dialog).first.wait_for(state="visible", timeout=OUTPUT_TIMEOUT_MS)
    if dialog.count():
        question = _text(dialog)
        page.keyboard.press("Escape")
        raise AssertionError(f"JupyterLab showed a dialog instead: {question!r}")
    expect(output).to_have_text("42")
    expect(cell.locator(".jp-InputPrompt")).to_have_text("[1]:")
    return (
        f"{kernel_name}: run {one.ran - started:.1f} s after opening (kernel then: "
        f"{one.status_at_run!r}; {_session_timing(one)}), output {time.time() - one.ran:.1f} s "
        "later"
    )


def _explain(exc: BaseException, one: Try, lab: LabServer, shot: Path) -> str:
    """What a failed try shows: the error, the kernel's status then and now, the session
    request's timing, a screenshot; the lab's log and the browser's console are printed."""
    try:
        one.tab.page.screenshot(path=str(shot))
    except PlaywrightError as shot_error:
        shot = Path(f"(no screenshot: {shot_error.message.splitlines()[0]})")
    print(f"--- jupyter lab log ({lab.log_path}), last lines:\n{lab.log_tail()}")
    print("--- browser console (warnings, errors):", *one.tab.console[-30:], sep="\n")
    print("--- failed requests:", *one.tab.failed_requests[-30:], sep="\n")
    hint = ""
    if one.ran is not None and not one.answered_at_run:
        hint = (
            "The run was made while JupyterLab's POST /api/sessions was unanswered, and "
            "JupyterLab drops such a run: the server must answer at once, with the kernel "
            "still starting (jupyter_server's pending kernels), in the configuration the "
            "package ships.\n"
        )
    return (
        f"print(6*7), run at once in the first cell of a new notebook, did not show 42 "
        f"({exc})\n{hint}"
        f"kernel status when run: {one.status_at_run!r}; "
        f"now: {_text(one.tab.page.locator(KERNEL_STATUS))!r}\n"
        f"{_session_timing(one)}\n"
        f"dialogs dismissed before the run: {one.dismissed}\n"
        f"screenshot: {shot}"
    )


def _wait_until(
    page: Page, done, timeout: float, failure: str = "", since: float | None = None
) -> bool:
    """Poll `done()` (fed by the page's events) until it is true or `timeout` seconds have
    passed since `since` (default: now); fail with `failure` then, if given."""
    deadline = (time.monotonic() if since is None else since) + timeout
    while not done():
        if time.monotonic() >= deadline:
            if failure:
                raise AssertionError(failure)
            return False
        page.wait_for_timeout(10)  # lets Playwright deliver the page's events
    return True


def _dismiss(dialog, one: Try) -> None:
    one.dismissed.append(_text(dialog))
    dialog.page.keyboard.press("Escape")


def _is_new_session(request) -> bool:
    return request.method == "POST" and urlparse(request.url).path.endswith("/api/sessions")


def _session_timing(one: Try) -> str:
    """When JupyterLab's request for the notebook's session went and was answered, relative
    to the run (the browser's own timings)."""
    if not one.session_requests:
        return "JupyterLab sent no POST /api/sessions"
    timing = one.session_requests[0][0].timing  # startTime: epoch ms; responseEnd: ms after
    sent = timing["startTime"] / 1000
    answered = timing["responseEnd"]  # -1 while unanswered
    text = (
        f"POST /api/sessions answered {answered / 1000:.2f} s after it was sent"
        if answered >= 0
        else "POST /api/sessions not answered yet"
    )
    if one.ran is not None:
        text += f", run {one.ran - sent:.2f} s after it was sent"
    return text


def _text(locator) -> str:
    try:
        return locator.first.inner_text(timeout=1_000).strip()
    except PlaywrightError as exc:
        return f"(unreadable: {exc.message.splitlines()[0]})"
