"""Per-session GPU use. NVML names the processes using a GPU by host PID (which is why tools
inside a container see nothing); the manager knows each session's kernel and asks its
runtime for the kernel's host PIDs, so it can say which session uses how much of which GPU.

One sweep is one inventory read (NVML's running processes and per-process utilization, on
a worker thread) and, only when some process uses a GPU at all, one PID lookup per live
session that holds a GPU (its runtime's ``pids``: the engine's ``top`` for a container, a
/proc scan for a local kernel). A sweep is reused for ``max_age`` seconds and shared by
callers that ask while it is taken, so the events websocket's ticks, the API and the
widgets polling it cost one sweep every couple of seconds, never a wait on the loop.

Sessions of other processes on the same store are found by what the store recorded (their
container id or kernel PID), else, for containers, by their session label.

Shapes (what ``GET sessions/{id}`` and ``GET gpus`` serve):

- a session's ``gpu_usage``: ``{"memory_used": bytes, "utilization": percent | None,
  "devices": [{"uuid", "index", "name", "kind", "memory_used", "memory_total",
  "utilization"}]}``, one device per device it holds (a MIG instance by its ``MIG-…``
  UUID and memory). A device's ``utilization`` is the SM percent its processes keep busy
  (their sum, at most 100); the session's is the mean over its devices. ``None`` where the
  GPU does not report per-process utilization. The whole is ``None`` for a session that is
  not RUNNING, or whose processes could not be found.
- a GPU's ``usage``: ``[{"session_id", "name", "owner", "memory_used", "utilization"}]``:
  every live session holding (part of) it or running a process on it, most memory first,
  then one ``{"session_id": None, "name": "other", "owner": None, ...}`` entry for
  processes no session accounts for (and, for a non-admin, other users' sessions).
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.models import GPUDevice, RuntimeHandle, Session
from ..core.status import SessionStatus
from ..devices import GPUProcess, WarnsOnce

if TYPE_CHECKING:
    from . import GPUSessionManager


# Statuses in which a session's kernel may be running on its GPUs.
KERNEL_STATUSES = (SessionStatus.RUNNING, SessionStatus.RESTARTING, SessionStatus.TERMINATING)
OTHER = "other"


def _add_utilization(total: int | None, value: int | None) -> int | None:
    """Sum two SM percentages (at most 100); unknown stays unknown."""
    if total is None or value is None:
        return None
    return min(100, total + value)


@dataclass
class UsageSweep:
    """One look at the host: the GPUs, the processes on them, and whose they are."""

    at: float  # time.monotonic() when taken
    devices: list[GPUDevice]
    processes: list[GPUProcess]
    sessions: dict[str, Session]  # live sessions holding GPUs, by id
    owners: dict[int, str] = field(default_factory=dict)  # host PID → session id
    known: set[str] = field(default_factory=set)  # sessions whose processes are known

    def session_usage(self, session: Session) -> dict[str, Any] | None:
        """``session``'s ``gpu_usage`` (see the module's docs)."""
        if session.status != SessionStatus.RUNNING:
            return None
        if session.allocations and session.id not in self.known:
            return None
        by_uuid = {d.uuid: d for d in self.devices}
        entries: dict[str, dict[str, Any]] = {}
        first_on: dict[str, str] = {}  # physical GPU → the session's first device on it
        for a in session.allocations:
            if a.device_uuid in entries:
                continue
            device = by_uuid.get(a.gpu_uuid)
            mig = next(
                (m for m in (device.mig_instances if device else ()) if m.uuid == a.device_uuid),
                None,
            )
            name = device.name if device else ""
            entries[a.device_uuid] = {
                "uuid": a.device_uuid,
                "index": device.index if device else None,
                "name": f"{name} MIG {mig.profile}" if mig else name,
                "kind": a.kind,
                "memory_used": 0,
                "memory_total": mig.memory if mig else (device.memory if device else None),
                "utilization": 0,
            }
            first_on.setdefault(a.gpu_uuid, a.device_uuid)
        for p in self.processes:
            if self.owners.get(p.pid) != session.id:
                continue
            key = first_on.get(p.gpu_uuid)
            if key is None:  # a GPU it does not hold (should not happen): still shown
                device = by_uuid.get(p.gpu_uuid)
                key = first_on[p.gpu_uuid] = p.gpu_uuid
                entries[key] = {
                    "uuid": p.gpu_uuid,
                    "index": p.gpu_index,
                    "name": device.name if device else "",
                    "kind": "gpu",
                    "memory_used": 0,
                    "memory_total": device.memory if device else None,
                    "utilization": 0,
                }
            entry = entries[key]
            entry["memory_used"] += p.memory_used or 0
            entry["utilization"] = _add_utilization(entry["utilization"], p.utilization)
        devices = list(entries.values())
        loads = [d["utilization"] for d in devices]
        return {
            "memory_used": sum(d["memory_used"] for d in devices),
            "utilization": (
                round(sum(loads) / len(loads)) if loads and None not in loads else None
            ),
            "devices": devices,
        }

    def device_usage(self, gpu_uuid: str) -> list[dict[str, Any]]:
        """One GPU's ``usage`` (see the module's docs), every session named."""
        used: dict[str | None, dict[str, Any]] = {}
        for session in self.sessions.values():
            if any(a.gpu_uuid == gpu_uuid for a in session.allocations):
                used[session.id] = self._entry(session, known=session.id in self.known)
        for p in self.processes:
            if p.gpu_uuid != gpu_uuid:
                continue
            sid = self.owners.get(p.pid)
            if sid is not None and sid not in used:
                used[sid] = self._entry(self.sessions[sid], known=True)
            entry = used.get(sid)
            if entry is None:
                entry = used[None] = {
                    "session_id": None,
                    "name": OTHER,
                    "owner": None,
                    "memory_used": 0,
                    "utilization": 0,
                }
            entry["memory_used"] = (entry["memory_used"] or 0) + (p.memory_used or 0)
            entry["utilization"] = _add_utilization(entry["utilization"], p.utilization)
        return order_usage(list(used.values()))

    @staticmethod
    def _entry(session: Session, *, known: bool) -> dict[str, Any]:
        return {
            "session_id": session.id,
            "name": session.name,
            "owner": session.owner,
            "memory_used": 0 if known else None,
            "utilization": 0 if known else None,
        }


def order_usage(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most memory first; the anonymous "other" entry last."""
    return sorted(
        entries, key=lambda e: (e["session_id"] is None, -(e["memory_used"] or 0), e["name"])
    )


