"""Session dependency graphs as SVG: a layered layout (longest path from the roots,
barycentric ordering against crossings) and a deterministic drawing, in pure Python."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

# One colour per state a session can show; FAILED is TERMINATED with a non-zero exit code.
STATUS_COLOURS: dict[str, str] = {
    "PENDING": "#9aa5b1",
    "PREPARING": "#f2c744",
    "RUNNING": "#2f7ed8",
    "RESTARTING": "#8e6bd8",
    "TERMINATING": "#f08c2e",
    "TERMINATED": "#2f9e44",
    "FAILED": "#e8590c",
    "ERROR": "#c92a2a",
    "CANCELLED": "#5c677d",
}
LEGEND_LABELS: dict[str, str] = {
    "PENDING": "pending",
    "PREPARING": "preparing",
    "RUNNING": "running",
    "RESTARTING": "restarting",
    "TERMINATING": "terminating",
    "TERMINATED": "succeeded",
    "FAILED": "failed",
    "ERROR": "error",
    "CANCELLED": "cancelled",
}
_DARK_TEXT = frozenset({"PENDING", "PREPARING"})  # light fills get dark text

NODE_W, NODE_H = 156, 40
DUMMY_H = 6  # the room a long edge takes where it passes a layer
COL_GAP, ROW_GAP = 64, 14
MARGIN = 12
LEGEND_ROW = 22
LABEL_CHARS = 22
SWEEPS = 6


def status_key(node: Mapping[str, Any]) -> str:
    """The colour key of a node: its status, with a batch session that ended TERMINATED
    with a non-zero exit code as FAILED (an interactive kernel's exit code is only how its
    container was stopped)."""
    status = str(node.get("status") or "PENDING").upper()
    if (
        status == "TERMINATED"
        and node.get("kind") != "interactive"
        and exit_code_of(node) not in (None, 0)
    ):
        return "FAILED"
    return status if status in STATUS_COLOURS else "PENDING"


def exit_code_of(node: Mapping[str, Any]) -> int | None:
    code = node.get("exit_code")
    if isinstance(code, int):
        return code
    reason = str(node.get("reason") or "")
    prefix = "command exited with code "
    if reason.startswith(prefix):
        try:
            return int(reason[len(prefix) :].split()[0].rstrip(".,;:"))
        except (ValueError, IndexError):
            return None
    return None


def status_label(node: Mapping[str, Any]) -> str:
    key = status_key(node)
    if key == "FAILED":
        return f"FAILED (exit {exit_code_of(node)})"
    return key


@dataclass
class Layout:
    """Where everything goes: node id → (x, y) of its box's top-left corner, each edge's
    points (through the layers it crosses), and the drawing's size."""

    positions: dict[str, tuple[float, float]]
    layers: list[list[str]]  # real nodes only, in drawing order
    routes: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)
    width: float = 0.0
    height: float = 0.0
    crossings: int = 0


def _edge_pairs(
    nodes: Sequence[Mapping[str, Any]], edges: Iterable[Any]
) -> tuple[list[str], list[tuple[str, str]]]:
    ids = list(dict.fromkeys(str(n["id"]) for n in nodes))
    known = set(ids)
    pairs: dict[tuple[str, str], None] = {}
    for edge in edges:
        if isinstance(edge, Mapping):
            a, b = str(edge["from"]), str(edge["to"])
        else:
            a, b = (str(x) for x in edge)
        if a in known and b in known and a != b:
            pairs[(a, b)] = None
    return ids, sorted(pairs)  # input order must not change the drawing


