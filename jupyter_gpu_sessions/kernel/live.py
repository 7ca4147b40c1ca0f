"""What the live widgets share: the API client, their asyncio tasks on the kernel's loop,
the one-line error, coalesced redraws and refreshes, and ``close()`` that stops it all."""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABCMeta, abstractmethod
from collections.abc import Coroutine
from html import escape
from typing import Any
from urllib.parse import quote

import ipywidgets

from .client import APIError, Client
from .events import fetch, one_line, stream

RENDER_DELAY = 0.05  # redraws are coalesced: many events in a burst draw once
TERMINAL = frozenset({"TERMINATED", "CANCELLED", "ERROR"})

ERROR_STYLE = (
    "color:#b42318;font-size:12px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis"
)


def quote_ref(value: str) -> str:
    return quote(str(value), safe="")


class _WidgetABC(ABCMeta, type(ipywidgets.VBox)):
    """ABC's metaclass and the widgets' (traitlets') together: a live widget is an ipywidget
    whose hooks below each subclass must define."""


class LiveWidget(metaclass=_WidgetABC):
    """What the three widgets share: the client, the tasks, the one-line error, coalesced
    redraws and refreshes, and ``close()``. Mixed in before an ipywidgets box."""

    _what = "this widget"
    _wants_gpus = False

    def _start(self, client: Client | None) -> None:
        self._tasks: set[asyncio.Task] = set()
        self._render_handle: asyncio.Handle | None = None
        self._refreshing: asyncio.Task | None = None
        self._refresh_again = False
        self._closed = False
        self._error_text = ""
        self.connections: list[str] = []  # "websocket" / "polling", each (re)connection
        self._loop: asyncio.AbstractEventLoop | None
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        try:
            self._client = client if client is not None else Client.from_env(what=self._what)
        except APIError as exc:
            self._client = None
            self._show_error(exc)
            self._render_now()
            return
        if self._loop is None:
            # A plain script: no loop to stay live on, so one snapshot now.
            try:
                self._apply([self._client.request("GET", p, q) for p, q in self._requests()])
            except APIError as exc:
                self._show_error(exc)
            self._render_now()
            return
        self._spawn(self._run())

    # -- what each widget defines ----------------------------------------------------------
    @abstractmethod
    def _requests(self) -> list[tuple[str, dict[str, Any] | None]]:
        """The GETs (path, query) whose answers make the widget's picture."""

    @abstractmethod
    def _apply(self, answers: list[Any]) -> None:
        """Take in the answers to ``_requests``, in their order."""

    @abstractmethod
    def _render(self) -> None:
        """Draw what the widget holds now."""

    def _on_event(self, event: dict[str, Any]) -> None:
        pass

    # -- machinery -------------------------------------------------------------------------
    @property
    def error(self) -> str:
        """The one line the widget shows about what went wrong ("" when all is well)."""
        return self._error_text

    @property
    def tasks(self) -> set[asyncio.Task]:
        """The widget's running asyncio tasks (none once closed)."""
        return {t for t in self._tasks if not t.done()}

    def _show_error(self, exc: BaseException | str) -> None:
        if isinstance(exc, APIError):
            text = one_line(exc.message)
        elif isinstance(exc, BaseException):  # a bug of ours: still one line
            text = f"{type(exc).__name__}: {one_line(exc)}"
        else:
            text = one_line(exc)
        self._error_text = text
        shown = escape(text)
        self._error.value = f'<div style="{ERROR_STYLE}" title="{shown}">⚠ {shown}</div>'

    def _clear_error(self) -> None:
        if self._error_text:
            self._error_text = ""
            self._error.value = ""

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task | None:
        if self._closed or self._loop is None:
            coro.close()
            return None
        task = self._loop.create_task(self._guarded(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guarded(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # shown as one line; never a traceback in the output
            if not self._closed:
                self._show_error(exc)

    async def _run(self) -> None:
        self._request_refresh()
        async with contextlib.aclosing(stream(self._client, gpus=self._wants_gpus)) as events:
            async for event in events:
                kind = event.get("type")
                if kind == "connected":
                    self.connections.append(str(event.get("via")))
                    if event.get("via") == "websocket":
                        self._clear_error()
                    self._request_refresh()  # catch up with what happened unseen
                elif kind == "error":
                    self._show_error(str(event.get("message", "")))
                else:
                    self._on_event(event)

    def _request_refresh(self) -> None:
        if self._refreshing is not None and not self._refreshing.done():
            self._refresh_again = True
            return
        self._refreshing = self._spawn(self._refresh())

    async def _refresh(self) -> None:
        while True:
            self._refresh_again = False
            try:
                answers = [
                    await fetch(self._client, "GET", path, params)
                    for path, params in self._requests()
                ]
            except APIError as exc:
                self._show_error(exc)
            else:
                self._clear_error()
                self._apply(answers)
                self._render_soon()
            if not self._refresh_again:
                return

    def _render_soon(self) -> None:
        if self._loop is None:
            self._render_now()
        elif self._render_handle is None and not self._closed:
            self._render_handle = self._loop.call_later(RENDER_DELAY, self._render_now)

    def _render_now(self) -> None:
        self._render_handle = None
        if not self._closed:
            self._render()

    def _stop(self) -> None:
        self._closed = True
        # getattr: close() also runs from __del__ of a widget whose __init__ failed.
        if getattr(self, "_render_handle", None) is not None:
            self._render_handle.cancel()
            self._render_handle = None
        for task in list(getattr(self, "_tasks", ())):
            task.cancel()


def close_tree(widget: ipywidgets.Widget) -> None:
    """Close ``widget``'s children, recursively (each holds a comm in a kernel)."""
    for child in getattr(widget, "children", ()):
        close_tree(child)
        child.close()
