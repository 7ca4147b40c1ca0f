"""How a kernel reaches the API: its session's own token, over a unix socket mounted into
its container (or the server's URL for a local kernel); what that token may and may not do,
and that the server's own token never reaches a kernel."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from pathlib import Path

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import websocket_connect

from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.image import DEFAULT_RECIPE
from jupyter_gpu_sessions.manager import GPUSessionManager
from jupyter_gpu_sessions.manager.api_access import (
    CONTAINER_API_DIR,
    TOKEN_CACHE_SECONDS,
    token_hash,
)
from jupyter_gpu_sessions.runtime.docker import CONTAINER_STATE_DIR

from .api_support import ADMIN, TOKENS, server_fixtures, stored_session
from .support import (
    KERNEL_UID,
    make_notebook_dir,
    run_code,
    shipped_spec,
    wait_for_iopub,
    write_kernelspec,
)

SERVER_SECRET_VARS = ("JUPYTER_TOKEN", "JPY_API_TOKEN", "JUPYTERHUB_API_TOKEN")

jp_server_config, jp_auth_header = server_fixtures(
    GPUSessionManager={
        # A deployer who allowlists the server's credentials still does not pass them.
        "env_allowlist": ["LANG", "TZ", *SERVER_SECRET_VARS],
        "local_env_allowlist": ["PATH", "HOME", *SERVER_SECRET_VARS],
    },
)

# Run in a kernel: the API as the kernel-side client calls it (stdlib only: HTTP over the
# mounted unix socket in a container, the server's URL in a local kernel).
API_CODE = r"""
import http.client, json, os, socket
from urllib.parse import urlsplit

class _Unix(http.client.HTTPConnection):
    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(os.environ["JUPYTER_GPU_SESSIONS_SOCKET"])
        self.sock = s

def api(method, path, body=None, token=None):
    url = urlsplit(os.environ["JUPYTER_GPU_SESSIONS_URL"])
    if os.environ.get("JUPYTER_GPU_SESSIONS_SOCKET"):
        conn = _Unix("localhost", timeout=30)
    else:
        conn = http.client.HTTPConnection(url.netloc, timeout=30)
    token = token or os.environ["JUPYTER_GPU_SESSIONS_TOKEN"]
    conn.request(method, url.path + path, body=None if body is None else json.dumps(body),
                 headers={"Authorization": "token " + token})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        return [r.status, json.loads(data) if data else None]
    except ValueError:
        return [r.status, data.decode(errors="replace")]

def say(value):
    print("@@" + json.dumps(value))

