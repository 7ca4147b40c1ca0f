"""The notebook widgets: the SVG graph drawing (pure), and SessionGraph, GPUMonitor and
SessionTable live against a real in-process server, its events websocket and its store."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import threading
import uuid
import xml.etree.ElementTree as ET

import pytest
from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_unix_socket

from jupyter_gpu_sessions.core.models import ResourceRequest, Session
from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.kernel import Client
from jupyter_gpu_sessions.kernel import events as kernel_events
from jupyter_gpu_sessions.kernel.graph import STATUS_COLOURS, layout, render_svg, status_key
from jupyter_gpu_sessions.manager import GPUSessionManager, current_process
from jupyter_gpu_sessions.widgets import GPUMonitor, SessionGraph, SessionTable

from .api_support import TOKENS, server_fixtures, stored_session
from .support import until

SVG = "{http://www.w3.org/2000/svg}"

jp_server_config, _ = server_fixtures()


# -- the drawing, pure ----------------------------------------------------------------------
def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # also proves the drawing is well-formed XML


def boxes(svg: str) -> dict[str, dict[str, str]]:
    """Node id → its status key, fill colour and the two lines of text."""
    found = {}
    for g in parse(svg).iter(f"{SVG}g"):
        if g.get("class") == "node":
            rect = g.find(f"{SVG}rect")
            texts = [t.text for t in g.findall(f"{SVG}text")]
            found[g.get("data-id")] = {
                "status": g.get("data-status"),
                "fill": rect.get("fill"),
                "x": float(rect.get("x")),
                "y": float(rect.get("y")),
                "name": texts[0],
                "label": texts[1],
            }
    return found


def arrows(svg: str) -> list[tuple[str, str]]:
    return [
        (p.get("data-from"), p.get("data-to"))
        for p in parse(svg).iter(f"{SVG}path")
        if p.get("class") == "edge" and p.get("marker-end") == "url(#jgs-arrow)"
    ]


ALL_STATES = [
    ("pending", "PENDING", None, "PENDING"),
    ("preparing", "PREPARING", None, "PREPARING"),
    ("running", "RUNNING", None, "RUNNING"),
    ("restarting", "RESTARTING", None, "RESTARTING"),
    ("terminating", "TERMINATING", None, "TERMINATING"),
    ("succeeded", "TERMINATED", 0, "TERMINATED"),
    ("failed", "TERMINATED", 3, "FAILED"),
    ("error", "ERROR", None, "ERROR"),
    ("cancelled", "CANCELLED", None, "CANCELLED"),
]


def test_one_box_per_session_in_the_colour_of_its_status_with_a_legend():
    nodes = [
        {"id": f"id-{name}", "name": name, "status": status, "exit_code": code, "kind": "batch"}
        for name, status, code, _ in ALL_STATES
    ]
    svg = render_svg(nodes, [])
    drawn = boxes(svg)
    assert set(drawn) == {n["id"] for n in nodes}
    for name, _, _, key in ALL_STATES:
        assert drawn[f"id-{name}"]["status"] == key
        assert drawn[f"id-{name}"]["fill"] == STATUS_COLOURS[key]
        assert drawn[f"id-{name}"]["name"] == name
    assert drawn["id-failed"]["label"] == "FAILED (exit 3)"
    assert len(set(STATUS_COLOURS.values())) == len(STATUS_COLOURS) == 9  # one colour each
    legend = [g for g in parse(svg).iter(f"{SVG}g") if g.get("class") == "legend-item"]
    assert [g.get("data-status") for g in legend] == list(STATUS_COLOURS)
    assert [g.find(f"{SVG}rect").get("fill") for g in legend] == list(STATUS_COLOURS.values())
    assert "succeeded" in svg and "failed" in svg


def test_a_failure_is_told_from_the_exit_code_or_the_reason_but_not_for_kernels():
    assert status_key({"status": "TERMINATED", "kind": "batch", "exit_code": 0}) == "TERMINATED"
    assert status_key({"status": "TERMINATED", "reason": "command exited with code 2"}) == (
        "FAILED"
    )
    # An interactive kernel's exit code is how its container was stopped, not a failure.
    kernel = {"status": "TERMINATED", "kind": "interactive", "exit_code": 137}
    assert status_key(kernel) == "TERMINATED"


def test_an_arrow_per_edge_from_the_dependency_to_the_dependent_in_layers():
    # A → B, A → C, B and C → D, A → D (spans a layer), E alone.
    nodes = [{"id": x, "name": x, "status": "PENDING"} for x in "ABCDE"]
    edges = [{"from": a, "to": b} for a, b in ["AB", "AC", "BD", "CD", "AD"]]
    svg = render_svg(nodes, edges)
    assert sorted(arrows(svg)) == sorted((e["from"], e["to"]) for e in edges)
    drawn = boxes(svg)
    # Longest path from the roots: A and E first, B and C next, D last, left to right.
    assert drawn["A"]["x"] == drawn["E"]["x"] < drawn["B"]["x"] == drawn["C"]["x"] < drawn["D"]["x"]
    plan = layout(nodes, edges)
    assert [sorted(layer) for layer in plan.layers] == [["A", "E"], ["B", "C"], ["D"]]
    # The long edge A → D passes the middle layer instead of crossing its boxes.
    assert len(plan.routes[("A", "D")]) == 4 and len(plan.routes[("A", "B")]) == 2
    for (a, b), points in plan.routes.items():
        ax, ay = plan.positions[a]
        bx, by = plan.positions[b]
        assert points[0] == (ax + 156, ay + 20)  # leaves its dependency's right side
        assert points[-1] == (bx, by + 20)  # and points at its dependent's left side
    assert 'marker id="jgs-arrow"' in svg


def test_barycentric_ordering_removes_avoidable_crossings():
    # Alphabetical order would cross both pairs: a → z1, b → y1 …
    nodes = [{"id": x, "name": x, "status": "RUNNING"} for x in ["a", "b", "y1", "z1", "y2", "z2"]]
    edges = [("a", "z1"), ("b", "y1"), ("z1", "z2"), ("y1", "y2")]
    plan = layout(nodes, edges)
    assert plan.crossings == 0
    ys = {i: plan.positions[i][1] for i in plan.positions}
    assert (ys["a"] < ys["b"]) == (ys["z1"] < ys["y1"]) == (ys["z2"] < ys["y2"])


def test_names_and_ids_are_escaped():
    nasty = "<script>alert(\"x\")</script> & 'q'"
    svg = render_svg(
        [
            {"id": 'id"><b>', "name": nasty, "status": "RUNNING", "reason": "<i>why</i>"},
            {"id": "plain", "name": "ok", "status": "PENDING"},
        ],
        [('id"><b>', "plain")],
    )
    assert "<script" not in svg and "<b>" not in svg and "<i>" not in svg
    drawn = boxes(svg)
    assert set(drawn) == {'id"><b>', "plain"}
    assert drawn['id"><b>']["name"].startswith("<script>alert")  # shown, as text
    assert arrows(svg) == [('id"><b>', "plain")]


def test_the_drawing_is_deterministic_and_handles_empty_and_cyclic_input():
    rng = random.Random(7)
    nodes = [{"id": f"{i:032x}", "name": f"job-{i}", "status": "RUNNING"} for i in range(40)]
    edges = [
        (nodes[j]["id"], nodes[i]["id"])
        for i in range(1, 40)
        for j in rng.sample(range(i), min(i, 2))
    ]
    first = render_svg(nodes, edges)
    shuffled_nodes, shuffled_edges = nodes[:], edges[:]
    rng.shuffle(shuffled_nodes)
    rng.shuffle(shuffled_edges)
    assert render_svg(shuffled_nodes, shuffled_edges) == first
    assert len(boxes(first)) == 40 and len(arrows(first)) == len(set(edges))
    assert "No sessions to show." in render_svg([], [])
    # A cycle (the API refuses them) still draws every node rather than failing.
    cyclic = render_svg([{"id": x, "name": x, "status": "PENDING"} for x in "xy"], ["xy", "yx"])
    assert set(boxes(cyclic)) == {"x", "y"}


# -- live widgets on a real server ----------------------------------------------------------
@pytest.fixture
def manager(jp_serverapp) -> GPUSessionManager:
    return jp_serverapp.web_app.settings["gpu_sessions_engine"].manager


@pytest.fixture
def client(jp_serverapp, http_server, jp_http_port, jp_base_url) -> Client:
    """Alice's client of the server, listening on its port (``http_server``)."""
    url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}gpu-sessions/api/"
    return Client(url, token=TOKENS["alice"])


