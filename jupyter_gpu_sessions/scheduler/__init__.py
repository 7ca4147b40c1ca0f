"""Pure scheduling: which device slots are free, who starts next, and this process's
in-memory queue between passes (``queue.py``).

No I/O, no asyncio, no database: only :mod:`jupyter_gpu_sessions.core` and the stdlib.
"""

from ..core.passes import PassDecision, PassInput, QueuedSession
from .allocator import SHARE_UNITS, Capacity, describe_gpus, share_units
from .queue import QueueCache
from .strategies import (
    CHECKS,
    STRATEGIES,
    STRATEGY_CLASSES,
    CheckFailure,
    DrfStrategy,
    FifoStrategy,
    HostTotals,
    OwnerUsage,
    PassResult,
    PendingSession,
    SchedulingStrategy,
    as_strategy,
    schedule,
)

__all__ = [
    "CHECKS",
    "SHARE_UNITS",
    "STRATEGIES",
    "Capacity",
    "CheckFailure",
    "DrfStrategy",
    "FifoStrategy",
    "STRATEGY_CLASSES",
    "SchedulingStrategy",
    "as_strategy",
    "HostTotals",
    "OwnerUsage",
    "PassDecision",
    "PassInput",
    "PassResult",
    "PendingSession",
    "QueueCache",
    "QueuedSession",
    "describe_gpus",
    "schedule",
    "share_units",
]
