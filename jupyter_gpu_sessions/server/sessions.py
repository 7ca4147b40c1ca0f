"""Handlers for sessions, GPUs, quotas, policies and operations (scheduler, history)."""

from __future__ import annotations

from typing import Any

from tornado import web

from ..core.errors import Conflict, InvalidRequest
from ..core.status import SessionStatus
from ..core.units import parse_duration
from .base import GPUSessionsHandler

MAX_PAGE = 500


class SessionLookup(GPUSessionsHandler):
    async def resolve(self, ref: str) -> str:
        """The id of the session ``ref`` names: its id, or its name (the caller's newest
        session of that name; an admin's own first, else anyone's)."""
        return await self.engine.resolve_session(self.who, ref)

    async def session(self, ref: str) -> dict[str, Any]:
        """The caller's session (any, for admins); another user's is "not found"."""
        return await self.engine.get_session(self.who, await self.resolve(ref))


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
        body = await self.engine.sessions_page(
            self.who, owner=owner, statuses=statuses, limit=limit, offset=offset
        )
        self.finish(body)

    @web.authenticated
    async def post(self) -> None:
        """Create a batch session (201 with it), or with ``{"sessions": [...]}`` a whole
        pipeline at once, all or nothing (201 with ``{"sessions": [...]}``). They run in
        the server's root directory (in the manager service: the caller's home)."""
        data = self.body(required=True)
        root = self.app.batch_working_dir(self.who)
        if "sessions" in data:
            if set(data) != {"sessions"}:
                raise InvalidRequest(
                    'Send either one batch session or {"sessions": [...]}, not both.'
                )
            created = await self.engine.create_sessions(
                self.who, data["sessions"], working_dir=root
            )
            self.reply({"sessions": created}, status=201)
            return
        created = await self.engine.create_sessions(self.who, [data], working_dir=root)
        self.reply(created[0], status=201)


class SessionHandler(SessionLookup):
    query_args = frozenset({"recursive"})

    @web.authenticated
    async def get(self, session_id: str) -> None:
        self.reply(await self.session(session_id))

    @web.authenticated
    async def delete(self, session_id: str) -> None:
        """End the session (its kernel shut down, devices freed); ``recursive=true`` also
        ends every session that depends on it."""
        session = await self.session(session_id)
        recursive = self.bool_argument("recursive")
        dependents = await self.engine.dependents(self.who, session["id"])
        if dependents and not recursive:
            raise Conflict(
                f"{len(dependents)} session(s) depend on {session['id'][:12]} "
                f"({', '.join(d['id'][:12] for d in dependents[:5])}): end them first, or "
                "send recursive=true to end them too."
            )
        reason = f"deleted through the API by {self.who.username}"
        ended = []
        for target in [*reversed(dependents), session]:
            ended.append(await self._end(target, reason))
        self.reply({"ended": ended})

    async def _end(self, session: dict[str, Any], reason: str) -> dict[str, Any]:
        kernel_manager = self.serverapp.kernel_manager
        kernel_id = session.get("kernel_id")
        if (
            kernel_id
            and kernel_id in kernel_manager
            and session["status"] in (SessionStatus.RUNNING.value, SessionStatus.RESTARTING.value)
        ):
            # This server's kernel: shut it down through its kernel manager, so that
            # jupyter_server's own sessions and clients learn it is gone.
            self.engine.set_stop_reason(session["id"], reason)
            await kernel_manager.shutdown_kernel(kernel_id)
            ended = await self.engine.get_session(self.who, session["id"])
            ended.pop("history", None)
            return ended
        # Queued or starting (here or in another process), or another process's kernel:
        # the one end path; a start in flight cleans up after itself. Read back as the API
        # shows it (from the engine, wherever it runs).
        ended = await self.engine.end_session(self.who, session["id"], reason)
        data = await self.engine.get_session(self.who, ended.id)
        data.pop("history", None)
        return data


class SessionLogsHandler(SessionLookup):
    query_args = frozenset({"tail"})

    @web.authenticated
    async def get(self, session_id: str) -> None:
        session = await self.session(session_id)
        tail = self.int_argument("tail", 200, minimum=1, maximum=10_000)
        if session["status"] == SessionStatus.CANCELLED.value:
            raise Conflict(
                f"Session {session['id'][:12]} never ran (cancelled: {session['reason']}), so "
                "it has no logs; its history says why."
            )
        if session["status"] == SessionStatus.PENDING.value:
            raise Conflict(
                f"Session {session['id'][:12]} has not started yet: {session['queue_message']}"
            )
        self.reply(await self.engine.session_logs(self.who, session["id"], tail=tail))


class SessionHistoryHandler(SessionLookup):
    @web.authenticated
    async def get(self, session_id: str) -> None:
        self.reply(await self.engine.session_history(self.who, await self.resolve(session_id)))


class SessionGraphHandler(SessionLookup):
    query_args = frozenset({"direction"})

    @web.authenticated
    async def get(self, session_id: str) -> None:
        direction = self.get_argument("direction", "both")
        if direction not in ("up", "down", "both"):
            raise InvalidRequest(
                f"direction {direction!r} is not understood: use up (what the session "
                "depends on), down (what depends on it) or both"
            )
        graph = await self.engine.session_graph(self.who, await self.resolve(session_id), direction)
        self.reply(graph)


class GPUsHandler(GPUSessionsHandler):
    @web.authenticated
    async def get(self) -> None:
        self.reply(await self.engine.gpus(self.who))


class QuotaHandler(GPUSessionsHandler):
    @web.authenticated
    async def get(self) -> None:
        self.reply(await self.engine.quota(self.who))


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
        self.reply({"policies": await self.engine.policies(self.who)})


class PolicyHandler(GPUSessionsHandler):
    @web.authenticated
    async def get(self, scope: str) -> None:
        self.reply(await self.engine.get_policy(self.who, check_scope(scope)))

    @web.authenticated
    async def put(self, scope: str) -> None:
        """Set the limits of ``scope`` (replacing what config or an earlier PUT set); they
        apply from the next scheduling pass and kernel start."""
        scope = check_scope(scope)
        self.require_admin("set policies")
        limits = self.body(required=True)
        self.reply(await self.engine.put_policy(self.who, scope, limits))

    @web.authenticated
    async def delete(self, scope: str) -> None:
        await self.engine.delete_policy(self.who, check_scope(scope))
        self.set_status(204)
        self.finish()


class SchedulerHealthHandler(GPUSessionsHandler):
    @web.authenticated
    async def get(self) -> None:
        self.reply(await self.engine.scheduler_health(self.who))


class SchedulerTriggerHandler(GPUSessionsHandler):
    @web.authenticated
    async def post(self) -> None:
        self.require_admin("trigger the scheduler")
        self.body(set())
        self.reply(await self.engine.schedule_now(self.who))


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
        deleted = await self.engine.clear_history(self.who, retention, vacuum=vacuum)
        self.reply({"deleted": deleted, "retention_seconds": retention, "vacuumed": vacuum})


class OpenAPIHandler(GPUSessionsHandler):
    @web.authenticated
    async def get(self) -> None:
        from . import openapi_document

        self.reply(openapi_document())
