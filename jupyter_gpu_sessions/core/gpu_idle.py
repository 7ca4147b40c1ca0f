"""GPU-idle reclaim, the pure part: when a kernel holding GPUs is warned, withdrawn or ended
(one :class:`GPUIdleClock` per session, told each utilization reading), and the words of
its warnings, which travel as session history entries (so every process on the store and
the events websocket see them) and are read back here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

WARNING = "gpu-idle-warning"
WITHDRAWN = "gpu-idle-withdrawn"
ENDED = "gpu-idle"

_WARNING_RE = re.compile(
    rf"^{WARNING}: GPU utilization under (?P<threshold>[\d.]+)% for (?P<idle>[\d.]+)s; "
    r"it ends in (?P<grace>[\d.]+)s"
)


def warning_reason(threshold: float, idle_for: float, grace: float) -> str:
    """The history entry of a warning (read back by :func:`parse_warning`)."""
    return (
        f"{WARNING}: GPU utilization under {threshold:g}% for {idle_for:.1f}s; it ends in "
        f"{grace:.1f}s unless it uses its GPU"
    )


def withdrawn_reason(threshold: float, utilization: int | None, *, restarted: bool = False) -> str:
    if restarted:
        return f"{WITHDRAWN}: the kernel was restarted; its GPU-idle clock starts over"
    if utilization is None:
        return (
            f"{WITHDRAWN}: its GPU utilization can no longer be read; it is not ended for "
            "GPU idleness"
        )
    return (
        f"{WITHDRAWN}: GPU utilization back at {utilization}% (not under {threshold:g}%); "
        "it is not ended"
    )


def ended_reason(threshold: float, idle_for: float) -> str:
    return (
        f"{ENDED}: GPU utilization under {threshold:g}% for {idle_for:.0f}s; its devices are "
        "free again"
    )


def parse_warning(reason: str) -> dict[str, float] | None:
    """``{"threshold", "idle_seconds", "grace_seconds"}`` of a warning's history entry;
    None for any other entry."""
    match = _WARNING_RE.match(reason or "")
    if match is None:
        return None
    return {
        "threshold": float(match["threshold"]),
        "idle_seconds": float(match["idle"]),
        "grace_seconds": float(match["grace"]),
    }


def notice_event(row: dict[str, Any]) -> dict[str, Any] | None:
    """The events websocket's message for a warning or withdrawal history entry (``row``
    as ``status_changes`` gives it), or None for a status change."""
    reason = row.get("reason") or ""
    common = {
        "session_id": row["session_id"],
        "kernel_id": row.get("kernel_id"),
        "name": row.get("name"),
        "owner": row.get("owner"),
        "at": row.get("at"),
        "message": reason,
    }
    warning = parse_warning(reason)
    if warning is not None:
        return {
            "type": WARNING,
            **common,
            "threshold": warning["threshold"],
            "idle_seconds": warning["idle_seconds"],
            "ends_at": (row.get("at") or 0.0) + warning["grace_seconds"],
        }
    if reason.startswith(f"{WITHDRAWN}:"):
        return {"type": WITHDRAWN, **common}
    return None


@dataclass(frozen=True)
class Decision:
    """What to do about one session now: ``"warn"``, ``"withdraw"``, ``"end"`` or ``""``
    (nothing); ``idle_for`` seconds under the threshold, ``ends_at`` (wall clock) once
    warned."""

    action: str = ""
    idle_for: float = 0.0
    ends_at: float | None = None


class GPUIdleClock:
    """One session's GPU-idle clock. ``run`` names the kernel's current run (its container
    or process): a restart is a new run and starts the clock over."""

    def __init__(self, run: str | None) -> None:
        self.run = run
        self.idle_since: float | None = None
        self.ends_at: float | None = None  # set while warned

    @property
    def warned(self) -> bool:
        return self.ends_at is not None

    def observe(
        self,
        *,
        run: str | None,
        utilization: int | None,
        threshold: float | None,
        window: float | None,
        grace: float,
        now: float,
    ) -> Decision:
        """Tell the clock one reading (``utilization`` None: the GPU does not report its
        processes' use) under the owner's limits (None: no reclaim applies)."""
        withdraw = Decision("withdraw") if self.warned else Decision()
        if run != self.run:  # restarted: its idle time so far does not count
            self.run = run
            self.idle_since = self.ends_at = None
        if threshold is None or window is None or utilization is None or utilization >= threshold:
            self.idle_since = self.ends_at = None
            return withdraw
        if self.idle_since is None:
            self.idle_since = now
        idle_for = now - self.idle_since
        if self.ends_at is None:
            if idle_for < window:
                return withdraw if withdraw.action else Decision(idle_for=idle_for)
            self.ends_at = now + grace
            return Decision("warn", idle_for, self.ends_at)
        if now >= self.ends_at:
            return Decision("end", idle_for, self.ends_at)
        return Decision("", idle_for, self.ends_at)
