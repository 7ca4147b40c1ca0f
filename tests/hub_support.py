"""A real JupyterHub for scenario tests: the example deployment, run for real.

``examples/jupyterhub/jupyterhub_config.py`` is started with ``jupyterhub -f`` (through a
small wrapper config that adds an API token for the tests), as root, with:

- configurable-http-proxy (:func:`chp_path`), on free ports, all on 127.0.0.1;
- a throwaway PostgreSQL cluster (``scripts/lib.sh start_test_postgres``) as the store of
  the manager service (``jupyter gpu-sessions manager``, a Hub-managed service);
- OS users made with ``useradd`` when missing (:data:`USERS`: jgs-ada and jgs-bob, and the
  Hub admin jgs-cy), logging in with SharedPasswordAuthenticator (:attr:`Hub.password`,
  :attr:`Hub.admin_password` for admins);
- LocalProcessSpawner: each user's single-user server runs as that OS user, with this
  virtualenv's ``jupyterhub-singleuser`` (every directory above ``sys.prefix`` must be
  traversable by those users: the fixture checks, and fails saying which is not);
- simulated GPUs (4×A100-80GB with fake device nodes) for the service.

Use it through the session-scoped ``hub`` fixture (``from .hub_support import
hub_fixture`` in a test module; it takes conftest's ``docker_client`` and
``kernel_image``): a :class:`Hub` with helpers to log a user in through the real login
page, start and stop a user's server through the Hub API, make a user's API token, call
the service (REST API, engine RPC, events websocket), run code in a kernel of a user's
server (:func:`start_kernel`, :func:`execute`) and find the processes involved. Every
helper talks real HTTP to the real processes.

At teardown the Hub stops its proxy, service and users' servers; every container of the
service's store is removed and the PostgreSQL cluster thrown away.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from jupyter_gpu_sessions.runtime.base import SESSION_LABEL, STORE_LABEL

from .browser_support import fake_gpu_nodes, free_port
from .databases import _lib

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DIR = REPO / "examples" / "jupyterhub"
EXAMPLE_CONFIG = EXAMPLE_DIR / "jupyterhub_config.py"
SERVICE = "gpu-sessions"
# The Hub's users: (name, Hub admin). Made with useradd when missing.
USERS = {"jgs-ada": False, "jgs-bob": False, "jgs-cy": True}
ADMIN = "jgs-cy"
TEST_SERVICE = "jgs-tests"  # the tests' own Hub API client (an admin token)
SIMULATED_GPUS = "4xA100-80GB"
CHP = "configurable-http-proxy"
T = TypeVar("T")


# -- finding things -------------------------------------------------------------------------
def chp_path() -> str:
    """configurable-http-proxy: $JGS_CHP, else the example's ``npm ci`` install, else the
    one in /tmp/chp (installed by hand), else PATH. Fails the test when there is none."""
    candidates = [
        os.environ.get("JGS_CHP", ""),
        str(EXAMPLE_DIR / "node_modules" / ".bin" / CHP),
        f"/tmp/chp/node_modules/.bin/{CHP}",
        shutil.which(CHP) or "",
    ]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    pytest.fail(
        f"No {CHP}: run `npm ci` in {EXAMPLE_DIR} (scripts/test.sh does), or set JGS_CHP "
        "to its path.",
        pytrace=False,
    )


def until(check: Callable[[], T], timeout: float = 60.0, what: str = "the condition") -> T:
    """Poll ``check()`` (every 0.1 s) until it is truthy; its value. The processes here
    tell of nothing: their state is read again until it is the one a test needs."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.1)


# -- OS users -------------------------------------------------------------------------------
def ensure_os_user(name: str) -> pwd.struct_passwd:
    """The OS account ``name``, made (with a home directory) when missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


def untraversable(user: pwd.struct_passwd, path: str) -> list[str]:
    """Directories from / down to ``path`` that ``user`` may not pass through (x bit)."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    blocked = []
    current = Path(os.path.realpath(path))
    for directory in [*reversed(current.parents), current]:
        info = os.stat(directory)
        if info.st_uid == user.pw_uid:
            ok = info.st_mode & stat.S_IXUSR
        elif info.st_gid in groups:
            ok = info.st_mode & stat.S_IXGRP
        else:
            ok = info.st_mode & stat.S_IXOTH
        if not ok:
            blocked.append(str(directory))
    return blocked


