"""The in-process engine: the engine interface over a manager in this same process.

Identity checks live here (another user's session is "not found", admin-only operations
say who may), and every blocking read goes through a thread, so no caller on an event
loop waits on the database, the file system or NVML.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from traitlets import Type

from ..core.errors import Conflict, InvalidRequest, NotFound, SessionNotFound
from ..core.identity import Identity, require_admin
from ..core.models import SESSION_ID, SESSION_NAME, ExitState, RuntimeHandle, Session
from ..core.policy import Policy, PolicySet
from ..core.status import SessionStatus
from ..engine import Engine, KernelLaunch, VFolderOperations
from ..vfolders import VFolderService
from . import PORT_NAMES, GPUSessionManager
from .doctor import diagnose
from .gpu_usage import GPUUsage
from .launcher import launcher_json
from .views import gpu_snapshot, graph_json, history_json, quota_json, session_json, visible_gpus

# The vfolder service keeps to the interface without importing it (vfolders/ sits below it).
VFolderOperations.register(VFolderService)


class LocalEngine(Engine):
    """The manager runs here: kernels start from this process, on this host's Docker."""

    manager_class = Type(
        default_value=GPUSessionManager,
        klass=GPUSessionManager,
        help="The session manager this engine runs (configured as GPUSessionManager).",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.manager: GPUSessionManager = self.manager_class(parent=self)
        self._pages = _PageCache()
        # Per-session GPU use: one NVML sweep + PID lookups, shared for a couple of seconds.
        self.gpu_usage: GPUUsage = self.manager.gpu_usage

    # -- kernel sessions -------------------------------------------------------------------
    @property
    def default_image(self) -> str:
        return self.manager.default_image

    async def submit(self, launch: KernelLaunch) -> Session:
        return await self.manager.submit(launch)

    async def start_kernel(
        self,
        launch: KernelLaunch,
        session: Session,
        progress: Callable[[str], None] | None = None,
    ) -> Session:
        session = await self.manager.start_kernel(launch, session, progress=progress)
        # What a restarted server connects with (its ports are final now: a start whose
        # port was taken moved to fresh ones); shown to the kernel's owner alone.
        connection = _connection(launch.connection_info)
        await asyncio.to_thread(self.manager.store.note_kernel, session.id, connection=connection)
        return session

    def admission(self, kernel_id: str) -> asyncio.Future:
        return self.manager.admission(kernel_id)

    def forget_admission(self, kernel_id: str) -> None:
        self.manager.forget_admission(kernel_id)

    # A caller's kernel operations mark the kernel seen: a server is attached to it (the
    # manager service ends idle kernels no server is attached to: kernel_watch.py).
    async def poll(self, session: Session) -> ExitState | None:
        self.manager.note_seen(session.id)
        return await self.manager.poll(session)

    async def signal(self, session: Session, signum: int) -> None:
        self.manager.note_seen(session.id)
        await self.manager.signal(session, signum)

    def expect_stop(self, session_id: str) -> None:
        self.manager.note_seen(session_id)
        self.manager.expect_stop(session_id)

    async def note_exit(self, session: Session, state: ExitState) -> Session:
        self.manager.note_seen(session.id)
        return await self.manager.note_exit(session, state)

    async def stop_kernel(self, session: Session, *, restart: bool, reason: str = "") -> Session:
        return await self.manager.stop_kernel(session, restart=restart, reason=reason)

    def handle(self, session: Session) -> RuntimeHandle | None:
        return self.manager.handle(session)

    async def adopt(self, session_id: str, handle: RuntimeHandle) -> Session:
        """Only the container the store says the session runs in (a caller's handle names
        no other container), and a handle this process already holds for it is kept (with
        what a restart reuses)."""

        def adopt() -> Session:
            session = self.manager.store.get(session_id, history=False)
            if session.status.is_terminal:
                raise Conflict(f"Session {session_id} has ended ({session.status.value}).")
            if session.container_id and handle.id != session.container_id:
                raise InvalidRequest(
                    f"Session {session_id} does not run in {handle.runtime} {handle.id!r}."
                )
            known = self.manager.handle(session)
            if known is not None and known.id == handle.id:
                return session
            return self.manager.adopt(session_id, handle)

        self.manager.note_seen(session_id)
        return await asyncio.to_thread(adopt)

    def stop_reason(self, session_id: str) -> str:
        return self.manager.stop_reason(session_id)

    def set_stop_reason(self, session_id: str, reason: str) -> None:
        self.manager.set_stop_reason(session_id, reason)

    # -- sessions --------------------------------------------------------------------------
    async def _visible(self, who: Identity, session_id: str, *, history: bool) -> Session:
        """The caller's session (any, for admins); another user's is "not found"."""
        try:
            session = await asyncio.to_thread(self.manager.store.get, session_id, history=history)
        except SessionNotFound:
            session = None
        if session is None or (session.owner != who.username and not who.is_admin):
            raise SessionNotFound(f"No session {session_id!r} of yours.")
        return session

    async def own_session(self, who: Identity, session_id: str) -> Session:
        session = await self._visible(who, session_id, history=False)
        if session.owner != who.username:  # an admin's view of another's: not theirs
            raise SessionNotFound(f"No session {session_id!r} of yours.")
        return session

    async def sessions_page(
        self,
        who: Identity,
        *,
        owner: str | None,
        statuses: list[Any] | None,
        limit: int,
        offset: int,
    ) -> bytes:
        if not who.is_admin:
            if owner not in (None, who.username):
                raise NotFound(f"No sessions of {owner!r} for you to see.")
            owner = who.username
        key = (owner, tuple(statuses or ()), limit, offset)
        version = await self._pages.version(self.manager)
        body = self._pages.get(key, version)
        if body is None:
            manager = self.manager

            def encoded_page() -> bytes:  # one trip to a worker thread: query and encoding
                sessions, total = manager.store.page(
                    owner=owner, statuses=statuses, limit=limit, offset=offset
                )
                page = {
                    "sessions": [session_json(manager, s) for s in sessions],
                    "total": total,
                    "limit": limit,
                    "offset": offset,
                }
                return json.dumps(page).encode()

            body = await asyncio.to_thread(encoded_page)
            self._pages.put(key, version, body)
        return body

    async def get_session(self, who: Identity, session_id: str) -> dict[str, Any]:
        session = await self._visible(who, session_id, history=True)
        data = session_json(self.manager, session, history=True)
        data["gpu_usage"] = await self.gpu_usage.session_usage(session)
        return data

    async def create_sessions(
        self, who: Identity, specs: list[Any], *, working_dir: str | None = None
    ) -> list[dict[str, Any]]:
        created = await self.manager.create_batches(who.username, specs, working_dir=working_dir)
        return [session_json(self.manager, s) for s in created]

    async def resolve_session(self, who: Identity, ref: str) -> str:
        if not isinstance(ref, str) or not (
            SESSION_ID.fullmatch(ref) or SESSION_NAME.fullmatch(ref)
        ):
            raise SessionNotFound(
                f"No session {ref!r:.80}: name a session by its id (32 hexadecimal digits) or "
                "its name (letters, digits, '.', '_', '-')."
            )
        found = await asyncio.to_thread(
            self.manager.store.find, ref, who.username, anyone=who.is_admin
        )
        if found is None:
            raise SessionNotFound(f"No session {ref!r} of yours.")
        return found.id

    async def dependents(self, who: Identity, session_id: str) -> list[dict[str, Any]]:
        session = await self._visible(who, session_id, history=False)
        found = await asyncio.to_thread(self.manager.store.dependents, session.id)
        return [session_json(self.manager, s) for s in found]

    async def end_session(self, who: Identity | None, session_id: str, reason: str) -> Session:
        if who is not None:
            await self._visible(who, session_id, history=False)
        return await self.manager.end_session(session_id, reason)

    async def session_logs(self, who: Identity, session_id: str, tail: int = 200) -> dict:
        session = await self._visible(who, session_id, history=False)
        text = await self.manager.session_logs(session, tail=tail)
        return {"session_id": session.id, "live": not session.status.is_terminal, "logs": text}

    async def session_history(self, who: Identity, session_id: str) -> dict[str, Any]:
        session = await self._visible(who, session_id, history=True)
        return {"session_id": session.id, "history": history_json(session)}

    async def session_graph(
        self, who: Identity, session_id: str, direction: str = "both"
    ) -> dict[str, Any]:
        session = await self._visible(who, session_id, history=False)
        nodes, edges = await asyncio.to_thread(self.manager.store.graph, session.id, direction)
        return graph_json(nodes, edges, who)

    def session_json(self, session: Session, *, history: bool = False) -> dict[str, Any]:
        return session_json(self.manager, session, history=history)

    # -- GPUs, quota, policies, operations -------------------------------------------------
    async def gpus(self, who: Identity) -> dict[str, Any]:
        inventory = self.manager.inventory
        usage = await self.gpu_usage.sweep()

        def read() -> tuple[list[dict[str, Any]], str | None]:  # one trip to a thread
            return gpu_snapshot(self.manager, usage), inventory.driver_version()

        snapshot, driver = await asyncio.to_thread(read)
        return {
            "inventory": type(inventory).__name__,
            "driver_version": driver,
            "gpus": visible_gpus(snapshot, who),
        }

    async def quota(self, who: Identity) -> dict[str, Any]:
        return await asyncio.to_thread(quota_json, self.manager, who)

    async def launcher(self, who: Identity, kernelspecs: list[dict[str, Any]]) -> dict[str, Any]:
        return await asyncio.to_thread(launcher_json, self.manager, who, kernelspecs)

    async def idle_timeouts(self, owners: Iterable[str]) -> dict[str, float | None]:
        def read() -> dict[str, float | None]:
            self.manager.refresh_policies()
            return {owner: self.manager.policy_for(owner).idle_timeout for owner in owners}

        return await asyncio.to_thread(read)

    async def policies(self, who: Identity) -> list[dict[str, Any]]:
        require_admin(who, "list policies")

        def read() -> list[dict[str, Any]]:
            stored = self.manager.admin.policies()
            configured = dict(self.manager.policies)
            return [
                _policy_json(scope, stored, configured)
                for scope in sorted(set(stored) | set(configured))
            ]

        return await asyncio.to_thread(read)

    async def get_policy(self, who: Identity, scope: str) -> dict[str, Any]:
        require_admin(who, "read policies")
        stored = await asyncio.to_thread(self.manager.admin.policies)
        configured = dict(self.manager.policies)
        if scope not in stored and scope not in configured:
            raise NotFound(f"No policy for scope {scope!r}.")
        return _policy_json(scope, stored, configured)

    async def put_policy(self, who: Identity, scope: str, limits: dict[str, Any]) -> dict[str, Any]:
        require_admin(who, "set policies")
        policy = Policy.parse(limits, scope=scope)  # refuses unknown limits and bad values
        PolicySet.from_config({scope: limits})
        stored = {k: v for k, v in limits.items() if v is not None}
        await asyncio.to_thread(self.manager.admin.put_policy, scope, stored, who.username)
        await asyncio.to_thread(self.manager.refresh_policies)
        return {"scope": scope, "limits": policy.to_dict(), "source": "api"}

    async def delete_policy(self, who: Identity, scope: str) -> None:
        require_admin(who, "remove policies")
        if not await asyncio.to_thread(self.manager.admin.delete_policy, scope):
            raise NotFound(
                f"No policy for scope {scope!r} was set through the API (configured policies "
                "are changed in the server's config)."
            )
        await asyncio.to_thread(self.manager.refresh_policies)

    async def scheduler_health(self, who: Identity) -> dict[str, Any]:
        return {
            "now": time.time(),
            "this_manager": self.manager.manager_id,
            "managers": await asyncio.to_thread(self.manager.health),
        }

    async def schedule_now(self, who: Identity) -> dict[str, Any]:
        require_admin(who, "trigger the scheduler")
        decision = await self.manager.schedule_now()
        return {
            "placed": sorted(decision.placed),
            "cancelled": sorted(decision.cancelled),
            "duration": self.manager.last_pass.get("schedule_duration"),
        }

    async def clear_history(self, who: Identity, retention: float, *, vacuum: bool) -> int:
        require_admin(who, "clear the session history")
        return await asyncio.to_thread(self.manager.clear_history, retention, vacuum=vacuum)

    async def user_groups(self, username: str, hub_groups: Iterable[str] | None) -> frozenset:
        def look_up() -> frozenset:
            # None: the caller does not know the Hub's groups (kept as stored).
            self.manager.admin.touch_user(
                username, None if hub_groups is None else tuple(hub_groups)
            )
            return self.manager.groups_of(username)

        return await asyncio.to_thread(look_up)

    async def status_marker(self) -> int:
        return await asyncio.to_thread(self.manager.store.change_marker)

    async def status_changes(self, since: int) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.manager.store.history_since, since)

    @property
    def vfolders(self) -> VFolderOperations:
        return self.manager.vfolders

    # -- kernels that outlive their server -------------------------------------------------
    async def running_kernels(self, who: Identity) -> list[dict[str, Any]]:
        found = await asyncio.to_thread(self.manager.store.kernel_attachments, who.username)
        kernels = []
        for session, kept in found:
            handle = self.manager.handle(session)
            running = session.status == SessionStatus.RUNNING and kept.get("connection")
            kernels.append(
                {
                    "session_id": session.id,
                    "kernel_id": session.kernel_id,
                    "status": session.status.value if running else "STARTING",
                    "runtime": session.runtime,
                    "container_id": session.container_id if running else None,
                    "container_name": handle.name if handle and running else "",
                    "connection_info": dict(kept["connection"]) if running else None,
                    "attachment": dict(kept["attachment"]),
                }
            )
        return kernels

    async def note_attachment(self, session_id: str, attachment: dict[str, Any]) -> None:
        checked = check_attachment(attachment)
        self.manager.note_seen(session_id)
        await asyncio.to_thread(self.manager.store.note_kernel, session_id, attachment=checked)

    async def note_detached(self, session_ids: list[str]) -> None:
        self.manager.note_detached(list(session_ids))

    # -- life ------------------------------------------------------------------------------
    async def start(self) -> None:
        # The store (migrations), the GPU inventory (NVML) and the Docker client are built
        # now, off the loop, not on the first request or kernel start that needs them.
        await asyncio.to_thread(self.manager.warm_up)
        self.manager.ensure_reconciler()
        await asyncio.to_thread(self.manager.heartbeat)
        try:
            await asyncio.to_thread(self.manager.vfolders.ensure_ready)
        except Exception:  # one unmountable vfolder must not take the whole API down
            self.log.exception("Could not make every vfolder ready (loop mounts)")

    async def shutdown(self) -> None:
        """This process's batch sessions end with it: queued ones are cancelled, running
        ones stopped (SIGTERM, then a kill after ``batch_stop_timeout``), their devices
        freed — as the kernels of a server that shuts down are. Nothing else would watch
        them until the reconcile pass of another process found this one gone."""
        await self.manager.end_batches()

    def stop(self) -> None:
        # Returns at once: a reconcile pass under way finishes on its own thread.
        self.manager.stop_reconciler(wait=False)

    def close(self) -> None:
        self.manager.close()

    def diagnose(self) -> list[tuple[bool | None, str, str]]:
        return diagnose(self.manager)

    def use_event_logger(self, logger: Any) -> None:
        self.manager.use_event_logger(logger)

    def watch_kernels(self, forgotten: Callable[[], Iterable[str]]) -> None:
        self.manager.forgotten_kernels = forgotten

    # -- how kernels reach the API ---------------------------------------------------------
    def serve_api(self, url: str | None, socket_dir: str | None = None) -> None:
        self.manager.serve_api(url, socket_dir)

    async def token_owner(self, token: str) -> str | None:
        owner = self.manager.cached_token_owner(token)  # no I/O: a recent hit or a bad shape
        if owner is False:
            owner = await asyncio.to_thread(self.manager.token_owner, token)
        return owner or None