def _layers_by_longest_path(
    ids: list[str], pairs: list[tuple[str, str]], sort_key: dict[str, tuple]
) -> dict[str, int]:
    """Layer of each node: 0 for a root, else one more than its deepest dependency (Kahn's
    order; nodes caught in a cycle, which the API refuses anyway, go one layer further)."""
    preds: dict[str, list[str]] = {i: [] for i in ids}
    succs: dict[str, list[str]] = {i: [] for i in ids}
    for a, b in pairs:
        preds[b].append(a)
        succs[a].append(b)
    indegree = {i: len(preds[i]) for i in ids}
    ready = sorted((i for i in ids if indegree[i] == 0), key=sort_key.__getitem__)
    layer: dict[str, int] = {}
    head = 0
    while head < len(ready):
        current = ready[head]
        head += 1
        layer[current] = max((layer[p] + 1 for p in preds[current]), default=0)
        for nxt in succs[current]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    if len(layer) < len(ids):
        depth = max(layer.values(), default=-1) + 1
        for i in sorted((i for i in ids if i not in layer), key=sort_key.__getitem__):
            layer[i] = depth
    return layer


def _count_crossings(
    upper: dict[str, int], lower: dict[str, int], segments: list[tuple[str, str]]
) -> int:
    """Crossings between two adjacent layers: inversions of the lower ends once the
    segments are sorted by their upper ends (a Fenwick tree, O(E log V))."""
    if len(segments) < 2:
        return 0
    order = sorted((upper[a], lower[b]) for a, b in segments)
    size = len(lower) + 1
    tree = [0] * (size + 1)
    crossings = 0
    seen = 0
    for _, pos in order:
        # how many already seen have a lower end after pos
        i, below = pos + 1, 0
        while i > 0:
            below += tree[i]
            i -= i & -i
        crossings += seen - below
        seen += 1
        i = pos + 1
        while i <= size:
            tree[i] += 1
            i += i & -i
    return crossings


