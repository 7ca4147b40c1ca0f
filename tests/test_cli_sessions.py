"""`jupyter gpu-sessions session|vfolder …` as a person runs it in a terminal: the same forms
and the same output as the magics, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jupyter_gpu_sessions.kernel import commands
from jupyter_gpu_sessions.kernel.commands import Context
from jupyter_gpu_sessions.manager import GPUSessionManager

from .api_support import TOKENS, server_fixtures, stored_session

jp_server_config, jp_auth_header = server_fixtures()

JUPYTER_GPU_SESSIONS = str(Path(sys.executable).with_name("jupyter-gpu-sessions"))


def terminal(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The command as typed in a shell, without the test's API settings unless given."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_GPU_SESSIONS_")}
    return subprocess.run(
        [JUPYTER_GPU_SESSIONS, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
    )


@pytest.fixture
def manager(jp_serverapp) -> GPUSessionManager:
    return jp_serverapp.web_app.settings["gpu_sessions_engine"].manager


@pytest.fixture
def api_url(jp_fetch, jp_http_port, jp_base_url) -> str:
    return f"http://127.0.0.1:{jp_http_port}{jp_base_url}gpu-sessions/api/"


def api_env(api_url: str, user: str = "alice") -> dict[str, str]:
    return {"JUPYTER_GPU_SESSIONS_URL": api_url, "JUPYTER_GPU_SESSIONS_TOKEN": TOKENS[user]}


async def test_the_terminal_prints_what_the_magics_print(api_url, manager):
    a = stored_session(manager, "alice", name="A")
    b = stored_session(manager, "alice", name="B", depends_on=(a.id,))
    c = stored_session(manager, "alice", name="C", depends_on=(a.id,))
    stored_session(manager, "alice", name="D", depends_on=(b.id, c.id))
    env = api_env(api_url)
    await asyncio.to_thread(terminal, "vfolder", "create", "data", env=env)
    forms = [
        ("session", ["list"]),
        ("session", ["list", "--all"]),
        ("session", ["info", b.id]),
        ("session", ["show-graph", a.id]),
        ("session", ["show-graph", a.id, "--table"]),
        ("session", ["gpus"]),
        ("session", ["quota"]),
        ("vfolder", ["list"]),
        ("vfolder", ["info", "data"]),
    ]
    for group, argv in forms:
        result = await asyncio.to_thread(terminal, group, *argv, env=env)
        assert result.returncode == 0, (argv, result.stderr)
        assert result.stderr == ""
        ctx = Context(prog=f"%{group}", environ=env)
        shown = await asyncio.to_thread(commands.run, group, argv, ctx)
        assert result.stdout == repr(shown) + "\n", (group, argv)
    tree = (await asyncio.to_thread(terminal, "session", "show-graph", a.id, env=env)).stdout
    assert tree.count("D (") == 2

    # A mistake: one line on stderr, exit status 2; the server's refusal: status 1.
    bad = await asyncio.to_thread(terminal, "session", "start", "x", "--gpus", "two", env=env)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == (
        "jupyter gpu-sessions session start: argument --gpus: 'two' is not a whole number "
        "(see jupyter gpu-sessions session start --help)\n"
    )
    refused = await asyncio.to_thread(terminal, "session", "rm", a.id, env=env)
    assert refused.returncode == 1
    assert refused.stderr.startswith("jupyter gpu-sessions session rm: 3 session(s) depend on")
    assert "--recursive" in refused.stderr and refused.stderr.count("\n") == 1
    ended = await asyncio.to_thread(terminal, "session", "rm", a.id, "--recursive", env=env)
    assert ended.returncode == 0 and ended.stdout.startswith("Ended 4 session(s):")
    helped = await asyncio.to_thread(terminal, "session", "--help", env=env)
    assert helped.returncode == 0 and "show-graph [NAME] [--table]" in helped.stdout


async def test_the_terminal_finds_the_users_running_server(api_url, tmp_path, jp_http_port):
    """No JUPYTER_GPU_SESSIONS_URL: the first running server (jpserver-*.json) that answers."""
    runtime = tmp_path / "terminal-runtime"
    runtime.mkdir()
    env = {"JUPYTER_RUNTIME_DIR": str(runtime)}
    none = await asyncio.to_thread(terminal, "session", "list", env=env)
    assert none.returncode == 1 and none.stderr.count("\n") == 1
    assert "no running Jupyter server with jupyter-gpu-sessions answered" in none.stderr
    base = api_url.removesuffix("gpu-sessions/api/")
    gone = {"pid": 2**22 + 7, "url": "http://127.0.0.1:9/", "token": "x", "base_url": "/"}
    (runtime / "jpserver-1.json").write_text(json.dumps(gone))  # its process is gone
    wrong = {"pid": os.getpid(), "url": "http://127.0.0.1:9/", "token": "x", "base_url": "/"}
    (runtime / "jpserver-2.json").write_text(json.dumps(wrong))  # does not answer
    mine = {
        "pid": os.getpid(),
        "url": base,
        "port": jp_http_port,
        "token": TOKENS["alice"],
        "base_url": base.split(str(jp_http_port), 1)[1],
    }
    (runtime / "jpserver-3.json").write_text(json.dumps(mine))
    os.utime(runtime / "jpserver-3.json", (1_000_000_000, 1_000_000_000))  # the oldest
    found = await asyncio.to_thread(terminal, "vfolder", "list", env=env)
    assert found.returncode == 0, found.stderr
    assert found.stdout == "No vfolders.\n"


async def test_session_run_in_a_terminal_streams_the_log_and_exits_with_the_commands_status(
    jp_serverapp, api_url, kernel_image
):
    await jp_serverapp.extension_manager.start_all_extensions()  # batch sessions run
    env = api_env(api_url)
    code = "import time\nfor i in range(3): print('step', i, flush=True); time.sleep(0.5)\nexit(3)"
    failed = await asyncio.to_thread(
        terminal, "session", "run", "job", "--", "python3", "-c", code, env=env
    )
    assert failed.returncode == 3, failed.stderr
    lines = failed.stdout.splitlines()
    assert lines[0].startswith("Session job (") and "waiting for it" in lines[0]
    assert [line for line in lines if line.startswith("step")] == ["step 0", "step 1", "step 2"]
    assert lines[-1].startswith("Session job (") and "TERMINATED: exit code 3" in lines[-1]

    # A dependent of the failed job never runs: CANCELLED, said in one line, status 1.
    cancelled = await asyncio.to_thread(
        terminal, "session", "run", "after", "--depends-on", "job", "--", "true", env=env
    )
    assert cancelled.returncode == 1
    assert "CANCELLED: dependency-failed" in cancelled.stdout.splitlines()[-1]

    ok = await asyncio.to_thread(
        terminal, "session", "run", "fine", "--", "sh", "-c", "echo all good", env=env
    )
    assert ok.returncode == 0 and "all good" in ok.stdout
    assert ok.stdout.splitlines()[-1].endswith("exit code 0 (success).")

    logs = await asyncio.to_thread(terminal, "session", "logs", "job", env=env)
    ctx = Context(prog="%session", environ=env)
    assert (
        logs.stdout
        == repr(await asyncio.to_thread(commands.run, "session", "logs job", ctx)) + "\n"
    )
    assert "step 2" in logs.stdout
    followed = await asyncio.to_thread(terminal, "session", "logs", "job", "--follow", env=env)
    assert "step 0" in followed.stdout and followed.returncode == 3
