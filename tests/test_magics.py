"""The ``%session``/``%vfolder`` command layer: its forms, what it shows, its one-line errors,
against a real server; and the magics in real kernels run by nbclient."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.kernel import commands
from jupyter_gpu_sessions.kernel.client import APIError, Client, NoServer
from jupyter_gpu_sessions.kernel.commands import CommandError, Context, LogFollower
from jupyter_gpu_sessions.kernel.render import Fields, Table, Text, graph_table, graph_tree
from jupyter_gpu_sessions.manager import GPUSessionManager

from .api_support import TOKENS, server_fixtures, stored_session
from .support import make_notebook_dir, shipped_spec

jp_server_config, jp_auth_header = server_fixtures()

NO_SERVER = {"PATH": os.environ.get("PATH", "")}


def _diamond() -> dict:
    """A → B, A → C, B → D, C → D (edges: dependency → dependent)."""
    ids = {n: n.lower() * 32 for n in "ABCD"}
    return {
        "nodes": [{"id": ids[n], "name": n, "status": "PENDING"} for n in "DCBA"],
        "edges": [{"from": ids[a], "to": ids[b]} for a, b in ("AB", "AC", "BD", "CD")],
    }


# -- the forms, offline ------------------------------------------------------------------
def test_every_session_form_parses_into_what_the_api_is_sent():
    p = commands.parse
    args = p("session", "list --all --status running,pending", "%session")
    assert (args.command, args.all, args.status) == ("list", True, "RUNNING,PENDING")
    assert p("session", "info", "%session").name is None
    assert p("session", "info prep", "%session").name == "prep"
    args = p(
        "session",
        "start train --image img:1 --gpus 2 --cpus 1.5 --memory 4GiB --vfolder data "
        "--vfolder models:ro --depends-on prep clean --env SEED=1 -- python3 -c 'print(1)'",
        "%session",
    )
    assert commands.start_spec(args, "%session start") == {
        "type": "batch",
        "name": "train",
        "command": ["python3", "-c", "print(1)"],
        "image": "img:1",
        "resources": {"gpus": 2, "cpus": 1.5, "memory": "4GiB"},
        "vfolders": ["data", "models:ro"],
        "depends_on": ["prep", "clean"],
        "env": {"SEED": "1"},
    }
    # One quoted shell line is sent as a shell command.
    args = p("session", "run job -- 'echo a && echo b'", "%session")
    assert args.command == "run"
    assert commands.start_spec(args, "%session run")["command"] == "echo a && echo b"
    assert p("session", "logs prep --follow", "%session").follow is True
    assert p("session", "rm prep --recursive", "%session").recursive is True
    args = p("session", "show-graph --table", "%session")
    assert (args.name, args.table) == (None, True)
    assert p("session", "gpus", "%session").command == "gpus"
    assert p("session", "quota", "%session").command == "quota"


def test_every_vfolder_form_parses():
    p = commands.parse
    assert p("vfolder", "list", "%vfolder").trash is False
    args = p("vfolder", "create data --quota 10GiB --project ml", "%vfolder")
    assert (args.name, args.quota, args.project) == ("data", "10GiB", "ml")
    assert p("vfolder", "info data", "%vfolder").name == "data"
    args = p("vfolder", "share data bob --perm rw", "%vfolder")
    assert (args.name, args.user, args.perm) == ("data", "bob", "rw")
    args = p("vfolder", "clone data copy", "%vfolder")
    assert (args.src, args.dst) == ("data", "copy")
    assert p("vfolder", "rm data", "%vfolder").command == "rm"
    assert p("vfolder", "restore data", "%vfolder").command == "restore"


@pytest.mark.parametrize(
    ("group", "line", "expected"),
    [
        ("session", "frob", "%session: argument FORM: invalid choice: 'frob'"),
        ("session", "list --status SLEEPING", "%session list: argument --status: 'SLEEPING'"),
        ("session", "list --al", "%session list: unrecognized arguments: --al"),
        ("session", "start train --gpus two -- x", "argument --gpus: 'two' is not a whole number"),
        ("session", "start train --gpus -1 -- x", "argument --gpus: '-1' is negative"),
        ("session", "start train --cpus 0 -- x", "argument --cpus: '0' must be more than 0"),
        ("session", "start train --memory lots -- x", "'lots' is not a size"),
        ("session", "start 'my job' -- x", "'my job' is not a session name"),
        ("session", "start train --vfolder d:xx -- x", "'d:xx' is not a vfolder mount"),
        ("session", "start train --gpus 1", "give the command after --"),
        ("session", "start train --env NOEQUALS -- x", "'NOEQUALS' is not KEY=VALUE"),
        ("session", "logs", "the following arguments are required: NAME"),
        ("session", "rm a b", "unrecognized arguments: b"),
        ("session", "list 'unclosed", "cannot read the line: No closing quotation"),
        ("vfolder", "share data bob --perm all", "argument --perm: invalid choice: 'all'"),
        ("vfolder", "share data bob", "the following arguments are required: --perm"),
        ("vfolder", "create", "the following arguments are required: NAME"),
    ],
)
def test_a_bad_argument_is_one_line_that_says_what_is_wrong(group, line, expected):
    ctx = Context(prog=f"%{group}", environ=NO_SERVER)
    with pytest.raises(CommandError) as caught:
        commands.run(group, line, ctx)
    message = caught.value.message
    assert expected in message
    assert "\n" not in message and caught.value.usage


def test_help_is_output_not_an_exit():
    ctx = Context(prog="%session", environ=NO_SERVER)
    text = str(commands.run("session", "", ctx))
    for form in ("list", "info", "start", "run", "logs", "rm", "show-graph", "gpus", "quota"):
        assert f"  {form}" in text
    assert "--depends-on" in str(commands.run("session", "start --help", ctx))
    vtext = str(commands.run("vfolder", "--help", Context(prog="%vfolder", environ=NO_SERVER)))
    for form in ("list", "create", "info", "share", "clone", "rm", "restore"):
        assert f"  {form}" in vtext


def test_without_a_server_other_forms_print_the_one_no_server_line():
    ctx = Context(prog="%session", environ=NO_SERVER)
    for line in ("list", "gpus", "quota", "rm x", "logs x", "show-graph", "info other"):
        with pytest.raises(CommandError) as caught:
            commands.run("session", line, ctx)
        form = line.split()[0]
        assert caught.value.message == (
            f"%session {form} needs a Jupyter server with jupyter-gpu-sessions: this kernel was "
            "started without one (nbclient, papermill, jupyter console). Run it in JupyterLab, "
            "or set JUPYTER_GPU_SESSIONS_URL and JUPYTER_GPU_SESSIONS_TOKEN."
        )
    with pytest.raises(NoServer):
        Client.from_env(NO_SERVER)
    with pytest.raises(CommandError, match="not started by jupyter-gpu-sessions"):
        commands.run("session", "info", ctx)


def test_info_without_a_server_comes_from_the_injected_info(tmp_path):
    info = {
        "id": "f" * 32,
        "name": "my-kernel",
        "owner": "alice",
        "image": "img:1",
        "runtime": "docker",
        "kind": "interactive",
        "request": {"gpus": 1, "cpus": 2.0, "memory": 4 * 2**30},
        "devices": [{"uuid": "GPU-1234", "index": 0, "name": "A100", "memory_total": 80 * 2**30}],
        "mounts": [{"name": "data", "path": "/home/jovyan/data", "read_only": True}],
        "limits": {"max_gpus": 2.0, "max_memory": 64 * 2**30, "idle_timeout": 3600},
        "created_at": 1_700_000_000,
    }
    path = tmp_path / "session.json"
    path.write_text(json.dumps(info))
    env = {"JUPYTER_GPU_SESSIONS_INFO": str(path), "JUPYTER_GPU_SESSIONS_SESSION_ID": "f" * 32}
    out = commands.run("session", "info", Context(prog="%session", environ=env))
    text = str(out)
    for expected in (
        "my-kernel",
        "f" * 32,
        "1 GPU, 2 CPU, 4GiB",
        "GPU-1234",
        "80GiB",
        "/home/jovyan/data",
        "max_memory:",
        "64GiB",
        "1h",
        "no live status",
    ):
        assert expected in text, (expected, text)
    assert "<td" in out._repr_html_()

    # The server went away (or the kernel's token with it): still the kernel's own info.
    gone = {**env, "JUPYTER_GPU_SESSIONS_URL": "http://127.0.0.1:9/gpu-sessions/api/"}
    text = str(commands.run("session", "info", Context(prog="%session", environ=gone)))
    assert "my-kernel" in text and "GPU-1234" in text
    assert "(live status unavailable: cannot reach the gpu-sessions API at 127.0.0.1:9" in text
    with pytest.raises(CommandError, match="^%session list: cannot reach the gpu-sessions API"):
        commands.run("session", "list", Context(prog="%session", environ=gone))


# -- rendering -----------------------------------------------------------------------------
def test_tables_align_in_text_and_escape_in_html():
    table = Table(["NAME", "STATUS"], [["<b>x</b>", "RUNNING"], ["long-name-here", None]])
    assert repr(table).splitlines() == [
        "NAME            STATUS",
        "<b>x</b>        RUNNING",
        "long-name-here  -",
    ]
    html = table._repr_html_()
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert html.count("<tr>") == 3
    fields = Fields([("id", "abc"), ("status", "<RUNNING>")])
    assert repr(fields).splitlines() == ["id:      abc", "status:  <RUNNING>"]
    assert "&lt;RUNNING&gt;" in fields._repr_html_()
    assert "&lt;" in Text("<script>")._repr_html_()


def test_show_graph_tree_lists_a_node_under_each_parent_and_the_table_once():
    graph = _diamond()
    tree = repr(graph_tree(graph)).splitlines()
    assert tree == [
        "A (aaaaaaaaaaaa) PENDING",
        "├── B (bbbbbbbbbbbb) PENDING",
        "│   └── D (dddddddddddd) PENDING",
        "└── C (cccccccccccc) PENDING",
        "    └── D (dddddddddddd) PENDING",
    ]
    table = graph_table(graph)
    assert table.column("NAME") == ["A", "B", "C", "D"]
    assert table.column("DEPENDS ON") == ["", "A", "A", "B, C"]


def test_log_follower_prints_each_line_once_as_the_tail_window_moves():
    follower = LogFollower()
    assert follower.new_lines("a\nb\n") == ["a", "b"]
    assert follower.new_lines("a\nb\nc\n") == ["c"]
    assert follower.new_lines("b\nc\nd\ne\n") == ["d", "e"]  # the window moved on
    assert follower.new_lines("b\nc\nd\ne\n") == []
    # A short first read (logs --follow --tail 2), then the whole log.
    follower = LogFollower()
    assert follower.new_lines("3\n4\n") == ["3", "4"]
    assert follower.new_lines("1\n2\n3\n4\n5\n") == ["5"]
    assert follower.new_lines("4\n5\n6\n") == ["6"]
    assert follower.new_lines("") == []


def test_an_unreachable_server_is_one_line():
    client = Client("http://127.0.0.1:9/gpu-sessions/api/", token="t", timeout=2)
    with pytest.raises(APIError) as caught:
        client.sessions()
    assert caught.value.status == 0
    assert "cannot reach the gpu-sessions API at 127.0.0.1:9" in caught.value.message
    missing = Client("http://x/gpu-sessions/api/", socket_path="/nonexistent/api.sock")
    with pytest.raises(APIError, match="/nonexistent/api.sock"):
        missing.quota()


# -- against a real server -----------------------------------------------------------------
@pytest.fixture
def manager(jp_serverapp) -> GPUSessionManager:
    return jp_serverapp.web_app.settings["gpu_sessions_engine"].manager


@pytest.fixture
def api_url(jp_fetch, jp_http_port, jp_base_url) -> str:
    """The running server's API (``jp_fetch`` makes it listen)."""
    return f"http://127.0.0.1:{jp_http_port}{jp_base_url}gpu-sessions/api/"