def ws_handshake(path, token):
    # The events websocket's upgrade over the socket: its status (101 = accepted).
    url = urlsplit(os.environ["JUPYTER_GPU_SESSIONS_URL"])
    conn = _Unix("localhost", timeout=30)
    conn.request("GET", url.path + path + "?token=" + token, headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    status = conn.getresponse().status
    conn.close()
    return status
"""

ENV_CODE = r"""
say({k: v for k, v in os.environ.items()})
"""


async def kernel_says(kc, code: str) -> list:
    """Run ``code`` (after API_CODE) and return every value it passed to ``say``."""
    reply, out = await run_code(kc, API_CODE + code, timeout=90)
    assert reply["status"] == "ok", out
    return [json.loads(line[2:]) for line in out.splitlines() if line.startswith("@@")]


def install_spec(jp_data_dir: Path, name: str, **config) -> str:
    spec = shipped_spec("python3-container")
    if config.get("runtime") == "local":  # no container: none of its limits apply
        spec["metadata"]["kernel_provisioner"]["config"] = config
    else:
        spec["metadata"]["kernel_provisioner"]["config"].update(config)
    target = jp_data_dir / "kernels" / name
    target.mkdir(parents=True)
    (target / "kernel.json").write_text(json.dumps(spec))
    return name


async def start_server_kernel(jp_fetch, kernels, name: str):
    response = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": name}))
    kernel_id = json.loads(response.body)["id"]
    km = kernels.get_kernel(kernel_id)
    await km.ready
    kc = km.client()
    kc.start_channels()
    await wait_for_iopub(kc)
    return kernel_id, km, kc


async def with_token(jp_fetch, method: str, path: str, token: str, body=None) -> tuple[int, dict]:
    """An API call that presents ``token`` (Api's calls present a user's)."""
    response = await jp_fetch(
        "gpu-sessions",
        "api",
        *path.split("/"),
        method=method,
        headers={"Authorization": f"token {token}"},
        body=None if body is None and method == "GET" else json.dumps(body or {}),
        raise_error=False,
        allow_nonstandard_methods=True,
    )
    return response.code, json.loads(response.body) if response.body else None


def files_under(folder: str) -> dict[str, bytes]:
    found = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    found[path] = f.read()
    return found


def server_secrets(serverapp) -> list[str]:
    secrets = [serverapp.identity_provider.token, *TOKENS.values()]
    return [s for s in secrets if s]


@pytest.fixture
def container_spec(jp_data_dir, kernel_image):
    # A kernelspec that names a server credential does not pass it either.
    env = {"JUPYTERHUB_API_TOKEN": "from-the-kernelspec", "KEPT": "yes"}
    return install_spec(
        jp_data_dir, "api-container", image=kernel_image, cpus=1, memory="1GiB", env=env
    )


@pytest.fixture
def secrets_in_environ(jp_serverapp, monkeypatch):
    """The server's own credentials in its environment, as JupyterHub and the CLI set them."""
    token = jp_serverapp.identity_provider.token
    for name in SERVER_SECRET_VARS:
        monkeypatch.setenv(name, token)
    return token


async def test_a_container_kernel_reaches_the_api_over_its_socket_as_its_owner_never_admin(
    jp_fetch,
    jp_serverapp,
    jp_root_dir,
    jp_base_url,
    jp_http_port,
    container_spec,
    secrets_in_environ,
    docker_client,
    tmp_path,
):
    make_notebook_dir(jp_root_dir)
    await jp_serverapp.extension_manager.start_all_extensions()  # serves the socket
    engine = jp_serverapp.web_app.settings["gpu_sessions_engine"]
    manager: GPUSessionManager = engine.manager
    kernels = jp_serverapp.kernel_manager
    bobs = stored_session(manager, "bob", SessionStatus.RUNNING, name="bobs")
    manager.admin.touch_user(ADMIN, ["hub-ml"])  # as a JupyterHub login would record them
    kernel_id, km, kc = await start_server_kernel(jp_fetch, kernels, container_spec)
    session = km.provisioner.session
    assert session.owner == ADMIN  # the kernel's owner is an admin: its token is not
    try:
        # What the kernel was given.
        (env,) = await kernel_says(kc, ENV_CODE)
        token = env["JUPYTER_GPU_SESSIONS_TOKEN"]
        assert token.startswith("jgs_") and len(token) > 40
        assert env["JUPYTER_GPU_SESSIONS_URL"] == f"http://localhost{jp_base_url}gpu-sessions/api/"
        assert env["JUPYTER_GPU_SESSIONS_SOCKET"] == f"{CONTAINER_API_DIR}/api.sock"
        assert env["JUPYTER_GPU_SESSIONS_SESSION_ID"] == session.id
        assert env["JUPYTER_GPU_SESSIONS_INFO"] == f"{CONTAINER_STATE_DIR}/session.json"
        assert not set(SERVER_SECRET_VARS) & set(env) and env["KEPT"] == "yes"
        assert manager.tokens.count(session.id) == 1
        assert manager.tokens.owner(token_hash(token)) == (ADMIN, session.id)

        # Its socket: the server's directory, mounted read-only (reached by uid 1000).
        (container,) = docker_client.containers.list(
            filters={"label": f"io.jupyter.gpu-sessions.session-id={session.id}"}
        )
        (mount,) = [m for m in container.attrs["Mounts"] if m["Destination"] == CONTAINER_API_DIR]
        assert mount["RW"] is False
        assert os.path.exists(os.path.join(mount["Source"], "api.sock"))

        # The kernel sees its own session; nobody else's exists for it.
        said = await kernel_says(
            kc,
            f"""
say(sorted(get_ipython().extension_manager.loaded))
say(os.getuid())
say(json.load(open(os.environ["JUPYTER_GPU_SESSIONS_INFO"])))
say(api("GET", "sessions"))
say(api("GET", "sessions/{session.id}"))
say(api("GET", "sessions/{bobs.id}"))
say(api("GET", "sessions?owner=bob"))
say(api("DELETE", "sessions/{bobs.id}"))
say(api("PUT", "policies/default", {{"max_gpus": 64}}))
say(api("GET", "gpus"))
say([ws_handshake("events", os.environ["JUPYTER_GPU_SESSIONS_TOKEN"]),
     ws_handshake("events", "jgs_" + "0" * 43)])
""",
        )
        loaded, uid, info, listed, own, other, others, end_other, policy, gpus, ws = said
        assert "jupyter_gpu_sessions" in loaded  # the default image carries the magics
        assert uid == KERNEL_UID
        assert info["id"] == session.id and info["owner"] == ADMIN
        assert info["runtime"] == "docker" and info["kind"] == "interactive"
        assert info["image"] == session.image and info["request"]["cpus"] == 1
        assert {"devices", "mounts", "limits", "created_at", "name"} <= set(info)
        assert token not in json.dumps(info)
        status, page = listed
        assert status == 200
        assert [s["id"] for s in page["sessions"]] == [session.id]
        assert own[0] == 200 and own[1]["id"] == session.id and own[1]["status"] == "RUNNING"
        assert other[0] == 404 and others[0] == 404 and end_other[0] == 404
        assert manager.store.get(bobs.id).status == SessionStatus.RUNNING
        assert policy[0] == 403 and "not one" in policy[1]["message"]  # never an admin
        assert gpus[0] == 200
        assert ws == [101, 401]  # the events websocket over the socket, by token
        # A token knows no Hub groups: the owner's stored ones are kept, not cleared.
        assert manager.admin.user_groups(ADMIN) == ["hub-ml"]

        # POST and DELETE pass without any XSRF cookie (a token is no cookie).
        created, trashed = await kernel_says(
            kc,
            'say(api("POST", "vfolders", {"name": "from-kernel"}))\n'
            'say(api("DELETE", "vfolders/from-kernel"))\n',
        )
        assert created[0] == 201 and created[1]["owner"] == ADMIN, created
        assert trashed[0] in (200, 204), trashed

        # The token works only on this API: not on jupyter_server's own routes.
        header = {"Authorization": f"token {token}"}
        for route in (("api", "contents"), ("api", "kernels"), ("api", "sessions")):
            response = await jp_fetch(*route, headers=header, raise_error=False)
            assert response.code in (401, 403), route
            response = await jp_fetch(
                *route, headers={"Authorization": ""}, params={"token": token}, raise_error=False
            )
            assert response.code in (401, 403), route
        status, _ = await with_token(jp_fetch, "GET", "sessions", token)
        assert status == 200

        # The events websocket takes it too (?token=), as its owner without admin rights.
        ws = await websocket_connect(
            f"ws://127.0.0.1:{jp_http_port}{jp_base_url}gpu-sessions/api/events?token={token}"
        )
        hello = json.loads(await ws.read_message())
        ws.close()
        assert hello == {"type": "hello", "user": ADMIN, "admin": False}

        # A server that died (its socket dead, its directory kept) and came back at the
        # same address: the running container sees the new socket through its mount.
        app = jp_serverapp.web_app.settings["gpu_sessions_app"]
        dead, app._api_server = app._api_server, None
        dead.stop()
        await dead.close_all_connections()
        probe = (
            f'try:\n    say(api("GET", "sessions/{session.id}")[0])\n'
            "except OSError as exc:\n    say(type(exc).__name__)\n"
        )
        assert await kernel_says(kc, probe) == ["ConnectionRefusedError"]
        app._serve_api()
        assert app._api_socket_path == os.path.join(mount["Source"], "api.sock")
        assert await kernel_says(kc, probe) == [200]

        # The kernel may write to its state directory: links it plants there to a host file
        # are replaced, never followed, when the (root) server restarts it.
        victim = tmp_path / "victim"
        victim.write_text("untouched")
        (planted,) = await kernel_says(
            kc,
            f"""
folder = "{CONTAINER_STATE_DIR}"
names = [n for n in os.listdir(folder) if n.endswith((".json", ".py"))]
for name in names:
    os.unlink(os.path.join(folder, name))
    os.symlink("{victim}", os.path.join(folder, name))
say(sorted(names))
""",
        )
        assert "session.json" in planted and "notice.py" in planted
        assert any(n.startswith("kernel-") for n in planted)  # the connection file's copy

        # A restart keeps the token, and the new kernel still reaches the API.
        await kernels.restart_kernel(kernel_id)
        await wait_for_iopub(kc)
        assert victim.read_text() == "untouched" and victim.stat().st_uid == os.geteuid()
        for name in planted:
            assert not os.path.islink(os.path.join(manager.state_root, session.id, name))
        (env_after,) = await kernel_says(kc, ENV_CODE)
        assert env_after["JUPYTER_GPU_SESSIONS_TOKEN"] == token
        (again,) = await kernel_says(kc, f'say(api("GET", "sessions/{session.id}"))')
        assert again[0] == 200 and again[1]["status"] == "RUNNING"

        # Neither the kernel's environment nor its files hold the server's token.
        secrets = server_secrets(jp_serverapp)
        assert secrets_in_environ in secrets
        for value in env_after.values():
            assert not any(secret in value for secret in secrets)
        folder = os.path.join(manager.state_root, session.id)
        stored = files_under(folder)
        assert os.path.join(folder, "session.json") in stored
        for path, data in stored.items():
            assert not any(secret.encode() in data for secret in secrets), path
        inspected = json.dumps(container.attrs)
        assert not any(secret in inspected for secret in secrets)
    finally:
        kc.stop_channels()
        if kernel_id in kernels:
            await kernels.shutdown_kernel(kernel_id)

    # The token dies with its session.
    ended = manager.store.get(session.id)
    assert ended.status == SessionStatus.TERMINATED
    status, body = await with_token(jp_fetch, "GET", "sessions", token)
    assert status == 401 and "not accepted" in body["message"]
    assert manager.tokens.count(session.id) == 0
    with pytest.raises(HTTPClientError) as refused:
        await websocket_connect(
            f"ws://127.0.0.1:{jp_http_port}{jp_base_url}gpu-sessions/api/events?token={token}"
        )
    assert refused.value.code == 401


async def test_a_local_kernel_gets_the_servers_url_and_its_own_token(
    jp_fetch, jp_serverapp, jp_root_dir, jp_base_url, jp_http_port, jp_data_dir, secrets_in_environ
):
    make_notebook_dir(jp_root_dir)
    await jp_serverapp.extension_manager.start_all_extensions()
    manager: GPUSessionManager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    kernels = jp_serverapp.kernel_manager
    name = install_spec(jp_data_dir, "api-local", runtime="local")
    kernel_id, km, kc = await start_server_kernel(jp_fetch, kernels, name)
    session = km.provisioner.session
    try:
        env, own, listed = await kernel_says(
            kc,
            ENV_CODE + f'say(api("GET", "sessions/{session.id}"))\nsay(api("GET", "sessions"))\n',
        )
        assert env["JUPYTER_GPU_SESSIONS_URL"] == (
            f"http://127.0.0.1:{jp_http_port}{jp_base_url}gpu-sessions/api/"
        )
        assert "JUPYTER_GPU_SESSIONS_SOCKET" not in env
        assert env["JUPYTER_GPU_SESSIONS_TOKEN"].startswith("jgs_")
        folder = os.path.join(manager.state_root, session.id)
        assert env["JUPYTER_GPU_SESSIONS_INFO"] == os.path.join(folder, "session.json")
        assert json.loads(Path(env["JUPYTER_GPU_SESSIONS_INFO"]).read_text())["runtime"] == "local"
        assert own[0] == 200 and own[1]["id"] == session.id
        assert [s["id"] for s in listed[1]["sessions"]] == [session.id]
        secrets = server_secrets(jp_serverapp)
        assert not set(SERVER_SECRET_VARS) & set(env)
        assert not any(s in v for v in env.values() for s in secrets)
        for path, data in files_under(folder).items():
            assert not any(s.encode() in data for s in secrets), path
    finally:
        kc.stop_channels()
        await kernels.shutdown_kernel(kernel_id)


async def test_an_unknown_or_malformed_session_token_is_refused_with_a_clear_message(
    jp_fetch, jp_serverapp
):
    for token in ("jgs_" + "A" * 43, "jgs_short", "jgs_" + "x" * 400):
        status, body = await with_token(jp_fetch, "GET", "sessions", token)
        assert status == 401, token
        assert "not accepted" in body["message"] and body["reason"] == "unauthenticated"
    # A POST with an unknown token: 401 as well, not an XSRF 403.
    status, body = await with_token(jp_fetch, "POST", "vfolders", "jgs_x", {"name": "x"})
    assert status == 401 and "not accepted" in body["message"]


async def test_the_socket_is_private_to_this_server_and_gone_when_it_stops(
    jp_serverapp, jp_base_url
):
    app = jp_serverapp.web_app.settings["gpu_sessions_app"]
    # Someone else made the usual directory (world-writable): not used, a fresh one is.
    squatted = app._default_socket_dir()
    os.mkdir(squatted)
    os.chmod(squatted, 0o777)
    try:
        await jp_serverapp.extension_manager.start_all_extensions()
    finally:
        os.rmdir(squatted)
    path = app._api_socket_path
    folder = os.path.dirname(path)
    assert folder != squatted and os.path.basename(folder).startswith("jgs-api-")
    assert len(path.encode()) <= 107
    assert os.stat(folder).st_mode & 0o777 == 0o711
    assert os.stat(path).st_mode & 0o777 == 0o666
    endpoint = app.engine.manager.api_endpoint
    assert endpoint.socket_dir == folder
    assert endpoint.container_url == f"http://localhost{jp_base_url}gpu-sessions/api/"

    # jupyter_server's host check passes over the socket, and its own auth still applies.
    def ask(headers: dict[str, str]) -> int:
        import http.client
        import socket

        class Unix(http.client.HTTPConnection):
            def connect(self):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)

        conn = Unix("localhost", timeout=10)
        conn.request("GET", f"{jp_base_url}gpu-sessions/api/sessions", headers=headers)
        status = conn.getresponse().status
        conn.close()
        return status

    assert await asyncio.to_thread(ask, {"Authorization": f"token {TOKENS['alice']}"}) == 200
    assert await asyncio.to_thread(ask, {}) == 401

    await app.stop_extension()
    assert not os.path.exists(path)
    assert app.engine.manager.api_endpoint is None