def anonymous_usage(entries: list[dict[str, Any]], owner: str) -> list[dict[str, Any]]:
    """``entries`` as ``owner`` may see them: every other user's session folded into the one
    "other" entry, its owner and name hidden."""
    shown: list[dict[str, Any]] = []
    other: dict[str, Any] | None = None
    for entry in entries:
        if entry["session_id"] is not None and entry["owner"] == owner:
            shown.append(entry)
            continue
        if other is None:
            other = {
                "session_id": None,
                "name": OTHER,
                "owner": None,
                "memory_used": 0,
                "utilization": 0,
            }
        if entry["memory_used"] is not None:
            other["memory_used"] += entry["memory_used"]
        other["utilization"] = _add_utilization(other["utilization"], entry["utilization"])
    if other is not None:
        shown.append(other)
    return order_usage(shown)


class GPUUsage(WarnsOnce):
    """Sweeps, cached ``max_age`` seconds and shared by concurrent callers (per loop)."""

    def __init__(
        self, manager: GPUSessionManager, max_age: float = 2.0, lookup_timeout: float = 5.0
    ) -> None:
        self.manager = manager
        self.max_age = max_age
        # A PID lookup that takes longer (a Docker engine that hangs) leaves that session's
        # use unknown rather than holding GET gpus and the events ticks.
        self.lookup_timeout = lookup_timeout
        self._last: UsageSweep | None = None
        self._taking: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}
        self._host = socket.gethostname()
        self._warned: set[str] = set()

    async def sweep(self) -> UsageSweep:
        """The latest sweep, taken now when the last is older than ``max_age``."""
        last = self._last
        if last is not None and time.monotonic() - last.at < self.max_age:
            return last
        loop = asyncio.get_running_loop()
        task = self._taking.get(loop)
        if task is None:
            task = loop.create_task(self._take())
            self._taking[loop] = task

            def done(finished: asyncio.Task) -> None:
                if self._taking.get(loop) is finished:
                    del self._taking[loop]
                if not finished.cancelled() and finished.exception() is None:
                    self._last = finished.result()

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def session_usage(self, session: Session) -> dict[str, Any] | None:
        """``session``'s ``gpu_usage``; ``None`` unless it is RUNNING."""
        if session.status != SessionStatus.RUNNING:
            return None
        if not session.allocations:
            return {"memory_used": 0, "utilization": None, "devices": []}
        sweep = await self.sweep()
        if session.id not in sweep.sessions:
            # Started after that sweep read the store: a sweep of its own, not a wrong 0.
            sweep = await self._take()
            self._last = sweep
        return sweep.session_usage(session)

    async def _take(self) -> UsageSweep:
        manager = self.manager

        def read() -> tuple[list[GPUDevice], list[GPUProcess] | None, list[Session]]:
            inventory = manager.inventory
            try:
                processes = inventory.processes()
            except Exception as exc:  # an inventory's bug must not take GET gpus down
                self._warn_once("inventory", "Could not list the GPU processes: %s", exc)
                processes = None  # unknown: nobody's use can be told
            devices = inventory.devices()
            live = [
                s for s in manager.store.live() if s.allocations and s.status in KERNEL_STATUSES
            ]
            return devices, processes, live

        devices, processes, live = await asyncio.to_thread(read)
        sweep = UsageSweep(time.monotonic(), devices, processes or [], {s.id: s for s in live})
        if processes is None:
            return sweep
        if not processes:  # nothing runs on any GPU: nobody uses anything, no lookups
            sweep.known = set(sweep.sessions)
            return sweep
        found = await asyncio.gather(
            *(asyncio.wait_for(self._pids(s), self.lookup_timeout) for s in live),
            return_exceptions=True,
        )
        for session, pids in zip(live, found, strict=True):
            if isinstance(pids, BaseException):
                self._warn_once(
                    session.id,
                    "Could not list the processes of session %s: %s",
                    session.id,
                    pids if str(pids) else type(pids).__name__,  # a timeout says nothing
                )
                continue
            if pids is None:
                continue
            sweep.known.add(session.id)
            for pid in pids:
                sweep.owners.setdefault(pid, session.id)
        return sweep

    async def _pids(self, session: Session) -> list[int] | None:
        """The host PIDs of ``session``'s kernel; ``None`` when it cannot be found here."""
        manager = self.manager
        runtime = manager.runtime(session.runtime)
        handle = manager.handle(session)
        if handle is None and session.container_id:
            if session.runtime == "local" and session.process.host != self._host:
                return None  # a process on another host: its PID means nothing here
            handle = RuntimeHandle(session.runtime, session.container_id)
        if handle is not None:
            return await runtime.pids(handle)
        find = getattr(runtime, "session_handles", None)
        if find is None:
            return None
        handles = await find(manager.store_id, session.id)  # by label: another process's
        if not handles:
            return None
        pids: list[int] = []
        for found in handles:
            pids.extend(await runtime.pids(found))
        return pids