def as_user(api_url: str, user: str = "alice", prog: str = "%session") -> Context:
    env = {"JUPYTER_GPU_SESSIONS_URL": api_url, "JUPYTER_GPU_SESSIONS_TOKEN": TOKENS[user]}
    return Context(prog=prog, environ=env, out=lambda line: None)


async def magic(ctx: Context, group: str, line: str):
    """Run a form as the magic does, in a thread (the server runs on this loop)."""
    return await asyncio.to_thread(commands.run, group, line, ctx)


async def magic_error(ctx: Context, group: str, line: str) -> str:
    with pytest.raises(CommandError) as caught:
        await magic(ctx, group, line)
    assert "\n" not in caught.value.message
    return caught.value.message


async def test_session_forms_against_a_real_server(api_url, manager):
    a = stored_session(manager, "alice", name="A")
    b = stored_session(manager, "alice", name="B", depends_on=(a.id,))
    c = stored_session(manager, "alice", name="C", depends_on=(a.id,))
    d = stored_session(manager, "alice", name="D", depends_on=(b.id, c.id))
    done = stored_session(manager, "alice", SessionStatus.TERMINATED, name="old")
    stored_session(manager, "bob", name="bobs")
    alice = as_user(api_url)

    listed = await magic(alice, "session", "list")
    assert sorted(listed.column("NAME")) == ["A", "B", "C", "D"]  # not ended, not bob's
    assert "OWNER" not in listed.columns
    everything = await magic(alice, "session", "list --all")
    assert "old" in everything.column("NAME") and "bobs" not in everything.column("NAME")
    ended = await magic(alice, "session", "list --status terminated")
    assert ended.column("ID") == [done.id[:12]]

    info = repr(await magic(alice, "session", f"info {d.id}"))
    assert "id:" in info and d.id in info and "PENDING" in info
    assert f"depends on:  B ({b.id[:12]}), C ({c.id[:12]})" in info
    assert "Queue" in info and "waiting for:" in info
    assert "History" in info

    tree = repr(await magic(alice, "session", f"show-graph {d.id}")).splitlines()
    assert tree[0].startswith("A (") and sum("D (" in line for line in tree) == 2
    table = await magic(alice, "session", f"show-graph {d.id} --table")
    assert table.column("NAME") == ["A", "B", "C", "D"]
    # No NAME and not a kernel: all my sessions with dependencies.
    assert (await magic(alice, "session", "show-graph --table")).column("NAME") == list("ABCD")

    # bob's token sees nothing of alice's.
    bob = as_user(api_url, "bob")
    assert "no session" in (await magic_error(bob, "session", f"info {a.id}")).lower()
    assert (await magic(bob, "session", "list")).column("NAME") == ["bobs"]

    refused = await magic_error(alice, "session", f"rm {a.id}")
    assert refused.startswith("%session rm: 3 session(s) depend on") and "--recursive" in refused
    gone = await magic(alice, "session", f"rm {a.id} --recursive")
    assert sorted(gone.column("NAME")) == ["A", "B", "C", "D"]
    assert set(gone.column("STATUS")) == {"CANCELLED"}
    assert (await magic(alice, "session", "list")).rows == []

    gpus = repr(await magic(alice, "session", "gpus"))
    assert gpus.count("A100") == 4 and "free" in gpus
    quota = repr(await magic(alice, "session", "quota"))
    assert quota.startswith("alice (groups: ml)") and "vfolder storage" in quota


