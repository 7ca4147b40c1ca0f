"""Pure scheduling: which device slots are free, and who starts next.

No I/O, no asyncio, no database: only :mod:`jupyter_gpu_sessions.core` and the stdlib.
"""

from .allocator import SHARE_UNITS, Capacity, describe_gpus, share_units
from .strategies import (
    CHECKS,
    STRATEGIES,
    CheckFailure,
    HostTotals,
    OwnerUsage,
    PassResult,
    PendingSession,
    schedule,
)

__all__ = [
    "CHECKS",
    "SHARE_UNITS",
    "STRATEGIES",
    "Capacity",
    "CheckFailure",
    "HostTotals",
    "OwnerUsage",
    "PassResult",
    "PendingSession",
    "describe_gpus",
    "schedule",
    "share_units",
]
