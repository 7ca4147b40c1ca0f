"""The server extension: the GPU sessions REST API, its events, and idle-kernel culling."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import ipaddress
import os
import pwd
import stat
import tempfile
import time
from typing import Any

from jupyter_server.auth.identity import IdentityProvider, PasswordIdentityProvider
from jupyter_server.extension.application import ExtensionApp
from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_unix_socket
from traitlets import Bool, Enum, Float, Set, Unicode, default

from .._version import __version__
from ..core.errors import InvalidRequest
from ..core.identity import Identity
from ..engine import EngineChooser, current_owner, use_engine
from .base import API_PREFIX
from .idle import IdleCuller

# jupyter_server's own session and kernel-action routes, keeping the engine's 4xx codes.
JUPYTER_API = "jupyter_gpu_sessions.server.jupyter_api"
API_SOCKET_NAME = "api.sock"
# AF_UNIX paths hold at most 107 bytes: the socket's directory must stay short.
_SOCKET_DIR_MAX = 90


def _own_directory(folder: str) -> None:
    """Make ``folder`` (0711), or check that it is this user's and only this user may write
    to it: a socket in someone else's directory could be swapped for theirs."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o711)
    info = os.lstat(folder)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.geteuid()
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise ValueError(
            f"{folder} is not a directory of this user's that only this user may write to"
        )
    os.chmod(folder, 0o711)