async def test_info_of_a_queued_session_says_its_place_and_the_limit_that_holds_it(
    jp_serverapp, api_url, kernel_image
):
    await jp_serverapp.extension_manager.start_all_extensions()  # batch sessions run
    admin = Client(api_url, token=TOKENS["root"])
    await asyncio.to_thread(admin.request, "PUT", "policies/user:alice", None, {"max_gpus": 1})
    alice = as_user(api_url)
    await magic(alice, "session", "start first --gpus 1 -- sleep 600")
    await magic(alice, "session", "start second --gpus 1 -- sleep 600")
    try:
        client = Client(api_url, token=TOKENS["alice"])
        for _ in range(100):
            second = await asyncio.to_thread(client.session, "second")
            if (second.get("scheduler") or {}).get("failed"):
                break
            await asyncio.sleep(0.1)
        assert second["status"] == "PENDING"
        info = repr(await magic(alice, "session", "info second"))
        queue = info[info.index("Queue") :]
        assert "position:" in queue and "#1" in queue
        assert "waiting for:" in queue and "1 GPU" in queue
        assert "held by max_gpus:" in queue, info
    finally:
        gone = await magic(alice, "session", "rm first")
        await magic(alice, "session", "rm second")
    assert gone.column("STATUS")[0] in ("TERMINATING", "TERMINATED")
    for _ in range(200):
        if not (await magic(alice, "session", "list")).rows:
            break
        await asyncio.sleep(0.1)
    ended = await magic(alice, "session", "list --status TERMINATED,CANCELLED")
    assert sorted(ended.column("NAME")) == ["first", "second"]


