"""TokenStore: the per-session API tokens a kernel or batch job presents (hashes only).

A token acts for its session's owner while the session has not begun to end: PENDING,
PREPARING, RUNNING or RESTARTING. From TERMINATING on it is refused, whatever its row says
(the check joins the session's status), and its rows are deleted when the session ends
(``forget_tokens``, in the same transaction as the final status) or with the session
(``ON DELETE CASCADE``; ``clear_history``). Methods block (database I/O).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import Connection, Engine, delete, insert, select

from .db import read_transaction, write_transaction
from .tables import session_tokens, sessions

# The statuses in which a session's tokens are accepted.
TOKEN_STATUSES = ("PENDING", "PREPARING", "RUNNING", "RESTARTING")


def forget_tokens(conn: Connection, session_ids: Sequence[str]) -> None:
    """Delete the tokens of ``session_ids`` inside the caller's write transaction."""
    if session_ids:
        conn.execute(delete(session_tokens).where(session_tokens.c.session_id.in_(session_ids)))


class TokenStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, session_id: str, token_hash: str) -> bool:
        """Record a token of ``session_id``; False (nothing stored) when the session has
        begun to end or does not exist."""
        with write_transaction(self.engine) as conn:
            live = conn.execute(
                select(sessions.c.id).where(
                    sessions.c.id == session_id, sessions.c.status.in_(TOKEN_STATUSES)
                )
            ).first()
            if live is None:
                return False
            conn.execute(
                insert(session_tokens).values(
                    token_hash=token_hash, session_id=session_id, created_at=time.time()
                )
            )
            return True

    def holds(self, session_id: str, token_hash: str) -> bool:
        """Whether ``token_hash`` is a token of ``session_id`` that is accepted now."""
        found = self.owner(token_hash)
        return found is not None and found[1] == session_id

    def owner(self, token_hash: str) -> tuple[str, str] | None:
        """(owner, session id) of an accepted token; None when unknown or its session has
        begun to end."""
        query = (
            select(sessions.c.owner, sessions.c.id)
            .select_from(session_tokens.join(sessions))
            .where(
                session_tokens.c.token_hash == token_hash,
                sessions.c.status.in_(TOKEN_STATUSES),
            )
        )
        with read_transaction(self.engine) as conn:
            row = conn.execute(query).first()
        return None if row is None else (row.owner, row.id)

    def forget(self, session_id: str) -> None:
        with write_transaction(self.engine) as conn:
            forget_tokens(conn, [session_id])

    def count(self, session_id: str) -> int:
        """How many token rows ``session_id`` has (for tests and checks)."""
        with read_transaction(self.engine) as conn:
            return len(
                conn.execute(
                    select(session_tokens.c.token_hash).where(
                        session_tokens.c.session_id == session_id
                    )
                ).all()
            )
