"""What one scheduling pass reads from the store and writes back: shared by the store,
which runs the pass in one write transaction, and the scheduler's queue, which decides.
(Found through :mod:`jupyter_gpu_sessions.scheduler` too.)"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .models import Allocation, ResourceRequest
from .status import SessionStatus


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
    """What one scheduling pass reads, inside its write transaction.

    ``full``: ``pending``, ``allocations`` and ``holding`` are the whole queue, every live
    allocation and every session holding resources. Otherwise they cover only ``changed``
    (the sessions whose status changed since the caller's token): the ones still pending,
    their allocations, the ones holding; ``load_full()`` gives the whole picture on demand.
    """

    full: bool
    pending: list[QueuedSession]
    allocations: list[Allocation]
    holding: dict[str, tuple[str, ResourceRequest]]  # id → (owner, request)
    changed: set[str]
    # id → (status, exit code, name) of the sessions the pending ones depend on
    dependencies: Callable[[Iterable[str]], dict[str, tuple[SessionStatus, int | None, str]]]
    load_full: Callable[[], PassInput]


@dataclass
class PassDecision:
    """What a scheduling pass decided; written back in the same transaction."""

    placed: dict[str, list[Allocation]] = field(default_factory=dict)
    # id → (waiting data: failed checks and position, attempts or None if unchanged)
    waiting: dict[str, tuple[dict[str, Any], int | None]] = field(default_factory=dict)
    cancelled: dict[str, str] = field(default_factory=dict)
    # (newest history id, queue sequence) after this pass: the next pass's ``since``
    token: tuple[int, int] = (0, 0)
