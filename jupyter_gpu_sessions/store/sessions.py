"""SessionStore: sessions, their history and allocations; every change one write transaction.

Methods block (database I/O): the manager calls them through an executor.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)

from ..core.errors import Conflict, SessionNotFound
from ..core.models import Allocation, ProcessRef, ResourceRequest, Session, StatusChange
from ..core.passes import PassDecision, PassInput, QueuedSession
from ..core.status import TERMINAL_STATUSES, SessionStatus, check_transition
from .db import json_text, make_engine, migrate, read_transaction, write_transaction
from .tables import allocations, sessions, status_history
from .tokens import forget_tokens

LIVE_STATUSES = tuple(s.value for s in SessionStatus if s not in TERMINAL_STATUSES)
HOLDING_STATUSES = ("PREPARING", "RUNNING", "RESTARTING", "TERMINATING")
GRAPH_DIRECTIONS = ("up", "down", "both")
_JSON_COLUMNS = ("request", "devices", "depends_on", "scheduler", "launch")
# Every column but the log tail (only the logs endpoint reads it); JSON columns as their
# text, decoded through a cache: most rows repeat a few shapes ("[]", the same request).
_ROW = tuple(
    json_text(c).label(c.name) if c.name in _JSON_COLUMNS else c
    for c in sessions.c
    if c.name != "log_tail"
)


# A scheduling pass's read of the queue, by the raw driver cursor (see _queued); the JSON
# columns are filled in per database (SessionStore.__init__).
_QUEUED = (
    "SELECT id, owner, {}, created_at, attempts, {}, {} FROM sessions WHERE status = 'PENDING'"
)
_QUEUED_JSON = ("request", "depends_on", "scheduler")


@dataclass
class OwnerTotals:
    """What one owner's sessions hold now (sessions past PENDING and not ended)."""

    sessions: int = 0
    pending: int = 0
    gpus: float = 0.0
    cpus: float = 0.0
    memory: int = 0


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


def _json(text: str | None) -> Any:
    """Decoded JSON column text, cached (callers copy what they change)."""
    if text is None:
        return None
    value = _DECODED.get(text)
    if value is None:
        if len(_DECODED) > 4096:
            _DECODED.clear()
        value = _DECODED[text] = json.loads(text)
    return value


_DECODED: dict[str, Any] = {}


def _session_from_row(row: Any, history: Sequence[Any] = ()) -> Session:
    """A Session from a ``_ROW`` row (JSON columns as text)."""
    return Session(
        id=row.id,
        owner=row.owner,
        image=row.image,
        request=parse_request(row.request),
        runtime=row.runtime,
        process=ProcessRef(row.process_host, row.process_pid, row.process_started),
        kind=row.kind,
        name=row.name,
        kernel_id=row.kernel_id,
        status=SessionStatus(row.status),
        reason=row.reason,
        allocations=tuple(Allocation(session_id=row.id, **a) for a in _json(row.devices) or ()),
        depends_on=tuple(_json(row.depends_on) or ()),
        scheduler={**(_json(row.scheduler) or {}), "attempts": row.attempts},
        exit_code=row.exit_code,
        oom_killed=bool(row.oom_killed),
        container_id=row.container_id,
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        history=[StatusChange(SessionStatus(h.status), h.at, h.reason) for h in history],
        # A batch session's launch; a kernel's column holds what re-attaching it needs
        # (``kernel_attachments``), never shown as a launch.
        launch=(dict(_json(row.launch) or {}) or None) if row.kind == "batch" else None,
    )


class SessionStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self.version = 0  # writes by this process (see _write)
        self.engine = make_engine(url)
        migrate(self.engine)
        # The raw queue query (see _queued): on PostgreSQL its JSON columns cast to text (as
        # SQLite gives them) and %s placeholders.
        postgres = self.engine.dialect.name == "postgresql"
        self._queued_sql = _QUEUED.format(
            *(f"CAST({c} AS TEXT)" if postgres else c for c in _QUEUED_JSON)
        )
        self._mark = "%s" if postgres else "?"

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction; ``version`` grows once it has committed (or failed), so
        readers in this process know at once that cached reads may be stale."""
        try:
            with write_transaction(self.engine) as conn:
                yield conn
        finally:
            self.version += 1

    # -- reads -----------------------------------------------------------------------------
    def change_marker(self) -> int:
        """Grows with every status change by any process: a cheap "did anything happen?"."""
        with read_transaction(self.engine) as conn:
            return conn.execute(select(func.coalesce(func.max(status_history.c.id), 0))).scalar()

    def get(self, session_id: str, *, history: bool = True) -> Session:
        with read_transaction(self.engine) as conn:
            return self._get(conn, session_id, history=history)

    def _get(self, conn: Connection, session_id: str, *, history: bool = True) -> Session:
        row = conn.execute(select(*_ROW).where(sessions.c.id == session_id)).first()
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
        query = self._filtered(select(*_ROW), owner, statuses, kernel_id)
        query = query.order_by(sessions.c.created_at, sessions.c.id)
        if limit is not None:
            query = query.limit(limit)
        with read_transaction(self.engine) as conn:
            return [_session_from_row(r) for r in conn.execute(query.offset(offset)).all()]

    def page(
        self,
        *,
        owner: str | None = None,
        statuses: Iterable[SessionStatus] | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = True,
    ) -> tuple[list[Session], int]:
        """One page of sessions (newest first by default) and how many match in all."""
        order = (sessions.c.created_at.desc(), sessions.c.id.desc())
        if not newest_first:
            order = (sessions.c.created_at, sessions.c.id)
        query = self._filtered(select(*_ROW), owner, statuses, None).order_by(*order)
        count = self._filtered(select(func.count()).select_from(sessions), owner, statuses, None)
        with read_transaction(self.engine) as conn:
            total = conn.execute(count).scalar()
            rows = conn.execute(query.limit(limit).offset(offset)).all()
        return [_session_from_row(r) for r in rows], total

    @staticmethod
    def _filtered(query, owner, statuses, kernel_id):
        if owner is not None:
            query = query.where(sessions.c.owner == owner)
        if statuses is not None:
            query = query.where(sessions.c.status.in_([s.value for s in statuses]))
        if kernel_id is not None:
            query = query.where(sessions.c.kernel_id == kernel_id)
        return query

    def statuses(self, session_ids: Sequence[str]) -> dict[str, SessionStatus]:
        """The status of each of ``session_ids`` this store knows (one query)."""
        with read_transaction(self.engine) as conn:
            rows = conn.execute(
                select(sessions.c.id, sessions.c.status).where(sessions.c.id.in_(list(session_ids)))
            )
            return {r.id: SessionStatus(r.status) for r in rows}

    def find(self, ref: str, owner: str, *, anyone: bool = False) -> Session | None:
        """The session ``ref`` names for ``owner``: the session with that id, else
        ``owner``'s newest session of that name; with ``anyone`` (an admin), the newest
        of that name of any owner when ``owner`` has none. History not read."""
        with read_transaction(self.engine) as conn:
            row = None
            if len(ref) == 32:
                query = select(*_ROW).where(sessions.c.id == ref)
                if not anyone:
                    query = query.where(sessions.c.owner == owner)
                row = conn.execute(query).first()
            if row is None:
                newest = (sessions.c.created_at.desc(), sessions.c.id.desc())
                row = conn.execute(
                    select(*_ROW)
                    .where(sessions.c.owner == owner, sessions.c.name == ref)
                    .order_by(*newest)
                    .limit(1)
                ).first()
                if row is None and anyone:
                    row = conn.execute(
                        select(*_ROW).where(sessions.c.name == ref).order_by(*newest).limit(1)
                    ).first()
            return None if row is None else _session_from_row(row)

    def dependents(self, session_id: str) -> list[Session]:
        """Live sessions that wait for ``session_id`` (directly or through others)."""
        live = self.live()
        found: dict[str, Session] = {}
        frontier = {session_id}
        while frontier:
            nxt = set()
            for s in live:
                if s.id not in found and frontier.intersection(s.depends_on):
                    found[s.id] = s
                    nxt.add(s.id)
            frontier = nxt
        return list(found.values())

    def graph(
        self, session_id: str, direction: str = "both"
    ) -> tuple[list[Session], list[tuple[str, str]]]:
        """``session_id`` with, transitively, what it depends on (``up``), what depends on it
        (``down``), or both: the nodes, and every edge among them (dependency → dependent)."""
        if direction not in GRAPH_DIRECTIONS:
            raise ValueError(f"direction {direction!r}: use one of {GRAPH_DIRECTIONS}")
        with read_transaction(self.engine) as conn:
            rows = {
                r.id: _session_from_row(r)
                for r in conn.execute(
                    select(*_ROW).where(
                        (sessions.c.id == session_id) | (json_text(sessions.c.depends_on) != "[]")
                    )
                ).all()
            }
            seen: set[str] = set()
            for way in ("up", "down"):
                if direction not in (way, "both"):
                    continue
                todo, walked = [session_id], set()
                while todo:
                    current = todo.pop()
                    if current in walked:
                        continue
                    walked.add(current)
                    if current not in rows:
                        row = conn.execute(select(*_ROW).where(sessions.c.id == current)).first()
                        if row is None:
                            continue
                        rows[current] = _session_from_row(row)
                    if way == "up":
                        todo.extend(rows[current].depends_on)
                    else:
                        todo.extend(s.id for s in rows.values() if current in s.depends_on)
                seen |= walked
        nodes = [rows[i] for i in seen if i in rows]
        edges = sorted({(d, n.id) for n in nodes for d in n.depends_on if d in seen})
        return nodes, edges

    def history_since(self, after: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Status changes after history row ``after`` (any process's), oldest first, with
        the session's owner, name and kernel: what the events websocket streams."""
        query = (
            select(
                status_history.c.id,
                status_history.c.session_id,
                status_history.c.status,
                status_history.c.reason,
                status_history.c.at,
                sessions.c.owner,
                sessions.c.name,
                sessions.c.kernel_id,
            )
            .join(sessions, sessions.c.id == status_history.c.session_id)
            .where(status_history.c.id > after)
            .order_by(status_history.c.id)
            .limit(limit)
        )
        with read_transaction(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(query).all()]

    def log_tail(self, session_id: str) -> str | None:
        with read_transaction(self.engine) as conn:
            return conn.execute(
                select(sessions.c.log_tail).where(sessions.c.id == session_id)
            ).scalar()

    def save_log_tail(self, session_id: str, text: str) -> None:
        with self._write() as conn:
            conn.execute(update(sessions).where(sessions.c.id == session_id).values(log_tail=text))

    def clear_history(self, before: float) -> int:
        """Delete sessions that ended before ``before`` (with their history); live sessions
        are never touched. Returns how many were deleted."""
        ended = [s.value for s in TERMINAL_STATUSES]
        with self._write() as conn:
            ids = select(sessions.c.id).where(
                sessions.c.status.in_(ended), sessions.c.ended_at < before
            )
            conn.execute(delete(status_history).where(status_history.c.session_id.in_(ids)))
            conn.execute(delete(allocations).where(allocations.c.session_id.in_(ids)))
            self._bump_changes(conn)
            return conn.execute(
                delete(sessions).where(sessions.c.status.in_(ended), sessions.c.ended_at < before)
            ).rowcount

    def vacuum(self) -> None:
        """Give the space of deleted rows back to the file system (outside a transaction,
        as VACUUM requires)."""
        if self.engine.dialect.name == "sqlite":
            raw = self.engine.raw_connection()
            try:
                raw.driver_connection.execute("VACUUM")
            finally:
                raw.close()
        else:
            with self.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM")

    def live(self) -> list[Session]:
        return self.list(statuses=[SessionStatus(s) for s in LIVE_STATUSES])

    def last_change(self, session_id: str) -> float:
        """When the session's status last changed (0 for an unknown session)."""
        with read_transaction(self.engine) as conn:
            at = conn.execute(
                select(func.max(status_history.c.at)).where(
                    status_history.c.session_id == session_id
                )
            ).scalar()
        return float(at or 0.0)

    def ended_among(self, session_ids: Sequence[str]) -> list[str]:
        """Those of ``session_ids`` this store knows as ended."""
        ended = [s.value for s in TERMINAL_STATUSES]
        with read_transaction(self.engine) as conn:
            rows = conn.execute(
                select(sessions.c.id).where(
                    sessions.c.id.in_(list(session_ids)), sessions.c.status.in_(ended)
                )
            )
            return [r.id for r in rows]

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
        return self.add_many([session], admit=admit)[0]

    def add_many(
        self,
        new: Sequence[Session],
        *,
        admit: Callable[[OwnerTotals], None] | None = None,
        unique_names: bool = False,
    ) -> list[Session]:
        """Queue every one of ``new`` (PENDING) in one write transaction: all or nothing (a
        pipeline). ``admit`` sees each owner's totals first and raises to refuse; with
        ``unique_names``, a name already held by a live session of the same owner is a
        :class:`Conflict`."""
        now = time.time()
        with self._write() as conn:
            owners = dict.fromkeys(s.owner for s in new)
            if admit is not None:
                for owner in owners:
                    admit(self._owner_totals(conn, owner))
            if unique_names:
                for session in new:
                    taken = conn.execute(
                        select(sessions.c.id).where(
                            sessions.c.owner == session.owner,
                            sessions.c.name == session.name,
                            sessions.c.status.in_(LIVE_STATUSES),
                        )
                    ).first()
                    if taken is not None:
                        raise Conflict(
                            f"{session.owner} already has a session named {session.name!r} "
                            f"that has not ended ({taken.id[:12]}): choose another name, or "
                            "end that session first.",
                            reason="name-taken",
                        )
            for session in new:
                self._insert(conn, session, now)
            return [self._get(conn, session.id) for session in new]

    def _insert(self, conn: Connection, session: Session, now: float) -> None:
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
                launch=session.launch,
            )
        )
        self._history(conn, session.id, SessionStatus.PENDING, session.reason or "queued", now)

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
        with self._write() as conn:
            current = self._get(conn, session_id, history=False)
            if only_from is not None and current.status not in set(only_from):
                return None
            check_transition(current.status, status)
            values: dict[str, Any] = {"status": status.value, "reason": reason}
            if status == SessionStatus.RUNNING:
                if current.started_at is None:
                    values["started_at"] = now
                values["exit_code"] = None  # a new run: its predecessor's exit is history
            if status in TERMINAL_STATUSES:
                values["ended_at"] = now
                conn.execute(delete(allocations).where(allocations.c.session_id == session_id))
                forget_tokens(conn, [session_id])  # its API tokens die with it
            if exit_code is not None:
                values["exit_code"] = exit_code
            if oom_killed:  # sticky: once killed for memory, the record says so
                values["oom_killed"] = True
            if container_id is not None:
                values["container_id"] = container_id
            conn.execute(update(sessions).where(sessions.c.id == session_id).values(**values))
            self._history(conn, session_id, status, reason, now)
            return self._get(conn, session_id)

    def note(self, session_id: str, reason: str, *, only_from: Iterable[SessionStatus]) -> bool:
        """A history entry that keeps the session's status: a word to its owner about a
        live session (a GPU-idle warning), seen by every process's events feed. False
        (nothing written) when the session is no longer in one of ``only_from``."""
        with self._write() as conn:
            current = self._get(conn, session_id, history=False)
            if current.status not in set(only_from):
                return False
            self._history(conn, session_id, current.status, reason, time.time())
            return True

    def update(
        self,
        session_id: str,
        *,
        only_from: Iterable[SessionStatus],
        container_id: str | None = None,
        exit_code: int | None = None,
        oom_killed: bool | None = None,
    ) -> Session | None:
        """Record a fact about a live session without changing its status: the container a
        start created, or how its kernel died. ``None`` (nothing written) when the session
        is no longer in one of ``only_from``: someone ended it meanwhile."""
        values: dict[str, Any] = {}
        if container_id is not None:
            values["container_id"] = container_id
        if exit_code is not None:
            values["exit_code"] = exit_code
        if oom_killed:
            values["oom_killed"] = True
        statuses = [s.value for s in only_from]
        with self._write() as conn:
            done = conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id, sessions.c.status.in_(statuses))
                .values(**values)
            )
            if not done.rowcount:
                return None
            self._bump_changes(conn)
            return self._get(conn, session_id)

    # -- kernels that outlive their server (JupyterHub mode) ---------------------------------
    def note_kernel(
        self,
        session_id: str,
        *,
        attachment: Mapping[str, Any] | None = None,
        connection: Mapping[str, Any] | None = None,
    ) -> bool:
        """Keep, for a live kernel session, what a restarted server re-attaches it with: the
        server's ``attachment`` and the kernel's ``connection`` info (each replaced whole
        when given). False when the session is not a live kernel session."""
        row = sessions.c
        with self._write() as conn:
            found = conn.execute(
                select(row.kind, row.status, json_text(row.launch).label("launch")).where(
                    row.id == session_id
                )
            ).first()
            if found is None:
                raise SessionNotFound(f"no session {session_id!r}")
            if found.kind != "interactive" or found.status not in LIVE_STATUSES:
                return False
            kept = dict(_json(found.launch) or {})
            if attachment is not None:
                kept["attachment"] = dict(attachment)
            if connection is not None:
                kept["connection"] = dict(connection)
            conn.execute(update(sessions).where(row.id == session_id).values(launch=kept))
            return True

    def kernel_connection(self, session_id: str) -> dict[str, Any] | None:
        """The connection info ``note_kernel`` kept for a kernel session, or None."""
        row = sessions.c
        with read_transaction(self.engine) as conn:
            found = conn.execute(
                select(row.kind, json_text(row.launch).label("launch")).where(row.id == session_id)
            ).first()
        if found is None or found.kind != "interactive":
            return None
        kept = _json(found.launch) or {}
        connection = kept.get("connection") if isinstance(kept, dict) else None
        return dict(connection) if isinstance(connection, dict) else None

    def kernel_attachments(self, owner: str) -> list[tuple[Session, dict[str, Any]]]:
        """``owner``'s kernel sessions that run or are on their way to (queued, starting,
        restarting) and that a server noted an attachment for, oldest first, each with its
        kept ``{"attachment": …, "connection": …}`` (a connection once it ran)."""
        statuses = [s for s in LIVE_STATUSES if s != SessionStatus.TERMINATING.value]
        query = (
            select(*_ROW)
            .where(
                sessions.c.owner == owner,
                sessions.c.kind == "interactive",
                sessions.c.status.in_(statuses),
            )
            .order_by(sessions.c.created_at, sessions.c.id)
        )
        with read_transaction(self.engine) as conn:
            rows = conn.execute(query).all()
        found = []
        for row in rows:
            kept = _json(row.launch) or {}
            if isinstance(kept, dict) and kept.get("attachment"):
                found.append((_session_from_row(row), dict(kept)))
        return found

    def take_over(
        self, session_id: str, previous: ProcessRef, process: ProcessRef
    ) -> Session | None:
        """Make ``process`` the one that supervises a RUNNING session ``previous`` (now
        gone) supervised: a restarted manager service adopting its predecessor's kernel.
        Its devices stay allocated to it, untouched. ``None`` when the session is no longer
        RUNNING or another process took it over first; the session when ``process`` holds
        it (also when it already did)."""
        row = sessions.c
        with self._write() as conn:
            conn.execute(
                update(sessions)
                .where(
                    row.id == session_id,
                    row.status == SessionStatus.RUNNING.value,
                    row.process_host == previous.host,
                    row.process_pid == previous.pid,
                    row.process_started == previous.started,
                )
                .values(
                    process_host=process.host,
                    process_pid=process.pid,
                    process_started=process.started,
                )
            )
            current = self._get(conn, session_id, history=False)
            if current.status != SessionStatus.RUNNING or current.process != process:
                return None
            self._bump_changes(conn)
            return current

    def schedule(
        self,
        decide: Callable[[PassInput], PassDecision],
        since: tuple[int, int] | None = None,
    ) -> PassDecision:
        """One scheduling pass in one write transaction: read the queue — all of it, or with
        ``since`` (the token of the caller's previous pass) only what changed, when no other
        process has written waiting data in between — ``decide``, and write placements
        (PENDING → PREPARING with their allocations), changed waiting data and
        cancellations. The returned decision carries the token for the next pass."""
        now = time.time()
        with self._write() as conn:
            marker, seq = self._token(conn)
            full = since is None or since[1] != seq or since[0] > marker
            if full:
                data = self._full_input(conn)
            else:
                changed = set(
                    conn.execute(
                        select(status_history.c.session_id)
                        .distinct()
                        .where(status_history.c.id > since[0])
                    ).scalars()
                )
                data = self._delta_input(conn, changed)
            decision = decide(data)
            if self._write_decision(conn, decision, now):
                conn.exec_driver_sql("UPDATE queue_state SET seq = seq + 1 WHERE id = 1")
            decision.token = self._token(conn)
            return decision

    @staticmethod
    def _token(conn: Connection) -> tuple[int, int]:
        marker = conn.exec_driver_sql(
            "SELECT coalesce(max(id), 0) FROM session_status_history"
        ).scalar()
        seq = conn.exec_driver_sql("SELECT seq FROM queue_state WHERE id = 1").scalar()
        return int(marker), int(seq or 0)

    @staticmethod
    def _queued(rows: Iterable[Sequence[Any]]) -> list[QueuedSession]:
        # The raw driver cursor: a full pass reads every queued row, and SQLAlchemy's row
        # objects would cost more than the scheduling itself.
        return [
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

    def _inputs(self, conn: Connection, full: bool, changed: set[str]) -> PassInput:
        return PassInput(
            full=full,
            pending=[],
            allocations=[],
            holding={},
            changed=changed,
            dependencies=lambda ids: self._dependencies(conn, ids),
            load_full=lambda: self._full_input(conn),
        )

    def _full_input(self, conn: Connection) -> PassInput:
        data = self._inputs(conn, True, set())
        data.pending = self._queued(
            conn.exec_driver_sql(self._queued_sql + " ORDER BY created_at, id").all()
        )
        data.allocations = self._allocations(conn)
        data.holding = self._holding(conn, None)
        return data

    def _delta_input(self, conn: Connection, changed: set[str]) -> PassInput:
        data = self._inputs(conn, False, changed)
        if not changed:
            return data
        ids = sorted(changed)
        marks = ",".join([self._mark] * len(ids))
        data.pending = self._queued(
            conn.exec_driver_sql(f"{self._queued_sql} AND id IN ({marks})", tuple(ids)).all()
        )
        rows = conn.execute(
            select(allocations).where(allocations.c.session_id.in_(ids)).order_by(allocations.c.id)
        ).all()
        data.allocations = [
            Allocation(r.session_id, r.gpu_uuid, r.device_uuid, r.kind, r.fraction) for r in rows
        ]
        data.holding = self._holding(conn, ids)
        return data

    @staticmethod
    def _holding(conn: Connection, ids: Sequence[str] | None) -> dict[str, tuple[str, Any]]:
        query = select(sessions.c.id, sessions.c.owner, json_text(sessions.c.request)).where(
            sessions.c.status.in_(HOLDING_STATUSES)
        )
        if ids is not None:
            query = query.where(sessions.c.id.in_(ids))
        return {sid: (owner, parse_request(text)) for sid, owner, text in conn.execute(query)}

    @staticmethod
    def _dependencies(
        conn: Connection, ids: Iterable[str]
    ) -> dict[str, tuple[SessionStatus, int | None, str]]:
        ids = list(ids)
        if not ids:
            return {}
        rows = conn.execute(
            select(sessions.c.id, sessions.c.status, sessions.c.exit_code, sessions.c.name).where(
                sessions.c.id.in_(ids)
            )
        )
        return {r.id: (SessionStatus(r.status), r.exit_code, r.name) for r in rows}

    def _write_decision(self, conn: Connection, decision: PassDecision, now: float) -> bool:
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
                .values(scheduler=bindparam("_scheduler")),
                [{"_id": k, "_scheduler": data} for k, (data, _) in decision.waiting.items()],
            )
            self._bump_changes(conn)
        counted = [(k, n) for k, (_, n) in decision.waiting.items() if n is not None]
        if counted:
            conn.execute(
                update(sessions)
                .where(sessions.c.id == bindparam("_id"))
                .values(attempts=bindparam("_attempts")),
                [{"_id": k, "_attempts": n} for k, n in counted],
            )
        for session_id, reason in decision.cancelled.items():
            conn.execute(
                update(sessions)
                .where(sessions.c.id == session_id)
                .values(status=SessionStatus.CANCELLED.value, reason=reason, ended_at=now)
            )
            self._history(conn, session_id, SessionStatus.CANCELLED, reason, now)
        # Placements and cancellations reach other processes through the history; attempts
        # live in their in-memory queues too, so a change there makes them read it again.
        return bool(counted)

    @staticmethod
    def _bump_changes(conn: Connection) -> None:
        conn.exec_driver_sql("UPDATE queue_state SET changes = changes + 1 WHERE id = 1")

    def list_marker(self) -> tuple[int, int]:
        """Changes whenever any session's listed data does (any process): the newest history
        id and the change counter. Two equal markers mean equal session lists."""
        with read_transaction(self.engine) as conn:
            row = conn.exec_driver_sql(
                "SELECT (SELECT coalesce(max(id), 0) FROM session_status_history), "
                "(SELECT changes FROM queue_state WHERE id = 1)"
            ).first()
        return int(row[0]), int(row[1] or 0)

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
                json_text(sessions.c.request).label("request"),
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
