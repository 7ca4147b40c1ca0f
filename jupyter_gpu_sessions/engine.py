"""The engine interface: every operation the server extension, the provisioner, the CLI and
the kernel-side client ask of the GPU session engine, and how a caller finds its engine.

Two implementations stand behind it: the in-process engine
(:class:`jupyter_gpu_sessions.manager.engine.LocalEngine`, the default: the manager runs in
the caller's own process) and, for JupyterHub, an HTTP client of a remote engine service.
Callers import this module and ``core/`` only, so either can stand in for the other.

The shapes are what crosses a process boundary: kernel operations take and return core
models (:class:`~jupyter_gpu_sessions.core.models.Session`, ``ExitState``, ``RuntimeHandle``:
plain dataclasses), and reads for people return the JSON objects the REST API serves.
Wherever what a caller may see depends on who it is, the caller's
:class:`~jupyter_gpu_sessions.core.identity.Identity` is the first argument, and another
user's session or vfolder is "not found". (The HTTP implementation arrives with the
JupyterHub mode; it maps the REST API's 4xx answers back to the same ``core.errors``.)
"""

from __future__ import annotations

import asyncio
import getpass
import os
import threading
from abc import ABC, ABCMeta, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from traitlets import Type, default
from traitlets.config import Config, LoggingConfigurable

from .core.identity import Identity
from .core.models import ExitState, ResourceRequest, RuntimeHandle, Session
from .core.vfolders import FileEntry, Permission, Share, VFolder

__all__ = [
    "RUNTIMES",
    "SESSION_TOKEN_PREFIX",
    "Engine",
    "EngineChooser",
    "KernelLaunch",
    "VFolderOperations",
    "current_engine",
    "current_owner",
    "use_engine",
]


def current_owner() -> str:
    """Who owns the kernels this process starts: the JupyterHub user, else the OS user."""
    return os.environ.get("JUPYTERHUB_USER") or getpass.getuser()


# The runtimes a kernelspec may name. `docker`: a container per kernel; `local`: a process.
RUNTIMES = ("docker", "local")
# Per-session API tokens start with this, so the server tells them from its own at once.
SESSION_TOKEN_PREFIX = "jgs_"


@dataclass
class KernelLaunch:
    """What the provisioner asks for: one kernel start (or restart) of a session."""

    kernel_id: str
    owner: str
    image: str
    argv: list[str]
    env: dict[str, str]
    explicit_env: dict[str, str]
    cwd: str
    request: ResourceRequest
    runtime: str
    connection_file: str
    connection_info: dict[str, Any]
    launch_timeout: float
    queue_timeout: float = 0.0  # 0: wait as long as it takes
    name: str = ""
    vfolders: list[str] = field(default_factory=list)  # "data", "team-ds:ro"
    labels: dict[str, str] = field(default_factory=dict)
    # The image is a person's choice (a notebook's saved one), not the kernelspec's own:
    # it must be on the engine's image allowlist.
    image_chosen: bool = False