def batch_session(manager, owner: str, name: str, depends_on=()) -> Session:
    return manager.store.add(
        Session(
            id=uuid.uuid4().hex,
            owner=owner,
            image="test-image",
            request=ResourceRequest(),
            runtime="docker",
            process=current_process(),
            kind="batch",
            name=name,
            depends_on=tuple(depends_on),
        )
    )


class Leftovers:
    """What a widget may leave behind: tasks on this loop and threads. The server's own
    (its events hub's task, the threads of the loop's default executor it uses through
    ``asyncio.to_thread``) are not the widget's."""

    def __init__(self, hub) -> None:
        hub.start()  # the server's watcher runs from the first subscriber on
        self.loop = asyncio.get_running_loop()
        self.tasks = asyncio.all_tasks()
        self.threads = set(threading.enumerate())

    def new_threads(self) -> set[threading.Thread]:
        executor = getattr(self.loop, "_default_executor", None)
        server = set(getattr(executor, "_threads", ()))
        return set(threading.enumerate()) - self.threads - server

    def new_tasks(self) -> set[asyncio.Task]:
        return asyncio.all_tasks() - self.tasks - {asyncio.current_task()}

    async def assert_none_after(self, widget, hub) -> None:
        started = set(widget.tasks)
        assert started, "the widget runs no task: it cannot be live"
        assert not self.new_threads()
        widget.close()
        await until(lambda: all(t.done() for t in started), 10, "the widget's tasks ending")
        assert not widget.tasks
        await until(lambda: not hub.subscribers, 10, "the widget's websocket closing")
        await until(lambda: not self.new_tasks(), 10, "no task left")
        assert not self.new_threads(), self.new_threads()


