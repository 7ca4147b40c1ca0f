"""Live notebook widgets over the gpu-sessions API: the dependency graph of sessions, GPU
utilization charts and a table of sessions with a terminate button.

Plain ipywidgets (HTML holding SVG, buttons), so they work wherever ipywidgets do
(JupyterLab, Notebook 7, VS Code). Updates come from :func:`events.stream` in asyncio tasks
on the kernel's loop; ``close()`` cancels them (and so closes the websocket). No thread is
started; a kernel's shutdown ends the tasks with its loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from html import escape
from typing import Any

import ipywidgets

from . import graph
from .client import ACTIVE_STATUSES, APIError, Client
from .events import fetch, one_line
from .live import ERROR_STYLE, TERMINAL, LiveWidget, close_tree, quote_ref

AGE_REFRESH = 15.0  # seconds between updates of the age column


# -- SessionGraph ---------------------------------------------------------------------------
class SessionGraph(LiveWidget, ipywidgets.VBox):
    """The dependency graph of ``root`` (a session name or id; ``direction`` "up", "down"
    or "both"), or of your newest sessions when ``root`` is None, drawn as SVG: one box per
    session coloured by its status, an arrow from each dependency to its dependent. It
    redraws as statuses change and refetches when a session joins."""

    _what = "SessionGraph"

    def __init__(
        self,
        root: str | None = None,
        direction: str = "both",
        client: Client | None = None,
        *,
        limit: int = 100,
        **kwargs: Any,
    ) -> None:
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction {direction!r}: use one of up, down, both")
        self._error = ipywidgets.HTML()
        self._drawing = ipywidgets.HTML(value="<i>loading…</i>")
        super().__init__(children=[self._error, self._drawing], **kwargs)
        self.root = root
        self.direction = direction
        self.limit = limit
        self._nodes: dict[str, dict[str, Any]] = {}
        self._edges: list[tuple[str, str]] = []
        self._svg = ""
        self._start(client)

    @property
    def nodes(self) -> list[dict[str, Any]]:
        """The sessions drawn: id, name, status, kind, reason, exit_code (copies)."""
        return [dict(n) for n in self._nodes.values()]

    @property
    def edges(self) -> list[tuple[str, str]]:
        """(dependency id, dependent id) pairs."""
        return list(self._edges)

    @property
    def statuses(self) -> dict[str, str]:
        """Session id → the status its box shows (TERMINATED with a non-zero exit: FAILED)."""
        return {i: graph.status_key(n) for i, n in self._nodes.items()}

    @property
    def colours(self) -> dict[str, str]:
        return {i: graph.STATUS_COLOURS[k] for i, k in self.statuses.items()}

    @property
    def svg(self) -> str:
        return self._svg

    def _requests(self) -> list[tuple[str, dict[str, Any] | None]]:
        if self.root is None:
            return [("sessions", {"limit": self.limit})]
        return [(f"sessions/{quote_ref(self.root)}/graph", {"direction": self.direction})]

    def _apply(self, answers: list[Any]) -> None:
        answer = answers[0] or {}
        keep = ("id", "name", "status", "kind", "owner", "reason", "exit_code")
        if self.root is None:
            sessions = answer.get("sessions", [])
            self._nodes = {s["id"]: {k: s.get(k) for k in keep} for s in sessions}
            self._edges = sorted(
                {
                    (d, s["id"])
                    for s in sessions
                    for d in s.get("depends_on", ())
                    if d in self._nodes
                }
            )
        else:
            self._nodes = {n["id"]: {k: n.get(k) for k in keep} for n in answer.get("nodes", [])}
            self._edges = sorted(
                {
                    (e["from"], e["to"])
                    for e in answer.get("edges", ())
                    if e["from"] in self._nodes and e["to"] in self._nodes
                }
            )

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") != "status":
            return
        node = self._nodes.get(event.get("session_id", ""))
        if node is None:
            self._request_refresh()  # a new session, maybe part of this graph
            return
        node["status"] = event.get("status", node["status"])
        node["reason"] = event.get("reason", node.get("reason"))
        if node["status"] in TERMINAL:
            self._request_refresh()  # for the exit code the event does not carry
        self._render_soon()

    def _highlight(self) -> str | None:
        if self.root is None:
            return None
        if self.root in self._nodes:
            return self.root
        named = [i for i, n in self._nodes.items() if n.get("name") == self.root]
        return named[0] if len(named) == 1 else None

    def _render(self) -> None:
        nodes = list(self._nodes.values())
        empty = "No sessions yet." if self.root is None else f"No graph for {self.root}."
        self._svg = graph.render_svg(nodes, self._edges, highlight=self._highlight(), empty=empty)
        self._drawing.value = f'<div style="overflow:auto;max-height:640px">{self._svg}</div>'

    def close(self) -> None:
        self._stop()
        close_tree(self)
        super().close()


# -- GPUMonitor -----------------------------------------------------------------------------
CHART_W, CHART_H = 300, 86


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _chart(
    points: list[tuple[float, float | None]],
    window: float,
    top: float,
    colour: str,
    title: str,
    current: str,
) -> str:
    """A line chart of (age in seconds, value) over the last ``window`` seconds."""
    pad_l, pad_t, pad_b = 6, 18, 14
    w, h = CHART_W - 2 * pad_l, CHART_H - pad_t - pad_b
    coords = []
    for age, value in points:
        if value is None:
            continue
        x = pad_l + w * (1 - min(age, window) / window)
        y = pad_t + h * (1 - min(max(value / top, 0.0), 1.0)) if top > 0 else pad_t + h
        coords.append(f"{x:.1f},{y:.1f}")
    line = (
        f'<polyline points="{" ".join(coords)}" fill="none" stroke="{colour}" '
        'stroke-width="1.6" stroke-linejoin="round"/>'
        if coords
        else ""
    )
    minutes = window / 60
    span = f"{minutes:g} min" if minutes >= 1 else f"{window:g} s"
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_W}" height="{CHART_H}" '
        f'class="jgs-chart" font-family="system-ui, sans-serif" font-size="11">'
        f'<text x="{pad_l}" y="12" fill="#344054" font-weight="600">{escape(title)}</text>'
        f'<text x="{CHART_W - pad_l}" y="12" fill="#344054" text-anchor="end">'
        f"{escape(current)}</text>"
        f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="#f8fafc" '
        'stroke="#d0d5dd"/>'
        f"{line}"
        f'<text x="{pad_l}" y="{CHART_H - 2}" fill="#667085" font-size="10">-{span}</text>'
        f'<text x="{CHART_W - pad_l}" y="{CHART_H - 2}" fill="#667085" font-size="10" '
        'text-anchor="end">now</text></svg>'
    )


def _holder_label(gpu: dict[str, Any]) -> str:
    usage = {u.get("session_id"): u for u in gpu.get("usage") or () if isinstance(u, dict)}
    parts = []
    for h in gpu.get("holders") or ():
        sid = h.get("session_id")
        name = h.get("name") or (sid[:12] if sid else "another user's session")
        text = f"{name} ({h['owner']})" if h.get("owner") else name
        used = usage.get(sid) if sid else None
        if used and used.get("memory_used") is not None:
            text += f": {_size(used['memory_used'])}"
            if used.get("utilization") is not None:
                text += f", {used['utilization']:g}%"
        parts.append(text)
    return ", ".join(parts) if parts else "free"


class GPUMonitor(LiveWidget, ipywidgets.VBox):
    """Per GPU, utilization and memory in use as live line charts over the last ``window``
    seconds (five minutes by default), each GPU labelled with the session(s) holding it.
    Fed by the events stream's GPU ticks."""

    _what = "GPUMonitor"
    _wants_gpus = True

    def __init__(self, window: float = 300, client: Client | None = None, **kwargs: Any) -> None:
        if not window or window <= 0:
            raise ValueError(f"window {window!r}: a number of seconds above 0")
        self._error = ipywidgets.HTML()
        self._drawing = ipywidgets.HTML(value="<i>loading…</i>")
        super().__init__(children=[self._error, self._drawing], **kwargs)
        self.window = float(window)
        self._gpus: dict[str, dict[str, Any]] = {}
        # uuid → (monotonic time, utilization %, memory used, memory total)
        self._samples: dict[str, deque[tuple[float, float | None, float | None, float | None]]]
        self._samples = {}
        self._start(client)

    @property
    def gpus(self) -> list[dict[str, Any]]:
        """Each GPU: uuid, index, name and its holders' label ("free" when none)."""
        return [
            {
                "uuid": uuid,
                "index": g.get("index"),
                "name": g.get("name"),
                "label": _holder_label(g),
                "holders": [dict(h) for h in g.get("holders") or ()],
            }
            for uuid, g in sorted(self._gpus.items(), key=lambda kv: kv[1].get("index", 0))
        ]

    @property
    def samples(self) -> dict[str, list[tuple[float, float | None, float | None]]]:
        """uuid → (age in seconds, utilization %, memory used in bytes), oldest first."""
        now = self._now()
        return {u: [(now - t, g, m) for t, g, m, _ in s] for u, s in self._samples.items()}

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    def _requests(self) -> list[tuple[str, dict[str, Any] | None]]:
        return [("gpus", None)]

    def _apply(self, answers: list[Any]) -> None:
        self._take((answers[0] or {}).get("gpus", []))

    def _take(self, gpus: list[dict[str, Any]]) -> None:
        now = self._now()
        current = {}
        for gpu in gpus:
            uuid = gpu.get("uuid")
            if not uuid:
                continue
            current[uuid] = gpu
            load = gpu.get("utilization") or {}
            total = load.get("memory_total") or gpu.get("memory")
            samples = self._samples.setdefault(uuid, deque())
            samples.append((now, load.get("gpu"), load.get("memory_used"), total))
            while samples and now - samples[0][0] > self.window:
                samples.popleft()
        self._gpus = current
        for gone in set(self._samples) - set(current):
            del self._samples[gone]

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") == "gpus":
            self._take(event.get("gpus") or [])
            self._render_soon()
        elif event.get("type") == "status":
            self._request_refresh()  # who holds which GPU may have changed

    def _render(self) -> None:
        if not self._gpus:
            self._drawing.value = "<i>No GPUs on this server.</i>" if self._client else ""
            return
        now = self._now()
        blocks = []
        for gpu in self.gpus:
            uuid = gpu["uuid"]
            samples = list(self._samples.get(uuid, ()))
            last = samples[-1] if samples else (now, None, None, None)
            total = last[3] or max((s[3] or 0 for s in samples), default=0) or 0
            util_now = "?" if last[1] is None else f"{last[1]:g}%"
            mem_now = f"{_size(last[2])} / {_size(total or None)}"
            util = _chart(
                [(now - t, g) for t, g, _, _ in samples],
                self.window,
                100.0,
                "#2f7ed8",
                "utilization",
                util_now,
            )
            memory = _chart(
                [(now - t, m) for t, _, m, _ in samples],
                self.window,
                float(total or 0),
                "#8e6bd8",
                "memory",
                mem_now,
            )
            title = f"GPU {gpu['index']} · {gpu['name'] or uuid}"
            blocks.append(
                f'<div class="jgs-gpu" data-uuid="{escape(uuid)}" style="margin:0 0 8px 0">'
                f'<div style="font-size:13px"><b>{escape(title)}</b> '
                f'<span style="color:#475467">— {escape(gpu["label"])}</span></div>'
                f'<div style="display:flex;gap:12px;flex-wrap:wrap">{util}{memory}</div></div>'
            )
        self._drawing.value = "".join(blocks)

    def close(self) -> None:
        self._stop()
        close_tree(self)
        super().close()