class VFolderOperations(ABC):
    """Every vfolder operation, on behalf of ``who``; another user's vfolder is "not found".
    Blocking (file system, database): async callers run them in a thread
    (``asyncio.to_thread``). ``VFolderService`` is the in-process implementation."""

    @abstractmethod
    def list(self, who: Identity) -> list[dict[str, Any]]: ...

    @abstractmethod
    def list_trash(self, who: Identity) -> list[dict[str, Any]]: ...

    @abstractmethod
    def create(
        self,
        who: Identity,
        name: str,
        *,
        type: str = "user",
        group: str | None = None,
        quota: int | str | None = None,
        cloneable: bool = False,
        backend: str | None = None,
        group_permission: str | Permission | None = None,
    ) -> VFolder: ...

    @abstractmethod
    def get(self, who: Identity, name: str) -> tuple[VFolder, Permission, str]:
        """The vfolder, the caller's permission on it, and how it reaches them."""

    @abstractmethod
    def update(
        self,
        who: Identity,
        name: str,
        *,
        new_name: str | None = None,
        quota: int | str | None = None,
        cloneable: bool | None = None,
        group_permission: str | Permission | None = None,
    ) -> VFolder: ...

    @abstractmethod
    def delete(self, who: Identity, name: str) -> VFolder:
        """To the trash: recoverable with ``restore`` until purged."""

    @abstractmethod
    def restore(self, who: Identity, name: str) -> VFolder: ...

    @abstractmethod
    def purge(self, who: Identity, name: str) -> None: ...

    @abstractmethod
    def clone(
        self,
        who: Identity,
        name: str,
        new_name: str,
        *,
        quota: int | str | None = None,
        cloneable: bool = False,
        backend: str | None = None,
    ) -> VFolder: ...

    @abstractmethod
    def usage(self, who: Identity, name: str, *, fresh: bool = False) -> int: ...

    @abstractmethod
    def owner_usage(self, username: str) -> dict[str, int]:
        """An owner's vfolder count and bytes (for their quota)."""

    @abstractmethod
    def invite(
        self, who: Identity, name: str, user: str, permission: str | Permission
    ) -> Share: ...

    @abstractmethod
    def invitations(self, who: Identity) -> dict[str, list[dict[str, Any]]]: ...

    @abstractmethod
    def accept(self, who: Identity, share_id: str) -> Share: ...

    @abstractmethod
    def decline(self, who: Identity, share_id: str) -> Share: ...

    @abstractmethod
    def shares(self, who: Identity, name: str) -> list[Share]: ...

    @abstractmethod
    def set_permission(
        self, who: Identity, name: str, user: str, permission: str | Permission
    ) -> Share: ...

    @abstractmethod
    def revoke(self, who: Identity, name: str, user: str) -> None: ...

    @abstractmethod
    def list_files(self, who: Identity, name: str, path: str = "") -> list[FileEntry]: ...

    @abstractmethod
    def open_download(self, who: Identity, name: str, path: str) -> tuple[IO[bytes], int, str]:
        """An open file, its size and its name."""

    @abstractmethod
    def upload(
        self,
        who: Identity,
        name: str,
        path: str,
        chunks: Iterable[bytes],
        *,
        size_hint: int | None = None,
        overwrite: bool = True,
    ) -> FileEntry:
        """Write ``chunks`` to ``path`` under the vfolder's quota (refused as it passes it)."""

    @abstractmethod
    def mkdir(self, who: Identity, name: str, path: str, parents: bool = False) -> FileEntry: ...

    @abstractmethod
    def delete_file(self, who: Identity, name: str, path: str, recursive: bool = False) -> None: ...

    @abstractmethod
    def ensure_ready(self) -> None:
        """Make every vfolder usable (loop mounts after a reboot); at start-up."""


class _ConfigurableABC(ABCMeta, type(LoggingConfigurable)):
    """Traitlets' metaclass and ABC's together: an engine is configurable and abstract."""


