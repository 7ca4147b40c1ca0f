"""Idle kernels give their GPUs back: shut down past the owner's ``idle_timeout``."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from ..core.errors import RuntimeUnavailable
from ..engine import Engine


class IdleCuller:
    """Checks the server's kernels periodically. A kernel of a session is idle when it is
    not busy and nothing happened on its channels (jupyter_server's ``last_activity``) for
    longer than its owner's ``idle_timeout``; open browser tabs do not count as activity
    of their own, so a notebook left open does not hold a GPU forever."""

    def __init__(self, engine: Engine, kernel_manager: Any, log: logging.Logger):
        self.engine = engine
        self.kernel_manager = kernel_manager
        self.log = log
        self._running = False
        self._engine_down = False

    async def check(self) -> list[str]:
        """One pass; returns the kernel ids shut down."""
        if self._running:  # a slow shutdown must not overlap the next tick
            return []
        self._running = True
        try:
            return await self._check()
        finally:
            self._running = False

    async def _check(self) -> list[str]:
        candidates = []
        for kernel_id in list(self.kernel_manager.list_kernel_ids()):
            try:
                kernel = self.kernel_manager.get_kernel(kernel_id)
            except KeyError:
                continue
            session = getattr(getattr(kernel, "provisioner", None), "session", None)
            if session is None or session.status.value != "RUNNING":
                continue
            if getattr(kernel, "execution_state", None) == "busy":
                continue
            last = getattr(kernel, "last_activity", None)
            if last is None:
                continue
            candidates.append((kernel_id, session, last))
        if not candidates:
            return []
        try:
            timeouts = await self.engine.idle_timeouts({s.owner for _, s, _ in candidates})
        except RuntimeUnavailable as exc:
            # The manager service is down (remote mode): nobody is culled until it is back,
            # and that is said once per outage, not at every check.
            if not self._engine_down:
                self._engine_down = True
                self.log.warning("Idle kernels are not culled while the engine is away: %s", exc)
            return []
        if self._engine_down:
            self._engine_down = False
            self.log.info("The engine answers again: idle kernels are culled again")
        now = datetime.now(timezone.utc)
        culled = []
        for kernel_id, session, last in candidates:
            timeout = timeouts.get(session.owner)
            if not timeout:
                continue
            if last.tzinfo is None:
                last = last.replace(tzinfo=timezone.utc)
            idle = (now - last).total_seconds()
            if idle <= timeout:
                continue
            try:  # it may have gone, or turned busy, while the timeouts were read
                kernel = self.kernel_manager.get_kernel(kernel_id)
            except KeyError:
                continue
            if getattr(kernel, "execution_state", None) == "busy":
                continue
            reason = (
                f"idle-timeout: no execution for {idle:.0f}s, past {session.owner}'s "
                f"idle_timeout of {timeout:g}s; its devices are free again"
            )
            self.log.info("Kernel %s (session %s): %s", kernel_id, session.id[:12], reason)
            self.engine.set_stop_reason(session.id, reason)
            try:
                await self.kernel_manager.shutdown_kernel(kernel_id)
                culled.append(kernel_id)
            except Exception:
                self.engine.set_stop_reason(session.id, "")
                self.log.exception("Could not shut down idle kernel %s", kernel_id)
        return culled