def check_environment_usable(users: list[pwd.struct_passwd]) -> None:
    """The users' servers run this virtualenv's Python (its directory, the interpreter it
    links to and that interpreter's standard library): fail clearly when they cannot."""
    places = {sys.prefix, os.path.realpath(sys.executable), sys.base_prefix}
    for user in users:
        blocked = sorted({d for place in places for d in untraversable(user, place)})
        if blocked:
            pytest.fail(
                f"The OS user {user.pw_name} cannot run this virtualenv's Python "
                f"({sys.prefix}, interpreter {os.path.realpath(sys.executable)}) for its "
                f"server: {', '.join(blocked)} may not be passed through by other users. "
                f"Allow it (`chmod o+x {' '.join(blocked)}`: traversal only, no listing), or "
                "make the virtualenv from a Python installed outside a private home.",
                pytrace=False,
            )


# -- processes ------------------------------------------------------------------------------
def proc_environ(pid: int) -> dict[str, str]:
    """A process's environment as it started (root reads anyone's)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` as a dict (Uid, Gid, Groups…)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat_line.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry))
    return found


# -- the Hub --------------------------------------------------------------------------------
@dataclass
class Hub:
    """A running JupyterHub with the manager service (see the module)."""

    process: subprocess.Popen
    url: str  # the proxy, e.g. http://127.0.0.1:PORT (no trailing slash)
    service_url: str  # the service directly, e.g. http://127.0.0.1:PORT
    admin_token: str  # a Hub API token with admin rights over users and servers
    password: str  # every non-admin user's password (SharedPasswordAuthenticator)
    admin_password: str  # the Hub admins' password
    db_url: str  # the service's store (PostgreSQL)
    state_dir: Path  # the Hub's working directory (its database, logs)
    log_path: Path
    users: dict[str, pwd.struct_passwd] = field(default_factory=dict)
    _tokens: dict[str, str] = field(default_factory=dict)

    # -- the Hub's API ------------------------------------------------------------------------
    @property
    def service_prefix(self) -> str:
        return f"/services/{SERVICE}/"

    def hub_api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """``/hub/api/{path}`` as the tests' admin client."""
        headers = {"Authorization": f"token {self.admin_token}", **kwargs.pop("headers", {})}
        return requests.request(
            method, f"{self.url}/hub/api/{path}", headers=headers, timeout=30, **kwargs
        )

    def user_model(self, user: str) -> dict[str, Any]:
        reply = self.hub_api("GET", f"users/{user}")
        reply.raise_for_status()
        return reply.json()

    def token(self, user: str, scopes: list[str] | None = None, note: str = "") -> str:
        """A new API token of ``user`` (made by the admin client). Without ``scopes``: all
        of the user's own permissions (its roles'), as a token the user makes itself."""
        body: dict[str, Any] = {"note": note or "jgs tests", "expires_in": 3600}
        if scopes is not None:
            body["scopes"] = scopes
        reply = self.hub_api("POST", f"users/{user}/tokens", json=body)
        reply.raise_for_status()
        return reply.json()["token"]

    def user_token(self, user: str) -> str:
        """One token per user with the user's own permissions, made once and reused."""
        if user not in self._tokens:
            self._tokens[user] = self.token(user)
        return self._tokens[user]

    def start_server(self, user: str, timeout: float = 90) -> dict[str, Any]:
        """Start ``user``'s server through the Hub API; its server model once ready."""
        reply = self.hub_api("POST", f"users/{user}/server")
        if reply.status_code not in (201, 202, 400):  # 400: already running
            raise AssertionError(
                f"starting {user}'s server: {reply.status_code} {reply.text}\n{self.log_tail()}"
            )

        def ready() -> dict[str, Any] | None:
            server = self.user_model(user).get("servers", {}).get("")
            return server if server and server.get("ready") else None

        return until(ready, timeout, f"{user}'s server to be ready ({self.log_tail()})")

    def stop_server(self, user: str, timeout: float = 60) -> None:
        """Stop ``user``'s server through the Hub API; returns once it is gone."""
        reply = self.hub_api("DELETE", f"users/{user}/server")
        if reply.status_code not in (202, 204, 400):  # 400: not running
            raise AssertionError(f"stopping {user}'s server: {reply.status_code} {reply.text}")
        until(
            lambda: "" not in self.user_model(user).get("servers", {}),
            timeout,
            f"{user}'s server to stop",
        )

    def server_pid(self, user: str) -> int:
        """The pid of ``user``'s running single-user server (LocalProcessSpawner's state)."""
        server = self.user_model(user)["servers"][""]
        return int(server["state"]["pid"])

    def server_url(self, user: str) -> str:
        """``user``'s server through the proxy (ends with /)."""
        return f"{self.url}/user/{user}/"

    # -- a browser's way in -------------------------------------------------------------------
    def login(self, user: str, password: str | None = None) -> requests.Session:
        """Log ``user`` in through the Hub's real login page: GET the form, POST it back with
        its _xsrf; the returned session holds the Hub's cookies (no server is started)."""
        browser = requests.Session()
        page = browser.get(f"{self.url}/hub/login", timeout=30)
        page.raise_for_status()
        match = re.search(r'name="_xsrf"\s+value="([^"]+)"', page.text)
        assert match, f"no _xsrf field in the Hub's login page:\n{page.text[:2000]}"
        reply = browser.post(
            f"{self.url}/hub/login",
            data={
                "username": user,
                "password": password if password is not None else self.password_of(user),
                "_xsrf": match.group(1),
            },
            allow_redirects=False,
            timeout=30,
        )
        browser.login_reply = reply  # type: ignore[attr-defined]
        return browser

    def password_of(self, user: str) -> str:
        return self.admin_password if USERS.get(user) else self.password

    def browse_service(self, browser: requests.Session, path: str) -> requests.Response:
        """Open the service's ``path`` (under its prefix) in a logged-in browser: through
        the service's login, the Hub's OAuth authorization and the service's callback,
        which sets the service's cookie, then the page itself."""
        target = f"{self.service_prefix}{path}"
        browser.get(f"{self.url}{self.service_prefix}login", params={"next": target}, timeout=30)
        return browser.get(f"{self.url}{target}", timeout=30)

    # -- the service ------------------------------------------------------------------------
    def api_url(self, path: str = "", direct: bool = True) -> str:
        """The GPU sessions API of the service: directly (as users' servers call it), or
        through the proxy (as browsers do)."""
        base = self.service_url if direct else self.url
        return f"{base}{self.service_prefix}gpu-sessions/api/{path}"

    def call(
        self, token: str | None, method: str, path: str, *, direct: bool = True, **kwargs: Any
    ) -> requests.Response:
        """The service's API ``path`` with ``Authorization: token <token>`` (none: anonymous)."""
        headers = dict(kwargs.pop("headers", {}))
        if token:
            headers["Authorization"] = f"token {token}"
        return requests.request(
            method, self.api_url(path, direct), headers=headers, timeout=60, **kwargs
        )

    def rpc(self, token: str, method: str, **args: Any) -> requests.Response:
        """One engine RPC call (``engine/{method}``), as a user's server in remote mode."""
        return self.call(token, "POST", f"engine/{method}", json={"args": args})

    def events(self, token: str, timeout: float = 30) -> Any:
        """The events websocket as ``token``'s user (a websocket-client connection; its
        first message is ``{"type": "hello", ...}``)."""
        import websocket

        url = self.api_url("events").replace("http://", "ws://", 1)
        return websocket.create_connection(
            url, header=[f"Authorization: token {token}"], timeout=timeout
        )

    def process_children(self) -> list[int]:
        """The Hub's child processes: the proxy, the managed services, users' servers."""
        return children(self.process.pid)

    def shutdown_kernel(self, user: str, kernel_id: str) -> None:
        """Shut a kernel of ``user``'s server down (its REST API, as JupyterLab does)."""
        reply = requests.delete(
            f"{self.server_url(user)}api/kernels/{kernel_id}",
            headers={"Authorization": f"token {self.user_token(user)}"},
            timeout=120,
        )
        assert reply.status_code in (204, 404), f"{reply.status_code}: {reply.text}"

    def kernel_session_summary(self, kernel_id: str) -> str:
        """The service's session of ``kernel_id`` in one line (for failure messages)."""
        reply = self.call(self.user_token(ADMIN), "GET", "sessions", params={"limit": "200"})
        if reply.status_code != 200:
            return f"(GET sessions: {reply.status_code})"
        for session in reply.json()["sessions"]:
            if session.get("kernel_id") == kernel_id:
                keys = ("id", "owner", "status", "reason", "queue_message")
                return json.dumps({k: session.get(k) for k in keys})
        return "(none)"

    def service_pids(self) -> list[int]:
        """The running manager service processes the Hub started (normally one)."""
        found = []
        for pid in children(self.process.pid):
            try:
                if proc_environ(pid).get("JUPYTERHUB_SERVICE_NAME") == SERVICE:
                    found.append(pid)
            except OSError:
                continue
        return found

    def service_pid(self) -> int:
        pids = self.service_pids()
        assert len(pids) == 1, f"expected one manager service process, found {pids}"
        return pids[0]

    def service_token(self) -> str:
        """The manager service's own Hub API token (from its environment)."""
        return proc_environ(self.service_pid())["JUPYTERHUB_API_TOKEN"]

    def service_answers(self) -> bool:
        try:
            requests.get(self.api_url("openapi.json"), timeout=2)
        except requests.ConnectionError:
            return False
        return True

    def wait_for_service(self, timeout: float = 90) -> int:
        """Until the service (re)started by the Hub answers; its pid."""
        until(
            lambda: self.service_pids() and self.service_answers(),
            timeout,
            f"the manager service to answer ({self.log_tail()})",
        )
        return self.service_pid()

    @property
    def store_id(self) -> str:
        """The label value of the service's containers (see GPUSessionManager.store_id)."""
        return hashlib.sha256(self.db_url.encode()).hexdigest()[:16]

    def containers(self, docker_client: Any, **filters: Any) -> list:
        """The service's session containers, running or not."""
        labels = [SESSION_LABEL, f"{STORE_LABEL}={self.store_id}"]
        return docker_client.containers.list(all=True, filters={"label": labels, **filters})

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "no Hub log"
        return "Hub log:\n" + "\n".join(text.splitlines()[-lines:])


