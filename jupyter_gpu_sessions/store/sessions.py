"""SessionStore: sessions, their history and allocations; every change one write transaction.

Methods block (database I/O): the manager calls them through an executor.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    String,
    bindparam,
    delete,
    func,
    insert,
    select,
    type_coerce,
    update,
)

from ..core.errors import GPUSessionsError
from ..core.models import Allocation, ProcessRef, ResourceRequest, Session, StatusChange
from ..core.status import TERMINAL_STATUSES, SessionStatus, check_transition
from .db import make_engine, migrate, read_transaction, write_transaction
from .tables import allocations, sessions, status_history

LIVE_STATUSES = tuple(s.value for s in SessionStatus if s not in TERMINAL_STATUSES)
HOLDING_STATUSES = ("PREPARING", "RUNNING", "RESTARTING", "TERMINATING")


class SessionNotFound(GPUSessionsError):
    reason = "not-found"


@dataclass
class OwnerTotals:
    """What one owner's sessions hold now (sessions past PENDING and not ended)."""

    sessions: int = 0
    pending: int = 0
    gpus: float = 0.0
    cpus: float = 0.0
    memory: int = 0


@dataclass(frozen=True, slots=True)
class QueuedSession:
    """A PENDING session as a scheduling pass reads it: only what the pass needs.
    ``scheduler_json`` is the stored waiting data as text, to compare without parsing."""

    id: str
    owner: str
    request: ResourceRequest
    created_at: float
    attempts: int
    depends_on: tuple[str, ...]
    scheduler_json: str


@dataclass
class PassInput:
    """Everything one scheduling pass reads, loaded in its write transaction."""

    pending: list[QueuedSession]
    allocations: list[Allocation]
    usage: dict[str, OwnerTotals]
    dependencies: dict[str, tuple[SessionStatus, int | None]]


@dataclass
class PassDecision:
    """What a scheduling pass decided; written back in the same transaction."""

    placed: dict[str, list[Allocation]] = field(default_factory=dict)
    # id → (waiting data: failed checks and queue position, attempts); only what changed
    waiting: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict)
    cancelled: dict[str, str] = field(default_factory=dict)


_REQUESTS: dict[str, ResourceRequest] = {}


def parse_request(text: str) -> ResourceRequest:
    """A stored request from its JSON text; queues hold few distinct shapes, so cache them."""
    request = _REQUESTS.get(text)
    if request is None:
        if len(_REQUESTS) > 4096:
            _REQUESTS.clear()
        request = _REQUESTS[text] = ResourceRequest.from_dict(json.loads(text))
    return request


def _allocation_dict(a: Allocation) -> dict[str, Any]:
    return {
        "gpu_uuid": a.gpu_uuid,
        "device_uuid": a.device_uuid,
        "kind": a.kind,
        "fraction": a.fraction,
    }


def _session_from_row(row: Any, history: Sequence[Any] = ()) -> Session:
    return Session(
        id=row.id,
        owner=row.owner,
        image=row.image,
        request=ResourceRequest.from_dict(row.request),
        runtime=row.runtime,
        process=ProcessRef(row.process_host, row.process_pid, row.process_started),
        kind=row.kind,
        name=row.name,
        kernel_id=row.kernel_id,
        status=SessionStatus(row.status),
        reason=row.reason,
        allocations=tuple(Allocation(session_id=row.id, **a) for a in row.devices or ()),
        depends_on=tuple(row.depends_on or ()),
        scheduler={**(row.scheduler or {}), "attempts": row.attempts},
        exit_code=row.exit_code,
        oom_killed=bool(row.oom_killed),
        container_id=row.container_id,
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        history=[StatusChange(SessionStatus(h.status), h.at, h.reason) for h in history],
    )


class SessionStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- reads -----------------------------------------------------------------------------
    def change_marker(self) -> int:
        """Grows with every status change by any process: a cheap "did anything happen?"."""
        with read_transaction(self.engine) as conn:
            return conn.execute(select(func.coalesce(func.max(status_history.c.id), 0))).scalar()

    def get(self, session_id: str) -> Session:
        with read_transaction(self.engine) as conn:
            return self._get(conn, session_id)

    def _get(self, conn: Connection, session_id: str, *, history: bool = True) -> Session:
        row = conn.execute(select(sessions).where(sessions.c.id == session_id)).first()
        if row is None:
            raise SessionNotFound(f"no session {session_id!r}")
        rows = ()
        if history:
            rows = conn.execute(
                select(status_history)
                .where(status_history.c.session_id == session_id)
                .order_by(status_history.c.id)
            ).all()
        return _session_from_row(row, rows)

    def list(
        self,
        *,
        owner: str | None = None,
        statuses: Iterable[SessionStatus] | None = None,
        kernel_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Session]:
        query = select(sessions).order_by(sessions.c.created_at, sessions.c.id)
        if owner is not None:
            query = query.where(sessions.c.owner == owner)
        if statuses is not None:
            query = query.where(sessions.c.status.in_([s.value for s in statuses]))
        if kernel_id is not None:
            query = query.where(sessions.c.kernel_id == kernel_id)
        if limit is not None:
            query = query.limit(limit)
        with read_transaction(self.engine) as conn:
            return [_session_from_row(r) for r in conn.execute(query.offset(offset)).all()]

    def live(self) -> list[Session]:
        return self.list(statuses=[SessionStatus(s) for s in LIVE_STATUSES])

    def allocations(self) -> list[Allocation]:
        with read_transaction(self.engine) as conn:
            return self._allocations(conn)

    @staticmethod
    def _allocations(conn: Connection) -> list[Allocation]:
        rows = conn.execute(select(allocations).order_by(allocations.c.id)).all()
        return [
            Allocation(r.session_id, r.gpu_uuid, r.device_uuid, r.kind, r.fraction) for r in rows
        ]

    # -- writes ----------------------------------------------------------------------------
    def add(
        self,
        session: Session,
        *,
        admit: Callable[[OwnerTotals], None] | None = None,
    ) -> Session:
        """Queue ``session`` (PENDING). ``admit`` sees the owner's totals inside the same
        write transaction and raises to refuse (e.g. too many pending sessions)."""
        now = time.time()
        with write_transaction(self.engine) as conn:
            if admit is not None:
                admit(self._owner_totals(conn, session.owner))
            conn.execute(
                insert(sessions).values(
                    id=session.id,
                    name=session.name,
                    owner=session.owner,
                    kind=session.kind,
                    kernel_id=session.kernel_id,
                    image=session.image,
                    runtime=session.runtime,
                    request=session.request.to_dict(),
                    status=SessionStatus.PENDING.value,
                    reason=session.reason or "queued",
                    devices=[],
                    depends_on=list(session.depends_on),
                    scheduler={},
                    attempts=0,
                    exit_code=None,
                    oom_killed=False,
                    container_id=None,
                    process_host=session.process.host,
                    process_pid=session.process.pid,
                    process_started=session.process.started,
                    created_at=session.created_at,
                )
            )
            self._history(conn, session.id, SessionStatus.PENDING, session.reason or "queued", now)
            return self._get(conn, session.id)

    def transition(
        self,
        session_id: str,
        status: SessionStatus,
        reason: str = "",
        *,
        only_from: Iterable[SessionStatus] | None = None,
        exit_code: int | None = None,
        oom_killed: bool | None = None,
        container_id: str | None = None,
    ) -> Session | None:
        """Move a session to ``status`` and record why; an ended session frees its devices
        in the same transaction. With ``only_from``, a session in another status is left
        as it is and ``None`` returned (a race lost to another process, not an error)."""
        now = time.time()
        with write_transaction(self.engine) as conn:
            current = self._get(conn, session_id, history=False)
            if only_from is not None and current.status not in set(only_from):
                return None
            check_transition(current.status, status)
            values: dict[str, Any] = {"status": status.value, "reason": reason}
            if status == SessionStatus.RUNNING and current.started_at is None:
                values["started_at"] = now
            if status in TERMINAL_STATUSES:
                values["ended_at"] = now
                conn.execute(delete(allocations).where(allocations.c.session_id == session_id))
            if exit_code is not None:
                values["exit_code"] = exit_code
            if oom_killed is not None:
                values["oom_killed"] = oom_killed
            if container_id is not None:
                values["container_id"] = container_id
            conn.execute(update(sessions).where(sessions.c.id == session_id).values(**values))
            self._history(conn, session_id, status, reason, now)
            return self._get(conn, session_id)

    def schedule(self, decide: Callable[[PassInput], PassDecision]) -> PassDecision:
        """One scheduling pass in one write transaction: load the queue, the live
        allocations and every owner's usage; ``decide``; write placements (PENDING →
        PREPARING with their allocations), waiting reasons and cancellations."""
        now = time.time()
        with write_transaction(self.engine) as conn:
            # The raw driver cursor: a pass reads every queued row, and SQLAlchemy's row
            # objects would cost more than the scheduling itself.
            rows = conn.exec_driver_sql(
                "SELECT id, owner, request, created_at, attempts, depends_on, scheduler "
                "FROM sessions WHERE status = 'PENDING' ORDER BY created_at, id"
            ).all()
            pending = [
                QueuedSession(
                    sid,
                    owner,
                    parse_request(request),
                    created_at,
                    attempts,
                    () if depends_on == "[]" else tuple(json.loads(depends_on)),
                    scheduler,
                )
                for sid, owner, request, created_at, attempts, depends_on, scheduler in rows
            ]
            dep_ids = {d for s in pending for d in s.depends_on}
            dependencies = {}
            if dep_ids:
                for row in conn.execute(
                    select(sessions.c.id, sessions.c.status, sessions.c.exit_code).where(
                        sessions.c.id.in_(dep_ids)
                    )
                ):
                    dependencies[row.id] = (SessionStatus(row.status), row.exit_code)
            decision = decide(
                PassInput(pending, self._allocations(conn), self._usage(conn), dependencies)
            )
            self._write_decision(conn, decision, now)
            return decision

    def _write_decision(self, conn: Connection, decision: PassDecision, now: float) -> None:
        for session_id, placed in decision.placed.items():
            conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id)
                .values(
                    status=SessionStatus.PREPARING.value,
                    reason="resources allocated",
                    devices=[_allocation_dict(a) for a in placed],
                    scheduler={},
                    attempts=0,
                )
            )
            if placed:
                conn.execute(
                    insert(allocations),
                    [{"session_id": session_id, **_allocation_dict(a)} for a in placed],
                )
            self._history(conn, session_id, SessionStatus.PREPARING, "resources allocated", now)
        if decision.waiting:
            conn.execute(
                update(sessions)
                .where(sessions.c.id == bindparam("_id"))
                .values(scheduler=bindparam("_scheduler"), attempts=bindparam("_attempts")),
                [
                    {"_id": k, "_scheduler": data, "_attempts": attempts}
                    for k, (data, attempts) in decision.waiting.items()
                ],
            )
        for session_id, reason in decision.cancelled.items():
            conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id)
                .values(status=SessionStatus.CANCELLED.value, reason=reason, ended_at=now)
            )
            self._history(conn, session_id, SessionStatus.CANCELLED, reason, now)

    @staticmethod
    def _history(
        conn: Connection, session_id: str, status: SessionStatus, reason: str, at: float
    ) -> None:
        conn.execute(
            insert(status_history).values(
                session_id=session_id, status=status.value, reason=reason, at=at
            )
        )

    def _usage(self, conn: Connection) -> dict[str, OwnerTotals]:
        usage: dict[str, OwnerTotals] = {}
        queued = conn.execute(
            select(sessions.c.owner, func.count())
            .where(sessions.c.status == SessionStatus.PENDING.value)
            .group_by(sessions.c.owner)
        )
        for owner, count in queued:
            usage.setdefault(owner, OwnerTotals()).pending = count
        rows = conn.execute(
            select(
                sessions.c.owner,
                type_coerce(sessions.c.request, String).label("request"),
            ).where(sessions.c.status.in_(HOLDING_STATUSES))
        )
        for row in rows:
            totals = usage.setdefault(row.owner, OwnerTotals())
            request = parse_request(row.request)
            totals.sessions += 1
            totals.gpus += request.gpu_equivalent
            totals.cpus += request.cpus or 0.0
            totals.memory += request.memory or 0
        return usage

    def _owner_totals(self, conn: Connection, owner: str) -> OwnerTotals:
        return self._usage(conn).get(owner, OwnerTotals())

    def owner_totals(self, owner: str) -> OwnerTotals:
        with read_transaction(self.engine) as conn:
            return self._owner_totals(conn, owner)

    def usage(self) -> Mapping[str, OwnerTotals]:
        with read_transaction(self.engine) as conn:
            return self._usage(conn)