_ROW_KEYS = ("id", "path", "name", "type")
_MAX_TEXT = 4096
_MAX_ROWS = 64


def check_attachment(attachment: Any) -> dict[str, Any]:
    """An attachment as ``Engine.note_attachment`` takes it, or ``InvalidRequest``."""

    def text(value: Any, what: str) -> str:
        if value is None:
            return ""
        if not isinstance(value, str) or len(value) > _MAX_TEXT:
            raise InvalidRequest(f"attachment {what} must be a string of at most {_MAX_TEXT}")
        return value

    if not isinstance(attachment, dict):
        raise InvalidRequest("an attachment is a JSON object")
    unknown = set(attachment) - {"server", "kernel_name", "cwd", "sessions"}
    if unknown:
        raise InvalidRequest(f"attachment has unknown keys: {', '.join(sorted(unknown))}")
    rows = attachment.get("sessions") or []
    if not isinstance(rows, list) or len(rows) > _MAX_ROWS:
        raise InvalidRequest(f"attachment sessions must be a list of at most {_MAX_ROWS} rows")
    checked_rows = []
    for row in rows:
        if not isinstance(row, dict) or set(row) - set(_ROW_KEYS) or not row.get("id"):
            raise InvalidRequest(f"each attachment session is an object with {_ROW_KEYS}")
        checked_rows.append({key: text(row.get(key), f"session {key}") for key in _ROW_KEYS})
    kernel_name = text(attachment.get("kernel_name"), "kernel_name")
    if not kernel_name:
        raise InvalidRequest("attachment kernel_name names the kernel's kernelspec")
    return {
        "server": text(attachment.get("server"), "server"),
        "kernel_name": kernel_name,
        "cwd": text(attachment.get("cwd"), "cwd"),
        "sessions": checked_rows,
    }


