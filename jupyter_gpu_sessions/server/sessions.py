"""Handlers for sessions, GPUs, quotas, policies and operations (scheduler, history)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from typing import Any

from tornado import web

from ..core.errors import Conflict, InvalidRequest, NotFound, SessionNotFound
from ..core.models import Session
from ..core.policy import Policy, PolicySet
from ..core.status import SessionStatus
from ..core.units import parse_duration
from .base import GPUSessionsHandler
from .events import gpu_snapshot, visible_gpus

MAX_PAGE = 500


def session_json(session: Session, manager: Any, *, history: bool = False) -> dict[str, Any]:
    data = session.to_dict()
    if session.status == SessionStatus.PENDING:
        data["queue_message"] = manager.queue_message(session)
    if history:
        data["history"] = [
            {"status": h.status.value, "at": h.at, "reason": h.reason} for h in session.history
        ]
    return data


class SessionLookup(GPUSessionsHandler):
    async def session(self, session_id: str, *, history: bool = False) -> Session:
        """The caller's session (any, for admins); another user's is "not found"."""
        self.check_id(session_id)
        try:
            session = await self.run(self.manager.store.get, session_id, history=history)
        except SessionNotFound:
            session = None
        if session is None or (session.owner != self.who.username and not self.who.is_admin):
            raise NotFound(f"No session {session_id!r} of yours.")
        return session


class PageCache:
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

    async def version(self, manager: Any) -> tuple:
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


class SessionsHandler(GPUSessionsHandler):
    query_args = frozenset({"limit", "offset", "status", "owner"})

    @web.authenticated
    async def get(self) -> None:
        limit = self.int_argument("limit", 100, minimum=1, maximum=MAX_PAGE)
        offset = self.int_argument("offset", 0, minimum=0, maximum=10**9)
        statuses = None
        raw = self.get_argument("status", "")
        if raw:
            try:
                statuses = [SessionStatus(s.strip().upper()) for s in raw.split(",") if s.strip()]
            except ValueError:
                known = ", ".join(s.value for s in SessionStatus)
                raise InvalidRequest(f"status {raw!r} is not one of {known}") from None
        owner = self.get_argument("owner", "") or None
        if not self.who.is_admin:
            if owner not in (None, self.who.username):
                raise NotFound(f"No sessions of {owner!r} for you to see.")
            owner = self.who.username
        cache: PageCache = self.settings.setdefault("gpu_sessions_page_cache", PageCache())
        key = (owner, tuple(statuses or ()), limit, offset)
        store = self.manager.store
        version = await cache.version(self.manager)
        body = cache.get(key, version)
        if body is None:
            manager = self.manager

            def encoded_page() -> bytes:  # one trip to a worker thread: query and encoding
                sessions, total = store.page(
                    owner=owner, statuses=statuses, limit=limit, offset=offset
                )
                page = {
                    "sessions": [session_json(s, manager) for s in sessions],
                    "total": total,
                    "limit": limit,
                    "offset": offset,
                }
                return json.dumps(page).encode()

            body = await self.run(encoded_page)
            cache.put(key, version, body)
        self.finish(body)


class SessionHandler(SessionLookup):
    query_args = frozenset({"recursive"})

    @web.authenticated
    async def get(self, session_id: str) -> None:
        session = await self.session(session_id, history=True)
        self.reply(session_json(session, self.manager, history=True))

    @web.authenticated
    async def delete(self, session_id: str) -> None:
        """End the session (its kernel shut down, devices freed); ``recursive=true`` also
        ends every session that depends on it."""
        session = await self.session(session_id)
        recursive = self.bool_argument("recursive")
        dependents = await self.run(self.manager.store.dependents, session.id)
        if dependents and not recursive:
            raise Conflict(
                f"{len(dependents)} session(s) depend on {session.id[:12]} "
                f"({', '.join(d.id[:12] for d in dependents[:5])}): end them first, or "
                "send recursive=true to end them too."
            )
        reason = f"deleted through the API by {self.who.username}"
        ended = []
        for target in [*reversed(dependents), session]:
            ended.append(await self._end(target, reason))
        self.reply({"ended": [session_json(s, self.manager) for s in ended]})

    async def _end(self, session: Session, reason: str) -> Session:
        kernel_manager = self.serverapp.kernel_manager
        if (
            session.kernel_id
            and session.kernel_id in kernel_manager
            and session.status in (SessionStatus.RUNNING, SessionStatus.RESTARTING)
        ):
            # This server's kernel: shut it down through its kernel manager, so that
            # jupyter_server's own sessions and clients learn it is gone.
            self.manager.set_stop_reason(session.id, reason)
            await kernel_manager.shutdown_kernel(session.kernel_id)
            return await self.run(self.manager.store.get, session.id)
        # Queued or starting (here or in another process), or another process's kernel:
        # the one end path; a start in flight cleans up after itself.
        return await self.manager.end_session(session.id, reason)


class SessionLogsHandler(SessionLookup):
    query_args = frozenset({"tail"})

    @web.authenticated
    async def get(self, session_id: str) -> None:
        session = await self.session(session_id)
        tail = self.int_argument("tail", 200, minimum=1, maximum=10_000)
        if session.status == SessionStatus.CANCELLED:
            raise Conflict(
                f"Session {session.id[:12]} never ran (cancelled: {session.reason}), so it "
                "has no logs; its history says why."
            )
        if session.status == SessionStatus.PENDING:
            raise Conflict(
                f"Session {session.id[:12]} has not started yet: "
                f"{self.manager.queue_message(session)}"
            )
        text = await self.manager.session_logs(session, tail=tail)
        self.reply({"session_id": session.id, "live": not session.status.is_terminal, "logs": text})


class SessionHistoryHandler(SessionLookup):
    @web.authenticated
    async def get(self, session_id: str) -> None:
        session = await self.session(session_id, history=True)
        self.reply(
            {
                "session_id": session.id,
                "history": [
                    {"status": h.status.value, "at": h.at, "reason": h.reason}
                    for h in session.history
                ],
            }
        )


class SessionGraphHandler(SessionLookup):
    @web.authenticated
    async def get(self, session_id: str) -> None:
        session = await self.session(session_id)
        nodes, edges = await self.run(self.manager.store.graph, session.id)
        visible = {n.id for n in nodes if n.owner == self.who.username or self.who.is_admin}
        self.reply(
            {
                "nodes": [
                    {
                        "id": n.id,
                        "name": n.name,
                        "status": n.status.value,
                        "kind": n.kind,
                        "owner": n.owner,
                    }
                    if n.id in visible
                    else {
                        "id": n.id,
                        "name": "",
                        "status": n.status.value,
                        "kind": n.kind,
                        "owner": None,
                    }
                    for n in nodes
                ],
                "edges": [{"from": a, "to": b} for a, b in edges],
            }
        )


class GPUsHandler(GPUSessionsHandler):
    @web.authenticated
    async def get(self) -> None:
        snapshot = await self.run(gpu_snapshot, self.manager)
        inventory = self.manager.inventory
        self.reply(
            {
                "inventory": type(inventory).__name__,
                "driver_version": await self.run(inventory.driver_version),
                "gpus": visible_gpus(snapshot, self.who),
            }
        )


class QuotaHandler(GPUSessionsHandler):
    @web.authenticated
    async def get(self) -> None:
        username = self.who.username

        def read() -> dict[str, Any]:
            self.manager.refresh_policies()
            policy = self.manager.policy_for(username)
            totals = self.manager.store.owner_totals(username)
            storage = self.manager.vfolders.owner_usage(username)
            return {
                "user": username,
                "groups": sorted(self.who.groups),
                "admin": self.who.is_admin,
                "policy": policy.to_dict(),
                "usage": {
                    "sessions": totals.sessions,
                    "pending_sessions": totals.pending,
                    "gpus": totals.gpus,
                    "cpus": totals.cpus,
                    "memory": totals.memory,
                    "vfolder_count": storage["count"],
                    "vfolder_bytes": storage["bytes"],
                },
            }

        self.reply(await self.run(read))


def check_scope(scope: str) -> str:
    if scope == "default":
        return scope
    kind, _, name = scope.partition(":")
    if kind not in ("user", "group") or not name or len(name) > 128 or "\x00" in name:
        raise InvalidRequest(
            f"policy scope {scope!r} is not understood: use 'default', 'group:NAME' or 'user:NAME'"
        )
    return scope


class PoliciesHandler(GPUSessionsHandler):
    @web.authenticated
    async def get(self) -> None:
        self.require_admin("list policies")

        def read() -> dict[str, Any]:
            stored = self.manager.admin.policies()
            configured = dict(self.manager.policies)
            scopes = sorted(set(stored) | set(configured))
            return {
                "policies": [
                    {
                        "scope": scope,
                        "limits": Policy.parse(
                            stored.get(scope, configured.get(scope, {})), scope=scope
                        ).to_dict(),
                        "source": "api" if scope in stored else "config",
                    }
                    for scope in scopes
                ]
            }

        self.reply(await self.run(read))


class PolicyHandler(GPUSessionsHandler):
    @web.authenticated
    async def get(self, scope: str) -> None:
        scope = check_scope(scope)
        self.require_admin("read policies")
        stored = await self.run(self.manager.admin.policies)
        if scope in stored:
            limits, source = stored[scope], "api"
        elif scope in self.manager.policies:
            limits, source = self.manager.policies[scope], "config"
        else:
            raise NotFound(f"No policy for scope {scope!r}.")
        self.reply(
            {
                "scope": scope,
                "limits": Policy.parse(limits, scope=scope).to_dict(),
                "source": source,
            }
        )

    @web.authenticated
    async def put(self, scope: str) -> None:
        """Set the limits of ``scope`` (replacing what config or an earlier PUT set); they
        apply from the next scheduling pass and kernel start."""
        scope = check_scope(scope)
        self.require_admin("set policies")
        limits = self.body(required=True)
        policy = Policy.parse(limits, scope=scope)  # refuses unknown limits and bad values
        PolicySet.from_config({scope: limits})
        stored = {k: v for k, v in limits.items() if v is not None}
        await self.run(self.manager.admin.put_policy, scope, stored, self.who.username)
        await self.run(self.manager.refresh_policies)
        self.reply({"scope": scope, "limits": policy.to_dict(), "source": "api"})

    @web.authenticated
    async def delete(self, scope: str) -> None:
        scope = check_scope(scope)
        self.require_admin("remove policies")
        if not await self.run(self.manager.admin.delete_policy, scope):
            raise NotFound(
                f"No policy for scope {scope!r} was set through the API (configured policies "
                "are changed in the server's config)."
            )
        await self.run(self.manager.refresh_policies)
        self.set_status(204)
        self.finish()


class SchedulerHealthHandler(GPUSessionsHandler):
    @web.authenticated
    async def get(self) -> None:
        self.reply(
            {
                "now": time.time(),
                "this_manager": self.manager.manager_id,
                "managers": await self.run(self.manager.health),
            }
        )


class SchedulerTriggerHandler(GPUSessionsHandler):
    @web.authenticated
    async def post(self) -> None:
        self.require_admin("trigger the scheduler")
        self.body(set())
        decision = await self.manager.schedule_now()
        self.reply(
            {
                "placed": sorted(decision.placed),
                "cancelled": sorted(decision.cancelled),
                "duration": self.manager.last_pass.get("schedule_duration"),
            }
        )


class ClearHistoryHandler(GPUSessionsHandler):
    @web.authenticated
    async def post(self) -> None:
        self.require_admin("clear the session history")
        data = self.body({"retention", "vacuum"})
        if "retention" not in data:
            raise InvalidRequest('Send {"retention": "1yr"} (or 6mo, 30d, 12h).')
        retention = parse_duration(data["retention"], what="retention")
        vacuum = data.get("vacuum", False)
        if not isinstance(vacuum, bool):
            raise InvalidRequest("vacuum must be true or false")
        deleted = await asyncio.to_thread(self.manager.clear_history, retention, vacuum=vacuum)
        self.reply({"deleted": deleted, "retention_seconds": retention, "vacuumed": vacuum})


class OpenAPIHandler(GPUSessionsHandler):
    @web.authenticated
    async def get(self) -> None:
        from . import openapi_document

        self.reply(openapi_document())
