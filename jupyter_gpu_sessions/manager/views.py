"""What people see of the engine: sessions as the API shows them, the one GPU-holder
snapshot, and the one quota-usage summary (the API, the events websocket and the CLI all
read these)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.identity import Identity
from ..core.models import Session
from ..core.status import SessionStatus
from .gpu_usage import anonymous_usage

if TYPE_CHECKING:
    from . import GPUSessionManager
    from .gpu_usage import UsageSweep


def session_json(
    manager: GPUSessionManager, session: Session, *, history: bool = False
) -> dict[str, Any]:
    data = session.to_dict()
    if session.status == SessionStatus.PENDING:
        data["queue_message"] = manager.queue_message(session)
    if history:
        data["history"] = history_json(session)
    return data


def history_json(session: Session) -> list[dict[str, Any]]:
    return [{"status": h.status.value, "at": h.at, "reason": h.reason} for h in session.history]


def gpu_snapshot(
    manager: GPUSessionManager, usage: UsageSweep | None = None
) -> list[dict[str, Any]]:
    """Every GPU with its utilization, which sessions hold it and, from ``usage`` (a sweep
    of :mod:`.gpu_usage`), how much of it each session's processes use (blocking)."""
    inventory = manager.inventory
    devices = inventory.devices()
    utilization = inventory.utilization()
    allocations = manager.store.allocations()
    holders: dict[str, list[str]] = {}  # GPU → sessions holding it (or part of it)
    held: dict[str, list[dict[str, Any]]] = {}  # session → what it was given
    for a in allocations:
        holders.setdefault(a.gpu_uuid, []).append(a.session_id)
        held.setdefault(a.session_id, []).append(a)
    sessions = {s.id: s for s in manager.store.live()}
    result = []
    for device in devices:
        entry = device.to_dict()
        entry["utilization"] = utilization.get(device.uuid)
        entry["holders"] = [
            {
                "session_id": sid,
                "owner": sessions[sid].owner if sid in sessions else None,
                "name": sessions[sid].name if sid in sessions else "",
                "devices": [a.device_uuid for a in held[sid]],
                "shares": {a.device_uuid: a.fraction for a in held[sid] if a.kind == "share"},
            }
            for sid in dict.fromkeys(holders.get(device.uuid, ()))
        ]
        entry["usage"] = usage.device_usage(device.uuid) if usage is not None else []
        result.append(entry)
    return result


def visible_gpus(snapshot: list[dict[str, Any]], who: Identity) -> list[dict[str, Any]]:
    """Other users' sessions appear as "another user" to non-admins."""
    if who.is_admin:
        return snapshot
    result = []
    for entry in snapshot:
        holders = [
            h
            if h["owner"] == who.username
            else {
                "session_id": None,
                "owner": None,
                "name": "another user's session",
                "devices": h["devices"],
                "shares": h["shares"],
            }
            for h in entry["holders"]
        ]
        usage = anonymous_usage(entry.get("usage", []), who.username)
        result.append({**entry, "holders": holders, "usage": usage})
    return result


def quota_json(manager: GPUSessionManager, who: Identity) -> dict[str, Any]:
    """``who``'s policy and what they use against it (blocking)."""
    manager.refresh_policies()
    policy = manager.policy_for(who.username)
    totals = manager.store.owner_totals(who.username)
    storage = manager.vfolders.owner_usage(who.username)
    return {
        "user": who.username,
        "groups": sorted(who.groups),
        "admin": who.is_admin,
        "policy": policy.to_dict(),
        "usage": {
            "sessions": totals.sessions,
            "pending_sessions": totals.pending,
            "gpus": totals.gpus,
            "cpus": totals.cpus,
            "memory": totals.memory,
            "vfolder_count": storage["count"],
            "vfolder_bytes": storage["bytes"],
        },
    }


def graph_json(nodes: list[Session], edges: list[tuple[str, str]], who: Identity) -> dict[str, Any]:
    """A dependency graph; nodes of other users' sessions keep only their status."""
    visible = {n.id for n in nodes if n.owner == who.username or who.is_admin}
    return {
        "nodes": [
            {
                "id": n.id,
                "name": n.name if n.id in visible else "",
                "status": n.status.value,
                "kind": n.kind,
                "owner": n.owner if n.id in visible else None,
                "resources": n.request.to_dict(),
                # So a graph can tell a batch that failed from one that succeeded.
                "exit_code": n.exit_code,
                "reason": n.reason if n.id in visible else "",
            }
            for n in nodes
        ],
        "edges": [{"from": a, "to": b} for a, b in edges],
    }