async def utilization_ticks(hub, every: float = 0.2) -> None:
    """The server's utilization ticks, as its timer sends them once started; started
    here instead, since its start would also run the reconcile passes, which end these
    stored sessions that no process is starting."""
    while True:
        await hub.tick()
        await asyncio.sleep(every)


def node_fill(svg: str, session_id: str) -> str | None:
    return boxes(svg).get(session_id, {}).get("fill")


async def test_session_graph_colours_each_session_by_its_status_as_it_changes(
    jp_serverapp, manager, client
):
    hub = jp_serverapp.web_app.settings["gpu_sessions_events"]
    first = stored_session(manager, "alice", SessionStatus.RUNNING, name="prep")
    left = stored_session(manager, "alice", name="left", depends_on=(first.id,))
    right = stored_session(manager, "alice", name="right", depends_on=(first.id,))
    stored_session(manager, "bob", SessionStatus.RUNNING, name="bobs")  # not alice's
    leftovers = Leftovers(hub)

    graph = SessionGraph(client=client)
    expected = {first.id: "RUNNING", left.id: "PENDING", right.id: "PENDING"}
    await until(lambda: graph.statuses == expected, 10, "the first drawing")
    await until(lambda: "websocket" in graph.connections, 10, "the events websocket")
    assert set(graph.edges) == {(first.id, left.id), (first.id, right.id)}
    await until(lambda: len(boxes(graph.svg)) == 3, 5, "three boxes")
    assert sorted(arrows(graph.svg)) == sorted(graph.edges)
    assert "bobs" not in graph.svg

    # Each change redraws that box in its new colour.
    for status in (SessionStatus.PREPARING, SessionStatus.RUNNING, SessionStatus.TERMINATING):
        manager.store.transition(left.id, status, "test")
        colour = STATUS_COLOURS[status.value]
        await until(lambda c=colour: node_fill(graph.svg, left.id) == c, 10, status.value)
        assert graph.statuses[left.id] == status.value
    manager.store.transition(right.id, SessionStatus.CANCELLED, "dependency-failed: test")
    await until(lambda: node_fill(graph.svg, right.id) == STATUS_COLOURS["CANCELLED"], 10)

    # A session that joins is drawn, with its edges; a batch that fails is FAILED.
    joined = batch_session(manager, "alice", "join", depends_on=(left.id, right.id))
    await until(lambda: joined.id in graph.statuses, 10, "the new session drawn")
    assert {(left.id, joined.id), (right.id, joined.id)} <= set(graph.edges)
    for status in (SessionStatus.PREPARING, SessionStatus.RUNNING, SessionStatus.TERMINATING):
        manager.store.transition(joined.id, status, "test")
    manager.store.transition(
        joined.id, SessionStatus.TERMINATED, "command exited with code 3", exit_code=3
    )
    await until(lambda: node_fill(graph.svg, joined.id) == STATUS_COLOURS["FAILED"], 10)
    assert graph.statuses[joined.id] == "FAILED" and "FAILED (exit 3)" in graph.svg
    assert len(boxes(graph.svg)) == len(graph.nodes) == 4
    assert graph.error == ""

    await leftovers.assert_none_after(graph, hub)


