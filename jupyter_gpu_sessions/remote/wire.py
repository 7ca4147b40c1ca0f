"""What crosses the engine RPC: the one codec of core models, launches and errors as JSON,
used by both ends (``RemoteEngine`` and the service's ``engine_rpc``)."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from ..core import errors as core_errors
from ..core.errors import GPUSessionsError, InvalidRequest
from ..core.models import (
    Allocation,
    ExitState,
    ProcessRef,
    ResourceRequest,
    RuntimeHandle,
    Session,
    StatusChange,
)
from ..core.status import IllegalTransition, SessionStatus
from ..core.vfolders import FileEntry, Permission, Share, VFolder
from ..engine import KernelLaunch

# The reason of a RuntimeUnavailable that says the service itself did not answer.
SERVICE_UNAVAILABLE = "service-unavailable"
# Status codes of the API, for errors whose class the other end does not name.
_BY_STATUS: dict[int, type[GPUSessionsError]] = {
    400: InvalidRequest,
    403: core_errors.Forbidden,
    404: core_errors.NotFound,
    409: core_errors.Conflict,
    413: core_errors.QuotaExceeded,
    422: core_errors.KernelLaunchError,
    503: core_errors.RuntimeUnavailable,
}


def _field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"{what}.{name} is missing or of the wrong type")
    return value


# -- errors --------------------------------------------------------------------------------
def error_class(name: str) -> type[GPUSessionsError] | None:
    """The domain error class named ``name`` (``core.errors`` or ``IllegalTransition``)."""
    if name == "IllegalTransition":
        return IllegalTransition
    klass = getattr(core_errors, name, None)
    if isinstance(klass, type) and issubclass(klass, GPUSessionsError):
        return klass
    return None


def error_to_wire(exc: GPUSessionsError) -> dict[str, Any]:
    return {"message": exc.message, "reason": exc.reason, "error": type(exc).__name__}


def error_from_wire(status: int, data: Any, *, where: str = "") -> GPUSessionsError:
    """The same domain error the service raised (its class, message and reason); another
    5xx, or an answer that is not ours, is :class:`RuntimeUnavailable` with the reason
    ``service-unavailable`` (the service is the runtime, as far as this server can tell)."""
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        klass = error_class(str(data.get("error") or ""))
        if klass is None and status < 500:
            klass = _BY_STATUS.get(status)
        if klass is not None:
            reason = data.get("reason") if isinstance(data.get("reason"), str) else None
            return klass(data["message"], reason=reason)
        message = data["message"]
    else:
        message = str(data)[:300] if data else f"HTTP {status}"
    return core_errors.RuntimeUnavailable(
        f"The GPU sessions manager service{where} answered {status}: {message}",
        reason=SERVICE_UNAVAILABLE,
    )


# -- kernel sessions -----------------------------------------------------------------------
def session_to_wire(session: Session) -> dict[str, Any]:
    data = session.to_dict()
    data.update(
        container_id=session.container_id,
        process=dataclasses.asdict(session.process),
        launch=session.launch,
        history=[
            {"status": h.status.value, "at": h.at, "reason": h.reason} for h in session.history
        ],
    )
    return data


def session_from_wire(data: Any) -> Session:
    """A Session from what the service sent (``session_to_wire``), or from the REST API's
    JSON of one (``get_session``: no process, no container id)."""
    if not isinstance(data, dict):
        raise InvalidRequest("a session must be a JSON object")
    sid = _field(data, "id", str, "session")
    try:
        status = SessionStatus(data.get("status", "PENDING"))
    except ValueError:
        raise InvalidRequest(f"session.status {data.get('status')!r} is not a status") from None
    process = data.get("process") or {}
    launch = data.get("launch")
    if launch is None and data.get("command"):
        launch = {"command": list(data["command"])}
    return Session(
        id=sid,
        owner=str(data.get("owner") or ""),
        image=str(data.get("image") or ""),
        request=ResourceRequest.from_dict(data.get("request") or {}),
        runtime=str(data.get("runtime") or "docker"),
        process=ProcessRef(
            str(process.get("host", "")),
            int(process.get("pid", 0)),
            float(process.get("started", 0)),
        ),
        kind=str(data.get("kind") or "interactive"),
        name=str(data.get("name") or ""),
        kernel_id=data.get("kernel_id"),
        status=status,
        reason=str(data.get("reason") or ""),
        allocations=tuple(
            Allocation(sid, a["gpu_uuid"], a["device_uuid"], a["kind"], float(a["fraction"]))
            for a in data.get("allocations") or ()
        ),
        depends_on=tuple(data.get("depends_on") or ()),
        scheduler=dict(data.get("scheduler") or {}),
        exit_code=data.get("exit_code"),
        oom_killed=bool(data.get("oom_killed")),
        container_id=data.get("container_id"),
        created_at=float(data.get("created_at") or 0.0),
        started_at=data.get("started_at"),
        ended_at=data.get("ended_at"),
        history=[
            StatusChange(SessionStatus(h["status"]), float(h["at"]), h.get("reason", ""))
            for h in data.get("history") or ()
        ],
        launch=launch,
    )


def exit_to_wire(state: ExitState | None) -> dict[str, Any] | None:
    return None if state is None else dataclasses.asdict(state)


def exit_from_wire(data: Any) -> ExitState | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise InvalidRequest("an exit state must be a JSON object or null")
    return ExitState(
        int(_field(data, "exit_code", int, "exit")),
        oom_killed=bool(data.get("oom_killed")),
        error=str(data.get("error") or ""),
    )


def handle_to_wire(handle: RuntimeHandle | None) -> dict[str, Any] | None:
    return None if handle is None else dataclasses.asdict(handle)


def handle_from_wire(data: Any) -> RuntimeHandle | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise InvalidRequest("a runtime handle must be a JSON object or null")
    return RuntimeHandle(
        str(_field(data, "runtime", str, "handle")),
        str(_field(data, "id", str, "handle")),
        str(data.get("name") or ""),
        str(data.get("digest") or ""),
        dict(data.get("extra") or {}),
    )


def _bytes_out(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    return value


def _bytes_in(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"$bytes"}:
        return base64.b64decode(value["$bytes"])
    return value


def launch_to_wire(launch: KernelLaunch) -> dict[str, Any]:
    data = {f.name: getattr(launch, f.name) for f in dataclasses.fields(launch)}
    data["request"] = launch.request.to_dict()
    data["connection_info"] = {k: _bytes_out(v) for k, v in launch.connection_info.items()}
    return data


_LAUNCH_TYPES: dict[str, type | tuple[type, ...]] = {
    "kernel_id": str,
    "owner": str,
    "image": str,
    "argv": list,
    "env": dict,
    "explicit_env": dict,
    "cwd": str,
    "runtime": str,
    "connection_file": str,
    "connection_info": dict,
    "launch_timeout": (int, float),
    "queue_timeout": (int, float),
    "name": str,
    "vfolders": list,
    "labels": dict,
    "image_chosen": bool,
}


def launch_from_wire(data: Any) -> KernelLaunch:
    """A launch as sent; every field checked for its type (the request parsed as a
    ResourceRequest), unknown fields refused."""
    if not isinstance(data, dict):
        raise InvalidRequest("launch must be a JSON object")
    unknown = sorted(set(data) - set(_LAUNCH_TYPES) - {"request"})
    if unknown:
        raise InvalidRequest(f"launch has unknown field(s): {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, kind in _LAUNCH_TYPES.items():
        if name not in data:
            continue
        value = data[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise InvalidRequest(f"launch.{name} is of the wrong type")
        values[name] = value
    for name in ("argv", "vfolders"):
        if not all(isinstance(v, str) for v in values.get(name, ())):
            raise InvalidRequest(f"launch.{name} must be a list of strings")
    for name in ("env", "explicit_env", "labels"):
        if not all(isinstance(v, str) for v in values.get(name, {}).values()):
            raise InvalidRequest(f"launch.{name} must map names to strings")
    missing = sorted(
        f.name
        for f in dataclasses.fields(KernelLaunch)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
        and f.name != "request"
    )
    if missing or not isinstance(data.get("request"), dict):
        raise InvalidRequest(f"launch lacks {', '.join(missing or ['request'])}")
    request = ResourceRequest.parse(**_request_fields(data["request"]))
    values["connection_info"] = {k: _bytes_in(v) for k, v in values["connection_info"].items()}
    values["launch_timeout"] = float(values["launch_timeout"])
    if "queue_timeout" in values:
        values["queue_timeout"] = float(values["queue_timeout"])
    return KernelLaunch(request=request, **values)


def _request_fields(data: dict[str, Any]) -> dict[str, Any]:
    known = set(ResourceRequest.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidRequest(f"launch.request has unknown field(s): {', '.join(unknown)}")
    return dict(data)


# -- vfolders ------------------------------------------------------------------------------
def vfolder_from_wire(data: dict[str, Any]) -> VFolder:
    names = {f.name for f in dataclasses.fields(VFolder)}
    values = {k: v for k, v in data.items() if k in names}
    gp = values.get("group_permission")
    values["group_permission"] = Permission.parse(gp) if gp else None
    return VFolder(**values)


def share_from_wire(data: dict[str, Any]) -> Share:
    names = {f.name for f in dataclasses.fields(Share)}
    values = {k: v for k, v in data.items() if k in names}
    values["permission"] = Permission.parse(values["permission"])
    return Share(**values)


def file_entry_from_wire(data: dict[str, Any]) -> FileEntry:
    return FileEntry(data["name"], data["type"], int(data["size"]), float(data["mtime"]))