class Engine(LoggingConfigurable, metaclass=_ConfigurableABC):
    """The GPU session engine, as every caller sees it."""

    # -- kernel sessions: the provisioner's side ---------------------------------------------
    @property
    @abstractmethod
    def default_image(self) -> str:
        """The image a kernelspec that names none runs."""

    @abstractmethod
    async def submit(self, launch: KernelLaunch) -> Session:
        """Check a start and queue it (PENDING); what can never run is refused at once."""

    @abstractmethod
    async def start_kernel(
        self,
        launch: KernelLaunch,
        session: Session,
        progress: Callable[[str], None] | None = None,
    ) -> Session:
        """Wait in the queue, then start the kernel on its devices; RUNNING when it answers.
        On failure nothing is left behind and the error says why (never a bare 400)."""

    @abstractmethod
    def admission(self, kernel_id: str) -> asyncio.Future:
        """A future told with the session once a start of ``kernel_id`` is queued (or with
        the refusal), so a server can answer its client while the kernel waits."""

    @abstractmethod
    def forget_admission(self, kernel_id: str) -> None: ...

    @abstractmethod
    async def poll(self, session: Session) -> ExitState | None:
        """None while the kernel runs (or still waits to), else how it ended."""

    @abstractmethod
    async def signal(self, session: Session, signum: int) -> None: ...

    @abstractmethod
    def expect_stop(self, session_id: str) -> None:
        """This caller asked the kernel to stop: its exit is not a crash."""

    @abstractmethod
    async def note_exit(self, session: Session, state: ExitState) -> Session:
        """Record a kernel's unasked-for exit (a crash, an OOM kill) before a restart."""

    @abstractmethod
    async def stop_kernel(self, session: Session, *, restart: bool, reason: str = "") -> Session:
        """After the kernel stopped: keep the session for a restart, or end it."""

    @abstractmethod
    def handle(self, session: Session) -> RuntimeHandle | None:
        """The container (or process) of ``session``'s current kernel, if known here."""

    @abstractmethod
    async def adopt(self, session_id: str, handle: RuntimeHandle) -> Session:
        """Re-attach to a running kernel (``load_provisioner_info`` after a server restart)."""

    @abstractmethod
    def stop_reason(self, session_id: str) -> str:
        """Why the kernel is being shut down, when a caller said so (idle-timeout, delete)."""

    @abstractmethod
    def set_stop_reason(self, session_id: str, reason: str) -> None:
        """Say why a kernel is about to be shut down; "" forgets it."""

    # -- sessions: what people see and do ---------------------------------------------------
    @abstractmethod
    async def sessions_page(
        self,
        who: Identity,
        *,
        owner: str | None,
        statuses: list[Any] | None,
        limit: int,
        offset: int,
    ) -> bytes:
        """A page of sessions, newest first, as the JSON body ``GET sessions`` answers."""

    @abstractmethod
    async def get_session(self, who: Identity, session_id: str) -> dict[str, Any]:
        """One session with its history and, while it runs, its ``gpu_usage`` (what its
        processes use of its GPUs); another user's is ``SessionNotFound``."""

    @abstractmethod
    async def own_session(self, who: Identity, session_id: str) -> Session:
        """``who``'s own session ``session_id`` as stored, without its history (an admin
        too: only their own); else ``SessionNotFound``. Cheap: what a kernel operation on
        behalf of a caller checks first."""

    @abstractmethod
    async def create_sessions(
        self, who: Identity, specs: list[Any], *, working_dir: str | None = None
    ) -> list[dict[str, Any]]:
        """Queue batch sessions owned by ``who`` — one, or a pipeline whose ``depends_on``
        name one another — all or nothing, each as ``POST sessions`` takes it; they run
        in ``working_dir`` (default: the engine's). A bad field, an unknown dependency or a
        cycle is ``InvalidRequest``; a name a live session of ``who`` holds, ``Conflict``."""

    @abstractmethod
    async def resolve_session(self, who: Identity, ref: str) -> str:
        """The id of the session ``ref`` names: an id, or a name (``who``'s newest session
        of that name; an admin's own first, else anyone's newest); else ``SessionNotFound``."""

    @abstractmethod
    async def dependents(self, who: Identity, session_id: str) -> list[dict[str, Any]]:
        """The live sessions that depend on ``session_id``, transitively, deepest last."""

    @abstractmethod
    async def end_session(self, who: Identity | None, session_id: str, reason: str) -> Session:
        """End a session however far it got (queued, starting, running, another process's):
        its container removed, then its devices freed. ``who`` None: the caller's own kernel."""

    @abstractmethod
    async def session_logs(self, who: Identity, session_id: str, tail: int = 200) -> dict:
        """Live from the container while it runs, the kept tail after."""

    @abstractmethod
    async def session_history(self, who: Identity, session_id: str) -> dict[str, Any]: ...

    @abstractmethod
    async def session_graph(
        self, who: Identity, session_id: str, direction: str = "both"
    ) -> dict[str, Any]:
        """Nodes and edges around ``session_id``: what it depends on (``up``), what depends
        on it (``down``), or both; transitively."""

    @abstractmethod
    def session_json(self, session: Session, *, history: bool = False) -> dict[str, Any]:
        """A session as the REST API shows it (a queued one with its place in the queue)."""

    # -- GPUs, quota, policies, operations ---------------------------------------------------
    @abstractmethod
    async def gpus(self, who: Identity) -> dict[str, Any]:
        """Inventory, utilization, holders and each GPU's ``usage`` per session; other users'
        sessions anonymous to non-admins."""

    @abstractmethod
    async def launcher(self, who: Identity, kernelspecs: list[dict[str, Any]]) -> dict[str, Any]:
        """What the launcher shows ``who`` for these GPU session kernelspecs (each
        ``{"name", "display_name", "config"}``): each one's JEP 87 parameters schema bounded
        by the host and ``who``'s policy, free GPUs now, and per choice whether it is
        ``allowed``, ``would-queue`` (where, waiting for what) or ``forbidden`` (by what)."""

    @abstractmethod
    async def quota(self, who: Identity) -> dict[str, Any]:
        """``who``'s policy and usage: sessions, GPUs, CPUs, memory, vfolders."""

    @abstractmethod
    async def idle_timeouts(self, owners: Iterable[str]) -> dict[str, float | None]:
        """Each owner's ``idle_timeout`` in seconds (None: none applies)."""

    @abstractmethod
    async def policies(self, who: Identity) -> list[dict[str, Any]]: ...

    @abstractmethod
    async def get_policy(self, who: Identity, scope: str) -> dict[str, Any]: ...

    @abstractmethod
    async def put_policy(
        self, who: Identity, scope: str, limits: dict[str, Any]
    ) -> dict[str, Any]: ...

    @abstractmethod
    async def delete_policy(self, who: Identity, scope: str) -> None: ...

    @abstractmethod
    async def scheduler_health(self, who: Identity) -> dict[str, Any]: ...

    @abstractmethod
    async def schedule_now(self, who: Identity) -> dict[str, Any]:
        """One scheduling pass now (admins)."""

    @abstractmethod
    async def clear_history(self, who: Identity, retention: float, *, vacuum: bool) -> int:
        """Delete sessions that ended more than ``retention`` seconds ago (admins)."""

    @abstractmethod
    async def user_groups(self, username: str, hub_groups: Iterable[str] | None) -> frozenset:
        """A user's groups (OS, configured, Hub); the user is remembered for shares."""

    @abstractmethod
    async def status_marker(self) -> int:
        """Where the status change feed stands now (for ``status_changes``)."""

    @abstractmethod
    async def status_changes(self, since: int) -> list[dict[str, Any]]:
        """Status changes after ``since`` (any process's), each with its ``owner``."""

    @property
    @abstractmethod
    def vfolders(self) -> VFolderOperations: ...

    # -- JupyterHub mode: kernels that live in a service ------------------------------------
    @property
    def remote(self) -> bool:
        """Whether kernels live in another process (the manager service): they then outlive
        this server, and its API acts as the identity the service knows it by."""
        return False

    async def identity_of(self, username: str, hub_groups: Iterable[str] | None) -> Identity | None:
        """Who the engine says a caller of this server is (a remote engine: the service's
        view of this server's user: Hub groups, Hub admin); None: decide here."""
        return None

    @abstractmethod
    async def running_kernels(self, who: Identity) -> list[dict[str, Any]]:
        """``who``'s kernels that a server noted an attachment for, oldest first, so a
        restarted server re-attaches them: each ``{"session_id", "kernel_id", "status":
        "RUNNING" | "STARTING" (queued, starting, restarting: the rest is null until it
        runs), "runtime", "container_id", "container_name", "connection_info":
        {"transport", "ip", "key", "signature_scheme", "shell_port", "iopub_port",
        "stdin_port", "hb_port", "control_port"}, "attachment": {...as noted}}``."""

    @abstractmethod
    async def note_attachment(self, session_id: str, attachment: dict[str, Any]) -> None:
        """Remember (replacing the last) what a server needs to re-attach the kernel of
        ``session_id``: ``{"server": its base URL, "kernel_name", "cwd", "sessions":
        [jupyter_server's rows on it: {"id", "path", "name", "type"}]}``. The caller's own
        live kernel session only; a bad shape is ``InvalidRequest``."""

    async def note_detached(self, session_ids: list[str]) -> None:
        """The caller's server let go of the kernels of ``session_ids`` (it shuts down and
        they run on): from now on the engine's own ``idle_timeout`` applies to them until a
        server calls on them again. The caller's own sessions only; others are ignored.
        An engine whose kernels end with their server has nothing to do."""

    # -- the engine's own life ---------------------------------------------------------------
    @abstractmethod
    async def start(self) -> None:
        """Once the caller's loop runs: build collaborators off the loop, start recovery."""

    async def shutdown(self) -> None:
        """Before ``stop()``, when the caller's server shuts down: end what only this
        process supervises (the in-process engine's batch sessions). A remote engine's
        service supervises its own: nothing to do."""

    @abstractmethod
    def stop(self) -> None:
        """Stop background work at once (a pass under way finishes on its own thread);
        kernels keep running."""

    @abstractmethod
    def close(self) -> None:
        """Release everything (database, threads); kernels keep running."""

    @abstractmethod
    def diagnose(self) -> list[tuple[bool | None, str, str]]:
        """Checks for `jupyter gpu-sessions doctor`: (ok, what, hint); ok None is a note."""

    @abstractmethod
    def use_event_logger(self, logger: Any) -> None:
        """Emit session status events to ``logger`` (the server's) too."""

    # -- how kernels reach the API ----------------------------------------------------------
    @abstractmethod
    def serve_api(self, url: str | None, socket_dir: str | None = None) -> None:
        """Where the API answers for kernels launched from now on: ``url`` (ending in
        ``gpu-sessions/api/``) for local kernels, and a directory holding its unix socket
        ``api.sock``, mounted read-only into containers. None: no server (the default)."""

    @abstractmethod
    async def token_owner(self, token: str) -> str | None:
        """The owner a per-session token acts for (never as an admin), or None when it is
        unknown or its session has begun to end."""

    @abstractmethod
    def watch_kernels(self, forgotten: Callable[[], Iterable[str]]) -> None:
        """Tell the engine which kernel ids its caller's server dropped from its map, so
        their sessions are ended by recovery."""


