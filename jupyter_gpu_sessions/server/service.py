"""The manager service (`jupyter gpu-sessions manager`): the engine in a server of its own,
for JupyterHub. Users' single-user servers reach it over HTTP (the engine RPC and the REST
API) in remote mode; it is the only process on the host that holds the Docker socket.

It is a jupyter_server ``ServerApp`` that serves this package's API and nothing else: no
other server extension, no contents, files, kernels, sessions, terminals, nbconvert or
config services. It runs as root, so nobody may reach its file system through it.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from jupyter_server.serverapp import ServerApp
from traitlets import default

from .._version import __version__

EXTENSION = "jupyter_gpu_sessions"
LOCAL_ENGINE = "jupyter_gpu_sessions.manager.engine.LocalEngine"
HUB_IDENTITY_PROVIDER = "jupyter_gpu_sessions.server.hub_auth.HubIdentityProvider"
SERVICE_NAME = "gpu-sessions"  # a standalone service's name (GPUSessionManager.service_name)


def hub_mode() -> bool:
    """Run by JupyterHub as a managed service: its token and name are in the environment."""
    return bool(
        os.environ.get("JUPYTERHUB_API_TOKEN") and os.environ.get("JUPYTERHUB_SERVICE_NAME")
    )


class ManagerApp(ServerApp):
    """The GPU sessions manager as a service: the REST API, its events websocket and the
    engine RPC (``{base_url}gpu-sessions/api/engine/{method}``) over the in-process engine.

    Under JupyterHub (``JUPYTERHUB_API_TOKEN`` and ``JUPYTERHUB_SERVICE_NAME`` set) callers
    authenticate with Hub OAuth: a user's token, a user's server's token or a browser's
    cookie, with the ``access:services!service=<name>`` scope; the caller is the Hub user.
    Standalone, jupyter_server's token guards it and every caller acts as the OS user the
    service runs as. Store: ``c.GPUSessionManager.db_url`` (PostgreSQL recommended)."""

    name = "jupyter-gpu-sessions-manager"
    version = __version__
    description = __doc__
    # /api/status and /api/me (health, who am I), CSP reports; nothing that reads or writes
    # files, starts kernels or changes the server's config.
    default_services = ("api", "security")

    @default("config_file_name")
    def _default_config_file_name(self) -> str:
        return "jupyter_gpu_sessions_manager_config"

    @default("ip")
    def _default_ip(self) -> str:
        url = os.environ.get("JUPYTERHUB_SERVICE_URL")
        return (urlparse(url).hostname or "127.0.0.1") if url else "127.0.0.1"

    @default("port")
    def _port_default(self) -> int:
        url = os.environ.get("JUPYTERHUB_SERVICE_URL")
        if url:
            parsed = urlparse(url)
            return parsed.port or (443 if parsed.scheme == "https" else 80)
        return int(os.getenv(self.port_env, "8890"))

    @default("base_url")
    def _default_base_url(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX") or "/"

    @default("identity_provider_class")
    def _default_identity_provider_class(self):
        if hub_mode():
            return HUB_IDENTITY_PROVIDER  # imported by name: only Hub deployments need it
        from jupyter_server.auth.identity import PasswordIdentityProvider

        return PasswordIdentityProvider

    @default("allow_root")
    def _default_allow_root(self) -> bool:
        # The service holds the Docker socket (usually as root); it serves no files.
        return True

    @default("open_browser")
    def _default_open_browser(self) -> bool:
        return False

    @default("terminals_enabled")
    def _default_terminals_enabled(self) -> bool:
        return False

    @default("default_url")
    def _default_default_url(self) -> str:
        return "/gpu-sessions/api/openapi.json"

    def find_server_extensions(self) -> None:
        """Only this package's extension: nothing else installed in the environment (a lab,
        a file browser) is discovered."""
        self._serve_only_this_api()

    def init_server_extensions(self) -> None:
        self._serve_only_this_api()
        super().init_server_extensions()

    def _serve_only_this_api(self) -> None:
        others = sorted(k for k, on in self.jpserver_extensions.items() if on and k != EXTENSION)
        if others:
            self.log.warning("The manager service loads no other extension: %s ignored", others)
        if self.extra_services:
            self.log.warning(
                "The manager service adds no services: %s ignored", self.extra_services
            )
            self.extra_services = []
        self.jpserver_extensions = {EXTENSION: True}
        self.config.ServerApp.jpserver_extensions = {EXTENSION: True}
        # The engine runs here, whatever the environment says (a remote engine's URL may
        # well be set for the users' servers), and serves the engine RPC.
        self.config.EngineChooser.engine_class = LOCAL_ENGINE
        self.config.GPUSessionsExtension.serve_engine = True
        # Named, so that a service restarted after a crash adopts the kernels its
        # predecessor started (the Hub's name for it, else one of its own).
        manager = self.config.GPUSessionManager
        if "service_name" not in manager:
            manager.service_name = os.environ.get("JUPYTERHUB_SERVICE_NAME") or SERVICE_NAME
