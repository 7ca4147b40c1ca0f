"""The engine RPC of the manager service: ``POST {base}gpu-sessions/api/engine/{method}``
with ``{"args": {...}}`` → ``{"result": ...}``; errors as the API answers them (``message``,
``reason``, ``error``: the ``core.errors`` class) with the API's status codes.

Users' servers in remote mode (``RemoteEngine``) call every engine operation here. Whoever
calls acts as the identity its authentication gives (Hub OAuth, or the service's token
standalone), never as one named in the body. Kernel operations act only on sessions the
caller owns: the session is loaded from the store by its id and its owner checked; a
session sent along is never trusted. ``METHODS`` is the one allowlist.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tornado import web

from ..core.errors import (
    Conflict,
    GPUSessionsError,
    InvalidRequest,
    NotFound,
    PolicyViolation,
    SessionNotFound,
    StartCancelled,
)
from ..core.identity import Identity, require_admin
from ..core.models import SESSION_ID, Session
from ..core.status import SessionStatus
from ..engine import Engine, KernelLaunch
from ..remote import wire  # the one codec of the RPC
from .base import GPUSessionsHandler, presented_session_token

# A ``wait_kernel`` call returns after this long at most (the client calls again).
MAX_WAIT = 20.0
# After progress lines, how long an answer waits for the outcome before it goes.
LINGER = 0.5
# A finished start's outcome is kept this long for a client that asks again.
KEEP_FINISHED = 120.0
_MISSING = object()


@dataclass
class _Start:
    """One kernel start under way in the service, for the server that asked for it."""

    owner: str
    task: asyncio.Future | None = None  # set as soon as the start is under way
    lines: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self, line: str) -> None:
        self.lines.append(line)
        self._wake()

    def _wake(self) -> None:
        # A fresh event per change: waiters hold the one that was current when they began.
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class KernelStarts:
    """Kernel starts run here as tasks, so a start goes on (and finishes, or cleans up)
    when the server that asked for it goes away; its server long-polls for progress."""

    def __init__(self) -> None:
        self.starts: dict[str, _Start] = {}

    def begin(
        self,
        session_id: str,
        owner: str,
        run: Callable[[Callable[[str], None]], Awaitable[Session]],
    ) -> bool:
        """Start ``run(progress)`` unless a start of ``session_id`` is under way (False)."""
        current = self.starts.get(session_id)
        if current is not None and current.task is not None and not current.task.done():
            return False
        start = _Start(owner)
        start.task = asyncio.ensure_future(run(start.note))
        start.task.add_done_callback(lambda task: self._finished(session_id, start, task))
        self.starts[session_id] = start
        return True

    def _finished(self, session_id: str, start: _Start, task: asyncio.Task) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: it is answered to the waiting server, if any
        start._wake()

        def forget() -> None:
            if self.starts.get(session_id) is start:
                del self.starts[session_id]

        asyncio.get_running_loop().call_later(KEEP_FINISHED, forget)

    async def wait(self, session_id: str, owner: str, seen: int, timeout: float) -> dict:
        """Progress lines after the first ``seen``, and the outcome once the start ended
        (its error raised as it was), within ``timeout`` seconds."""
        start = self.starts.get(session_id)
        if start is None or start.task is None or start.owner != owner:
            raise NotFound(
                f"No start of session {session_id[:12]} is under way in the manager service "
                "(it restarted, or the start ended long ago): start the kernel again."
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if len(start.lines) <= seen and not start.task.done():
            changed = asyncio.ensure_future(start.changed.wait())
            try:
                await asyncio.wait({changed, start.task}, timeout=timeout)
            finally:
                changed.cancel()
        if not start.task.done():
            # New lines: a moment more for the outcome, so that a start that is about to
            # end costs its server one round trip, not one per line.
            linger = min(LINGER, max(0.0, deadline - loop.time()))
            await asyncio.wait({start.task}, timeout=linger)
        answer: dict[str, Any] = {"lines": start.lines[seen:], "done": start.task.done()}
        if start.task.done():
            if start.task.cancelled():
                raise StartCancelled(
                    "The manager service stopped this kernel's start (it is shutting down): "
                    "start the kernel again once it is back.",
                    reason="service-stopping",
                )
            session = start.task.result()  # its error, as the start raised it
            answer["session"] = wire.session_to_wire(session)
        return answer


class Call:
    """One RPC: the caller, the engine and the arguments, each checked as it is read."""

    def __init__(self, handler: EngineRPCHandler, args: dict[str, Any]) -> None:
        self.handler = handler
        self.args = args
        self.who: Identity = handler.who
        self.engine: Engine = handler.engine

    @property
    def starts(self) -> KernelStarts:
        return self.handler.starts

    def arg(self, name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        if name not in self.args or (self.args[name] is None and default is None):
            if default is _MISSING:
                raise InvalidRequest(f"args.{name} is required")
            return default
        value = self.args[name]
        bad_bool = isinstance(value, bool) and bool not in (
            kind if isinstance(kind, tuple) else (kind,)
        )
        if not isinstance(value, kind) or bad_bool:
            raise InvalidRequest(f"args.{name} is of the wrong type")
        return value

    def session_id(self, name: str = "session_id") -> str:
        value = self.arg(name, str)
        if not SESSION_ID.fullmatch(value):
            raise SessionNotFound(f"No session {value!r:.80}: ids are 32 hexadecimal digits.")
        return value

    async def own_session(self) -> Session:
        """The stored session of ``args.session_id``, if the caller owns it (an admin too:
        kernel operations act on one's own kernels only)."""
        return await self.engine.own_session(self.who, self.session_id())

    def launch(self) -> KernelLaunch:
        """The launch sent, as this caller may ask for it: owned by the caller, in a
        container, with none of the caller's own labels, its image on the allowlist."""
        launch = wire.launch_from_wire(self.arg("launch", dict))
        if launch.runtime != "docker":
            raise PolicyViolation(
                f"Kernels of the manager service run in containers: runtime {launch.runtime!r} "
                "is not served here. Use a kernelspec whose runtime is docker.",
                reason="runtime-not-allowed",
            )
        launch.owner = self.who.username
        launch.labels = {}
        # The kernelspec is the caller's to edit: any image but the default one is a choice,
        # held to the image allowlist whatever the caller says.
        launch.image_chosen = launch.image != self.engine.default_image
        return launch


Method = Callable[[Call], Awaitable[Any]]


# -- kernel sessions: the provisioner's side -----------------------------------------------
async def _default_image(call: Call) -> Any:
    return call.engine.default_image


async def _whoami(call: Call) -> Any:
    who = call.who
    return {"username": who.username, "groups": sorted(who.groups), "is_admin": who.is_admin}


async def _submit(call: Call) -> Any:
    """Queue a kernel start; with ``start`` true, also begin it here at once (what a remote
    engine asks for), so a server that goes away right after its client was answered
    leaves a start that goes on, not a session queued for nobody."""
    launch = call.launch()
    start = call.arg("start", bool, False)
    session = await call.engine.submit(launch)
    if start:
        _begin_start(call, launch, session)
    return wire.session_to_wire(session)


def _begin_start(call: Call, launch: KernelLaunch, session: Session) -> bool:
    engine = call.engine

    async def run(progress: Callable[[str], None]) -> Session:
        return await engine.start_kernel(launch, session, progress=progress)

    return call.starts.begin(session.id, call.who.username, run)


async def _start_kernel(call: Call) -> Any:
    """(Re)start the kernel of a stored session of the caller's; it runs here as a task
    (``wait_kernel`` follows it)."""
    launch = call.launch()
    session = await call.own_session()
    if launch.kernel_id != session.kernel_id:
        raise InvalidRequest("launch.kernel_id is not the kernel of this session")
    return {"started": _begin_start(call, launch, session)}


async def _wait_kernel(call: Call) -> Any:
    session_id = call.session_id()
    seen = call.arg("seen", int, 0)
    wait = float(call.arg("wait", (int, float), MAX_WAIT))
    if seen < 0 or not 0 <= wait <= MAX_WAIT:
        raise InvalidRequest(f"args.seen must be 0 or more, args.wait 0 to {MAX_WAIT:g} seconds")
    answer = await call.starts.wait(session_id, call.who.username, seen, wait)
    if answer["done"]:
        handle = call.engine.handle(wire.session_from_wire(answer["session"]))
        answer["handle"] = wire.handle_to_wire(handle)
    return answer


async def _poll(call: Call) -> Any:
    return wire.exit_to_wire(await call.engine.poll(await call.own_session()))


async def _signal(call: Call) -> Any:
    signum = call.arg("signum", int)
    if not 0 < signum < 65:
        raise InvalidRequest(f"signal {signum} is not a signal number")
    await call.engine.signal(await call.own_session(), signum)


async def _expect_stop(call: Call) -> Any:
    call.engine.expect_stop((await call.own_session()).id)


async def _note_exit(call: Call) -> Any:
    state = wire.exit_from_wire(call.arg("state", dict))
    assert state is not None
    return wire.session_to_wire(await call.engine.note_exit(await call.own_session(), state))


async def _stop_kernel(call: Call) -> Any:
    restart = call.arg("restart", bool)
    reason = call.arg("reason", str, "")
    session = await call.own_session()
    return wire.session_to_wire(
        await call.engine.stop_kernel(session, restart=restart, reason=reason)
    )


async def _adopt(call: Call) -> Any:
    session = await call.own_session()
    # The service's own handle, never the caller's: a handle names a container, and a
    # forged one would let a caller signal someone else's.
    handle = call.engine.handle(session)
    if handle is None and session.status == SessionStatus.RUNNING:
        # A service restarted after a crash knows its predecessor's kernels once it has
        # looked at them: a poll adopts one whose container still runs.
        await call.engine.poll(session)
        handle = call.engine.handle(session)
    if handle is None:
        raise Conflict(
            f"The manager service does not supervise the kernel of session {session.id[:12]} "
            "(it was restarted and has not adopted it): start the kernel again."
        )
    adopted = await call.engine.adopt(session.id, handle)
    return {"session": wire.session_to_wire(adopted), "handle": wire.handle_to_wire(handle)}


async def _set_stop_reason(call: Call) -> Any:
    reason = call.arg("reason", str)
    call.engine.set_stop_reason((await call.own_session()).id, reason)


async def _end_session(call: Call) -> Any:
    reason = call.arg("reason", str)
    if call.arg("own", bool, False):  # the caller's own kernel (who None in the interface)
        session = await call.own_session()
        ended = await call.engine.end_session(call.who, session.id, reason)
    else:
        ended = await call.engine.end_session(call.who, call.session_id(), reason)
    return wire.session_to_wire(ended)


async def _running_kernels(call: Call) -> Any:
    return await call.engine.running_kernels(call.who)


async def _note_attachment(call: Call) -> Any:
    attachment = call.arg("attachment", dict)
    await call.engine.note_attachment((await call.own_session()).id, attachment)


# The most kernels one server shutdown lets go of in one call.
MAX_DETACHED = 256


async def _note_detached(call: Call) -> Any:
    ids = call.arg("session_ids", list)
    if len(ids) > MAX_DETACHED or not all(
        isinstance(i, str) and SESSION_ID.fullmatch(i) for i in ids
    ):
        raise InvalidRequest(
            f"args.session_ids must be a list of at most {MAX_DETACHED} session ids "
            "(32 hexadecimal digits each)"
        )
    owned = []
    for session_id in dict.fromkeys(ids):
        try:
            owned.append((await call.engine.own_session(call.who, session_id)).id)
        except SessionNotFound:
            continue  # ended meanwhile, or not the caller's: nothing to let go of
    await call.engine.note_detached(owned)


async def _token_owner(call: Call) -> Any:
    owner = await call.engine.token_owner(call.arg("token", str))
    return owner if owner == call.who.username else None


# -- what people see and do ----------------------------------------------------------------
async def _sessions_page(call: Call) -> Any:
    raw = call.arg("statuses", list, None)
    try:
        statuses = None if raw is None else [SessionStatus(s) for s in raw]
    except ValueError:
        raise InvalidRequest(f"args.statuses {raw!r} are not all statuses") from None
    body = await call.engine.sessions_page(
        call.who,
        owner=call.arg("owner", str, None),
        statuses=statuses,
        limit=call.arg("limit", int),
        offset=call.arg("offset", int),
    )
    return json.loads(body)


async def _get_session(call: Call) -> Any:
    return await call.engine.get_session(call.who, call.session_id())


async def _create_sessions(call: Call) -> Any:
    # Never the service's own directory (the Hub's): the one the user's server sent, or
    # the caller's home.
    where = call.handler.app.batch_working_dir(call.who, call.arg("working_dir", str, None))
    return await call.engine.create_sessions(call.who, call.arg("specs", list), working_dir=where)


async def _resolve_session(call: Call) -> Any:
    return await call.engine.resolve_session(call.who, call.arg("ref", str))


async def _dependents(call: Call) -> Any:
    return await call.engine.dependents(call.who, call.session_id())


async def _session_logs(call: Call) -> Any:
    return await call.engine.session_logs(
        call.who, call.session_id(), tail=call.arg("tail", int, 200)
    )


async def _session_history(call: Call) -> Any:
    return await call.engine.session_history(call.who, call.session_id())


async def _session_graph(call: Call) -> Any:
    direction = call.arg("direction", str, "both")
    if direction not in ("up", "down", "both"):
        raise InvalidRequest(f"direction {direction!r}: use up, down or both")
    return await call.engine.session_graph(call.who, call.session_id(), direction)


async def _gpus(call: Call) -> Any:
    return await call.engine.gpus(call.who)


async def _launcher(call: Call) -> Any:
    return await call.engine.launcher(call.who, call.arg("kernelspecs", list))


async def _quota(call: Call) -> Any:
    return await call.engine.quota(call.who)


async def _idle_timeouts(call: Call) -> Any:
    owners = call.arg("owners", list)
    if not call.who.is_admin:  # one's own policy only
        owners = [o for o in owners if o == call.who.username]
    return await call.engine.idle_timeouts([str(o) for o in owners])


async def _policies(call: Call) -> Any:
    return await call.engine.policies(call.who)


async def _get_policy(call: Call) -> Any:
    return await call.engine.get_policy(call.who, call.arg("scope", str))


async def _put_policy(call: Call) -> Any:
    return await call.engine.put_policy(call.who, call.arg("scope", str), call.arg("limits", dict))


async def _delete_policy(call: Call) -> Any:
    await call.engine.delete_policy(call.who, call.arg("scope", str))


async def _scheduler_health(call: Call) -> Any:
    return await call.engine.scheduler_health(call.who)


async def _schedule_now(call: Call) -> Any:
    return await call.engine.schedule_now(call.who)


async def _clear_history(call: Call) -> Any:
    retention = float(call.arg("retention", (int, float)))
    return await call.engine.clear_history(call.who, retention, vacuum=call.arg("vacuum", bool))


async def _user_groups(call: Call) -> Any:
    # The service's view of the caller (their Hub groups came with their authentication).
    username = call.arg("username", str)
    if username != call.who.username:
        raise NotFound(f"You may only ask for your own groups, not {username!r}'s.")
    return sorted(call.who.groups)


async def _status_marker(call: Call) -> Any:
    return await call.engine.status_marker()


async def _status_changes(call: Call) -> Any:
    rows = await call.engine.status_changes(call.arg("since", int))
    if call.who.is_admin:
        return rows
    return [row for row in rows if row.get("owner") == call.who.username]


async def _diagnose(call: Call) -> Any:
    # The host's checks name its store's URL (credentials included) and paths: admins only.
    require_admin(call.who, "see the manager service's host checks")
    checks = await asyncio.to_thread(call.engine.diagnose)
    return [list(check) for check in checks]


# The one allowlist: every engine operation a server in remote mode may call. Vfolders go
# through the REST API's own routes (streamed), not through here.
METHODS: dict[str, Method] = {
    "default_image": _default_image,
    "whoami": _whoami,
    "submit": _submit,
    "start_kernel": _start_kernel,
    "wait_kernel": _wait_kernel,
    "poll": _poll,
    "signal": _signal,
    "expect_stop": _expect_stop,
    "note_exit": _note_exit,
    "stop_kernel": _stop_kernel,
    "adopt": _adopt,
    "set_stop_reason": _set_stop_reason,
    "end_session": _end_session,
    "running_kernels": _running_kernels,
    "note_attachment": _note_attachment,
    "note_detached": _note_detached,
    "token_owner": _token_owner,
    "sessions_page": _sessions_page,
    "get_session": _get_session,
    "create_sessions": _create_sessions,
    "resolve_session": _resolve_session,
    "dependents": _dependents,
    "session_logs": _session_logs,
    "session_history": _session_history,
    "session_graph": _session_graph,
    "gpus": _gpus,
    "launcher": _launcher,
    "quota": _quota,
    "idle_timeouts": _idle_timeouts,
    "policies": _policies,
    "get_policy": _get_policy,
    "put_policy": _put_policy,
    "delete_policy": _delete_policy,
    "scheduler_health": _scheduler_health,
    "schedule_now": _schedule_now,
    "clear_history": _clear_history,
    "user_groups": _user_groups,
    "status_marker": _status_marker,
    "status_changes": _status_changes,
    "diagnose": _diagnose,
}


class EngineRPCHandler(GPUSessionsHandler):
    """``POST engine/{method}``: one engine operation as the authenticated caller."""

    async def prepare(self) -> None:
        if presented_session_token(self) is not None:
            raise web.HTTPError(
                403,
                "A session's token may not call the engine: it acts for one kernel's owner on "
                "the REST API only. Use your Hub token (your server's, under JupyterHub).",
            )
        await super().prepare()

    @property
    def starts(self) -> KernelStarts:
        starts = self.settings.get("gpu_sessions_kernel_starts")
        if starts is None:
            starts = self.settings["gpu_sessions_kernel_starts"] = KernelStarts()
        return starts

    @web.authenticated
    async def post(self, method: str) -> None:
        run = METHODS.get(method)
        if run is None:
            raise NotFound(
                f"No engine method {method!r:.80}; the service answers: "
                f"{', '.join(sorted(METHODS))}."
            )
        args = self.body({"args"}, required=True).get("args", {})
        if not isinstance(args, dict):
            raise InvalidRequest('Send {"args": {...}}: args must be a JSON object.')
        started = time.monotonic()
        try:
            result = await run(Call(self, args))
        except GPUSessionsError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            # A field of a nested object that does not hold what it must (a bad body).
            raise InvalidRequest(f"engine/{method}: malformed arguments ({exc})") from exc
        self.log.debug("engine/%s %.1f ms", method, (time.monotonic() - started) * 1000)
        self.reply({"result": result})
