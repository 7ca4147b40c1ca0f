"""A lab's JupyterHub whose users share one pool of GPUs through jupyter-gpu-sessions.

    jupyterhub -f examples/jupyterhub/jupyterhub_config.py

run as root (LocalProcessSpawner starts each user's server as that OS user), with:

- the proxy: `npm ci` in this directory (configurable-http-proxy, pinned by
  package-lock.json), or `configurable-http-proxy` on PATH, or $JGS_CHP naming it;
- JUPYTER_GPU_SESSIONS_DB_URL: the manager's store, PostgreSQL recommended, e.g.
  postgresql+psycopg://gpu@/gpu_sessions?host=/var/run/postgresql;
- JGS_HUB_PASSWORD and JGS_HUB_ADMIN_PASSWORD: the passwords of the demo logins
  (SharedPasswordAuthenticator; use PAM or OAuth for real people);
- OS accounts jgs-ada, jgs-bob and jgs-cy (`useradd -m NAME`), or your own in JGS_HUB_USERS
  (comma-separated; JGS_HUB_ADMINS names the Hub admins among them);
- the kernel image: `jupyter gpu-sessions image build`.

What runs where:

- The manager service (`jupyter gpu-sessions manager`, started and watched by the Hub)
  runs the engine: queue, policies, GPU allocations, containers. It is the only process with
  the Docker socket (it runs as root, like the Hub). Its API is at /services/gpu-sessions/,
  behind Hub OAuth: callers need the Hub scope access:services!service=gpu-sessions.
- Each user's single-user server runs as that user (not in the docker group) with the GPU
  sessions extension in *remote mode*: JUPYTER_GPU_SESSIONS_SERVICE_URL points it at the
  service, and it authenticates with its own $JUPYTERHUB_API_TOKEN, which acts only as its
  user. Its kernels are containers the service starts, as that user's uid, and they keep
  running when the user's server stops.
- This file is also the manager service's config (it is passed to it with --config):
  the c.GPUSessionManager section below is read by the service, not by the Hub.

Ports (all on 127.0.0.1 but the public one): JGS_HUB_PORT (8000, the proxy: open this one),
JGS_HUB_API_PORT (8081, the Hub), JGS_PROXY_API_PORT (8001), JGS_SERVICE_PORT (8890, the
manager service).
"""

import os
import shutil
import sys

c = get_config()  # noqa: F821 - provided by traitlets when it loads this file

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)  # this environment's commands: jupyterhub-singleuser…
SERVICE = "gpu-sessions"


def _env_int(name, default):
    return int(os.environ.get(name) or default)


HUB_PORT = _env_int("JGS_HUB_PORT", 8000)
HUB_API_PORT = _env_int("JGS_HUB_API_PORT", 8081)
PROXY_API_PORT = _env_int("JGS_PROXY_API_PORT", 8001)
SERVICE_PORT = _env_int("JGS_SERVICE_PORT", 8890)
SERVICE_URL = f"http://127.0.0.1:{SERVICE_PORT}"
USERS = [u for u in os.environ.get("JGS_HUB_USERS", "jgs-ada,jgs-bob,jgs-cy").split(",") if u]
ADMINS = [u for u in os.environ.get("JGS_HUB_ADMINS", "jgs-cy").split(",") if u]

# -- the manager service's own settings (read by `jupyter gpu-sessions manager`) -------------
# PostgreSQL by URL: the service is the only writer, and a hub's scheduling passes over
# many users' queues are what it is good at. SQLite works too (a file only root can read).
DB_URL = os.environ.get("JUPYTER_GPU_SESSIONS_DB_URL", "")
if not DB_URL:
    raise SystemExit(
        "Set JUPYTER_GPU_SESSIONS_DB_URL to the manager's store, e.g. "
        "postgresql+psycopg://gpu@/gpu_sessions?host=/var/run/postgresql"
    )
c.GPUSessionManager.db_url = DB_URL
# Dominant resource fairness: the next GPU goes to the user who holds the smallest share,
# so two users' queued kernels are served in turn, not first come first served.
c.GPUSessionManager.scheduler_strategy = "drf"
c.GPUSessionManager.policies = {
    # Everyone: at most 2 kernels at once (a third one queues until one ends), 4 queued,
    # 2 GPUs, and a kernel idle for 2 hours is shut down.
    "default": {
        "max_concurrent_sessions": 2,
        "max_pending_sessions": 4,
        "max_gpus": 2,
        "idle_timeout": "2h",
    },
    # A Hub group's policy applies to its members (the most generous limit wins).
    "group:ml": {"max_gpus": 4},
}
# Which uid a user's kernels run as: by default the OS user of the Hub user's name (so
# files in vfolders and home directories keep their owners). Map others explicitly:
# c.GPUSessionManager.kernel_user_map = {"grace": "1005:100"}