async def test_session_graph_of_one_root_follows_its_edges_and_shows_errors_in_one_line(
    jp_serverapp, manager, client
):
    hub = jp_serverapp.web_app.settings["gpu_sessions_events"]
    a = stored_session(manager, "alice", SessionStatus.RUNNING, name="a")
    b = stored_session(manager, "alice", name="b", depends_on=(a.id,))
    c = stored_session(manager, "alice", name="c", depends_on=(b.id,))
    stored_session(manager, "alice", name="unrelated")

    up = SessionGraph(root=b.id, direction="up", client=client)
    both = SessionGraph(root=b.id, client=client)
    await until(lambda: set(up.statuses) == {a.id, b.id}, 10, "b and what it depends on")
    await until(lambda: set(both.statuses) == {a.id, b.id, c.id}, 10, "the whole chain")
    assert both.edges == sorted([(a.id, b.id), (b.id, c.id)])
    manager.store.transition(c.id, SessionStatus.CANCELLED, "test")
    await until(lambda: both.statuses.get(c.id) == "CANCELLED", 10)
    # A batch that joins and fails: the graph's nodes carry the exit code (the reason
    # here does not tell).
    failing = batch_session(manager, "alice", "d", depends_on=(b.id,))
    await until(lambda: failing.id in both.statuses, 10, "the new node")
    for status in (SessionStatus.PREPARING, SessionStatus.RUNNING, SessionStatus.TERMINATING):
        manager.store.transition(failing.id, status, "test")
    manager.store.transition(failing.id, SessionStatus.TERMINATED, "test", exit_code=2)
    await until(lambda: both.statuses.get(failing.id) == "FAILED", 10, "FAILED (exit 2)")
    assert failing.id not in up.statuses  # "up" from b: only what b depends on
    # The root is drawn with a border.
    root = [g for g in parse(both.svg).iter(f"{SVG}g") if g.get("data-id") == b.id][0]
    assert root.find(f"{SVG}rect").get("stroke") != "none"

    missing = SessionGraph(root="no-such-session", client=client)
    await until(lambda: missing.error, 10, "the error line")
    assert "\n" not in missing.error and "Traceback" not in missing._error.value
    assert "no-such-session" in missing.error or "not found" in missing.error.lower()

    for widget in (up, both, missing):
        widget.close()
    await until(lambda: not hub.subscribers, 10, "every websocket closed")
    with pytest.raises(ValueError, match="direction"):
        SessionGraph(root=b.id, direction="sideways", client=client)