async def test_a_kernel_started_without_a_server_knows_itself_but_has_no_api(
    fresh_manager, kernel_image, kernel_dir, tmp_path
):
    """As nbclient and papermill start kernels; on the base image, which lacks the package,
    the magics' autoload is a silent no-op."""
    from jupyter_client.manager import AsyncKernelManager

    manager = fresh_manager()
    notebooks = make_notebook_dir(tmp_path / "nb")
    spec = shipped_spec("python3-container")
    spec["metadata"]["kernel_provisioner"]["config"]["image"] = DEFAULT_RECIPE.tag
    ksm = write_kernelspec(kernel_dir, "base-image", spec)
    km = AsyncKernelManager(kernel_name="base-image", kernel_spec_manager=ksm)
    await km.start_kernel(cwd=str(notebooks))
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        reply, out = await run_code(kc, "print('first cell')")
        assert reply["status"] == "ok" and out == "first cell\n"  # nothing else said
        env, info, loaded = await kernel_says(
            kc,
            ENV_CODE + 'say(json.load(open(os.environ["JUPYTER_GPU_SESSIONS_INFO"])))\n'
            "say(sorted(get_ipython().extension_manager.loaded))\n",
        )
        assert "jupyter_gpu_sessions" not in loaded
        session = km.provisioner.session
        assert env["JUPYTER_GPU_SESSIONS_SESSION_ID"] == session.id
        assert env["JUPYTER_GPU_SESSIONS_INFO"] == f"{CONTAINER_STATE_DIR}/session.json"
        for name in ("URL", "TOKEN", "SOCKET"):
            assert f"JUPYTER_GPU_SESSIONS_{name}" not in env
        assert info["id"] == session.id and info["owner"] == session.owner
        assert manager.tokens.count(session.id) == 0  # no server: no token minted
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