# -- the Hub --------------------------------------------------------------------------------
c.JupyterHub.bind_url = f"http://127.0.0.1:{HUB_PORT}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = HUB_API_PORT
c.JupyterHub.cookie_secret_file = os.path.abspath("jupyterhub_cookie_secret")
c.JupyterHub.db_url = "sqlite:///" + os.path.abspath("jupyterhub.sqlite")

# The proxy: configurable-http-proxy from npm (`npm ci` here), started by the Hub.
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{PROXY_API_PORT}"
c.ConfigurableHTTPProxy.command = [
    os.environ.get("JGS_CHP")
    or next(
        (
            path
            for path in (os.path.join(HERE, "node_modules", ".bin", "configurable-http-proxy"),)
            if os.access(path, os.X_OK)
        ),
        shutil.which("configurable-http-proxy") or "configurable-http-proxy",
    )
]

# Logins: shared demo passwords, one for users (8+ characters) and one for the Hub admins
# (32+ characters). Use PAMAuthenticator, or an OAuthenticator, for real people.
c.JupyterHub.authenticator_class = "shared-password"
if not os.environ.get("JUPYTERHUB_SERVICE_NAME"):  # (the manager service loads this too)
    for variable in ("JGS_HUB_PASSWORD", "JGS_HUB_ADMIN_PASSWORD"):
        if not os.environ.get(variable):
            raise SystemExit(
                "Set JGS_HUB_PASSWORD (8+ characters) and JGS_HUB_ADMIN_PASSWORD (32+): the "
                "passwords of this example's demo logins."
            )
    c.SharedPasswordAuthenticator.user_password = os.environ["JGS_HUB_PASSWORD"]
    c.SharedPasswordAuthenticator.admin_password = os.environ["JGS_HUB_ADMIN_PASSWORD"]
c.Authenticator.allowed_users = set(USERS)
c.Authenticator.admin_users = set(ADMINS)  # Hub admins are admins of the GPU sessions API
# Hub groups are GPU sessions groups: group policies, project vfolders, admin_groups.
c.JupyterHub.load_groups = {"ml": {"users": USERS[:1]}}

# Users' servers: real OS users, started as themselves by the Hub (running as root).
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = [os.path.join(BIN, "jupyterhub-singleuser")]
c.Spawner.default_url = "/lab"
c.Spawner.environment = {
    # Remote mode: the GPU sessions extension in each user's server talks to the service
    # (directly, not through the proxy), authenticated by the server's own
    # $JUPYTERHUB_API_TOKEN. Nothing in a user's server can start a container itself.
    "JUPYTER_GPU_SESSIONS_SERVICE_URL": f"{SERVICE_URL}/services/{SERVICE}/gpu-sessions/api/",
}
# The server's own token may call the service (besides the server role's usual scopes).
c.Spawner.server_token_scopes = [
    "access:servers!server",
    "users:activity!user",
    f"access:services!service={SERVICE}",
]

c.JupyterHub.load_roles = [
    {
        # Every user may use the GPU sessions service (the browser, their tokens, their
        # server's token). Take the scope away from a user to keep them off the GPUs.
        "name": "user",
        "scopes": ["self", f"access:services!service={SERVICE}"],
    },
    {
        # The service itself: reads who users are and which groups they are in.
        "name": "gpu-sessions-service",
        "scopes": ["read:users:name", "read:users:groups", "read:groups:name"],
        "services": [SERVICE],
    },
]

# The manager as a Hub-managed service: the Hub starts it (as root: it needs the Docker
# socket), gives it its API token and OAuth client, restarts it if it dies, and routes
# /services/gpu-sessions/ to it.
c.JupyterHub.services = [
    {
        "name": SERVICE,
        "url": SERVICE_URL,
        "command": [
            os.path.join(BIN, "jupyter-gpu-sessions"),
            "manager",
            f"--config={os.path.abspath(__file__)}",
        ],
        "environment": {
            key: os.environ[key]
            for key in (
                "JUPYTER_GPU_SESSIONS_DB_URL",
                # A machine without NVIDIA GPUs (a demo, the tests): simulated GPUs, e.g.
                # 4xA100-80GB, with fake device nodes (see `jupyter gpu-sessions doctor`).
                "JUPYTER_GPU_SESSIONS_SIMULATED_GPUS",
                "JUPYTER_GPU_SESSIONS_SIMULATED_DEVICE_DIR",
                "JUPYTER_GPU_SESSIONS_SIMULATED_PROCESSES",
                "DOCKER_HOST",
                "HOME",
                "JUPYTER_RUNTIME_DIR",
                "JUPYTER_DATA_DIR",
            )
            if os.environ.get(key)
        },
        "oauth_no_confirm": True,  # a browser is sent on to the service without a prompt
    }
]
