"""A kernel's log: live from its container while it runs, and the one keeper of its last
lines when the container goes (shown by the sessions API after the kernel ended)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..core.errors import GPUSessionsError
from ..core.models import RuntimeHandle, Session
from .lifecycle import LOG_NOTE, is_crash

if TYPE_CHECKING:
    from . import GPUSessionManager


class SessionLogs:
    """Reading a session's log, and keeping its tail when its container is removed."""

    async def _keep_logs(
        self: GPUSessionManager,
        session: Session,
        runtime,
        handle: RuntimeHandle,
        why: str = "",
    ) -> None:
        """Store the kernel's last log lines before its container goes, so the logs API
        can still show them, followed by the deaths recorded for it and why it ended."""
        try:
            text = await runtime.logs(handle, tail=self.log_tail_lines)
        except GPUSessionsError:
            text = ""
        try:
            history = (await asyncio.to_thread(self.store.get, session.id)).history
        except GPUSessionsError:
            history = []
        notes = [f"kernel died: {h.reason}" for h in history if is_crash(h.reason)]
        death = self.death_reason(session)
        if death and f"kernel died: {death}" not in notes:
            notes.append(f"kernel died: {death}")
        if session.kind == "batch":
            notes = [f"batch session ended: {why}"] if why else []
        elif why and not is_crash(why):
            notes.append(f"kernel shut down: {why}")
        text = text.rstrip("\n") + ("\n" if text.strip() else "")
        text += "".join(f"{LOG_NOTE} {note}\n" for note in notes)
        try:
            await asyncio.to_thread(self.store.save_log_tail, session.id, text)
        except Exception:  # losing a log tail must not keep a container (and GPUs) alive
            self.log.warning("Could not keep the log of session %s", session.id, exc_info=True)

    async def session_logs(self, session: Session, tail: int = 200) -> str:
        """The kernel's log: live from its container (or process) while it has one, the
        kept tail after it ended."""
        handle = self._handles.get(session.id)
        runtime = self.runtime(session.runtime)
        if handle is None and session.container_id and not session.status.is_terminal:
            if session.runtime == "docker":  # a kernel of another process on this host
                handle = RuntimeHandle("docker", session.container_id, "")
        if handle is not None and not session.status.is_terminal:
            try:
                return await runtime.logs(handle, tail=tail)
            except GPUSessionsError:
                pass  # the container just went: fall back to the kept tail
        text = await asyncio.to_thread(self.store.log_tail, session.id) or ""
        lines = text.splitlines(keepends=True)
        return "".join(lines[-tail:])