async def test_vfolder_forms_against_a_real_server(api_url):
    alice = as_user(api_url, prog="%vfolder")
    made = await magic(alice, "vfolder", "create data --quota 1GiB")
    assert "name:" in repr(made) and "1GiB" in repr(made)
    assert (await magic(alice, "vfolder", "list")).column("NAME") == ["data"]
    info = repr(await magic(alice, "vfolder", "info data"))
    assert "my permission:" in info and "owner:" in info and "alice" in info
    await magic(as_user(api_url, "bob", "%vfolder"), "vfolder", "list")  # bob signs in once
    shared = repr(await magic(alice, "vfolder", "share data bob --perm ro"))
    assert shared.startswith("Invited bob to vfolder data (ro)")
    clone = repr(await magic(alice, "vfolder", "clone data data2"))
    assert clone.startswith("Cloned data into data2")
    removed = repr(await magic(alice, "vfolder", "rm data"))
    assert "%vfolder restore data" in removed
    assert (await magic(alice, "vfolder", "list")).column("NAME") == ["data2"]
    assert (await magic(alice, "vfolder", "list --trash")).column("NAME") == ["data"]
    await magic(alice, "vfolder", "restore data")
    assert sorted((await magic(alice, "vfolder", "list")).column("NAME")) == ["data", "data2"]
    missing = await magic_error(alice, "vfolder", "info nothing-here")
    assert missing.startswith("%vfolder info: ") and "nothing-here" in missing
    assert "admins" in await magic_error(alice, "vfolder", "create team --project ml")


