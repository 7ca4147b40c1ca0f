"""What the ``%session``/``%vfolder`` magics and the CLI show: objects with ``_repr_html_``
(escaped HTML tables, for JupyterLab) and ``__repr__`` (aligned text, for a console)."""

from __future__ import annotations

import html
import shlex
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(value: Any) -> str:
    """Bytes for people: ``1.5GiB``; ``-`` when unknown."""
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        return value
    number = float(value)
    for unit in _UNITS:
        if abs(number) < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{int(number)}B"
            return f"{number:.1f}".rstrip("0").rstrip(".") + unit
        number /= 1024
    return f"{value}B"  # pragma: no cover


def when(ts: Any) -> str:
    """An epoch timestamp as local ``YYYY-MM-DD HH:MM:SS``; ``-`` when unset."""
    if ts is None or ts == "":
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))
    except (TypeError, ValueError, OverflowError, OSError):
        return str(ts)


def duration(seconds: Any) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length and seconds % length == 0:
            return f"{int(seconds // length)}{unit}"
    return f"{seconds:g}s"


def number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value) or "-"
    return str(value)


class Output(ABC):
    """Something a magic shows and the CLI prints."""

    @abstractmethod
    def text(self) -> str:
        """Aligned text, for a console and the terminal."""

    @abstractmethod
    def html(self) -> str:
        """An escaped HTML fragment, for rich frontends."""

    def __repr__(self) -> str:
        return self.text()

    def __str__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        return self.html()


class Text(Output):
    """Plain lines (help, a message, a tree): ``<pre>`` in HTML."""

    def __init__(self, text: str) -> None:
        self.value = text.rstrip("\n")

    def text(self) -> str:
        return self.value

    def html(self) -> str:
        return f'<pre class="jgs-text">{html.escape(self.value)}</pre>'


class Table(Output):
    """Rows under column headers, with an optional title above and note below."""

    def __init__(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        *,
        title: str = "",
        note: str = "",
        empty: str = "(none)",
    ) -> None:
        self.columns = list(columns)
        self.rows = [[cell(v) for v in row] for row in rows]
        self.title = title
        self.note = note
        self.empty = empty

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[str]:
        index = self.columns.index(name)
        return [row[index] for row in self.rows]

    def text(self) -> str:
        lines = [self.title] if self.title else []
        if not self.rows:
            lines.append(self.empty)
        else:
            widths = [len(c) for c in self.columns]
            for row in self.rows:
                for i, value in enumerate(row):
                    widths[i] = max(widths[i], len(value))
            for row in [self.columns, *self.rows]:
                lines.append(
                    "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
                )
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def html(self) -> str:
        parts = []
        if self.title:
            parts.append(f"<p><b>{html.escape(self.title)}</b></p>")
        if not self.rows:
            parts.append(f"<p><i>{html.escape(self.empty)}</i></p>")
        else:
            head = "".join(
                f'<th style="text-align:left">{html.escape(c)}</th>' for c in self.columns
            )
            body = "".join(
                "<tr>"
                + "".join(f'<td style="text-align:left">{html.escape(v)}</td>' for v in row)
                + "</tr>"
                for row in self.rows
            )
            parts.append(
                f'<table class="jgs-table"><thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>"
            )
        if self.note:
            parts.append(f"<p>{html.escape(self.note)}</p>")
        return "".join(parts)


class Fields(Table):
    """``name: value`` pairs: two aligned columns in text, a two-column table in HTML."""

    def __init__(
        self, pairs: Iterable[tuple[str, Any]], *, title: str = "", note: str = ""
    ) -> None:
        super().__init__(("", ""), pairs, title=title, note=note)

    def text(self) -> str:
        lines = [self.title] if self.title else []
        width = max((len(k) for k, _ in self.rows), default=0) + 1
        lines.extend(f"{(k + ':').ljust(width)}  {v}".rstrip() for k, v in self.rows)
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def html(self) -> str:
        parts = [f"<p><b>{html.escape(self.title)}</b></p>"] if self.title else []
        body = "".join(
            f'<tr><th style="text-align:left">{html.escape(k)}</th>'
            f'<td style="text-align:left">{html.escape(v)}</td></tr>'
            for k, v in self.rows
        )
        parts.append(f'<table class="jgs-fields"><tbody>{body}</tbody></table>')
        if self.note:
            parts.append(f"<p>{html.escape(self.note)}</p>")
        return "".join(parts)