class GPUSessionsExtension(ExtensionApp):
    """Serves ``{base_url}gpu-sessions/api/``: sessions, GPUs, quotas, policies, vfolders,
    scheduler health and a websocket of events, over the one session manager of this
    process (the same one the kernel provisioner uses)."""

    name = "jupyter_gpu_sessions"
    description = "GPU sessions: kernels as containers with GPUs, queues, vfolders and quotas."
    version = __version__
    load_other_extensions = True

    admin_users = Set(
        Unicode(),
        help="""Users who may set policies, trigger the scheduler, clear history, create
        project vfolders and see everyone's sessions. When neither admin_users nor
        admin_groups is set, the user a single-user server runs as is its admin (not under
        JupyterHub, where admins must be named).""",
    ).tag(config=True)

    admin_groups = Set(Unicode(), help="Members of these groups are admins (see admin_users).").tag(
        config=True
    )

    username_source = Enum(
        ["auto", "identity", "server"],
        default_value="auto",
        help="""Whose name an API caller acts under. `identity`: the name the server's
        identity provider gives (JupyterHub, a custom provider). `server`: the OS user the
        server runs as ($JUPYTERHUB_USER under JupyterHub) — right for a single-user server,
        whose token login has no real user name, and the owner of the kernels it starts.
        `auto`: `server` with jupyter_server's own token/password identity, else `identity`.""",
    ).tag(config=True)

    idle_check_interval = Float(
        10.0,
        help="Seconds between checks for kernels idle past their owner's idle_timeout.",
    ).tag(config=True)

    utilization_interval = Float(
        5.0, help="Seconds between GPU utilization ticks on the events websocket."
    ).tag(config=True)

    identity_cache_seconds = Float(
        5.0,
        help="How long a caller's groups and admin role are reused before they are looked "
        "up again (OS groups, configured groups, the store).",
    ).tag(config=True)

    manage_kernels = Bool(
        True,
        help="""Make the server's kernel manager `GPUSessionsKernelManager` (pending kernels,
        so a kernel queued for its GPUs never holds a request open and a cell run while it
        starts runs once it is up; refused starts answered 4xx; starting kernels shut down
        at once) and route jupyter_server's session and kernel-action endpoints through
        handlers that keep those codes. A `ServerApp.kernel_manager_class` you configure
        yourself is left alone (subclass GPUSessionsKernelManager to keep the behaviour).""",
    ).tag(config=True)

    api_socket = Bool(
        True,
        help="""Also serve this API on a unix socket that container kernels reach it through
        (its directory is mounted read-only into each container; a kernel presents its
        session's own token). Off: container kernels cannot reach the API (local kernels
        still use the server's URL).""",
    ).tag(config=True)

    api_socket_dir = Unicode(
        "",
        help="""The directory of that socket (short: a unix socket path holds at most 107
        bytes). Default: `jgs-api-<hash of user and server URL>` under $XDG_RUNTIME_DIR, else
        the temp directory, so a server restarted at the same address serves where its
        running containers look.""",
    ).tag(config=True)

    serve_engine = Bool(
        False,
        help="""Serve the engine RPC (`gpu-sessions/api/engine/{method}`) that users' servers
        in remote mode call: on in the manager service (`jupyter gpu-sessions manager`),
        which has no kernels of its own in jupyter_server's map, so `manage_kernels` and
        idle culling are then off (the engine's own idle and lifetime policies still
        apply, and the users' servers cull their kernels).""",
    ).tag(config=True)

    server_owner = Unicode(help="The OS user this server starts kernels for.")

    @default("server_owner")
    def _default_server_owner(self) -> str:
        return current_owner()

    def _link_jupyter_server_extension(self, serverapp: Any) -> None:
        """Before the server builds its kernel manager and routes: ours, unless configured
        otherwise (jupyter_server reads only `jpserver_extensions` from the package's
        `jupyter_server_config.d` file, so this cannot be set there)."""
        super()._link_jupyter_server_extension(serverapp)
        if not self.manage_kernels or self.serve_engine:
            return
        from .kernels import GPUSessionsKernelManager

        if "kernel_manager_class" in serverapp.config.get("ServerApp", {}):
            if not issubclass(serverapp.kernel_manager_class, GPUSessionsKernelManager):
                self.log.warning(
                    "ServerApp.kernel_manager_class is %s: GPU session kernels block "
                    "POST /api/sessions while they queue, and refused starts answer 500. "
                    "Subclass jupyter_gpu_sessions.server.kernels.GPUSessionsKernelManager "
                    "to keep pending kernels and 4xx refusals.",
                    serverapp.kernel_manager_class.__name__,
                )
        else:
            serverapp.kernel_manager_class = GPUSessionsKernelManager
        if JUPYTER_API not in serverapp.extra_services:
            serverapp.extra_services = [*serverapp.extra_services, JUPYTER_API]

    def initialize_settings(self) -> None:
        # Built once here, from config (c.EngineChooser.engine_class swaps it), and made
        # this process's engine: the provisioner of every kernel this server starts uses it.
        config = self.serverapp.config
        self.engine = EngineChooser(config=config).engine_class(config=config)
        use_engine(self.engine)
        self.engine.use_event_logger(self.serverapp.event_logger)
        self.settings["gpu_sessions_engine"] = self.engine
        self.settings["gpu_sessions_app"] = self
        self._identities: dict[str, tuple[float, tuple, Identity]] = {}
        from .events import EventHub

        self.events = EventHub(self.engine, self)
        self.settings["gpu_sessions_events"] = self.events
        self.culler = IdleCuller(self.engine, self.serverapp.kernel_manager, log=self.log)
        removed = getattr(self.serverapp.kernel_manager, "removed_kernel_ids", None)
        if removed is not None:  # GPUSessionsKernelManager: kernels it dropped are ended
            self.engine.watch_kernels(removed)
        self._callbacks: list[PeriodicCallback] = []

    def initialize_handlers(self) -> None:
        from .handlers import handlers

        self.handlers.extend((f"/{API_PREFIX}/{pattern}", klass) for pattern, klass in handlers)
        if self.serve_engine:
            from .handlers import engine_handlers

            self.handlers.extend(
                (f"/{API_PREFIX}/{pattern}", klass) for pattern, klass in engine_handlers
            )

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        """Once the server's loop runs: the API for kernels, recovery, health, idle culling
        and event ticks."""
        await super()._start_jupyter_server_extension(serverapp)
        # First: a kernel started while the engine warms up still gets the API.
        self._serve_api()
        try:
            await self.engine.start()
        finally:
            # Remote mode: the kernels this server had when it stopped still run in the
            # manager service; its kernel endpoints answer once they are back in its map
            # (in the background: other extensions start meanwhile).
            self._restoring = asyncio.ensure_future(self._restore_kernels())
        # What the server has built by now lives as long as it does: keep it out of the
        # collector's full passes, each of which otherwise stops the loop for ~0.1 s (a
        # JupyterLab server holds a few hundred thousand objects). Collected first, so that
        # no garbage is frozen with it.
        gc.collect()
        gc.freeze()
        periodic = [(self.events.tick, self.utilization_interval)]
        if not self.serve_engine:  # the service has no kernels of its own to cull
            periodic.append((self.culler.check, self.idle_check_interval))
        for callback, seconds in periodic:
            pc = PeriodicCallback(callback, seconds * 1000, jitter=0.1)
            pc.start()
            self._callbacks.append(pc)
        self.events.start()

    async def stop_extension(self) -> None:
        for pc in getattr(self, "_callbacks", []):
            pc.stop()
        await self._stop_serving_api()
        if hasattr(self, "events"):
            await self.events.stop()
        restoring = getattr(self, "_restoring", None)
        if restoring is not None and not restoring.done():
            restoring.cancel()  # what is not back yet runs on in the service
        if hasattr(self, "engine"):
            settle = getattr(self.serverapp.kernel_manager, "settle_notes", None)
            if settle is not None:  # what re-attaching kernels needs reaches the engine
                await settle()
            # This server's batch sessions end with it, as its kernels do.
            await self.engine.shutdown()
            # Returns at once: a reconcile pass under way finishes on its own thread.
            self.engine.stop()

    async def _restore_kernels(self) -> None:
        restore = getattr(self.serverapp.kernel_manager, "restore_kernels", None)
        if restore is not None:  # GPUSessionsKernelManager
            await restore(Identity(self.server_owner, frozenset(), False))

    # -- how kernels reach the API ---------------------------------------------------------
    def api_url(self) -> str:
        """The API's URL as a local kernel on this host reaches it (loopback when the
        server listens on every interface)."""
        server = self.serverapp
        ip = server.ip or "localhost"
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(ip.strip("[]"))
            if address.is_loopback or address.is_unspecified:
                ip = "[::1]" if address.version == 6 else "127.0.0.1"
            elif address.version == 6:
                ip = f"[{address}]"
        if ip == "localhost":
            ip = "127.0.0.1"
        scheme = "https" if server.certfile else "http"
        return f"{scheme}://{ip}:{server.port}{server.base_url}{API_PREFIX}/"

    def _serve_api(self) -> None:
        """Tell the engine where kernels reach the API; open the unix socket first."""
        if self.engine.remote:
            # Kernels live in the manager service and reach its API: nothing of this
            # server's is mounted into them.
            return
        socket_dir = None
        if self.api_socket and getattr(self, "_api_server", None) is None:
            try:
                socket_dir = self._open_api_socket()
            except (OSError, ValueError) as exc:
                self.log.warning(
                    "Container kernels cannot reach the GPU sessions API: no unix socket "
                    "(%s). Set GPUSessionsExtension.api_socket_dir to a short directory of "
                    "yours.",
                    exc,
                )
        elif getattr(self, "_api_server", None) is not None:
            socket_dir = os.path.dirname(self._api_socket_path)
        url = None if self.serverapp.sock else self.api_url()
        if url is None and socket_dir:
            url = f"http://localhost{self.serverapp.base_url}{API_PREFIX}/"
        self.engine.serve_api(url, socket_dir)

    def _default_socket_dir(self) -> str:
        key = f"{os.geteuid()}:{self.api_url()}:{self.serverapp.sock}"
        name = "jgs-api-" + hashlib.sha256(key.encode()).hexdigest()[:12]
        runtime = os.environ.get("XDG_RUNTIME_DIR", "")
        if runtime and os.path.isdir(runtime) and len(runtime) + len(name) < _SOCKET_DIR_MAX:
            return os.path.join(runtime, name)
        return os.path.join(tempfile.gettempdir(), name)

    def _open_api_socket(self) -> str:
        """Listen on ``<dir>/api.sock`` with the server's own application (routes, auth,
        settings). The directory is this user's alone to write (0711: others may only pass
        through it); the socket is open to all (0666) because the token is the guard."""
        folder = self.api_socket_dir or self._default_socket_dir()
        try:
            _own_directory(folder)
        except ValueError:
            if self.api_socket_dir:
                raise
            # Someone else holds the usual name (/tmp is shared): a fresh private one.
            folder = tempfile.mkdtemp(prefix="jgs-api-")
            _own_directory(folder)
        path = os.path.join(folder, API_SOCKET_NAME)
        if len(path.encode()) > 107:
            raise ValueError(f"the socket path {path} is longer than 107 bytes")
        sock = bind_unix_socket(path, mode=0o666)
        server = HTTPServer(
            self.serverapp.web_app,
            max_body_size=self.serverapp.max_body_size,
            max_buffer_size=self.serverapp.max_buffer_size,
        )
        server.add_socket(sock)
        self._api_server: HTTPServer | None = server
        self._api_socket_path = path
        self.log.info("GPU sessions API for container kernels on %s", path)
        return folder

    async def _stop_serving_api(self) -> None:
        if hasattr(self, "engine"):
            self.engine.serve_api(None)
        server = getattr(self, "_api_server", None)
        if server is None:
            return
        self._api_server = None
        server.stop()
        with contextlib.suppress(OSError):
            os.remove(self._api_socket_path)
        if not self.api_socket_dir:
            with contextlib.suppress(OSError):
                # Gone when empty; a crashed server's stays, so its containers see the
                # socket of a server restarted at the same address.
                os.rmdir(os.path.dirname(self._api_socket_path))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.close_all_connections(), 5)

    # -- where batch sessions run ----------------------------------------------------------
    def batch_working_dir(self, who: Identity, asked: str | None = None) -> str:
        """The directory ``who``'s batch sessions run in (it is mounted into them). A
        server: its root directory. The manager service runs as root in the Hub's own
        directory, which must never be mounted into anyone's container: there, the
        directory a user's server sends (its root directory; the container runs as that
        user's uid, so it reaches no more than they do), else the user's home directory."""
        if not self.serve_engine:
            return self.serverapp.root_dir
        if asked:
            if not os.path.isabs(asked):
                raise InvalidRequest(f"working_dir must be an absolute path, not {asked!r}")
            return asked
        try:
            home = pwd.getpwnam(who.username).pw_dir
        except (KeyError, ValueError):
            home = ""
        if not home or not os.path.isdir(home):
            raise InvalidRequest(
                f"{who.username} has no home directory on this host for batch sessions to run "
                "in: create them from your Jupyter server (they run in its root directory)."
            )
        return home

    # -- identity --------------------------------------------------------------------------
    def username_of(self, user: Any) -> str:
        source = self.username_source
        if source == "auto":
            provider = type(self.serverapp.identity_provider)
            own = provider in (IdentityProvider, PasswordIdentityProvider)
            source = "server" if own else "identity"
        return self.server_owner if source == "server" else user.username

    def is_admin(self, username: str, groups: frozenset[str]) -> bool:
        if username in self.admin_users or groups & self.admin_groups:
            return True
        if self.admin_users or self.admin_groups or os.environ.get("JUPYTERHUB_API_TOKEN"):
            return False
        return username == self.server_owner

    async def identity_of_user(self, user: Any) -> Identity:
        """The identity of an authenticated jupyter_server user: the Hub's groups and
        admin flag when the identity provider gives them (the manager service's
        HubIdentityProvider does: Hub admins are admins here)."""
        return await self.identity(
            self.username_of(user),
            getattr(user, "groups", None),
            hub_admin=bool(getattr(user, "hub_admin", False)),
        )

    async def identity(
        self, username: str, hub_groups: Any = None, *, hub_admin: bool = False
    ) -> Identity:
        """Who a caller is: their groups (OS, configured, Hub) and admin role, looked up at
        most every ``identity_cache_seconds`` per user; the caller is remembered so that
        shares can name them."""
        groups_key = None if hub_groups is None else tuple(sorted(hub_groups))
        remote = await self.engine.identity_of(username, groups_key)
        if remote is not None:  # remote mode: who the service knows this server's user as
            return remote
        now = time.monotonic()
        cached = self._identities.get(username)
        if cached is not None and cached[0] > now and cached[1] == (groups_key, hub_admin):
            return cached[2]

        groups = await self.engine.user_groups(username, groups_key)
        who = Identity(username, groups, hub_admin or self.is_admin(username, groups))
        if len(self._identities) > 10_000:
            self._identities.clear()
        self._identities[username] = (
            now + self.identity_cache_seconds,
            (groups_key, hub_admin),
            who,
        )
        return who
