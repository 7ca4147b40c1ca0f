"""Batch sessions: a command run in a container once its dependencies have succeeded.

A batch session (or a whole pipeline of them) is checked like a kernel — its image, its
resources against the host and the owner's policy, its vfolders — plus what only a batch
has: a name, a command, an environment, dependencies on the owner's other sessions (no
unknown ones, no cycles). The pipeline is queued in one store transaction, all or nothing.

The manager process that created a batch session runs it: a task per session waits in the
queue like a kernel's start, starts the container on the devices the scheduler gave it,
waits for the command's exit off the event loop, keeps the log and ends the session with
the exit code. Dependents are placed — or cancelled with ``dependency-failed`` — by the
scheduling pass that runs the moment a dependency ends. When the creating process goes
away, the reconcile pass of any other process ends its batch sessions (containers
removed), as it does for kernels of a gone process.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..core.errors import GPUSessionsError, InvalidRequest, PolicyViolation
from ..core.models import (
    SESSION_ID,
    SESSION_NAME,
    ExitState,
    ResourceRequest,
    RuntimeHandle,
    Session,
)
from ..core.status import SessionStatus
from ..engine import KernelLaunch
from ..runtime.base import LABEL_PREFIX
from .launching import _EndedMeanwhile
from .lifecycle import STARTING, crash_reason

if TYPE_CHECKING:
    from . import GPUSessionManager

S = SessionStatus
SPEC_FIELDS = frozenset(
    {"type", "name", "image", "command", "resources", "vfolders", "depends_on", "env", "runtime"}
)
RESOURCE_FIELDS = tuple(ResourceRequest.__dataclass_fields__)
MAX_PIPELINE = 100  # sessions in one POST
MAX_ARGS = 1024
MAX_COMMAND_CHARS = 64 * 1024
MAX_ENV = 256
MAX_ENV_CHARS = 64 * 1024
MAX_DEPENDS = 64
MAX_VFOLDERS = 32
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
# Loose: the engine checks the reference itself; this keeps spaces and control characters out.
IMAGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")
SHUTDOWN_REASON = "server-shutdown: the server that ran it shut down"
QUEUE_POLL = 0.1  # seconds between looks at the queued batch sessions of this process


@dataclass
class BatchSpec:
    """One batch session as asked for, checked field by field."""

    name: str
    image: str
    command: list[str]
    request: ResourceRequest
    vfolders: list[str]
    depends_on: list[str]  # names or ids, as given
    env: dict[str, str]
    runtime: str


def parse_spec(data: Any, default_image: str, where: str = "") -> BatchSpec:
    """A batch session from its JSON object; every field checked, with a message that says
    which field of which session is wrong and what to send instead."""
    at = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise InvalidRequest(
            f"{at}a batch session is a JSON object, e.g. "
            '{"type": "batch", "name": "prep", "command": ["python3", "prep.py"]}'
        )
    unknown = sorted(set(data) - SPEC_FIELDS)
    if unknown:
        raise InvalidRequest(
            f"{at}unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(SPEC_FIELDS))}"
        )
    kind = data.get("type", "batch")
    if kind != "batch":
        raise InvalidRequest(
            f'{at}type {kind!r}: only "batch" sessions are created here (interactive sessions '
            "are kernels: start one from JupyterLab or a kernel client)"
        )
    name = data.get("name")
    if not isinstance(name, str) or not SESSION_NAME.fullmatch(name):
        raise InvalidRequest(
            f"{at}name {name!r}: a batch session needs a name of 1 to 64 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit (e.g. \"prep\")"
        )
    at = f"{where} ({name}): " if where else f"{name}: "
    image = data.get("image")
    if image is None or image == "":
        image = default_image
    if not isinstance(image, str) or not IMAGE_REF.fullmatch(image):
        raise InvalidRequest(f"{at}image {image!r} is not an image reference such as python:3.12")
    runtime = data.get("runtime", "docker")
    if runtime != "docker":
        raise InvalidRequest(
            f'{at}runtime {runtime!r}: batch sessions run in containers (runtime "docker"): '
            "a local process would outlive a server that dies, with nothing to stop it"
        )
    return BatchSpec(
        name=name,
        image=image,
        command=_command(data.get("command"), at),
        request=_resources(data.get("resources"), at),
        vfolders=_strings(data.get("vfolders"), "vfolders", MAX_VFOLDERS, at),
        depends_on=_strings(data.get("depends_on"), "depends_on", MAX_DEPENDS, at),
        env=_env(data.get("env"), at),
        runtime=runtime,
    )


def _command(value: Any, at: str) -> list[str]:
    hint = 'send a list of strings (["python3", "train.py"]) or a shell string ("make all")'
    if isinstance(value, str):
        if not value.strip():
            raise InvalidRequest(f"{at}the command is empty: {hint}")
        argv = ["sh", "-c", value]
    elif isinstance(value, list) and value and all(isinstance(a, str) for a in value):
        argv = list(value)
        if not argv[0]:
            raise InvalidRequest(f"{at}the command's program (its first item) is empty: {hint}")
    else:
        raise InvalidRequest(f"{at}command {value!r:.80}: {hint}")
    if len(argv) > MAX_ARGS or sum(len(a) for a in argv) > MAX_COMMAND_CHARS:
        raise InvalidRequest(
            f"{at}the command is too long (at most {MAX_ARGS} arguments and "
            f"{MAX_COMMAND_CHARS // 1024} KiB): put it in a script in a vfolder and run that"
        )
    if any("\x00" in a for a in argv):
        raise InvalidRequest(f"{at}the command contains a NUL character")
    return argv


def _resources(value: Any, at: str) -> ResourceRequest:
    if value is None:
        return ResourceRequest()
    if not isinstance(value, dict):
        raise InvalidRequest(
            f'{at}resources must be an object such as {{"gpus": 1, "memory": "8GiB"}}'
        )
    unknown = sorted(set(value) - set(RESOURCE_FIELDS))
    if unknown:
        raise InvalidRequest(
            f"{at}unknown resource(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(RESOURCE_FIELDS)}"
        )
    for key, item in value.items():
        if not isinstance(item, str | int | float | type(None)):
            raise InvalidRequest(
                f"{at}resources.{key} must be a number or a string, not {item!r:.40}"
            )
    try:
        return ResourceRequest.parse(**value)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{at}{exc.message}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"{at}resources: {exc}") from None


def _strings(value: Any, what: str, most: int, at: str) -> list[str]:
    if value is None:
        return []
    if (
        not isinstance(value, list)
        or not all(isinstance(v, str) and 0 < len(v) <= 256 and "\x00" not in v for v in value)
        or len(value) > most
    ):
        raise InvalidRequest(f"{at}{what} must be a list of at most {most} non-empty strings")
    return list(dict.fromkeys(value))


def _env(value: Any, at: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_ENV:
        raise InvalidRequest(f"{at}env must be an object of at most {MAX_ENV} names → strings")
    size = 0
    for key, item in value.items():
        if not ENV_NAME.fullmatch(key):
            raise InvalidRequest(
                f"{at}env name {key!r:.80} is not a variable name (letters, digits, '_')"
            )
        if not isinstance(item, str) or "\x00" in item:
            raise InvalidRequest(f"{at}env {key} must be a string (without NUL characters)")
        size += len(key) + len(item)
    if size > MAX_ENV_CHARS:
        raise InvalidRequest(f"{at}env is larger than {MAX_ENV_CHARS // 1024} KiB")
    return dict(value)


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle among ``edges`` (name → names it depends on), as a path that ends
    where it started; None when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in edges.get(node, ()):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in edges:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def batch_outcome(state: ExitState, memory: int | None) -> tuple[SessionStatus, str]:
    """How a batch session ends, from how its container did."""
    if state.oom_killed:
        return S.ERROR, crash_reason(state, memory)
    if state.error:
        return S.ERROR, f"container-failed: {state.error} (exit code {state.exit_code})"
    if state.exit_code == 0:
        return S.TERMINATED, "command finished"
    return S.TERMINATED, f"command exited with code {state.exit_code}"


class BatchSessions:
    """Creating batch sessions and running them; mixed into :class:`GPUSessionManager`."""

    # -- creating --------------------------------------------------------------------------
    async def create_batches(
        self: GPUSessionManager,
        owner: str,
        specs: list[Any],
        *,
        working_dir: str | None = None,
    ) -> list[Session]:
        """Check and queue ``specs`` (a pipeline: dependencies may name one another) in one
        transaction, all or nothing; each then runs from this process."""
        if not isinstance(specs, list) or not specs:
            raise InvalidRequest(
                'Send one batch session, or {"sessions": [...]} with at least one.'
            )
        if len(specs) > MAX_PIPELINE:
            raise InvalidRequest(f"At most {MAX_PIPELINE} sessions can be created at once.")
        many = len(specs) > 1
        parsed = [
            parse_spec(data, self.default_image, f"sessions[{i}]" if many else "")
            for i, data in enumerate(specs)
        ]
        ids: dict[str, str] = {}
        for spec in parsed:
            if spec.name in ids:
                raise InvalidRequest(
                    f"The name {spec.name!r} is given to two sessions of this request: names "
                    "tell the sessions of a pipeline apart."
                )
            ids[spec.name] = uuid.uuid4().hex
        depends = await asyncio.to_thread(self._resolve_dependencies, owner, parsed, ids)
        cycle = find_cycle({s.name: [d for d in s.depends_on if d in ids] for s in parsed})
        if cycle:
            raise InvalidRequest(
                f"These sessions depend on one another in a cycle, so none could ever start: "
                f"{' → '.join(cycle)}. Remove one of those dependencies.",
                reason="dependency-cycle",
            )
        cwd = self._working_dir(working_dir or "")
        launches = [self._batch_launch_of(owner, spec, cwd) for spec in parsed]
        policy = None
        for spec, launch in zip(parsed, launches, strict=True):
            try:
                policy = await self._check_launch(launch, what="batch session")
            except GPUSessionsError as exc:
                if many:
                    exc.args = (f"{spec.name}: {exc.message}", *exc.args[1:])
                raise
        limit = policy.max_pending_sessions if policy is not None else None

        def admit(totals) -> None:
            if limit is not None and totals.pending + len(parsed) > limit:
                raise PolicyViolation(
                    f"{owner} has {totals.pending} queued session(s); {len(parsed)} more would "
                    f"pass max_pending_sessions ({limit}): wait for some to start, or end some."
                )

        now = time.time()
        sessions = [
            Session(
                id=ids[spec.name],
                owner=owner,
                image=spec.image,
                request=spec.request,
                runtime=spec.runtime,
                process=self.process,
                kind="batch",
                name=spec.name,
                depends_on=tuple(depends[spec.name]),
                created_at=now + i * 1e-6,  # the order they were given in
                launch={
                    "command": spec.command,
                    "vfolders": spec.vfolders,
                    "env": spec.env,
                    "cwd": cwd,
                },
            )
            for i, spec in enumerate(parsed)
        ]
        created = await asyncio.to_thread(
            self.store.add_many, sessions, admit=admit, unique_names=True
        )
        self.ensure_reconciler()
        for session in created:
            self._emit(session, None)
            self._starting[session.id] = math.inf  # this process starts it once placed
            self._batches[session.id] = asyncio.ensure_future(self._run_batch(session))
        return created

    def _resolve_dependencies(
        self: GPUSessionManager, owner: str, parsed: list[BatchSpec], ids: dict[str, str]
    ) -> dict[str, list[str]]:
        """Each session's dependencies as ids: names in this request first, else the
        owner's own sessions by id or name (blocking)."""
        resolved: dict[str, list[str]] = {}
        for spec in parsed:
            found = []
            for ref in spec.depends_on:
                if ref == spec.name or ref == ids[spec.name]:
                    raise InvalidRequest(
                        f"{spec.name} depends on itself, so it could never start: remove "
                        f"{ref!r} from its depends_on.",
                        reason="dependency-cycle",
                    )
                if ref in ids:
                    found.append(ids[ref])
                    continue
                session = None
                if SESSION_ID.fullmatch(ref) or SESSION_NAME.fullmatch(ref):
                    session = self.store.find(ref, owner)
                if session is None:
                    raise InvalidRequest(
                        f"{spec.name} depends on {ref!r}, which is neither a session of yours "
                        "(by name or id) nor a session of this request.",
                        reason="unknown-dependency",
                    )
                found.append(session.id)
            resolved[spec.name] = list(dict.fromkeys(found))
        return resolved

    @staticmethod
    def _batch_launch_of(owner: str, spec: BatchSpec, cwd: str) -> KernelLaunch:
        return KernelLaunch(
            kernel_id="",
            owner=owner,
            image=spec.image,
            argv=list(spec.command),
            env={},
            explicit_env=dict(spec.env),
            cwd=cwd,
            request=spec.request,
            runtime=spec.runtime,
            connection_file="",
            connection_info={},
            launch_timeout=0.0,
            name=spec.name,
            vfolders=list(spec.vfolders),
            labels={LABEL_PREFIX + "kind": "batch"},
        )

    def _batch_launch(self: GPUSessionManager, session: Session) -> KernelLaunch:
        launch = session.launch or {}
        spec = BatchSpec(
            name=session.name,
            image=session.image,
            command=list(launch.get("command") or ()),
            request=session.request,
            vfolders=list(launch.get("vfolders") or ()),
            depends_on=[],
            env=dict(launch.get("env") or {}),
            runtime=session.runtime,
        )
        return self._batch_launch_of(session.owner, spec, launch.get("cwd") or "")

    # -- running ---------------------------------------------------------------------------
    async def _run_batch(self: GPUSessionManager, session: Session) -> None:
        """Queue → container → exit → end, for one batch session of this process."""
        try:
            await self._supervise_batch(session)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not leave the task's failure unseen
            self.log.exception("Batch session %s (%s) failed", session.id[:12], session.name)
        finally:
            self._batches.pop(session.id, None)
            self._starting.pop(session.id, None)

    async def _supervise_batch(self: GPUSessionManager, session: Session) -> None:
        if session.status == S.PENDING:
            try:
                session = await self._placed(session)
            except asyncio.CancelledError:
                # Nobody will start it: cancelled (its devices back at once if just placed).
                abandoned = self.finish(session, S.CANCELLED, "start abandoned while queued")
                await asyncio.shield(abandoned)
                raise
            if session.status == S.PREPARING:
                self._emit(session, S.PENDING)
        if session.status == S.TERMINATING:
            await self.finish(session, S.CANCELLED, session.reason)
            return
        if session.status != S.PREPARING:
            return  # cancelled while queued (a dependency failed, a delete)
        runtime = self.runtime(session.runtime)
        handle = await self._launch_batch(session, runtime)
        if handle is None:
            return
        state = await self._batch_exit(runtime, handle)
        latest = await asyncio.to_thread(self.store.get, session.id, history=False)
        if latest.status != S.RUNNING:
            return  # someone is ending it (a delete): that end records how
        status, reason = batch_outcome(state, latest.request.memory)
        self.log.info("Batch session %s (%s): %s", latest.id[:12], latest.name, reason)
        await self.finish(latest, status, reason, exit_state=state)

    async def _placed(self: GPUSessionManager, session: Session) -> Session:
        """Until the queue places ``session`` (PREPARING) or it is ended meanwhile. One
        watcher per loop polls for all of this process's queued batch sessions, so a
        pipeline of a hundred costs what one queued kernel does."""
        loop = asyncio.get_running_loop()
        left: asyncio.Future = loop.create_future()
        self._queued_batches[session.id] = left
        watcher = self._batch_watcher
        if watcher is None or watcher.done() or watcher.get_loop() is not loop:
            self._batch_watcher = asyncio.ensure_future(self._watch_batch_queue())
        try:
            return await left
        finally:
            self._queued_batches.pop(session.id, None)

    async def _watch_batch_queue(self: GPUSessionManager) -> None:
        """Run passes when the store changed (another process's release) or every
        ``schedule_interval``, and tell each queued batch session when it leaves the queue;
        woken at once by this loop's own passes (a dependency ended here)."""
        loop = asyncio.get_running_loop()
        marker = None
        last_pass = -math.inf
        while self._queued_batches:
            try:
                current = await asyncio.to_thread(self.store.change_marker)
                if current != marker or loop.time() - last_pass >= self.schedule_interval:
                    marker, last_pass = current, loop.time()
                    await self.schedule_now()
                waiting = {k: f for k, f in self._queued_batches.items() if not f.done()}
                statuses = await asyncio.to_thread(self.store.statuses, list(waiting))
                for session_id, left in waiting.items():
                    if statuses.get(session_id, S.PENDING) == S.PENDING or left.done():
                        continue
                    try:
                        found = await asyncio.to_thread(self.store.get, session_id, history=False)
                    except GPUSessionsError as exc:  # deleted from the store meanwhile
                        left.set_exception(exc)
                        continue
                    if not left.done():
                        left.set_result(found)
            except asyncio.CancelledError:
                raise
            except Exception:  # the store hiccupped: the queued sessions wait on
                self.log.warning("Watching queued batch sessions failed", exc_info=True)
                await asyncio.sleep(1.0)
            await self._queue_news(QUEUE_POLL)

    async def _launch_batch(
        self: GPUSessionManager, session: Session, runtime
    ) -> RuntimeHandle | None:
        """Start the command's container on the session's devices; RUNNING once started.
        On failure nothing is left: no container, the session ended with why."""
        try:
            launch = self._batch_launch(session)
            spec = await asyncio.to_thread(self._launch_spec, session, launch)
            spec = replace(spec, batch=True)
            # session.json too (JUPYTER_GPU_SESSIONS_INFO); env and socket mount come
            # with _launch_spec (session_api_env / session_api_mounts).
            await asyncio.to_thread(self._prepare_state_dir, spec, "", session)
            handle = await runtime.start(spec)
            self._handles[session.id] = handle
            recorded = await asyncio.to_thread(
                self.store.update, session.id, only_from=STARTING, container_id=handle.id
            )
            if recorded is None:
                raise _EndedMeanwhile()
            running = await self._transition(
                session,
                S.RUNNING,
                "command started",
                only_from=STARTING,
                container_id=handle.id,
            )
            if running is None:
                raise _EndedMeanwhile()
            # Its exit is this task's to record, not the reconcile pass's.
            self._stop_expected[session.id] = math.inf
            self._starting.pop(session.id, None)
            return handle
        except BaseException as exc:
            await asyncio.shield(self._abort_batch(session, exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return None

    async def _abort_batch(self: GPUSessionManager, session: Session, exc: BaseException) -> None:
        latest = await asyncio.to_thread(self.store.get, session.id, history=False)
        if latest.status.is_terminal:  # ended by someone else meanwhile: remove what we made
            runtime = self.runtime(latest.runtime)
            for handle in await self._handles_of(latest):
                await runtime.remove(handle)
            self._handles.pop(latest.id, None)
            return
        if latest.status == S.TERMINATING or isinstance(exc, _EndedMeanwhile):
            await self.finish(latest, S.CANCELLED, latest.reason or "ended while starting")
            return
        if isinstance(exc, asyncio.CancelledError):
            reason = "start cancelled"
        elif isinstance(exc, GPUSessionsError):
            reason = f"{exc.reason}: {exc.message.splitlines()[0]}"
        else:
            self.log.error("Batch session %s could not start", session.id[:12], exc_info=exc)
            reason = f"start-failed: {type(exc).__name__}: {exc}"
        await self.finish(latest, S.ERROR, reason)

    async def _batch_exit(self: GPUSessionManager, runtime, handle: RuntimeHandle) -> ExitState:
        """How the command's container ended; while the engine cannot be reached, asked
        again (the command runs on meanwhile)."""
        while True:
            try:
                return await runtime.wait(handle)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning(
                    "Waiting for batch container %s failed (%s); trying again", handle.name, exc
                )
                await asyncio.sleep(2.0)

    # -- this process's end ----------------------------------------------------------------
    async def end_batches(self: GPUSessionManager, reason: str = SHUTDOWN_REASON) -> None:
        """End every batch session this process runs (its server shuts down): queued ones
        are cancelled, running ones get SIGTERM and ``batch_stop_timeout`` before they are
        killed, and their devices are freed. Nothing else would supervise them: the reconcile
        pass of another process would only end them once this process is gone."""
        tasks = dict(self._batches)
        if not tasks:
            return

        async def end(session_id: str) -> None:
            try:
                await self.end_session(session_id, reason)
            except Exception:
                self.log.warning("Could not end batch session %s", session_id, exc_info=True)

        await asyncio.gather(*(end(session_id) for session_id in tasks))
        _, late = await asyncio.wait(tasks.values(), timeout=self.batch_stop_timeout + 10)
        for task in late:
            task.cancel()