# -- tokens in the store and the engine (no kernel needed) ---------------------------------
def test_a_token_acts_only_while_its_session_lives_and_dies_at_once_when_it_ends(
    fresh_manager, aloop
):
    from jupyter_gpu_sessions.engine import current_engine

    manager = fresh_manager()
    engine = current_engine()
    manager.serve_api("http://127.0.0.1:1/gpu-sessions/api/", None)
    running = stored_session(manager, "alice", SessionStatus.RUNNING)
    running.runtime = "local"
    token = manager.session_token(running)
    assert token and manager.session_token(running) == token  # reused while accepted
    assert aloop.run(engine.token_owner(token)) == "alice"
    assert aloop.run(engine.token_owner(token)) == "alice"  # from the cache
    env = manager.session_api_env(running)
    assert env["JUPYTER_GPU_SESSIONS_TOKEN"] == token
    assert env["JUPYTER_GPU_SESSIONS_URL"] == "http://127.0.0.1:1/gpu-sessions/api/"

    # Ended in this process: refused at once, though the cache had it a moment ago.
    aloop.run(manager.end_session(running.id, "test"))
    assert aloop.run(engine.token_owner(token)) is None
    assert manager.tokens.count(running.id) == 0
    assert manager.session_token(manager.store.get(running.id)) is None  # none for the dead

    # Ended by another process (a direct store write): refused within the cache's time.
    other = stored_session(manager, "bob", SessionStatus.RUNNING)
    other_token = manager.session_token(other)
    assert aloop.run(engine.token_owner(other_token)) == "bob"
    manager.store.transition(other.id, SessionStatus.TERMINATING, "elsewhere")
    assert manager.token_owner(other_token) is None  # TERMINATING: no longer accepted
    aloop.run(asyncio.sleep(TOKEN_CACHE_SECONDS + 0.1))
    assert aloop.run(engine.token_owner(other_token)) is None

    # Malformed tokens never reach the database.
    for bad in ("", "jgs_", "token", "jgs_" + "a" * 42 + "!", other_token + "x", token + "\n"):
        assert manager.cached_token_owner(bad) is None
        assert aloop.run(engine.token_owner(bad)) is None