# -- SessionTable ---------------------------------------------------------------------------
_COLUMNS = (("name", "180px"), ("status", "130px"), ("resources", "200px"), ("age", "70px"))


def _resources(request: dict[str, Any] | None) -> str:
    r = request or {}
    parts = []
    if r.get("gpus"):
        parts.append(f"{r['gpus']} GPU" + ("s" if r["gpus"] != 1 else ""))
    if r.get("gpu_share"):
        parts.append(f"{r['gpu_share']:g} GPU share")
    if r.get("gpu_profile"):
        parts.append(str(r["gpu_profile"]))
    if r.get("cpus"):
        parts.append(f"{r['cpus']:g} CPU")
    if r.get("memory"):
        parts.append(_size(r["memory"]))
    return " · ".join(parts) or "default"


def _age(created: float | None, now: float) -> str:
    if not created:
        return ""
    seconds = max(0.0, now - created)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _cell(text: str, width: str, colour: str | None = None) -> str:
    style = f"width:{width};overflow:hidden;text-overflow:ellipsis;white-space:nowrap"
    if colour:
        style += f";color:{colour};font-weight:600"
    return f'<div style="{style}" title="{escape(text)}">{escape(text)}</div>'


class _Row:
    def __init__(self, table: SessionTable, session: dict[str, Any]) -> None:
        self.id = session["id"]
        self.session = session
        self.cells = {key: ipywidgets.HTML(layout={"width": w}) for key, w in _COLUMNS}
        self.button = ipywidgets.Button(
            description="Terminate",
            button_style="danger",
            tooltip=f"End session {session.get('name') or self.id}",
            layout={"width": "96px"},
        )
        self.button.on_click(lambda _b: table._terminate(self.id))
        self.problem = ipywidgets.HTML()
        self.error = ""
        self.box = ipywidgets.HBox([*self.cells.values(), self.button, self.problem])

    def values(self, now: float) -> dict[str, str]:
        s = self.session
        return {
            "name": s.get("name") or s["id"][:12],
            "status": graph.status_label(s),
            "resources": _resources(s.get("request")),
            "age": _age(s.get("created_at"), now),
        }

    def render(self, now: float) -> None:
        values = self.values(now)
        colour = graph.STATUS_COLOURS[graph.status_key(self.session)]
        for key, width in _COLUMNS:
            html = _cell(values[key], width, colour if key == "status" else None)
            if self.cells[key].value != html:
                self.cells[key].value = html
        ended = self.session.get("status") in TERMINAL
        self.button.disabled = ended or self.button.description != "Terminate"
        problem = f'<div style="{ERROR_STYLE}">⚠ {escape(self.error)}</div>' if self.error else ""
        if self.problem.value != problem:
            self.problem.value = problem

    def close(self) -> None:
        close_tree(self.box)
        self.box.close()


