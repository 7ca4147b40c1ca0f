"""Detached kernels of the manager service: idle ones end past their owner's ``idle_timeout``.

A user's server culls its own idle kernels (``server/idle.py``). When the server stops and
does not come back (a crash, the Hub's culler of idle servers, a user who never returns),
its kernels run on in the manager service, and only the lifetime and GPU-idle limits would
ever end them. This watcher closes that gap, in the manager service only (an embedded
manager's kernels end with their server):

- **Attached or not.** Every kernel call of a server (its restarter polls every few
  seconds; signals, adoption, notes) marks the kernel seen. A RUNNING kernel of this
  process not seen for ``detached_after`` seconds is detached, and at once when its server
  said it let go of it (``Engine.note_detached``, at a clean shutdown). A call again means
  a server re-attached it.
- **Activity**, as jupyter_server learns it: the watcher subscribes to a detached kernel's
  iopub channel (the connection info the service recorded at its start) and keeps its
  busy/idle status and the time of its last message, under the same rule as jupyter_server
  (``untracked_message_types``). A cell already running when the server left sent its
  ``busy`` before anyone listened: one ``kernel_info_request`` on the shell channel tells
  (a kernel running a cell answers it only once the cell is done).
- **The end.** A detached kernel that is not busy and whose last activity (or the moment
  it was detached, whichever is later) is older than its owner's ``idle_timeout`` ends
  ``idle-timeout: no server attached …``: container removed, devices freed. A busy kernel
  (a long training cell) is kept; lifetime and GPU-idle still apply to it.

All of it runs on a thread of its own (ZMQ sockets polled there, passes every
``detached_check_interval`` seconds, its own event loop for ends), never on a server's
event loop; a kernel nobody detached costs a dictionary write per call.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq
from jupyter_client.session import Session as MessageSession

from ..core.errors import GPUSessionsError
from ..core.models import Session
from ..core.status import SessionStatus
from .lifecycle import same_process

if TYPE_CHECKING:
    from . import GPUSessionManager

# A kernel that does not answer kernel_info on its shell within this long is running a cell.
PROBE_TIMEOUT = 5.0
# What does not count as a person's activity on a kernel (jupyter_server's default list).
UNTRACKED = frozenset(
    {
        "comm_info_request",
        "comm_info_reply",
        "kernel_info_request",
        "kernel_info_reply",
        "shutdown_request",
        "shutdown_reply",
        "interrupt_request",
        "interrupt_reply",
        "debug_request",
        "debug_reply",
        "stream",
        "display_data",
        "update_display_data",
        "execute_input",
        "execute_result",
        "error",
        "status",
        "clear_output",
        "debug_event",
        "input_request",
        "input_reply",
    }
)


def idle_reason(owner: str, idle_for: float, timeout: float) -> str:
    return (
        f"idle-timeout: no server attached and no execution for {idle_for:.0f}s, past "
        f"{owner}'s idle_timeout of {timeout:g}s; its devices are free again"
    )


# -- the decision, on any clock ------------------------------------------------------------
@dataclass
class Attachment:
    """Whether a server is attached to a kernel, from when this process noticed it running,
    the last call of a server on it, and a server's word that it let go of it."""

    noticed_at: float
    seen_at: float | None = None
    let_go_at: float | None = None

    def seen(self, at: float) -> None:
        self.seen_at = max(at, self.seen_at or at)

    def let_go(self, at: float) -> None:
        self.let_go_at = max(at, self.let_go_at or at)

    def detached_since(self, now: float, detached_after: float) -> float | None:
        """Since when no server is attached; None while one is (or may be)."""
        seen = max(self.seen_at or self.noticed_at, self.noticed_at)
        if self.let_go_at is not None and (self.seen_at is None or self.let_go_at >= self.seen_at):
            return max(self.let_go_at, self.noticed_at)  # let go of, and no call since
        if now - seen >= detached_after:
            return seen
        return None


@dataclass
class Activity:
    """A kernel's activity as its channels tell it: busy (None: not known yet) and when the
    last message that counts arrived (None: none since listening began)."""

    busy: bool | None = None
    last_at: float | None = None