def test_no_lookup_racing_an_end_lets_the_token_through_afterwards(fresh_manager, aloop):
    from jupyter_gpu_sessions.engine import current_engine

    manager = fresh_manager()
    engine = current_engine()
    sessions = [stored_session(manager, "carol", SessionStatus.RUNNING) for _ in range(6)]
    tokens = {s.id: manager.session_token(s) for s in sessions}
    ended: dict[str, bool] = {}
    wrong: list[str] = []
    stop = threading.Event()

    def hammer(session_id: str) -> None:
        while not stop.is_set():
            done = ended.get(session_id, False)  # read before the lookup starts
            owner = manager.token_owner(tokens[session_id])
            if done and owner is not None:
                wrong.append(session_id)

    threads = [threading.Thread(target=hammer, args=(s.id,)) for s in sessions for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for s in sessions:
            aloop.run(manager.end_session(s.id, "race"))
            ended[s.id] = True
            assert aloop.run(engine.token_owner(tokens[s.id])) is None
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not wrong


def test_clearing_history_removes_token_rows_with_their_sessions(fresh_manager):
    manager = fresh_manager()
    session = stored_session(manager, "alice", SessionStatus.RUNNING)
    manager.tokens.add(session.id, token_hash("jgs_" + uuid.uuid4().hex))
    manager.store.transition(session.id, SessionStatus.TERMINATING, "t")
    assert manager.tokens.count(session.id) == 1  # rows go with the final status...
    manager.store.transition(session.id, SessionStatus.TERMINATED, "t")
    assert manager.tokens.count(session.id) == 0
    kept = stored_session(manager, "alice", SessionStatus.TERMINATED)
    with manager.store.engine.begin() as conn:  # ...or with the session row (cascade)
        from jupyter_gpu_sessions.store.tables import session_tokens

        conn.execute(
            session_tokens.insert().values(token_hash="f" * 64, session_id=kept.id, created_at=0)
        )
    assert manager.tokens.count(kept.id) == 1
    assert manager.clear_history(1e-9) >= 2
    assert manager.tokens.count(kept.id) == 0


# -- the kernel-side package in the default image ------------------------------------------
def test_the_kernel_side_package_is_a_thin_layer_rebuilt_in_seconds(
    kernel_image, docker_client, tmp_path
):
    import time

    from jupyter_gpu_sessions.image.build import build_kernel_layer
    from jupyter_gpu_sessions.image.recipe import kernel_package_digest, kernel_package_files

    # The default image is the recipe's base plus a layer named by the package's files.
    assert kernel_image == f"{DEFAULT_RECIPE.tag}-{kernel_package_digest()}"
    names = [name for name, _ in kernel_package_files()]
    assert {"__init__.py", "_version.py", "kernel/__init__.py"} <= set(names)
    assert not any("__pycache__" in n for n in names)

    # Another file set names another layer (a changed kernel/ is a new tag, the same base).
    package = tmp_path / "pkg"
    (package / "kernel").mkdir(parents=True)
    for name in ("__init__.py", "_version.py", "kernel/__init__.py"):
        (package / name).write_text("# one\n")
    first = [(n, p.read_bytes()) for n, p in kernel_package_files(package)]
    (package / "kernel" / "__init__.py").write_text("# two\n")
    assert [(n, p.read_bytes()) for n, p in kernel_package_files(package)] != first

    tag = f"jupyter-gpu-sessions/test-layer:{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    try:
        build_kernel_layer(DEFAULT_RECIPE.tag, tag, client=docker_client)
        took = time.monotonic() - started
        image = docker_client.images.get(tag)
        assert image.labels["io.jupyter.gpu-sessions.kernel-package"] == kernel_package_digest()
        base = docker_client.images.get(DEFAULT_RECIPE.tag)
        layers, base_layers = image.attrs["RootFS"]["Layers"], base.attrs["RootFS"]["Layers"]
        assert layers[: len(base_layers)] == base_layers and len(layers) > len(base_layers)
        # Importable as a non-root user, with none of the server's dependencies present,
        # and compiled (no bytecode written at import: the files are root's).
        out = docker_client.containers.run(
            tag,
            [
                "python3",
                "-B",
                "-c",
                "import importlib.util as u, sys\n"
                "import jupyter_gpu_sessions, jupyter_gpu_sessions.kernel.magics\n"
                "import jupyter_gpu_sessions.kernel.client\n"
                "print([m for m in ('jupyter_server', 'sqlalchemy', 'docker', 'alembic')"
                " if u.find_spec(m)])\n"
                "print(hasattr(jupyter_gpu_sessions, 'load_ipython_extension'))\n"
                "print(jupyter_gpu_sessions.__file__)\n",
            ],
            user="1000:1000",
            remove=True,
        ).decode()
        assert out.splitlines() == [
            "[]",
            "True",
            "/usr/local/lib/python3.11/dist-packages/jupyter_gpu_sessions/__init__.py",
        ], out
        assert took < 60, f"the layer took {took:.0f}s"
    finally:
        docker_client.images.remove(tag, force=True)


# -- batch jobs: the same environment, file and token --------------------------------------
async def test_a_batch_job_reaches_the_api_with_its_own_token_which_dies_with_it(
    jp_fetch, jp_serverapp, kernel_image, secrets_in_environ
):
    from .api_support import Api

    await jp_serverapp.extension_manager.start_all_extensions()
    manager: GPUSessionManager = jp_serverapp.web_app.settings["gpu_sessions_engine"].manager
    api = Api(jp_fetch)
    code = API_CODE + (
        "import sys\n"
        'me = os.environ["JUPYTER_GPU_SESSIONS_SESSION_ID"]\n'
        'info = json.load(open(os.environ["JUPYTER_GPU_SESSIONS_INFO"]))\n'
        'status, body = api("GET", "sessions/" + me)\n'
        'print(status, info["kind"], info["name"], body["status"])\n'
        'sys.exit(0 if (status, info["kind"], body["status"]) == (200, "batch", "RUNNING")'
        " else 3)\n"
    )
    status, body = await api.post(
        "sessions",
        user="alice",
        body={"type": "batch", "name": "calls-home", "command": ["python3", "-c", code]},
    )
    assert status == 201, body
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        status, session = await api.get(f"sessions/{body['id']}", user="alice")
        if session["status"] in ("TERMINATED", "ERROR", "CANCELLED"):
            break
        assert asyncio.get_running_loop().time() < deadline, session
        await asyncio.sleep(0.1)
    logs = (await api.get(f"sessions/{body['id']}/logs", user="alice"))[1]["logs"]
    assert session["status"] == "TERMINATED" and session["exit_code"] == 0, (session, logs)
    assert "200 batch calls-home RUNNING" in logs
    assert not any(s in logs for s in server_secrets(jp_serverapp))
    assert manager.tokens.count(body["id"]) == 0  # gone with the session