class SessionTable(LiveWidget, ipywidgets.VBox):
    """Your sessions (not ended yet; with ``all`` the ended ones too, newest ``limit``) as
    a live table: name, status, resources, age, and a Terminate button per row (a failure
    shows in that row, in one line)."""

    _what = "SessionTable"

    def __init__(
        self, client: Client | None = None, *, all: bool = False, limit: int = 100, **kwargs: Any
    ) -> None:
        self._error = ipywidgets.HTML()
        header = ipywidgets.HBox(
            [
                ipywidgets.HTML(f'<div style="font-weight:600">{k}</div>', layout={"width": w})
                for k, w in _COLUMNS
            ]
        )
        self._body = ipywidgets.VBox()
        self._empty = ipywidgets.HTML("<i>loading…</i>")
        super().__init__(children=[self._error, header, self._body, self._empty], **kwargs)
        self.all = all
        self.limit = limit
        self._rows: dict[str, _Row] = {}
        self._start(client)

    @property
    def rows(self) -> dict[str, dict[str, str]]:
        """Session id → the row's name, status, resources and age, in table order."""
        now = time.time()
        return {i: r.values(now) for i, r in self._rows.items()}

    @property
    def buttons(self) -> dict[str, ipywidgets.Button]:
        return {i: r.button for i, r in self._rows.items()}

    @property
    def row_errors(self) -> dict[str, str]:
        return {i: r.error for i, r in self._rows.items() if r.error}

    def _requests(self) -> list[tuple[str, dict[str, Any] | None]]:
        params: dict[str, Any] = {"limit": self.limit}
        if not self.all:
            params["status"] = ACTIVE_STATUSES
        return [("sessions", params)]

    def _apply(self, answers: list[Any]) -> None:
        sessions = (answers[0] or {}).get("sessions", [])
        rows: dict[str, _Row] = {}
        for s in sessions:
            row = self._rows.pop(s["id"], None)
            if row is None:
                row = _Row(self, s)
            else:
                row.session = s
            rows[s["id"]] = row
        for gone in self._rows.values():
            gone.close()
        self._rows = rows
        boxes = tuple(r.box for r in rows.values())
        if self._body.children != boxes:
            self._body.children = boxes

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("type") != "status":
            return
        row = self._rows.get(event.get("session_id", ""))
        if row is None:
            self._request_refresh()  # a session this table does not show yet
            return
        row.session = {
            **row.session,
            "status": event.get("status", row.session.get("status")),
            "reason": event.get("reason", row.session.get("reason")),
        }
        if row.session["status"] in TERMINAL:
            row.button.description = "Terminate"
        self._render_soon()

    def _terminate(self, session_id: str) -> None:
        row = self._rows.get(session_id)
        if row is None:
            return
        row.error = ""
        row.button.description = "Ending…"
        row.render(time.time())
        if self._loop is None:
            try:
                self._ended(session_id, self._client.end_session(session_id))
            except APIError as exc:
                self._failed(session_id, exc)
            return
        self._spawn(self._end(session_id))

    async def _end(self, session_id: str) -> None:
        try:
            answer = await fetch(self._client, "DELETE", f"sessions/{quote_ref(session_id)}")
        except APIError as exc:
            self._failed(session_id, exc)
        else:
            self._ended(session_id, answer)

    def _ended(self, session_id: str, answer: Any) -> None:
        row = self._rows.get(session_id)
        if row is None:
            return
        if isinstance(answer, dict) and answer.get("id") == session_id:
            row.session = {**row.session, **answer}
        row.button.description = "Terminate"
        self._render_soon()

    def _failed(self, session_id: str, exc: APIError) -> None:
        row = self._rows.get(session_id)
        if row is None:
            return
        row.error = one_line(exc.message)
        row.button.description = "Terminate"
        self._render_soon()

    async def _run(self) -> None:
        self._spawn(self._tick_ages())
        await super()._run()

    async def _tick_ages(self) -> None:
        while True:
            await asyncio.sleep(AGE_REFRESH)
            self._render_soon()

    def _render(self) -> None:
        now = time.time()
        for row in self._rows.values():
            row.render(now)
        if self._client is None:
            text = ""
        elif self._rows:
            text = ""
        else:
            text = "<i>No sessions.</i>"
        if self._empty.value != text:
            self._empty.value = text

    def close(self) -> None:
        self._stop()
        for row in getattr(self, "_rows", {}).values():
            row.close()
        close_tree(self)
        super().close()


__all__ = ["GPUMonitor", "SessionGraph", "SessionTable"]