class Group(Output):
    """Several outputs, one after another (blank line between them in text)."""

    def __init__(self, parts: Iterable[Output]) -> None:
        self.parts = [p for p in parts if p is not None]

    def text(self) -> str:
        return "\n\n".join(p.text() for p in self.parts)

    def html(self) -> str:
        return "".join(f"<div>{p.html()}</div>" for p in self.parts)


class Outcome(Text):
    """The end of ``session run``: a line, and the exit status the CLI exits with."""

    def __init__(self, text: str, exit_status: int) -> None:
        super().__init__(text)
        self.exit_status = exit_status


# -- what the commands show, from the API's JSON ---------------------------------------
TERMINAL = frozenset({"TERMINATED", "CANCELLED", "ERROR"})


def short_id(session_id: Any) -> str:
    return str(session_id or "")[:12]


def _resources(request: Mapping[str, Any] | None) -> str:
    r = request or {}
    parts = []
    if r.get("gpu_profile"):
        parts.append(str(r["gpu_profile"]))
    elif r.get("gpu_share"):
        parts.append(f"{number(r['gpu_share'])} GPU")
    else:
        gpus = r.get("gpus") or 0
        parts.append(f"{gpus} GPU" + ("s" if gpus != 1 else ""))
    if r.get("cpus") is not None:
        parts.append(f"{number(r['cpus'])} CPU")
    if r.get("memory") is not None:
        parts.append(size(r["memory"]))
    return ", ".join(parts)


def _gpus_of(request: Mapping[str, Any] | None) -> str:
    r = request or {}
    if r.get("gpu_profile"):
        return str(r["gpu_profile"])
    if r.get("gpu_share"):
        return number(r["gpu_share"])
    return number(r.get("gpus") or 0)


def _note(session: Mapping[str, Any]) -> str:
    status = session.get("status")
    if status == "PENDING":
        return session.get("queue_message") or session.get("reason") or ""
    if (
        status in TERMINAL
        and session.get("kind") == "batch"
        and session.get("exit_code") is not None
    ):
        note = f"exit code {session['exit_code']}"
        if session.get("reason"):
            note += f": {session['reason']}"
        return note
    return session.get("reason") or ""


def sessions_table(sessions: list[Mapping[str, Any]], *, title: str = "") -> Table:
    owners = {s.get("owner") for s in sessions}
    show_owner = len(owners) > 1
    columns = ["NAME", "ID", "KIND", "STATUS", "GPUS", "CREATED", "NOTE"]
    if show_owner:
        columns.insert(2, "OWNER")
    rows = []
    for s in sessions:
        row = [
            s.get("name") or "-",
            short_id(s.get("id")),
            s.get("kind") or "interactive",
            s.get("status"),
            _gpus_of(s.get("request")),
            when(s.get("created_at")),
            _note(s),
        ]
        if show_owner:
            row.insert(2, s.get("owner"))
        rows.append(row)
    return Table(columns, rows, title=title, empty="No sessions.")


