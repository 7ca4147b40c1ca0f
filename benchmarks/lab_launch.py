"""From clicking a launcher card to the kernel ready in the new notebook, in a real browser:
the "GPU Sessions" card (its resource dialog's Start pressed as soon as it shows) against
the plain `python3-container` card of JupyterLab's Notebook section, alternating, in the
same `jupyter lab` run (simulated GPUs, the package's shipped configuration). "Ready": the
status bar says the kernel is Idle.

    .venv/bin/python benchmarks/lab_launch.py [--rounds 5]

Needs the built extension installed (`bash scripts/test.sh` or `pip install -e .`), the
default kernel image and Debian's chromium.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.browser_support import LabServer, Tab, launch_chromium, running_lab  # noqa: E402

KERNEL = "Python 3 (container)"
SECTION = ".jp-Launcher-section"
CARD = ".jp-LauncherCard"
DIALOG = ".jp-Dialog"
FORM = f"{DIALOG} .jp-gpu-sessions-resources"
EDITOR = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .cm-content"
KERNEL_STATUS = '.jp-StatusBar-TextItem[title^="Change kernel"]'


def _card(page: Page, section: str):
    found = page.locator(SECTION).filter(has=page.locator("h2", has_text=section))
    return found.locator(CARD).filter(has_text=KERNEL)


def _until_idle(page: Page, started: float) -> float:
    page.locator(EDITOR).first.wait_for(state="visible", timeout=60_000)
    page.wait_for_function(
        "sel => /\\|\\s*Idle/.test(document.querySelector(sel)?.textContent ?? '')",
        arg=KERNEL_STATUS,
        timeout=90_000,
    )
    return time.monotonic() - started


def one_launch(browser, lab: LabServer, kind: str, workspace: str) -> tuple[float, float]:
    """(click to kernel idle, click to dialog shown; 0 for the plain card), in seconds."""
    tab = Tab.open(browser)
    page = tab.page
    try:
        page.goto(f"{lab.url}/lab/workspaces/{workspace}?token={lab.token}")
        section = "Notebook" if kind == "plain" else "GPU Sessions"
        card = _card(page, section)
        card.wait_for(state="visible", timeout=60_000)
        started = time.monotonic()
        card.click()
        shown = 0.0
        if kind == "gpu":
            page.locator(FORM).wait_for(state="visible", timeout=30_000)
            shown = time.monotonic() - started
            page.locator(f"{DIALOG} .jp-mod-accept").click()
        return _until_idle(page, started), shown
    finally:
        tab.close()
        lab.end_sessions()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"plain": [], "gpu": []}
    dialog: list[float] = []
    with tempfile.TemporaryDirectory(prefix="jgs-lab-launch-") as base:
        with running_lab(Path(base), gpus="2xA100-80GB") as lab, sync_playwright() as p:
            browser = launch_chromium(p)
            try:
                one_launch(browser, lab, "plain", "warm-up")  # the lab's first page load
                for round_ in range(args.rounds):
                    for kind in ("plain", "gpu"):
                        ready, shown = one_launch(browser, lab, kind, f"{kind}-{round_}")
                        times[kind].append(ready)
                        if kind == "gpu":
                            dialog.append(shown)
            finally:
                browser.close()
    plain, gpu = statistics.median(times["plain"]), statistics.median(times["gpu"])
    print(f"click to kernel idle, {KERNEL}, median of {args.rounds} (alternating):")
    print(f"  plain Notebook card          {plain:.2f} s  {[round(t, 2) for t in times['plain']]}")
    print(f"  GPU Sessions card + dialog   {gpu:.2f} s  {[round(t, 2) for t in times['gpu']]}")
    print(f"    of which click to dialog   {statistics.median(dialog):.2f} s")
    print(f"  ratio                        {gpu / plain:.2f}")


if __name__ == "__main__":
    main()
