"""The session status machine of DESIGN.md, as an explicit transition table."""

from __future__ import annotations

from enum import Enum

from .errors import GPUSessionsError


class SessionStatus(str, Enum):
    PENDING = "PENDING"
    PREPARING = "PREPARING"
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    TERMINATING = "TERMINATING"
    TERMINATED = "TERMINATED"
    CANCELLED = "CANCELLED"
    ERROR = "ERROR"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {SessionStatus.TERMINATED, SessionStatus.CANCELLED, SessionStatus.ERROR}
)

S = SessionStatus
TRANSITIONS: dict[SessionStatus, frozenset[SessionStatus]] = {
    S.PENDING: frozenset({S.PREPARING, S.CANCELLED}),
    # A start that fails before any container ran is CANCELLED; one whose container ran
    # and failed is ERROR.
    S.PREPARING: frozenset({S.RUNNING, S.CANCELLED, S.ERROR, S.TERMINATING}),
    S.RUNNING: frozenset({S.RESTARTING, S.TERMINATING, S.ERROR}),
    S.RESTARTING: frozenset({S.RUNNING, S.TERMINATING, S.ERROR}),
    # TERMINATING: an end was asked for; the devices stay held until the container is gone.
    # A start ended before any container ran ends CANCELLED.
    S.TERMINATING: frozenset({S.TERMINATED, S.ERROR, S.CANCELLED}),
    S.TERMINATED: frozenset(),
    S.CANCELLED: frozenset(),
    S.ERROR: frozenset(),
}


class IllegalTransition(GPUSessionsError):
    reason = "illegal-transition"


def check_transition(current: SessionStatus, new: SessionStatus) -> None:
    """Raise :class:`IllegalTransition` unless ``current → new`` is in the table."""
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "none"
        raise IllegalTransition(
            f"a session cannot go from {current.value} to {new.value} (allowed: {allowed})"
        )