def session_info(
    session: Mapping[str, Any] | None,
    info: Mapping[str, Any] | None,
    *,
    note: str = "",
    dependency_names: Mapping[str, str] | None = None,
) -> Output:
    """A session as ``info`` shows it, from the API's JSON and/or the kernel's info file."""
    s: Mapping[str, Any] = session or {}
    i: Mapping[str, Any] = info or {}
    pairs: list[tuple[str, Any]] = [
        ("name", s.get("name") or i.get("name") or "-"),
        ("id", s.get("id") or i.get("id")),
        ("owner", s.get("owner") or i.get("owner")),
        ("kind", s.get("kind") or i.get("kind") or "interactive"),
    ]
    if session is not None:
        status = s.get("status")
        if s.get("reason"):
            status = f"{status} ({s['reason']})"
        pairs.append(("status", status))
    pairs += [
        ("image", s.get("image") or i.get("image")),
        ("runtime", s.get("runtime") or i.get("runtime")),
        ("resources", _resources(s.get("request") or i.get("request"))),
    ]
    if s.get("command"):
        command = s["command"]
        pairs.append(("command", command if isinstance(command, str) else shlex.join(command)))
    if s.get("depends_on"):
        names = dependency_names or {}
        pairs.append(
            (
                "depends on",
                ", ".join(
                    f"{names[d]} ({short_id(d)})" if names.get(d) else short_id(d)
                    for d in s["depends_on"]
                ),
            )
        )
    pairs.append(("created", when(s.get("created_at") or i.get("created_at"))))
    if s.get("started_at"):
        pairs.append(("started", when(s["started_at"])))
    if s.get("ended_at"):
        pairs.append(("ended", when(s["ended_at"])))
    if s.get("exit_code") is not None:
        pairs.append(("exit code", s["exit_code"]))
    usage = s.get("gpu_usage") or None
    if usage and usage.get("memory_used") is not None:
        pairs.append(("GPU memory used", size(usage["memory_used"])))
    parts: list[Output] = [Fields(pairs, title="Session", note=note)]

    if s.get("status") == "PENDING":
        scheduler = s.get("scheduler") or {}
        position = scheduler.get("position")
        queue = [
            ("position", f"#{position}" if position else "unknown (next scheduling pass)"),
            ("waiting for", s.get("queue_message") or "-"),
        ]
        for failure in scheduler.get("failed") or ():
            queue.append((f"held by {failure.get('check', 'limit')}", failure.get("message", "")))
        parts.append(Fields(queue, title="Queue"))

    parts.append(_gpu_table(s, i))
    limits = i.get("limits")
    if limits:
        parts.append(Fields([(k, _limit(k, v)) for k, v in limits.items()], title="Limits"))
    elif limits is not None:
        parts.append(Table([], [], title="Limits", empty="No limits apply."))
    mounts = i.get("mounts")
    if mounts is not None:
        parts.append(
            Table(
                ["NAME", "PATH", "MODE"],
                [
                    [m.get("name"), m.get("path"), "ro" if m.get("read_only") else "rw"]
                    for m in mounts
                ],
                title="Mounts",
                empty="No vfolders mounted.",
            )
        )
    history = s.get("history")
    if history:
        parts.append(
            Table(
                ["STATUS", "AT", "REASON"],
                [[h.get("status"), when(h.get("at")), h.get("reason") or ""] for h in history],
                title="History",
            )
        )
    return Group(parts)


def _gpu_table(s: Mapping[str, Any], i: Mapping[str, Any]) -> Table:
    usage = s.get("gpu_usage") or {}
    devices = {}
    for d in i.get("devices") or ():
        devices[d.get("uuid")] = {
            "index": d.get("index"),
            "name": d.get("name"),
            "uuid": d.get("uuid"),
            "memory_total": d.get("memory_total"),
        }
    for a in s.get("allocations") or ():
        devices.setdefault(a.get("device_uuid"), {"uuid": a.get("device_uuid")})
    for d in usage.get("devices") or ():
        devices.setdefault(d.get("uuid"), {}).update({k: v for k, v in d.items() if v is not None})
    rows = []
    for d in devices.values():
        util = d.get("utilization")
        rows.append(
            [
                number(d.get("index")),
                d.get("name") or "-",
                d.get("uuid"),
                size(d.get("memory_used")),
                size(d.get("memory_total")),
                "-" if util is None else f"{number(util)}%",
            ]
        )
    return Table(
        ["#", "NAME", "UUID", "USED", "MEMORY", "UTIL"], rows, title="GPUs", empty="No GPUs."
    )


_SIZE_LIMITS = {"max_memory", "max_vfolder_size", "max_vfolder_total_size"}


_TIME_LIMITS = {"max_session_lifetime", "idle_timeout"}


def _gpu_idle(policy: Mapping[str, Any]) -> str:
    """``under 5% for 30m``: when a kernel holding GPUs is warned, then ended."""
    threshold, window = policy.get("gpu_idle_threshold"), policy.get("gpu_idle_window")
    if threshold is None or window is None:
        return "none"
    return f"under {number(threshold)}% for {duration(window)}"


def _limit(name: str, value: Any) -> str:
    if value is None:
        return "unlimited"
    if name in _SIZE_LIMITS:
        return size(value)
    if name in _TIME_LIMITS:
        return duration(value)
    return number(value)