class EngineChooser(LoggingConfigurable):
    """Which engine implementation a process uses (a ``Type`` trait, as every swappable
    part): set ``c.EngineChooser.engine_class`` to use another."""

    engine_class = Type(
        default_value="jupyter_gpu_sessions.manager.engine.LocalEngine",
        klass=Engine,
        help="""The engine this process's server, provisioner and CLI talk to. The default
        runs the manager in this process; the JupyterHub mode's remote client stands in for
        it without any caller changing (the default when $JUPYTER_GPU_SESSIONS_SERVICE_URL
        names a manager service).""",
    ).tag(config=True)

    @default("engine_class")
    def _default_engine_class(self) -> Any:
        if os.environ.get("JUPYTER_GPU_SESSIONS_SERVICE_URL", "").strip():
            # Named, not imported: the remote client imports this module.
            return "jupyter_gpu_sessions.remote.RemoteEngine"
        return "jupyter_gpu_sessions.manager.engine.LocalEngine"


_current: Engine | None = None
_current_lock = threading.Lock()


def current_engine(config: Config | None = None) -> Engine:
    """This process's engine: the one a server extension put in place, else one built from
    ``config`` (the provisioner in nbclient or papermill, the CLI)."""
    global _current
    with _current_lock:
        if _current is None:
            klass = EngineChooser(config=config).engine_class
            _current = klass(config=config)
        return _current


def use_engine(engine: Engine | None) -> Engine | None:
    """Make ``engine`` this process's engine (None: the next caller builds one); returns the
    previous one."""
    global _current
    with _current_lock:
        previous, _current = _current, engine
        return previous
