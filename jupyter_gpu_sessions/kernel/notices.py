"""Words from the engine to this kernel, printed in the notebook as they come: a warning that
the kernel is about to be ended for leaving its GPU idle, and its withdrawal.

The engine writes ``kernel-notice.json`` (``{"id", "kind", "message"}``, replaced whole by
the next notice) into the session's state directory, next to ``session.json``. A daemon
thread looks at it every second and prints a new notice to stderr: ipykernel sends it to
the cell that runs (or ran last), also while that cell keeps the CPU busy, which is when
a GPU-idle warning matters. Standard library only, like the rest of ``kernel/``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Mapping
from typing import TextIO

from .client import ENV_INFO

NOTICE_FILE = "kernel-notice.json"
PREFIX = "[jupyter-gpu-sessions] "
POLL_SECONDS = 1.0


def notice_path(environ: Mapping[str, str] | None = None) -> str | None:
    """Where this kernel's notices arrive; None when no provisioner of ours started it."""
    env = os.environ if environ is None else environ
    info = env.get(ENV_INFO)
    return os.path.join(os.path.dirname(info), NOTICE_FILE) if info else None


class NoticeWatcher:
    """Prints each new notice at ``path`` once. The notice there when it starts was meant
    for a previous kernel of the session (before a restart): it is not printed."""

    def __init__(
        self, path: str, stream: TextIO | None = None, interval: float = POLL_SECONDS
    ) -> None:
        self.path = path
        self.stream = stream
        self.interval = interval
        self._stamp: tuple[int, int] | None = None
        self._said: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        notice = self._read()
        if notice is not None:
            self._said = notice.get("id")

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._watch, name="jupyter-gpu-sessions-notices", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: S110 - a notice is never worth a kernel's error
                pass

    def check(self) -> str | None:
        """One look: print a new notice; return its message (None: nothing new)."""
        notice = self._read()
        if notice is None or notice.get("id") == self._said:
            return None
        self._said = notice.get("id")
        message = str(notice.get("message") or "")
        if message:
            print(PREFIX + message, file=self.stream or sys.stderr, flush=True)
        return message

    def _read(self) -> dict | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return None
        try:
            with open(self.path, encoding="utf-8") as f:
                notice = json.load(f)
        except (OSError, ValueError):
            return None  # being replaced: looked at again next time
        self._stamp = stamp
        return notice if isinstance(notice, dict) else None


_watcher: NoticeWatcher | None = None
_lock = threading.Lock()


def start_notice_watcher(environ: Mapping[str, str] | None = None) -> NoticeWatcher | None:
    """This kernel's watcher, started once (loading the extension again changes nothing);
    None in a kernel no provisioner of ours started."""
    global _watcher
    path = notice_path(environ)
    if path is None:
        return None
    with _lock:
        if _watcher is None:
            _watcher = NoticeWatcher(path)
            _watcher.start()
        return _watcher