@dataclass(frozen=True)
class Verdict:
    action: str  # "attached", "listen", "busy", "idle", "end"
    idle_for: float = 0.0


def decide(
    attachment: Attachment,
    activity: Activity | None,
    *,
    now: float,
    detached_after: float,
    idle_timeout: float | None,
) -> Verdict:
    """What to do about one RUNNING kernel now: nothing while a server is attached (its own
    culler applies); listen once it is detached; end it when it is idle (not busy) past
    ``idle_timeout`` since its last activity or its detachment, whichever is later."""
    since = attachment.detached_since(now, detached_after)
    if since is None:
        return Verdict("attached")
    if activity is None:
        return Verdict("listen")
    if activity.busy is not False:
        return Verdict("busy")
    idle_for = now - max(since, activity.last_at or since)
    if idle_timeout and idle_for > idle_timeout:
        return Verdict("end", idle_for)
    return Verdict("idle", idle_for)


# -- one detached kernel's channels --------------------------------------------------------
class KernelChannels:
    """A detached kernel's iopub (SUB) and a shell (DEALER) socket for the one probe, read
    on the watcher's thread only."""

    def __init__(self, context: zmq.Context, connection: dict[str, Any], now: float) -> None:
        transport = connection.get("transport") or "tcp"
        ip = connection.get("ip") or "127.0.0.1"
        key = str(connection.get("key") or "").encode()
        self.session = MessageSession(
            key=key,
            signature_scheme=connection.get("signature_scheme") or "hmac-sha256",
            username="gpu-sessions",
            session=uuid.uuid4().hex,
        )
        self.activity = Activity()
        self.iopub = context.socket(zmq.SUB)
        self.shell = context.socket(zmq.DEALER)
        for socket in (self.iopub, self.shell):
            socket.linger = 0
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(f"{transport}://{ip}:{connection['iopub_port']}")
        self.shell.connect(f"{transport}://{ip}:{connection['shell_port']}")
        probe = self.session.msg("kernel_info_request", {})
        self.probe_id: str = probe["header"]["msg_id"]
        self.probe_sent = now
        self.probe_answered = False
        self.session.send(self.shell, probe)

    def sockets(self) -> tuple[zmq.Socket, zmq.Socket]:
        return self.iopub, self.shell

    def receive(self, socket: zmq.Socket, now: float) -> None:
        """Every message waiting on ``socket`` (non-blocking)."""
        while True:
            try:
                parts = socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            try:
                _idents, parts = self.session.feed_identities(parts)
                msg = self.session.deserialize(parts)
            except Exception:  # noqa: S112 - a message we cannot read is not activity
                continue
            self.handle(msg, shell=socket is self.shell, now=now)

    def handle(self, msg: dict[str, Any], *, shell: bool, now: float) -> None:
        """One message, as jupyter_server's activity watcher reads iopub; on the shell, the
        probe's reply. The probe's own status messages are not activity."""
        parent = msg.get("parent_header") or {}
        if parent.get("msg_id") == self.probe_id:
            if shell and not self.probe_answered:
                self._answered(now)
            return
        if shell:
            return
        msg_type = msg["header"]["msg_type"]
        if msg_type == "iopub_welcome":
            return  # the kernel greeting this subscription (ipykernel 7), not activity
        parent_type = parent.get("msg_type")
        activity = self.activity
        if msg_type not in UNTRACKED or parent_type not in UNTRACKED or activity.busy:
            activity.last_at = now
        if msg_type == "status" and parent_type not in UNTRACKED:
            activity.busy = msg["content"].get("execution_state") == "busy"

    def _answered(self, now: float) -> None:
        late = now - self.probe_sent > PROBE_TIMEOUT
        self.probe_answered = True
        self.activity.busy = False  # its shell is free: no cell runs
        if late:  # it was running a cell until just now
            self.activity.last_at = now

    def check_probe(self, now: float) -> None:
        """A probe unanswered for ``PROBE_TIMEOUT``: a cell runs (busy until it answers)."""
        if not self.probe_answered and now - self.probe_sent > PROBE_TIMEOUT:
            self.activity.busy = True

    def close(self) -> None:
        for socket in (self.iopub, self.shell):
            socket.close(linger=0)