WRAPPER = """\
# The example deployment, plus an admin API client for the tests.
c = get_config()  # noqa: F821
load_subconfig({example!r})  # noqa: F821
c.JupyterHub.services.append({{"name": {name!r}, "api_token": {token!r}}})
c.JupyterHub.load_roles.append(
    {{
        "name": {name!r},
        "services": [{name!r}],
        "scopes": [
            "admin:users",
            "admin:servers",
            "admin:server_state",
            "read:servers",
            "tokens",
            "read:users",
            "admin:groups",
        ],
    }}
)
c.Spawner.start_timeout = 90
c.Spawner.http_timeout = 90
c.JupyterHub.log_level = "DEBUG"
"""


def run_hub(docker_client: Any) -> Iterator[Hub]:
    """Start the example deployment; yield it; take everything down (see the module)."""
    if os.geteuid() != 0:
        pytest.fail(
            "The JupyterHub tests run as root: LocalProcessSpawner starts each user's server "
            "as that OS user.",
            pytrace=False,
        )
    chp = chp_path()
    accounts = {name: ensure_os_user(name) for name in USERS}
    check_environment_usable(list(accounts.values()))
    state = Path(tempfile.mkdtemp(prefix="jgs-hub."))
    pg_dir = tempfile.mkdtemp(prefix="jgs-hub-pg.")
    db_url = _lib("start_test_postgres", pg_dir)
    hub = None
    process = None
    try:
        for sub in ("home", "runtime", "data"):
            (state / "service" / sub).mkdir(parents=True)
        ports = {
            name: free_port() for name in ("JGS_HUB_PORT", "JGS_HUB_API_PORT", "JGS_PROXY_API_PORT")
        }
        ports["JGS_SERVICE_PORT"] = free_port()
        admin_token = secrets.token_hex(32)
        password = secrets.token_urlsafe(16)
        admin_password = secrets.token_urlsafe(32)
        wrapper = state / "jupyterhub_config.py"
        wrapper.write_text(
            WRAPPER.format(example=str(EXAMPLE_CONFIG), name=TEST_SERVICE, token=admin_token)
        )
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY"))},
            **{k: str(v) for k, v in ports.items()},
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "JGS_CHP": chp,
            "JGS_HUB_PASSWORD": password,
            "JGS_HUB_ADMIN_PASSWORD": admin_password,
            "JGS_HUB_USERS": ",".join(USERS),
            "JGS_HUB_ADMINS": ",".join(u for u, admin in USERS.items() if admin),
            "JUPYTER_GPU_SESSIONS_DB_URL": db_url,
            "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS": SIMULATED_GPUS,
            "JUPYTER_GPU_SESSIONS_SIMULATED_DEVICE_DIR": str(fake_gpu_nodes(state / "dev", 4)),
            # The service's own files (cookie secret, runtime, kernels' state) stay here.
            "HOME": str(state / "service" / "home"),
            "JUPYTER_RUNTIME_DIR": str(state / "service" / "runtime"),
            "JUPYTER_DATA_DIR": str(state / "service" / "data"),
        }
        log_path = state / "jupyterhub.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(Path(sys.executable).parent / "jupyterhub"), "-f", str(wrapper)],
                cwd=state,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        hub = Hub(
            process=process,
            url=f"http://127.0.0.1:{ports['JGS_HUB_PORT']}",
            service_url=f"http://127.0.0.1:{ports['JGS_SERVICE_PORT']}",
            admin_token=admin_token,
            password=password,
            admin_password=admin_password,
            db_url=db_url,
            state_dir=state,
            log_path=log_path,
            users=accounts,
        )

        def hub_up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"JupyterHub exited ({process.returncode}). {hub.log_tail()}")
            try:
                return requests.get(f"{hub.url}/hub/api/", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        until(hub_up, 90, f"JupyterHub to answer ({hub.log_tail()})")
        hub.wait_for_service()
        yield hub
    finally:
        try:
            if process is not None:
                _stop_hub(process)
            if hub is not None:
                for container in hub.containers(docker_client):
                    container.remove(force=True)
        finally:  # the cluster goes whatever happened above (Docker gone, say)
            _lib("stop_test_postgres", pg_dir)
            shutil.rmtree(pg_dir, ignore_errors=True)
            shutil.rmtree(state, ignore_errors=True)


def _stop_hub(process: subprocess.Popen) -> None:
    """SIGTERM: the Hub stops its users' servers, its services and its proxy; whatever of
    its process group is left after that is killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session", name="hub")
def hub_fixture(docker_client, kernel_image) -> Iterator[Hub]:
    """The example JupyterHub deployment, running (see the module)."""
    yield from run_hub(docker_client)


def rpc_result(reply: requests.Response) -> Any:
    """The result of an engine RPC reply, or an AssertionError with its message."""
    assert reply.status_code == 200, f"{reply.status_code}: {reply.text}"
    return json.loads(reply.text)["result"]


# -- kernels in a user's server -------------------------------------------------------------
def start_kernel(hub: Hub, user: str, kernelspec: str = "python3-container") -> str:
    """Start a kernel in ``user``'s server (its jupyter_server REST API, as a notebook
    does); its kernel id. In remote mode the server asks the service for it."""
    reply = requests.post(
        f"{hub.server_url(user)}api/kernels",
        json={"name": kernelspec},
        headers={"Authorization": f"token {hub.user_token(user)}"},
        timeout=120,
    )
    assert reply.status_code in (200, 201), f"{reply.status_code}: {reply.text}"
    return reply.json()["id"]


def execute(hub: Hub, user: str, kernel_id: str, code: str, timeout: float = 120) -> str:
    """Run ``code`` in a kernel of ``user``'s server over its channels websocket (as
    JupyterLab does); what it printed (stdout and stderr). Fails on an error reply."""
    import uuid
    from datetime import datetime, timezone

    import websocket

    url = f"{hub.server_url(user)}api/kernels/{kernel_id}/channels".replace("http", "ws", 1)
    session = uuid.uuid4().hex
    ws = websocket.create_connection(
        f"{url}?session_id={session}",
        header=[f"Authorization: token {hub.user_token(user)}"],
        timeout=timeout,
    )
    try:
        msg_id = uuid.uuid4().hex
        ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "username": user,
                        "session": session,
                        "msg_type": "execute_request",
                        "version": "5.3",
                        "date": datetime.now(timezone.utc).isoformat(),
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": True,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                    "channel": "shell",
                    "buffers": [],
                }
            )
        )
        out, reply, idle = [], None, False
        deadline = time.monotonic() + timeout
        while reply is None or not idle:
            if time.monotonic() > deadline:
                raise AssertionError(f"no reply to {code!r} within {timeout:g}s")
            try:
                msg = json.loads(ws.recv())
            except websocket.WebSocketException as exc:
                raise AssertionError(
                    f"{user}'s server closed kernel {kernel_id}'s websocket while {code!r} "
                    f"ran ({exc}; close status {getattr(ws, 'status', None)}); the kernel's "
                    f"session: {hub.kernel_session_summary(kernel_id)}\n{hub.log_tail(60)}"
                ) from exc
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "stream":
                out.append(msg["content"]["text"])
            elif kind == "error":
                out.append("\n".join(msg["content"]["traceback"]))
            elif kind == "execute_reply":
                reply = msg["content"]
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        assert reply["status"] == "ok", "".join(out) or reply
        return "".join(out)
    finally:
        ws.close()