# -- the magics in real kernels, run by nbclient -------------------------------------------
def notebook(*sources: str):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(s).strip()) for s in sources]
    return nb


def shown(cell) -> str:
    """What a cell showed on stdout and as its displays' text/plain."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream" and output.name == "stdout":
            parts.append(output.text)
        elif output.output_type in ("display_data", "execute_result"):
            parts.append(output.data.get("text/plain", "") + "\n")
    return "".join(parts)


def html(cell) -> str:
    return "".join(
        o.data.get("text/html", "")
        for o in cell.outputs
        if o.output_type in ("display_data", "execute_result")
    )


def stderr(cell) -> str:
    assert not [o for o in cell.outputs if o.output_type == "error"], cell.outputs
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr")


async def run_notebook(nb, km, cwd, timeout: int = 180):
    from nbclient import NotebookClient

    client = NotebookClient(
        nb, km=km, timeout=timeout, allow_errors=False, resources={"metadata": {"path": str(cwd)}}
    )
    await client.async_execute()
    client.kc.stop_channels()  # nbclient leaves a client of a kernel it does not own open
    return nb


MAGICS_NOTEBOOK = (
    "%load_ext jupyter_gpu_sessions",
    "import os; print(os.environ['JUPYTER_GPU_SESSIONS_SESSION_ID'])",
    "%session info",
    "%session list",
    "%vfolder create nbdata --quota 1GiB",
    "%vfolder list",
    "%vfolder info nbdata",
    "%vfolder clone nbdata nbcopy",
    "%vfolder rm nbcopy",
    "%vfolder restore nbcopy",
    "%vfolder share nbdata alice --perm ro",
    """%session start prep -- python3 -c "print('prep says hi')" """,
    """%session run train --depends-on prep -- python3 -c "print('train says hi'); exit(3)" """,
    "%session logs prep",
    "%session show-graph train",
    "%session show-graph train --table",
    "%session gpus",
    "%session quota",
    "%session start sleeper -- sleep 600",
    "%session rm sleeper",
    "%session start bad --gpus two -- true",
    "%session info no-such-session",
    "%session --help",
    "print(get_ipython().find_line_magic('session').__doc__)\n"
    "print(get_ipython().find_line_magic('vfolder').__doc__)",
    "%session logs train --follow",
)


def local_kernelspec(kernels: Path, name: str, image: str | None = None) -> str:
    """A one-GPU kernelspec: a local process, or (given ``image``) the container kernel."""
    if image is None:
        spec = shipped_spec("python3-gpu")
        spec["metadata"]["kernel_provisioner"]["config"] = {"gpus": 1, "runtime": "local"}
    else:
        spec = shipped_spec("python3-container")
        spec["metadata"]["kernel_provisioner"]["config"].update(
            {"gpus": 1, "image": image, "cpus": 1, "memory": "1GiB"}
        )
    (kernels / name).mkdir(parents=True, exist_ok=True)
    (kernels / name / "kernel.json").write_text(json.dumps(spec))
    return name


@pytest.mark.parametrize("where", ["container", "local"])
async def test_a_notebook_uses_every_magic_on_a_kernel_the_server_started(
    where, jp_fetch, jp_serverapp, jp_data_dir, jp_root_dir, api_url, kernel_image, manager
):
    make_notebook_dir(jp_root_dir)
    await jp_serverapp.extension_manager.start_all_extensions()  # kernels learn the API URL
    image = kernel_image if where == "container" else None
    name = local_kernelspec(jp_data_dir / "kernels", f"{where}-magics", image)
    # alice has used the server once, so vfolders can be shared with her.
    await magic(as_user(api_url, prog="%vfolder"), "vfolder", "list")
    response = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": name}))
    kernel_id = json.loads(response.body)["id"]
    km = jp_serverapp.kernel_manager.get_kernel(kernel_id)
    try:
        await km.ready
        nb = await run_notebook(notebook(*MAGICS_NOTEBOOK), km, jp_root_dir)
    finally:
        await jp_serverapp.kernel_manager.shutdown_kernel(kernel_id)
    cells = nb.cells
    for index, cell in enumerate(cells):
        if index not in (20, 21):
            assert stderr(cell) == "", (index, cell.source, stderr(cell))
    own = shown(cells[1]).strip()
    assert len(own) == 32
    info = shown(cells[2])
    assert own in info and "RUNNING" in info and "GPUs" in info and "History" in info
    assert f"runtime:          {'docker' if where == 'container' else 'local'}" in info
    assert "A100" in info and "Limits" in info and "Mounts" in info, info
    assert "<table" in html(cells[2])
    assert own[:12] in shown(cells[3]) and "<table" in html(cells[3])
    assert "Created vfolder nbdata" in shown(cells[4])
    assert "nbdata" in shown(cells[5]) and "1GiB" in shown(cells[5])
    assert "my permission:" in shown(cells[6])
    assert "Cloned nbdata into nbcopy" in shown(cells[7])
    assert "to the trash" in shown(cells[8]) and "Restored vfolder nbcopy" in shown(cells[9])
    assert shown(cells[10]).startswith("Invited alice to vfolder nbdata (ro)")
    assert "prep" in shown(cells[11])
    run = shown(cells[12])
    assert "train says hi" in run
    assert "exit code 3" in run
    assert "prep says hi" in shown(cells[13])
    tree = shown(cells[14])
    assert tree.index("prep (") < tree.index("└── train (")
    assert "TERMINATED" in tree
    assert [line.split()[1] for line in shown(cells[15]).splitlines()[1:]] == ["prep", "train"]
    assert "A100" in shown(cells[16])
    assert "vfolder storage" in shown(cells[17])
    assert "sleeper" in shown(cells[18]) and "Ended 1 session(s)" in shown(cells[19])
    assert stderr(cells[20]) == (
        "%session start: argument --gpus: 'two' is not a whole number (see %session start --help)\n"
    )
    assert shown(cells[20]) == ""
    missing = stderr(cells[21])
    assert missing.startswith("%session info: ") and missing.count("\n") == 1
    assert "show-graph [NAME] [--table]" in shown(cells[22])
    docs = shown(cells[23])
    for form in (
        "list [--all] [--status S]",
        "info [NAME]",
        "start NAME",
        "run ...",
        "logs NAME [--follow]",
        "rm NAME [--recursive]",
        "show-graph [NAME] [--table]",
        "gpus",
        "quota",
        "create NAME [--quota 10GiB] [--project GROUP]",
        "share NAME USER --perm ro|rw|wd",
        "clone SRC DST",
        "restore NAME",
    ):
        assert form in docs, form
    follow = shown(cells[24])
    assert "train says hi" in follow and "exit code 3" in follow


@pytest.mark.parametrize("where", ["container", "local"])
async def test_interrupting_session_run_stops_waiting_and_leaves_the_session_running(
    where, jp_fetch, jp_serverapp, jp_data_dir, jp_root_dir, api_url, kernel_image, manager
):
    """Ctrl-C (the kernel's interrupt) while ``%session run`` waits: one message saying the
    session keeps running and how to end it; no traceback; the session is untouched."""
    make_notebook_dir(jp_root_dir)
    await jp_serverapp.extension_manager.start_all_extensions()
    image = kernel_image if where == "container" else None
    name = local_kernelspec(jp_data_dir / "kernels", f"{where}-interrupt", image)
    response = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": name}))
    kernel_id = json.loads(response.body)["id"]
    km = jp_serverapp.kernel_manager.get_kernel(kernel_id)
    await km.ready
    kc = km.client()
    kc.start_channels()
    out: list[str] = []
    try:
        await kc.wait_for_ready(timeout=60)
        code = "%load_ext jupyter_gpu_sessions\n%session run sleeper -- sleep 600"
        msg_id = kc.execute(code)
        errors = []
        interrupted = False
        deadline = asyncio.get_running_loop().time() + 120
        while True:
            assert asyncio.get_running_loop().time() < deadline, out
            try:
                msg = await kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                msg = {"parent_header": {}}
            if msg["parent_header"].get("msg_id") == msg_id:
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    out.append(content["text"])
                elif kind in ("display_data", "execute_result"):
                    out.append(content["data"]["text/plain"] + "\n")
                elif kind == "error":
                    errors.append(content)
                elif kind == "status" and content["execution_state"] == "idle":
                    break
            running = await asyncio.to_thread(manager.store.list)
            if not interrupted and any(
                s.name == "sleeper" and s.status == SessionStatus.RUNNING for s in running
            ):
                await asyncio.sleep(1.0)  # well inside the wait loop
                await km.interrupt_kernel()
                interrupted = True
        assert interrupted and not errors, (out, errors)
    finally:
        kc.stop_channels()
        await jp_serverapp.kernel_manager.shutdown_kernel(kernel_id)
    text = "".join(out)
    assert "created: waiting for it (Ctrl-C stops waiting)" in text
    assert "Stopped waiting: session sleeper (" in text and "keeps running" in text
    assert "end it with `%session rm sleeper`" in text
    sleeper = next(s for s in manager.store.list() if s.name == "sleeper")
    assert sleeper.status == SessionStatus.RUNNING
    ended = await magic(as_user(api_url, "root"), "session", "rm sleeper")
    assert ended.column("STATUS") == ["TERMINATED"]


async def test_a_kernel_without_a_server_describes_itself_and_says_it_needs_one(
    kernel_dir, tmp_path, fresh_manager
):
    """nbclient as papermill uses it: the provisioner, no Jupyter server."""
    from jupyter_client.manager import AsyncKernelManager

    from .support import write_kernelspec

    fresh_manager(simulated_gpus="2xA100-80GB")
    spec = shipped_spec("python3-gpu")
    spec["metadata"]["kernel_provisioner"]["config"] = {"gpus": 1, "runtime": "local"}
    ksm = write_kernelspec(kernel_dir, "local-offline", spec)
    km = AsyncKernelManager(kernel_name="local-offline", kernel_spec_manager=ksm)
    nb = notebook(
        "%load_ext jupyter_gpu_sessions",
        "import os; print(sorted(k for k in os.environ if k.startswith('JUPYTER_GPU_SESSIONS_')))",
        "%session info",
        "%session list",
        "%vfolder list",
    )
    try:
        await km.start_kernel(cwd=str(tmp_path))
        session_id = km.provisioner.session.id
        nb = await run_notebook(nb, km, tmp_path)
    finally:
        await km.shutdown_kernel(now=True)
    env = shown(nb.cells[1])
    assert "JUPYTER_GPU_SESSIONS_INFO" in env and "JUPYTER_GPU_SESSIONS_SESSION_ID" in env
    assert "JUPYTER_GPU_SESSIONS_TOKEN" not in env and "JUPYTER_GPU_SESSIONS_URL" not in env
    info = shown(nb.cells[2])
    assert session_id in info
    assert "A100" in info and "1 GPU" in info and "no live status" in info
    assert stderr(nb.cells[2]) == ""
    assert stderr(nb.cells[3]) == (
        "%session list needs a Jupyter server with jupyter-gpu-sessions: this kernel was "
        "started without one (nbclient, papermill, jupyter console). Run it in JupyterLab, "
        "or set JUPYTER_GPU_SESSIONS_URL and JUPYTER_GPU_SESSIONS_TOKEN.\n"
    )
    assert stderr(nb.cells[4]).startswith("%vfolder list needs a Jupyter server")


def test_the_kernel_side_imports_without_the_server_packages():
    """What a user's image has: no jupyter_server, docker or sqlalchemy."""
    code = textwrap.dedent(
        """
        import sys
        for name in ("jupyter_server", "docker", "sqlalchemy", "jupyter_gpu_sessions.core",
                     "jupyter_gpu_sessions.engine", "jupyter_gpu_sessions.manager"):
            sys.modules[name] = None
        import jupyter_gpu_sessions
        import jupyter_gpu_sessions.kernel.client
        import jupyter_gpu_sessions.kernel.commands
        import jupyter_gpu_sessions.kernel.render
        import jupyter_gpu_sessions.kernel.magics
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        jupyter_gpu_sessions.load_ipython_extension(ip)
        print(sorted(ip.magics_manager.magics["line"].keys() & {"session", "vfolder"}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=NO_SERVER
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['session', 'vfolder']"