# -- the watcher ---------------------------------------------------------------------------
class DetachedKernels:
    """The detached-kernel watcher; mixed into :class:`GPUSessionManager`."""

    def _init_kernel_watch(self: GPUSessionManager) -> None:
        # Written by callers' threads (a dict assignment each), read by the watcher.
        self._kernel_seen: dict[str, float] = {}
        self._kernel_let_go: dict[str, float] = {}
        # The watcher thread's own.
        self._attachments: dict[str, Attachment] = {}
        self._channels: dict[str, KernelChannels] = {}
        self._unwatchable: set[str] = set()  # said once: no connection info kept
        self._kernel_watch_thread: threading.Thread | None = None
        self._kernel_watch_stopping = threading.Event()

    def note_seen(self: GPUSessionManager, session_id: str) -> None:
        """A server called on the kernel of ``session_id``: it is attached."""
        if self.service_name:
            self._kernel_seen[session_id] = time.monotonic()

    def note_detached(self: GPUSessionManager, session_ids: list[str]) -> None:
        """A server let go of these kernels on purpose (it shuts down): detached now."""
        if self.service_name:
            now = time.monotonic()
            for session_id in session_ids:
                self._kernel_let_go[session_id] = now

    # -- the thread ------------------------------------------------------------------------
    def ensure_kernel_watch(self: GPUSessionManager) -> None:
        """Start the watcher once per process, in the manager service only."""
        if not self.service_name:
            return
        with self._lock:
            thread = self._kernel_watch_thread
            if thread is None or not thread.is_alive():
                self._kernel_watch_stopping = threading.Event()
                self._kernel_watch_thread = threading.Thread(
                    target=self._kernel_watch_loop,
                    args=(self._kernel_watch_stopping,),
                    name="gpu-sessions-kernel-watch",
                    daemon=True,
                )
                self._kernel_watch_thread.start()

    def stop_kernel_watch(self: GPUSessionManager, wait: bool = True) -> None:
        self._kernel_watch_stopping.set()
        thread = self._kernel_watch_thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        self._kernel_watch_thread = None

    def _kernel_watch_loop(self: GPUSessionManager, stopping: threading.Event) -> None:
        loop = asyncio.new_event_loop()  # the thread's own: ends never touch the server's
        context = zmq.Context()
        poller = zmq.Poller()
        registered: set[zmq.Socket] = set()
        next_pass = 0.0
        try:
            while not stopping.is_set():
                if time.monotonic() >= next_pass:
                    try:
                        self.kernel_watch_pass(context, loop)
                    except Exception:  # keep watching: one bad pass must not end it
                        if not stopping.is_set():
                            self.log.exception("Detached-kernel check failed")
                    next_pass = time.monotonic() + self.detached_check_interval
                    _sync_poller(poller, registered, self._channels)
                wait = max(0.0, next_pass - time.monotonic())
                if not registered:
                    stopping.wait(wait)
                    continue
                ready = dict(poller.poll(timeout=int(min(wait, 0.5) * 1000)))
                now = time.monotonic()
                for channels in list(self._channels.values()):
                    for socket in channels.sockets():
                        if socket in ready:
                            channels.receive(socket, now)
        finally:
            for channels in self._channels.values():
                channels.close()
            self._channels.clear()
            context.term()
            loop.close()

    # -- one pass --------------------------------------------------------------------------
    def kernel_watch_pass(
        self: GPUSessionManager, context: zmq.Context, loop: asyncio.AbstractEventLoop
    ) -> list[str]:
        """Look at this process's running kernels: listen to the detached ones, stop
        listening to re-attached ones, end the idle ones; return what was ended."""
        now = time.monotonic()
        candidates, live = self._kernel_watch_candidates()
        running = {session.id for session, _ in candidates}
        for gone in set(self._attachments) - running:
            self._forget_kernel(gone)  # ended, restarting, or no idle_timeout anywhere
        for gone in (set(self._kernel_seen) | set(self._kernel_let_go)) - live:
            self._forget_kernel(gone)
        ended = []
        for session, timeout in candidates:
            attachment = self._attachments.setdefault(session.id, Attachment(noticed_at=now))
            seen = self._kernel_seen.get(session.id)
            if seen is not None:
                attachment.seen(seen)
            let_go = self._kernel_let_go.get(session.id)
            if let_go is not None:
                attachment.let_go(let_go)
            channels = self._channels.get(session.id)
            if channels is not None:
                for socket in channels.sockets():
                    channels.receive(socket, now)
                channels.check_probe(now)
            verdict = decide(
                attachment,
                channels.activity if channels is not None else None,
                now=now,
                detached_after=self.detached_after,
                idle_timeout=timeout,
            )
            if verdict.action == "attached":
                self._stop_listening(session, "a server is attached again")
            elif verdict.action == "listen" and timeout:
                self._listen(context, session, now)
            elif verdict.action == "end" and timeout:
                reason = idle_reason(session.owner, verdict.idle_for, timeout)
                self._stop_listening(session, "")
                if loop.run_until_complete(self._end_detached(session, reason)):
                    ended.append(session.id)
        return ended

    def _kernel_watch_candidates(
        self: GPUSessionManager,
    ) -> tuple[list[tuple[Session, float | None]], set[str]]:
        """Running interactive kernels this process supervises (started or adopted), each
        with its owner's ``idle_timeout``, and the ids of all live sessions. Blocking (the
        watcher's thread)."""
        policies = self.refresh_policies()
        scopes = [policies.default, *policies.groups.values(), *policies.users.values()]
        if not any(p.idle_timeout for p in scopes):
            return [], set()  # nobody's policy has an idle_timeout: not even the store is read
        found = []
        live = set()
        for session in self.store.live():
            live.add(session.id)
            if (
                session.kind != "interactive"
                or session.status != SessionStatus.RUNNING
                or not (same_process(session.process, self.process) or session.id in self._handles)
            ):
                continue
            found.append((session, self.policy_for(session.owner).idle_timeout))
        return found, live

    def _listen(self: GPUSessionManager, context: zmq.Context, session: Session, now: float):
        if session.id in self._channels:
            return
        connection = self.store.kernel_connection(session.id)
        if not connection or not connection.get("iopub_port") or not connection.get("shell_port"):
            if session.id not in self._unwatchable:
                self._unwatchable.add(session.id)
                self.log.warning(
                    "Kernel %s (session %s): no server attached, but its connection info was "
                    "not kept: its activity cannot be watched, and idle_timeout does not end it",
                    session.kernel_id,
                    session.id[:12],
                )
            return
        self._channels[session.id] = KernelChannels(context, connection, now)
        self.log.info(
            "Kernel %s of %s (session %s): no server attached; watching its activity for "
            "its owner's idle_timeout",
            session.kernel_id,
            session.owner,
            session.id[:12],
        )

    def _stop_listening(self: GPUSessionManager, session: Session, why: str) -> None:
        channels = self._channels.pop(session.id, None)
        if channels is not None:
            channels.close()
            if why:
                self.log.info("Kernel %s: %s", session.kernel_id, why)

    def _forget_kernel(self: GPUSessionManager, session_id: str) -> None:
        channels = self._channels.pop(session_id, None)
        if channels is not None:
            channels.close()
        self._attachments.pop(session_id, None)
        self._kernel_seen.pop(session_id, None)
        self._kernel_let_go.pop(session_id, None)
        self._unwatchable.discard(session_id)

    async def _end_detached(self: GPUSessionManager, session: Session, reason: str) -> bool:
        self.log.info("Kernel %s (session %s): %s", session.kernel_id, session.id[:12], reason)
        try:
            ended = await self.end_session(session.id, reason)
        except GPUSessionsError as exc:
            self.log.warning("Could not end detached idle session %s: %s", session.id[:12], exc)
            return False
        self._forget_kernel(session.id)
        return ended.reason == reason


def _sync_poller(poller: zmq.Poller, registered: set, channels: dict[str, KernelChannels]) -> None:
    """Poll exactly the sockets of the kernels listened to now."""
    wanted = {socket for c in channels.values() for socket in c.sockets()}
    for socket in registered - wanted:
        poller.unregister(socket)
    for socket in wanted - registered:
        poller.register(socket, zmq.POLLIN)
    registered.clear()
    registered.update(wanted)