async def test_gpu_monitor_charts_the_simulated_gpus_and_names_their_holders(
    jp_serverapp, manager, client
):
    hub = jp_serverapp.web_app.settings["gpu_sessions_events"]
    mine = stored_session(manager, "alice", name="training", gpus=1)
    theirs = stored_session(manager, "bob", name="bobs-secret", gpus=1)
    await manager.schedule_now()
    assert manager.store.get(mine.id).status == SessionStatus.PREPARING
    assert manager.store.get(theirs.id).status == SessionStatus.PREPARING
    ticker = asyncio.ensure_future(utilization_ticks(hub))
    leftovers = Leftovers(hub)

    monitor = GPUMonitor(window=60, client=client)
    await until(lambda: len(monitor.gpus) == 4, 10, "four simulated GPUs")
    # Ticks every 0.2 s: the charts fill with samples.
    await until(lambda: all(len(s) >= 3 for s in monitor.samples.values()), 10, "samples")
    labels = [g["label"] for g in monitor.gpus]
    assert sum("training (alice)" in label for label in labels) == 1
    assert sum("another user's session" in label for label in labels) == 1
    assert labels.count("free") == 2
    assert "bobs-secret" not in monitor._drawing.value
    assert all(g["name"] and "A100" in g["name"] for g in monitor.gpus)
    html = monitor._drawing.value
    assert html.count('class="jgs-gpu"') == 4 and html.count("<polyline") == 8
    assert "training (alice)" in html and "utilization" in html and "memory" in html
    for samples in monitor.samples.values():
        assert all(0 <= age <= 60 and util == 0 for age, util, _ in samples)

    # The holder leaves: its GPU shows free again.
    manager.store.transition(mine.id, SessionStatus.TERMINATING, "test")
    manager.store.transition(mine.id, SessionStatus.TERMINATED, "test")
    await until(lambda: [g["label"] for g in monitor.gpus].count("free") == 3, 10, "freed")

    await leftovers.assert_none_after(monitor, hub)
    ticker.cancel()
    with pytest.raises(ValueError, match="window"):
        GPUMonitor(window=0, client=client)


async def test_session_table_terminate_button_ends_a_session_and_shows_a_refusal_inline(
    jp_serverapp, manager, client
):
    hub = jp_serverapp.web_app.settings["gpu_sessions_events"]
    lone = stored_session(manager, "alice", name="lone")
    parent = stored_session(manager, "alice", name="parent")
    child = stored_session(manager, "alice", name="child", depends_on=(parent.id,))
    leftovers = Leftovers(hub)

    table = SessionTable(client=client)
    await until(lambda: set(table.rows) == {lone.id, parent.id, child.id}, 10, "three rows")
    row = table.rows[lone.id]
    assert row["name"] == "lone" and row["status"] == "PENDING" and row["age"].endswith(" s")
    assert row["resources"] == "default"

    table.buttons[lone.id].click()
    await until(lambda: manager.store.get(lone.id).status == SessionStatus.CANCELLED, 10, "ended")
    await until(lambda: table.rows.get(lone.id, {}).get("status") == "CANCELLED", 10)
    await until(lambda: table.buttons[lone.id].disabled, 5, "its button disabled")

    # Ending a session others depend on is refused: the reason in that row, one line.
    table.buttons[parent.id].click()
    await until(lambda: parent.id in table.row_errors, 10, "the refusal")
    assert "recursive" in table.row_errors[parent.id] and "\n" not in table.row_errors[parent.id]
    assert manager.store.get(parent.id).status == SessionStatus.PENDING
    assert not table.buttons[parent.id].disabled
    assert table.error == ""

    # A session started elsewhere appears.
    later = stored_session(manager, "alice", name="later")
    await until(lambda: later.id in table.rows, 10, "the new row")

    await leftovers.assert_none_after(table, hub)


async def test_widgets_reconnect_when_the_websocket_drops_and_keep_updating(
    jp_serverapp, manager, client
):
    hub = jp_serverapp.web_app.settings["gpu_sessions_events"]
    session = stored_session(manager, "alice", name="steady")
    graph = SessionGraph(client=client)
    await until(lambda: graph.connections == ["websocket"], 10, "connected")
    await until(lambda: session.id in graph.statuses, 10)

    await hub.stop()  # the server closes every events websocket
    manager.store.transition(session.id, SessionStatus.CANCELLED, "while disconnected")
    await until(lambda: graph.statuses.get(session.id) == "CANCELLED", 15, "caught up")
    await until(lambda: graph.connections.count("websocket") >= 2, 15, "reconnected")
    assert "polling" in graph.connections
    assert graph.error == ""  # cleared once the websocket is back
    graph.close()
    await until(lambda: not hub.subscribers and not graph.tasks, 10)


async def test_a_widget_without_a_server_says_so_in_one_line(monkeypatch):
    monkeypatch.delenv("JUPYTER_GPU_SESSIONS_URL", raising=False)
    for widget in (SessionGraph(), GPUMonitor(), SessionTable()):
        assert "needs a Jupyter server" in widget.error and "\n" not in widget.error
        assert not widget.tasks
        widget.close()