def graph_of_sessions(sessions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The graph of the sessions that have dependencies or dependents."""
    by_id = {s["id"]: s for s in sessions}
    edges = [{"from": d, "to": s["id"]} for s in by_id.values() for d in s.get("depends_on") or ()]
    linked = {e["from"] for e in edges} | {e["to"] for e in edges}
    nodes = [
        {
            "id": sid,
            "name": s.get("name", ""),
            "status": s.get("status"),
            "kind": s.get("kind"),
            "created_at": s.get("created_at"),
        }
        for sid, s in by_id.items()
        if sid in linked
    ]
    ids = {n["id"] for n in nodes}
    return {"nodes": nodes, "edges": [e for e in edges if e["from"] in ids and e["to"] in ids]}


def _label(node: Mapping[str, Any]) -> str:
    name = node.get("name") or "(another user's)"
    return f"{name} ({short_id(node.get('id'))}) {node.get('status')}"


def _order_key(node: Mapping[str, Any]) -> tuple:
    return (node.get("created_at") or 0, node.get("name") or "", node.get("id"))


def graph_tree(graph: Mapping[str, Any]) -> Text:
    """Every path: roots (no dependency) first, each dependent under every parent."""
    nodes = {n["id"]: n for n in graph.get("nodes", [])}
    children: dict[str, list[str]] = {i: [] for i in nodes}
    parents: dict[str, list[str]] = {i: [] for i in nodes}
    for e in graph.get("edges", []):
        if e["from"] in nodes and e["to"] in nodes:
            children[e["from"]].append(e["to"])
            parents[e["to"]].append(e["from"])
    for kids in children.values():
        kids.sort(key=lambda i: _order_key(nodes[i]))
    roots = sorted((i for i in nodes if not parents[i]), key=lambda i: _order_key(nodes[i]))
    if not roots and nodes:  # only a cycle: start anywhere
        roots = [min(nodes, key=lambda i: _order_key(nodes[i]))]
    lines: list[str] = []

    def walk(node_id: str, prefix: str, last: bool, path: frozenset[str], top: bool) -> None:
        if top:
            lines.append(_label(nodes[node_id]))
            child_prefix = ""
        else:
            lines.append(prefix + ("└── " if last else "├── ") + _label(nodes[node_id]))
            child_prefix = prefix + ("    " if last else "│   ")
        if node_id in path:
            return
        kids = children[node_id]
        for k, child in enumerate(kids):
            walk(child, child_prefix, k == len(kids) - 1, path | {node_id}, False)

    for root in roots:
        walk(root, "", True, frozenset(), True)
    return Text("\n".join(lines) or "No sessions with dependencies.")


def topological(graph: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Every node once, each after all it depends on; ties: oldest, then by name."""
    nodes = {n["id"]: n for n in graph.get("nodes", [])}
    indegree = dict.fromkeys(nodes, 0)
    children: dict[str, list[str]] = {i: [] for i in nodes}
    for e in graph.get("edges", []):
        if e["from"] in nodes and e["to"] in nodes and e["to"] not in children[e["from"]]:
            children[e["from"]].append(e["to"])
            indegree[e["to"]] += 1
    ready = sorted((i for i, d in indegree.items() if d == 0), key=lambda i: _order_key(nodes[i]))
    order: list[str] = []
    while ready:
        current = ready.pop(0)
        order.append(current)
        for child in children[current]:
            indegree[child] -= 1
            if indegree[child] == 0:
                ready.append(child)
        ready.sort(key=lambda i: _order_key(nodes[i]))
    order += [i for i in nodes if i not in order]  # a cycle (the server refuses them)
    return [nodes[i] for i in order]


def graph_table(graph: Mapping[str, Any]) -> Table:
    nodes = {n["id"]: n for n in graph.get("nodes", [])}
    parents: dict[str, list[str]] = {i: [] for i in nodes}
    for e in graph.get("edges", []):
        if e["from"] in nodes and e["to"] in parents:
            parents[e["to"]].append(e["from"])
    rows = []
    for k, node in enumerate(topological(graph), 1):
        deps = [nodes[p].get("name") or short_id(p) for p in parents[node["id"]]]
        rows.append(
            [k, node.get("name") or "-", short_id(node["id"]), node.get("status"), ", ".join(deps)]
        )
    return Table(
        ["#", "NAME", "ID", "STATUS", "DEPENDS ON"], rows, empty="No sessions with dependencies."
    )


def gpus_table(answer: Mapping[str, Any]) -> Table:
    rows = []
    for g in answer.get("gpus", []):
        util = g.get("utilization") or {}
        busy = util.get("gpu") if isinstance(util, dict) else util
        used = util.get("memory_used") if isinstance(util, dict) else None
        usage = {u.get("session_id"): u for u in g.get("usage") or ()}
        held = []
        for h in g.get("holders", []):
            label = h.get("name") or short_id(h.get("session_id"))
            if h.get("owner"):
                label += f" ({h['owner']})"
            u = usage.get(h.get("session_id")) if h.get("session_id") else None
            if u and u.get("memory_used") is not None:
                label += f": {size(u['memory_used'])}"
            held.append(label)
        named = {h.get("session_id") for h in g.get("holders", [])}
        for sid, u in usage.items():
            if sid not in named:
                label = u.get("name") or short_id(sid) or "other"
                held.append(f"{label}: {size(u.get('memory_used'))}")
        rows.append(
            [
                g.get("index"),
                g.get("name"),
                short_id(g.get("uuid")) + "…" if len(g.get("uuid") or "") > 12 else g.get("uuid"),
                size(g.get("memory")),
                size(used),
                "-" if busy is None else f"{number(busy)}%",
                ", ".join(held) or ("MIG" if g.get("mig_mode") else "free"),
            ]
        )
    return Table(["#", "NAME", "UUID", "MEMORY", "USED", "UTIL", "HELD BY"], rows, empty="No GPUs.")


def quota_table(answer: Mapping[str, Any]) -> Output:
    policy = answer.get("policy") or {}
    used = answer.get("usage") or {}
    rows = [
        (
            "sessions",
            number(used.get("sessions")),
            _limit("", policy.get("max_concurrent_sessions")),
        ),
        (
            "queued sessions",
            number(used.get("pending_sessions")),
            _limit("", policy.get("max_pending_sessions")),
        ),
        ("GPUs", number(used.get("gpus")), _limit("", policy.get("max_gpus"))),
        ("CPUs", number(used.get("cpus")), _limit("", policy.get("max_cpus"))),
        ("memory", size(used.get("memory")), _limit("max_memory", policy.get("max_memory"))),
        (
            "vfolders",
            number(used.get("vfolder_count")),
            _limit("", policy.get("max_vfolder_count")),
        ),
        (
            "vfolder storage",
            size(used.get("vfolder_bytes")),
            _limit("max_vfolder_total_size", policy.get("max_vfolder_total_size")),
        ),
        ("one vfolder", "", _limit("max_vfolder_size", policy.get("max_vfolder_size"))),
        (
            "session lifetime",
            "",
            _limit("max_session_lifetime", policy.get("max_session_lifetime")),
        ),
        ("idle timeout", "", _limit("idle_timeout", policy.get("idle_timeout"))),
        ("GPU idle reclaim", "", _gpu_idle(policy)),
    ]
    who = answer.get("user", "?")
    groups = ", ".join(answer.get("groups") or ()) or "none"
    title = f"{who} (groups: {groups}{'; admin' if answer.get('admin') else ''})"
    return Table(["", "USED", "LIMIT"], rows, title=title)


def vfolders_table(items: list[Mapping[str, Any]], *, trash: bool = False) -> Table:
    rows = [
        [
            v.get("name"),
            v.get("type"),
            v.get("group") if v.get("type") == "project" else v.get("owner"),
            v.get("permission"),
            v.get("relation"),
            size(v.get("usage")),
            size(v.get("quota")) if v.get("quota") is not None else "none",
            when(v.get("trashed_at")) if trash else v.get("status"),
        ]
        for v in items
    ]
    return Table(
        [
            "NAME",
            "TYPE",
            "OWNER",
            "PERM",
            "RELATION",
            "USED",
            "QUOTA",
            "TRASHED" if trash else "STATUS",
        ],
        rows,
        empty="The trash is empty." if trash else "No vfolders.",
    )


def vfolder_fields(v: Mapping[str, Any], *, title: str = "") -> Fields:
    pairs = [
        ("name", v.get("name")),
        ("id", v.get("id")),
        ("type", v.get("type")),
        ("owner", v.get("owner")),
    ]
    if v.get("group"):
        pairs.append(("group", v.get("group")))
    pairs += [
        ("my permission", v.get("permission")),
        ("relation", v.get("relation")),
        ("backend", v.get("backend")),
        ("quota", size(v.get("quota")) if v.get("quota") is not None else "none"),
    ]
    if "usage" in v:
        pairs.append(("used", size(v.get("usage"))))
    pairs += [
        ("cloneable", v.get("cloneable")),
        ("status", v.get("status")),
        ("created", when(v.get("created_at"))),
    ]
    return Fields(pairs, title=title)