def layout(nodes: Sequence[Mapping[str, Any]], edges: Iterable[Any] = ()) -> Layout:
    """Lay ``nodes`` (dicts with ``id`` and ``name``) out left to right, dependencies
    before dependents; ``edges`` are ``{"from", "to"}`` dicts or pairs, dependency →
    dependent. The same input always gives the same layout."""
    ids, pairs = _edge_pairs(nodes, edges)
    by_id = {str(n["id"]): n for n in nodes}
    sort_key = {i: (str(by_id[i].get("name") or ""), i) for i in ids}
    layer_of = _layers_by_longest_path(ids, pairs, sort_key)
    depth = max(layer_of.values(), default=-1) + 1

    # Long edges pass through one dummy per layer they cross, so ordering sees them.
    layers: list[list[str]] = [[] for _ in range(depth)]
    for i in sorted(ids, key=sort_key.__getitem__):
        layers[layer_of[i]].append(i)
    dummy_layer: dict[str, int] = {}
    chains: dict[tuple[str, str], list[str]] = {}
    segments: list[tuple[str, str]] = []  # between adjacent layers only
    for a, b in pairs:
        la, lb = layer_of[a], layer_of[b]
        chain = [a]
        for level in range(la + 1, lb):
            dummy = f"\0{a}\0{b}\0{level}"
            dummy_layer[dummy] = level
            layers[level].append(dummy)
            chain.append(dummy)
        chain.append(b)
        chains[(a, b)] = chain
        if lb > la:  # not so in a cycle: such an edge is drawn but does not steer the order
            segments.extend(zip(chain, chain[1:], strict=False))
    down: dict[str, list[str]] = {}
    up: dict[str, list[str]] = {}
    for a, b in segments:
        down.setdefault(a, []).append(b)
        up.setdefault(b, []).append(a)
    seg_by_layer: list[list[tuple[str, str]]] = [[] for _ in range(max(depth - 1, 0))]
    for a, b in segments:
        level = layer_of.get(a, dummy_layer.get(a, 0))
        seg_by_layer[level].append((a, b))

    def positions_of(order: list[list[str]]) -> list[dict[str, int]]:
        return [{v: k for k, v in enumerate(layer)} for layer in order]

    def total_crossings(order: list[list[str]]) -> int:
        pos = positions_of(order)
        return sum(
            _count_crossings(pos[level], pos[level + 1], seg_by_layer[level])
            for level in range(len(order) - 1)
        )

    def reorder(order: list[list[str]], level: int, neighbours: dict[str, list[str]], ref: int):
        pos = {v: k for k, v in enumerate(order[ref])}
        current = order[level]
        keyed = []
        for k, v in enumerate(current):
            linked = neighbours.get(v)
            # Nodes with nothing to pull them keep their place.
            bary = sum(pos[u] for u in linked) / len(linked) if linked else float(k)
            keyed.append((bary, k, v))
        keyed.sort()
        order[level] = [v for _, _, v in keyed]

    best = [list(layer) for layer in layers]
    best_crossings = total_crossings(best)
    order = [list(layer) for layer in layers]
    stale = 0
    for _ in range(SWEEPS if best_crossings else 0):
        for level in range(1, depth):
            reorder(order, level, up, level - 1)
        for level in range(depth - 2, -1, -1):
            reorder(order, level, down, level + 1)
        crossings = total_crossings(order)
        if crossings < best_crossings:
            best, best_crossings, stale = [list(layer) for layer in order], crossings, 0
            if not crossings:
                break
        else:
            stale += 1
            if stale == 2:  # barycentres settle in a few sweeps; more rarely pay
                break

    # Coordinates: columns left to right, each column centred vertically.
    heights = []
    for layer in best:
        h = sum(DUMMY_H if v in dummy_layer else NODE_H for v in layer)
        heights.append(h + ROW_GAP * max(len(layer) - 1, 0))
    tallest = max(heights, default=0)
    point: dict[str, tuple[float, float]] = {}
    for level, layer in enumerate(best):
        x = MARGIN + level * (NODE_W + COL_GAP)
        y = MARGIN + (tallest - heights[level]) // 2  # whole pixels: short, exact output
        for v in layer:
            h = DUMMY_H if v in dummy_layer else NODE_H
            point[v] = (x, y)
            y += h + ROW_GAP
    routes: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for (a, b), chain in chains.items():
        ax, ay = point[a]
        pts = [(ax + NODE_W, ay + NODE_H // 2)]
        for dummy in chain[1:-1]:
            dx, dy = point[dummy]
            pts.append((dx, dy + DUMMY_H // 2))
            pts.append((dx + NODE_W, dy + DUMMY_H // 2))
        bx, by = point[b]
        pts.append((bx, by + NODE_H // 2))
        routes[(a, b)] = pts
    return Layout(
        positions={i: point[i] for i in ids},
        layers=[[v for v in layer if v not in dummy_layer] for layer in best],
        routes=routes,
        width=2 * MARGIN + max(depth, 1) * NODE_W + max(depth - 1, 0) * COL_GAP,
        height=2 * MARGIN + max(tallest, NODE_H),
        crossings=best_crossings,
    )


def _fmt(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:.1f}".rstrip("0").rstrip(".")


def _short(text: str, limit: int = LABEL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _edge_path(points: list[tuple[float, float]]) -> str:
    (x0, y0), rest = points[0], points[1:]
    parts = [f"M{_fmt(x0)},{_fmt(y0)}"]
    px, py = x0, y0
    for x, y in rest:
        if y == py:
            parts.append(f"L{_fmt(x)},{_fmt(y)}")
        else:
            mid = (px + x) // 2
            parts.append(f"C{_fmt(mid)},{_fmt(py)} {_fmt(mid)},{_fmt(y)} {_fmt(x)},{_fmt(y)}")
        px, py = x, y
    return " ".join(parts)


def _legend(width: float) -> tuple[list[str], float]:
    item_w = 104
    per_row = max(1, int((width - 2 * MARGIN) // item_w))
    parts = []
    for k, key in enumerate(STATUS_COLOURS):
        row, col = divmod(k, per_row)
        x, y = MARGIN + col * item_w, MARGIN + row * LEGEND_ROW
        parts.append(
            f'<g class="legend-item" data-status="{key}">'
            f'<rect x="{_fmt(x)}" y="{_fmt(y)}" width="12" height="12" rx="3" '
            f'fill="{STATUS_COLOURS[key]}"/>'
            f'<text x="{_fmt(x + 17)}" y="{_fmt(y + 10.5)}">{LEGEND_LABELS[key]}</text></g>'
        )
    rows = (len(STATUS_COLOURS) + per_row - 1) // per_row
    return parts, rows * LEGEND_ROW + MARGIN


def render_svg(
    nodes: Sequence[Mapping[str, Any]],
    edges: Iterable[Any] = (),
    *,
    highlight: str | None = None,
    empty: str = "No sessions to show.",
) -> str:
    """The graph as one ``<svg>`` element: a legend of the status colours, then each
    session a rounded box (name and status, coloured by status; ``highlight`` drawn with
    a thicker border) and each dependency an arrow towards its dependent."""
    plan = layout(nodes, edges)
    width = max(plan.width, 5 * 104 + 2 * MARGIN)
    legend, legend_h = _legend(width)
    height = legend_h + (plan.height if nodes else NODE_H + 2 * MARGIN)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="jgs-session-graph" '
        f'width="{_fmt(width)}" height="{_fmt(height)}" '
        f'viewBox="0 0 {_fmt(width)} {_fmt(height)}" '
        'font-family="system-ui, -apple-system, Segoe UI, sans-serif" font-size="12">',
        "<defs>"
        '<marker id="jgs-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
        'markerHeight="8" orient="auto-start-reverse">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#667085"/></marker></defs>',
        '<g class="legend" fill="#344054">',
        *legend,
        "</g>",
        f'<g transform="translate(0,{_fmt(legend_h)})">',
    ]
    if not nodes:
        out.append(
            f'<text x="{MARGIN}" y="{_fmt(MARGIN + NODE_H / 2)}" fill="#667085">'
            f"{escape(empty)}</text>"
        )
    out.append('<g class="edges" fill="none" stroke="#667085" stroke-width="1.4">')
    for (a, b), points in plan.routes.items():
        out.append(
            f'<path class="edge" data-from="{escape(a)}" data-to="{escape(b)}" '
            f'd="{_edge_path(points)}" marker-end="url(#jgs-arrow)"/>'
        )
    out.append("</g>")
    out.append('<g class="nodes">')
    by_id = {str(n["id"]): n for n in nodes}
    for layer in plan.layers:
        for node_id in layer:
            node = by_id[node_id]
            key = status_key(node)
            x, y = plan.positions[node_id]
            name = str(node.get("name") or "") or node_id[:12]
            label = status_label(node)
            text = "#1d2939" if key in _DARK_TEXT else "#ffffff"
            stroke = "#101828" if node_id == highlight else "none"
            tip = f"{name} ({node_id}): {label}"
            if node.get("reason"):
                tip += f" - {node['reason']}"
            out.append(
                f'<g class="node" data-id="{escape(node_id)}" data-status="{key}">'
                f"<title>{escape(tip)}</title>"
                f'<rect x="{_fmt(x)}" y="{_fmt(y)}" width="{NODE_W}" height="{NODE_H}" rx="8" '
                f'fill="{STATUS_COLOURS[key]}" stroke="{stroke}" stroke-width="2.5"/>'
                f'<text x="{_fmt(x + 10)}" y="{_fmt(y + 16)}" fill="{text}" '
                f'font-weight="600">{escape(_short(name))}</text>'
                f'<text x="{_fmt(x + 10)}" y="{_fmt(y + 31)}" fill="{text}" '
                f'font-size="10.5">{escape(label)}</text></g>'
            )
    out.append("</g></g></svg>")
    return "".join(out)