async def test_the_stream_works_over_a_unix_socket(jp_serverapp, manager, tmp_path):
    """As in a container kernel: the API answers on a unix socket (the real server's app)."""
    path = str(tmp_path / "api.sock")
    server = HTTPServer(jp_serverapp.web_app)
    server.add_socket(bind_unix_socket(path))
    base = jp_serverapp.base_url
    client = Client(f"http://localhost{base}gpu-sessions/api/", TOKENS["alice"], socket_path=path)
    session = stored_session(manager, "alice", name="over-socket")
    try:
        assert (await kernel_events.fetch(client, "GET", f"sessions/{session.id}"))[
            "name"
        ] == "over-socket"
        graph = SessionGraph(client=client)
        await until(lambda: graph.connections == ["websocket"], 10, "the websocket")
        await until(lambda: session.id in graph.statuses, 10)
        manager.store.transition(session.id, SessionStatus.CANCELLED, "test")
        await until(lambda: graph.statuses.get(session.id) == "CANCELLED", 10)
        graph.close()
        await until(lambda: not graph.tasks, 10)
    finally:
        server.stop()


class _Sessions(web.RequestHandler):
    def get(self) -> None:
        self.finish({"sessions": self.settings["sessions"], "total": 0})


class _GPUs(web.RequestHandler):
    def get(self) -> None:
        self.finish({"gpus": [{"uuid": "GPU-1", "index": 0, "name": "T4", "holders": []}]})


async def test_the_stream_polls_the_api_when_there_is_no_events_websocket():
    """A server (a proxy, an older version) without the websocket: status changes and GPU
    ticks still come, from the REST API."""
    sessions = [{"id": "s1", "name": "one", "status": "PENDING", "owner": "alice"}]
    app = web.Application([(r"/api/sessions", _Sessions), (r"/api/gpus", _GPUs)], sessions=sessions)
    sock, port = _listener()
    server = HTTPServer(app)
    server.add_sockets([sock])
    client = Client(f"http://127.0.0.1:{port}/api/", token="t")
    seen: list[dict] = []

    async def consume() -> None:
        async for event in kernel_events.stream(client, poll_interval=0.1, max_backoff=1):
            seen.append(event)

    task = asyncio.ensure_future(consume())
    try:
        await until(lambda: any(e["type"] == "gpus" for e in seen), 10, "a GPU tick")
        sessions[0] = {**sessions[0], "status": "CANCELLED"}
        await until(lambda: any(e.get("status") == "CANCELLED" for e in seen), 10, "the change")
        errors = [e["message"] for e in seen if e["type"] == "error"]
        assert errors and "no events websocket" in errors[0] and "polling" in errors[0]
        assert {"type": "connected", "via": "polling"} in seen
        change = next(e for e in seen if e.get("status") == "CANCELLED")
        assert change["type"] == "status" and change["session_id"] == "s1"
        # The websocket is tried again with backoff, and polling goes on meanwhile.
        await until(lambda: sum(e["type"] == "error" for e in seen) >= 3, 10, "retries")
    finally:
        task.cancel()
        server.stop()
    with pytest.raises(asyncio.CancelledError):
        await task
    json.dumps(seen)  # plain JSON, as a widget gets it


def _listener() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock, sock.getsockname()[1]


# -- in a real kernel started by the server -------------------------------------------------
KERNEL_SETUP = """
import asyncio, json, threading
from jupyter_gpu_sessions.widgets import GPUMonitor, SessionGraph, SessionTable
threads_before = set(threading.enumerate())
tasks_before = asyncio.all_tasks()
widgets = [SessionGraph(), GPUMonitor(window=60), SessionTable()]
graph, monitor, table = widgets

async def until(check):
    for _ in range(150):
        if check():
            return True
        await asyncio.sleep(0.1)
    return False
"""

KERNEL_SEES = """
ok = await until(lambda: graph.statuses.get(SID) == STATUS and SID in table.rows
                 and len(monitor.gpus) == 4 and "websocket" in graph.connections)
print("RESULT " + json.dumps({
    "ok": ok, "statuses": graph.statuses, "rows": table.rows, "errors": [w.error for w in widgets],
    "labels": [g["label"] for g in monitor.gpus], "connections": graph.connections,
    "live": [len(w.tasks) for w in widgets],
}))
"""

