"""AdminStore: policies set through the API, the users the API has seen, manager health.

Methods block (database I/O): callers on an event loop go through an executor.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from .db import read_transaction, write_transaction
from .tables import managers, policies, users

FORGET_AFTER = 86400.0  # seconds a silent manager stays listed in the store


class AdminStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- policies --------------------------------------------------------------------------
    def policies(self) -> dict[str, dict[str, Any]]:
        """Scope → limits, as set through the API."""
        with read_transaction(self.engine) as conn:
            rows = conn.execute(select(policies.c.scope, policies.c.limits)).all()
        return {r.scope: dict(r.limits) for r in rows}

    def put_policy(self, scope: str, limits: Mapping[str, Any], by: str) -> None:
        now = time.time()
        with write_transaction(self.engine) as conn:
            exists = conn.execute(select(policies.c.scope).where(policies.c.scope == scope)).first()
            values = {"limits": dict(limits), "updated_at": now, "updated_by": by}
            if exists:
                conn.execute(update(policies).where(policies.c.scope == scope).values(**values))
            else:
                conn.execute(insert(policies).values(scope=scope, **values))

    def delete_policy(self, scope: str) -> bool:
        with write_transaction(self.engine) as conn:
            return conn.execute(delete(policies).where(policies.c.scope == scope)).rowcount > 0

    # -- users -----------------------------------------------------------------------------
    def touch_user(self, username: str, groups: Iterable[str] | None) -> None:
        """Remember that ``username`` used the API (at most one write a minute per user),
        with their groups; None: groups not known to this caller (a session token's
        request), the stored ones are kept."""
        now = time.time()
        with read_transaction(self.engine) as conn:
            row = conn.execute(
                select(users.c.groups, users.c.last_seen).where(users.c.username == username)
            ).first()
        if groups is None:
            groups = list(row.groups) if row is not None else []
        groups = sorted(groups)
        if row is not None and list(row.groups) == groups and now - row.last_seen < 60:
            return
        with write_transaction(self.engine) as conn:
            if row is None:  # read again under the write lock: a concurrent first request
                row = conn.execute(select(users.c.username).where(users.c.username == username))
                row = row.first()
            if row is None:
                conn.execute(
                    insert(users).values(
                        username=username, groups=groups, first_seen=now, last_seen=now
                    )
                )
            else:
                conn.execute(
                    update(users)
                    .where(users.c.username == username)
                    .values(groups=groups, last_seen=now)
                )

    def known_user(self, username: str) -> bool:
        with read_transaction(self.engine) as conn:
            return (
                conn.execute(select(users.c.username).where(users.c.username == username)).first()
                is not None
            )

    def user_groups(self, username: str) -> list[str]:
        with read_transaction(self.engine) as conn:
            row = conn.execute(select(users.c.groups).where(users.c.username == username)).first()
        return list(row.groups) if row else []

    # -- manager health --------------------------------------------------------------------
    def heartbeat(
        self, manager_id: str, host: str, pid: int, started_at: float, passes: Mapping[str, Any]
    ) -> None:
        now = time.time()
        with write_transaction(self.engine) as conn:
            # Every process that ever scheduled has a row (nbclient runs too): forget those
            # silent for a day, in the same write.
            conn.execute(delete(managers).where(managers.c.seen_at < now - FORGET_AFTER))
            done = conn.execute(
                update(managers)
                .where(managers.c.id == manager_id)
                .values(seen_at=now, passes=dict(passes))
            ).rowcount
            if not done:
                conn.execute(
                    insert(managers).values(
                        id=manager_id,
                        host=host,
                        pid=pid,
                        started_at=started_at,
                        seen_at=now,
                        passes=dict(passes),
                    )
                )

    def managers(self, seen_since: float) -> list[dict[str, Any]]:
        with read_transaction(self.engine) as conn:
            rows = conn.execute(
                select(managers).where(managers.c.seen_at >= seen_since).order_by(managers.c.id)
            ).all()
        return [
            {
                "id": r.id,
                "host": r.host,
                "pid": r.pid,
                "started_at": r.started_at,
                "seen_at": r.seen_at,
                **dict(r.passes),
            }
            for r in rows
        ]