def _connection(info: dict[str, Any]) -> dict[str, Any]:
    """What a client connects to a kernel with (JSON-ready: the key as text)."""
    keys = ("transport", "ip", "signature_scheme", *PORT_NAMES)
    kept = {name: info[name] for name in keys if name in info}
    key = info.get("key", b"")
    kept["key"] = key.decode() if isinstance(key, bytes) else str(key)
    return kept


def _policy_json(scope: str, stored: dict[str, Any], configured: dict[str, Any]) -> dict[str, Any]:
    source = "api" if scope in stored else "config"
    limits = stored[scope] if scope in stored else configured.get(scope, {})
    return {
        "scope": scope,
        "limits": Policy.parse(limits, scope=scope).to_dict(),
        "source": source,
    }


class _PageCache:
    """Encoded session pages, reused while nothing listed changed: a UI polling the list
    from many tabs then costs neither a query, nor a thread hop, nor an encoding.

    What changed is told by this process's own writes (``SessionStore.version``, at once),
    its queue positions (``pass_count``), and the store's list marker for other processes'
    writes (nbclient, papermill): re-read in the background every ``MARKER_SECONDS`` while
    requests come, and before answering when it is older than ``MARKER_STALE``."""

    MARKER_SECONDS = 0.25
    MARKER_STALE = 1.0  # the most another process's change can stay unseen

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.pages: OrderedDict[tuple, tuple[tuple, bytes]] = OrderedDict()
        self.marker: tuple[int, int] | None = None
        self.marker_at = 0.0

    async def version(self, manager: GPUSessionManager) -> tuple:
        store = manager.store
        local = store.version  # before the marker: a write in between only costs a miss
        age = time.monotonic() - self.marker_at
        if self.marker is None or age > self.MARKER_STALE:
            # Not asked for a while: read it now (a page must never be older than that).
            self.marker_at = time.monotonic()
            self.marker = await asyncio.to_thread(store.list_marker)
        elif age > self.MARKER_SECONDS:
            # Under steady use: refreshed in the background, no request waits for it.
            self.marker_at = time.monotonic()
            asyncio.ensure_future(self._refresh(store))
        return (local, self.marker, manager.pass_count)

    async def _refresh(self, store: Any) -> None:
        try:
            self.marker = await asyncio.to_thread(store.list_marker)
        except Exception:  # the next request tries again; pages are not served stale
            self.marker = None

    def get(self, key: tuple, version: tuple) -> bytes | None:
        hit = self.pages.get(key)
        if hit is None or hit[0] != version:
            return None
        self.pages.move_to_end(key)
        return hit[1]

    def put(self, key: tuple, version: tuple, body: bytes) -> None:
        self.pages[key] = (version, body)
        self.pages.move_to_end(key)
        while len(self.pages) > self.size:
            self.pages.popitem(last=False)