KERNEL_CLOSE = """
def extra_tasks():
    # Not counting the kernel's own (running this cell, handling its messages).
    def kernels(task):
        code = getattr(task.get_coro(), "cr_code", None)
        return code is not None and ("/ipykernel/" in code.co_filename
                                     or "/IPython/" in code.co_filename)
    return {t for t in asyncio.all_tasks() - tasks_before if not kernels(t)}

for w in widgets:
    w.close()
await until(lambda: not any(w.tasks for w in widgets) and not extra_tasks())
print("RESULT " + json.dumps({
    "tasks": sorted(repr(t) for t in extra_tasks()),
    "threads": sorted(t.name for t in set(threading.enumerate()) - threads_before),
}))
left_open = SessionGraph()  # never closed: it ends with its kernel
"""


async def test_the_widgets_run_live_in_a_kernel_the_server_started(
    jp_serverapp, http_server, jp_http_port, jp_base_url, manager
):
    import nbformat
    from nbclient import NotebookClient

    hub = jp_serverapp.web_app.settings["gpu_sessions_events"]
    ticker = asyncio.ensure_future(utilization_ticks(hub))
    session = stored_session(manager, "alice", name="in-kernel", gpus=1)
    env = {
        **os.environ,
        "JUPYTER_GPU_SESSIONS_URL": f"http://127.0.0.1:{jp_http_port}{jp_base_url}gpu-sessions/api/",
        "JUPYTER_GPU_SESSIONS_TOKEN": TOKENS["alice"],
    }
    kernels = jp_serverapp.kernel_manager
    kernel_id = await kernels.start_kernel(kernel_name="python3", env=env)
    km = kernels.get_kernel(kernel_id)
    await km.ready  # the server starts kernels pending: started once, not again by nbclient
    nb = nbformat.v4.new_notebook()
    runner = NotebookClient(nb, km=km, timeout=60)

    async def run(code: str) -> dict:
        cell = nbformat.v4.new_code_cell(code)
        nb.cells.append(cell)
        await runner.async_execute_cell(cell, len(nb.cells) - 1)
        text = "".join(o.get("text", "") for o in cell.outputs if o["output_type"] == "stream")
        errors = [o for o in cell.outputs if o["output_type"] == "error"]
        assert not errors, errors
        return json.loads(text.split("RESULT ", 1)[1]) if "RESULT " in text else {}

    try:
        async with runner.async_setup_kernel():
            await run(KERNEL_SETUP)
            seen = await run(f"SID, STATUS = {session.id!r}, 'PENDING'\n" + KERNEL_SEES)
            assert seen["ok"], seen
            assert seen["rows"][session.id]["name"] == "in-kernel"
            assert seen["errors"] == ["", "", ""] and all(seen["live"])

            await manager.schedule_now()  # it gets a GPU: PREPARING, a holder
            seen = await run("STATUS = 'PREPARING'\n" + KERNEL_SEES)
            assert seen["ok"], seen
            assert any("in-kernel (alice)" in label for label in seen["labels"]), seen

            done = await run(KERNEL_CLOSE)
            assert done["tasks"] == [] and done["threads"] == [], done
            # The one left open is live: its websocket is the one the server has.
            await until(lambda: len(hub.subscribers) == 1, 10, "the last widget's websocket")
    finally:
        ticker.cancel()
        if runner.kc is not None:
            runner.kc.stop_channels()
        await kernels.shutdown_kernel(kernel_id)
    # … until its kernel ends: its websocket goes with it.
    await until(lambda: not hub.subscribers, 15, "the kernel's websocket closing")


async def test_a_new_users_first_requests_at_once_all_succeed(jp_serverapp, http_server, client):
    """Three widgets opening together are a user's first requests at once: each is
    answered (the server once answered some with a 500 while remembering the user)."""
    newcomers = [Client(client.base_url, token=TOKENS[u]) for u in ("bob", "carol", "root")]
    answers = await asyncio.gather(
        *(
            kernel_events.fetch(who, "GET", path)
            for path in ["sessions", "gpus", "quota"] * 4
            for who in newcomers
        )
    )
    assert len(answers) == 36 and all(isinstance(a, dict) for a in answers)
