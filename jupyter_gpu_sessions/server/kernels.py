"""jupyter_server's kernel manager, fitted for kernels that queue and start in containers.

- **Pending kernels by default.** ``POST /api/sessions`` answers as soon as a GPU session
  kernel is admitted to the queue, with the kernel ``starting``; the kernel's websocket
  waits for it (jupyter_server's pending kernels), so a cell run at once runs once the
  kernel is up, as on a local kernel, and a kernel that queues for minutes shows as
  starting instead of a hung request.
- **Refusals are 4xx.** What the engine refuses before queueing (a bad value, a policy,
  more than the host has, a missing image, Docker down) reaches ``/api/sessions`` and
  ``/api/kernels`` as :class:`tornado.web.HTTPError` with the code the GPU sessions API
  uses, and the engine's message. nbclient and papermill keep the plain exceptions.
- **Shutting down a starting kernel** ends its session at once (queued: cancelled;
  starting: the start removes its container), instead of waiting for it to start.
- **A kernel the restarter gave up on** gets its cleanup, so its session ends and its GPUs
  are freed at once (jupyter_server only drops it from its map).
- **Kernels outlive their server** (remote mode: the kernels run in the manager service).
  What re-attaching a kernel needs (its kernelspec, working directory, jupyter_server's
  session rows on it) is noted with the engine as it changes; a server that shuts down
  detaches its GPU session kernels (no shutdown request, no signal, connection files kept)
  and tells the engine so (``Engine.note_detached``: its idle_timeout applies to them);
  a server that starts re-creates them from ``Engine.running_kernels`` (same kernel ids,
  ``load_provisioner_info``, its session rows with the same ids), and answers its kernel
  and session endpoints once that is done. A kernel shut down on purpose ends as always.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_server._tz import utcnow
from jupyter_server.prometheus.metrics import KERNEL_CURRENTLY_RUNNING_TOTAL
from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets import Bool, Float, TraitError, Unicode

from ..core.errors import GPUSessionsError, RuntimeUnavailable, StartCancelled
from ..core.identity import Identity
from ..engine import Engine, current_engine
from ..provisioner import GPUContainerProvisioner
from .base import status_for

PROVISIONER_NAME = "gpu-container-provisioner"
# Why a kernel whose restarts all failed is ended (shown in its history).
RESTARTER_GAVE_UP = "jupyter_server's restarter gave up on the kernel"
_REMOVED_KEPT = 10_000  # kernel ids remembered as removed (for the reconcile pass)
# Why a kernel found dead when its restarted server came to re-attach it was ended.
DIED_AWAY = "the kernel died while its server was away"
KERNEL_ACTIONS_SCHEMA = "https://events.jupyter.org/jupyter_server/kernel_actions/v1"


class GPUSessionsKernelManager(AsyncMappingKernelManager):
    """The server's kernel manager when jupyter-gpu-sessions is installed (set by the
    package's ``jupyter_server_config.d`` file). Kernels of other provisioners behave as
    with :class:`AsyncMappingKernelManager`, with pending kernels."""

    use_pending_kernels = Bool(
        True,
        help="""Answer a kernel start before the kernel runs; clients wait for it on its
        websocket. On by default: a GPU session kernel may queue for minutes, and a run
        asked for meanwhile must not be lost.""",
    ).tag(config=True)

    provisioner_name = Unicode(
        PROVISIONER_NAME, help="The provisioner whose kernels are GPU sessions."
    ).tag(config=True)

    restore_wait = Float(
        60.0,
        help="""Remote mode: the longest a request to the kernel and session endpoints waits,
        at start-up, for the kernels still running in the manager service to be
        re-attached (so an open notebook finds its kernel and session again).""",
    ).tag(config=True)

    restore_poll_interval = Float(
        2.0,
        help="""Remote mode: seconds between looks at a re-attached kernel whose start goes
        on in the manager service (it queued for its GPUs when the server stopped).""",
    ).tag(config=True)

    def _create_kernel_manager_factory(self) -> Any:
        """jupyter_server's kernel managers, each given the server's event logger up front.
        Left to itself each one looks for it at its first event (its start's) and registers
        the kernel-actions schema with it again, loading and validating the YAML (~1 ms on
        the event loop, per kernel start) only to find it there already."""
        create = super()._create_kernel_manager_factory()

        def create_kernel_manager(*args: Any, **kwargs: Any) -> Any:
            km = create(*args, **kwargs)
            logger = getattr(self.parent, "event_logger", None)
            if (
                logger is not None
                and not getattr(km, "extra_event_schema_paths", None)
                and KERNEL_ACTIONS_SCHEMA in logger.schemas.schema_ids
            ):
                km.event_logger = logger
            return km

        return create_kernel_manager

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._admitted: dict[str, asyncio.Future] = {}
        self._removed: dict[str, float] = {}
        self._cleanups: set[asyncio.Task] = set()
        self._shutting_down: set[str] = set()  # starting kernels a shutdown is ending
        self._engine: Engine | None = None
        # Remote mode: each GPU session kernel's engine session, and the attachment the
        # engine last took for it; re-attaching at start-up, done when set.
        self._session_ids: dict[str, str] = {}
        self._noted: dict[str, tuple[str, dict[str, Any]]] = {}
        self._note_lock: asyncio.Lock | None = None
        self._notes: set[asyncio.Task] = set()
        self._restored: asyncio.Event | None = None
        self._restore_who: Identity | None = None
        self._restoring: dict[str, asyncio.Task] = {}  # re-attached, still starting
        if not any(isinstance(f, _QuietFailedStarts) for f in self.log.filters):
            self.log.addFilter(_QuietFailedStarts())

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = current_engine(self.config)
        return self._engine

    def _is_session_kernel(self, kernel_name: str | None) -> bool:
        """Whether ``kernel_name``'s kernelspec starts a GPU session (blocking: reads it)."""
        try:
            spec = self.kernel_spec_manager.get_kernel_spec(kernel_name or self.default_kernel_name)
        except Exception:  # unknown kernels fail in the start itself, with its message
            return False
        provisioner = (spec.metadata or {}).get("kernel_provisioner") or {}
        return provisioner.get("provisioner_name") == self.provisioner_name

    # -- start -----------------------------------------------------------------------------
    async def start_kernel(  # type: ignore[override]
        self, *, kernel_id: str | None = None, path: Any = None, **kwargs: Any
    ) -> str:
        if kernel_id is not None and kernel_id in self:
            return await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        ours = await asyncio.to_thread(self._is_session_kernel, kwargs.get("kernel_name"))
        if not ours:
            return await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        kernel_id = kernel_id or self.new_kernel_id()
        admitted = self.engine.admission(kernel_id)
        self._admitted[kernel_id] = admitted
        try:
            kernel_id = await super().start_kernel(kernel_id=kernel_id, path=path, **kwargs)
        except (GPUSessionsError, TraitError) as exc:
            self._forget_admission(kernel_id)
            raise engine_http_error(exc) from exc
        start = self._pending_kernels.get(kernel_id)
        if start is None or start.done():
            self._forget_admission(kernel_id)
        else:
            start.add_done_callback(lambda _task: self._forget_admission(kernel_id))
            # Answer once the engine has queued it, or its start has failed before that.
            await asyncio.wait({start, admitted}, return_when=asyncio.FIRST_COMPLETED)
        km = self.get_kernel(kernel_id)
        failure = _failure(km)
        if failure is not None and not admitted.done():
            await super().shutdown_kernel(kernel_id)  # removes the failed pending kernel
            if isinstance(failure, GPUSessionsError | TraitError):
                raise engine_http_error(failure) from failure
            raise failure
        if admitted.done() and not admitted.cancelled() and admitted.exception() is None:
            self._session_ids[kernel_id] = admitted.result().id
            self._note_soon()
        return kernel_id

    def _forget_admission(self, kernel_id: str) -> None:
        self._admitted.pop(kernel_id, None)
        self.engine.forget_admission(kernel_id)

    async def _finish_kernel_start(self, kernel_id: str) -> None:
        """jupyter_server's, with the start's future shielded: shutting a starting kernel
        down cancels this watcher, and a watcher cancelled while awaiting ``km.ready``
        would cancel the start's own future (which then can never report how it ended).

        A session kernel whose start was ended deliberately (deleted, shut down while
        queued) leaves the map; any other failed start stays, dead, with its reason, so
        the user's notebook can say why."""
        km = self.get_kernel(kernel_id)
        try:
            await asyncio.shield(km.ready)
        except asyncio.CancelledError:
            raise
        except Exception as failure:
            km.execution_state = "dead"
            km.reason = str(failure)
            self.log.info("Kernel %s did not start: %s", kernel_id, failure)
            ours = kernel_id in self and kernel_id not in self._shutting_down
            if isinstance(failure, StartCancelled) and ours and not km.shutting_down:
                await super().shutdown_kernel(kernel_id)
            return
        self._kernel_ports[kernel_id] = km.ports
        self.start_watching_activity(kernel_id)
        self.add_restart_callback(kernel_id, lambda: self._handle_kernel_died(kernel_id), "dead")

    # -- shutdown and restart --------------------------------------------------------------
    async def _async_shutdown_kernel(
        self, kernel_id: str, now: bool = False, restart: bool = False
    ) -> None:
        """A kernel still starting (queued, preparing) or restarting is ended through its
        session at once, and its start allowed to settle; jupyter_client would otherwise
        wait for a queued kernel to start, and fails on a kernel caught mid-restart.
        Returns once the kernel is gone."""
        km = self._kernels.get(kernel_id)
        if km is not None and not km.ready.done():
            self._shutting_down.add(kernel_id)
            try:
                await self._end_starting(kernel_id, km, self._pending_kernels.get(kernel_id))
                with contextlib.suppress(Exception):
                    await asyncio.shield(km.ready)  # how it failed is the start's to report
            finally:
                self._shutting_down.discard(kernel_id)
            if kernel_id not in self:
                return  # its failed start took it out of the map meanwhile: it is gone
        await super()._async_shutdown_kernel(kernel_id, now=now, restart=restart)
        # With pending kernels jupyter_client only starts the shutdown; wait for it, so
        # that when a DELETE answers the container is gone and its GPUs are free.
        stopping = self._pending_kernels.get(kernel_id)
        if stopping is not None:
            await stopping

    # jupyter_server names it both ways; shutdown_all calls the underscored one.
    shutdown_kernel = _async_shutdown_kernel  # type: ignore[assignment]

    async def _end_starting(self, kernel_id: str, km: Any, start: asyncio.Future | None) -> None:
        session = getattr(getattr(km, "provisioner", None), "session", None)
        session_id = session.id if session is not None else None
        restoring = self._restoring.get(kernel_id)
        if session_id is None and restoring is not None:  # re-attached, still starting
            session_id = self._session_ids.get(kernel_id)
        admitted = self._admitted.get(kernel_id)
        if session_id is None and admitted is not None and start is not None:
            await asyncio.wait({start, admitted}, return_when=asyncio.FIRST_COMPLETED)
            if admitted.done() and not admitted.cancelled() and admitted.exception() is None:
                session_id = admitted.result().id
        if session_id is None:
            return  # not a session kernel, or its start already failed
        reason = self.engine.stop_reason(session_id) or "kernel shut down while starting"
        try:
            await self.engine.end_session(None, session_id, reason)
        except GPUSessionsError as exc:
            self.log.warning("Kernel %s: could not end its starting session: %s", kernel_id, exc)
        if restoring is not None:
            restoring.cancel()

    async def restart_kernel(self, kernel_id: str, now: bool = False):
        km = self._kernels.get(kernel_id)
        if km is not None and not km.ready.done():
            raise web.HTTPError(
                409,
                "This kernel is still starting (it may be queued for its GPUs): wait until "
                "it runs, or shut it down and start a new one.",
            )
        return await super().restart_kernel(kernel_id, now=now)

    async def cull_kernel_if_idle(self, kernel_id: str):
        """jupyter_server's culler (``cull_idle_timeout``) leaves a kernel alone while it is
        still starting: waiting in the queue for its GPUs is not being idle."""
        km = self._kernels.get(kernel_id)
        if km is not None and not km.ready.done() and km.execution_state != "dead":
            return
        return await super().cull_kernel_if_idle(kernel_id)

    def _handle_kernel_died(self, kernel_id: str) -> None:
        """The restarter gave up: clean the kernel up (its provisioner ends the session and
        frees its devices) rather than only forgetting it."""
        km = self._kernels.get(kernel_id)
        super()._handle_kernel_died(kernel_id)
        session = getattr(getattr(km, "provisioner", None), "session", None)
        if session is None:
            return
        self.engine.set_stop_reason(session.id, RESTARTER_GAVE_UP)
        task = asyncio.ensure_future(self._clean_up_dead(kernel_id, km))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _clean_up_dead(self, kernel_id: str, km: Any) -> None:
        try:
            await km.cleanup_resources(restart=False)
        except Exception:
            self.log.warning("Kernel %s: cleanup after its death failed", kernel_id, exc_info=True)

    def remove_kernel(self, kernel_id: str):
        # jupyter_client leaves a failed start's finished task in its pending map when it
        # removes the kernel; shutdown_all would then shut down a kernel that is gone (a
        # 404 that aborts the server's cleanup, so SIGTERM never stops it).
        pending = self._pending_kernels.get(kernel_id)
        if pending is not None and pending.done():
            del self._pending_kernels[kernel_id]
        self._session_ids.pop(kernel_id, None)
        self._noted.pop(kernel_id, None)
        self._removed[kernel_id] = time.monotonic()
        if len(self._removed) > _REMOVED_KEPT:
            for old in sorted(self._removed, key=self._removed.get)[: _REMOVED_KEPT // 2]:
                del self._removed[old]
        return super().remove_kernel(kernel_id)

    def removed_kernel_ids(self) -> set[str]:
        """Kernels this server started and no longer manages (the reconcile pass ends their
        sessions if they still run)."""
        return set(self._removed) - set(self._kernels)

    # -- remote mode: kernels that outlive their server ------------------------------------
    @property
    def server_key(self) -> str:
        """Which server a kernel's attachment names: this server's base URL (a Hub user's
        named servers each re-attach their own kernels)."""
        return str(getattr(self.parent, "base_url", "") or "/")

    def _engine_session_id(self, kernel_id: str) -> str | None:
        km = self._kernels.get(kernel_id)
        session = getattr(getattr(km, "provisioner", None), "session", None)
        return session.id if session is not None else self._session_ids.get(kernel_id)

    def _session_rows(self) -> dict[str, list[dict[str, str]]]:
        """jupyter_server's session rows, per kernel id."""
        rows: dict[str, list[dict[str, str]]] = {}
        cursor = getattr(getattr(self.parent, "session_manager", None), "cursor", None)
        if cursor is None:
            return rows
        found = cursor.execute("SELECT session_id, path, name, type, kernel_id FROM session")
        for session_id, path, name, kind, kernel_id in found.fetchall():
            rows.setdefault(kernel_id, []).append(
                {"id": session_id, "path": path or "", "name": name or "", "type": kind or ""}
            )
        return rows

    def _attachment(self, kernel_id: str, rows: list[dict[str, str]]) -> dict[str, Any]:
        km = self._kernels[kernel_id]
        return {
            "server": self.server_key,
            "kernel_name": km.kernel_name,
            "cwd": str((km._launch_args or {}).get("cwd") or self.root_dir),
            "sessions": sorted(rows, key=lambda row: row["id"]),
        }

    def _note_soon(self) -> None:
        if not self.engine.remote:
            return
        task = asyncio.ensure_future(self.note_attachments())
        self._notes.add(task)
        task.add_done_callback(self._notes.discard)

    async def note_attachments(self) -> None:
        """Remote mode: tell the engine, for each GPU session kernel whose attachment
        changed (a new kernel, a session row created, renamed or moved to another kernel),
        what re-attaching it needs. One round at a time, so the last word is the latest."""
        if not self.engine.remote:
            return
        if self._note_lock is None:
            self._note_lock = asyncio.Lock()
        async with self._note_lock:
            rows = self._session_rows()
            changed: dict[str, tuple[str, dict[str, Any]]] = {}
            for kernel_id in list(self._kernels):
                session_id = self._engine_session_id(kernel_id)
                if session_id is None:
                    continue
                attachment = self._attachment(kernel_id, rows.get(kernel_id, []))
                if self._noted.get(kernel_id) != (session_id, attachment):
                    # A restart with a new resource choice starts a new engine session.
                    changed[kernel_id] = (session_id, attachment)
            if not changed:
                return
            results = await asyncio.gather(
                *(self.engine.note_attachment(sid, a) for sid, a in changed.values()),
                return_exceptions=True,
            )
            for (kernel_id, noted), result in zip(changed.items(), results, strict=True):
                if isinstance(result, BaseException):
                    self.log.warning(
                        "Kernel %s: the manager service did not take what re-attaching it "
                        "needs (%s); it may not survive a restart of this server",
                        kernel_id,
                        result,
                    )
                elif kernel_id in self._kernels:
                    self._noted[kernel_id] = noted

    async def settle_notes(self, timeout: float = 5.0) -> None:
        """Let notes under way reach the engine (before it stops, at shutdown)."""
        if self._notes:
            await asyncio.wait(set(self._notes), timeout=timeout)

    def _detachable(self, kernel_id: str) -> bool:
        km = self._kernels.get(kernel_id)
        return (
            kernel_id in self._session_ids
            or kernel_id in self._admitted
            or isinstance(getattr(km, "provisioner", None), GPUContainerProvisioner)
        )

    async def _async_shutdown_all(self, now: bool = False) -> None:
        """The server shuts down. In remote mode its GPU session kernels keep running in the
        manager service: they are let go of (the next server re-attaches them); the others
        are shut down, as are all kernels in embedded mode."""
        if self.engine.remote:
            let_go = []
            for kernel_id in [k for k in set(self._kernels) | set(self._pending_kernels)]:
                if self._detachable(kernel_id):
                    session_id = self._engine_session_id(kernel_id)
                    self._detach(kernel_id)
                    if session_id is not None:
                        let_go.append(session_id)
            await self._note_detached(let_go)
        await super()._async_shutdown_all(now=now)

    shutdown_all = _async_shutdown_all  # type: ignore[assignment]

    async def _note_detached(self, session_ids: list[str]) -> None:
        """Tell the engine these kernels run on with no server (its idle_timeout applies
        to them at once); bounded, for a shutdown must not hang on a service that is away
        (it then finds out by itself, after ``GPUSessionManager.detached_after``)."""
        if not session_ids:
            return
        try:
            await asyncio.wait_for(self.engine.note_detached(session_ids), 5.0)
        except Exception as exc:
            self.log.info("Could not tell the manager service the kernels were let go: %s", exc)

    def _detach(self, kernel_id: str) -> None:
        """Let go of a kernel without stopping it: no shutdown request, no signal, its
        connection file kept, its session left running."""
        km = self._kernels.get(kernel_id)
        self._pending_kernels.pop(kernel_id, None)
        for watcher in (
            self._pending_kernel_tasks.pop(kernel_id, None),
            self._restoring.pop(kernel_id, None),
        ):
            if watcher is not None:
                watcher.cancel()
        if km is None:
            return
        with contextlib.suppress(Exception):
            self.stop_watching_activity(kernel_id)
        with contextlib.suppress(Exception):
            self.stop_buffering(kernel_id)
        km.stop_restarter()
        km._close_control_socket()
        km._connection_file_written = False  # nobody removes it: the next server uses it
        self._kernels.pop(kernel_id, None)
        self._kernel_connections.pop(kernel_id, None)
        self._kernel_ports.pop(kernel_id, None)
        self.log.info("Kernel %s detached: it keeps running in the manager service", kernel_id)

    async def restored(self) -> None:
        """Returns once the kernels of a previous run are re-attached (remote mode; at
        most ``restore_wait`` seconds), so requests see them."""
        if not self.engine.remote:
            return
        if self._restored is None:
            self._restored = asyncio.Event()
        if not self._restored.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._restored.wait(), self.restore_wait)

    async def restore_kernels(self, who: Identity) -> list[str]:
        """Remote mode, at start-up: re-attach ``who``'s kernels that this server (its base
        URL) had when it stopped, with their session rows. A kernel found dead is ended; one
        still queued or starting in the service is back as a starting kernel, ready once it
        runs. Returns the kernel ids re-attached."""
        if self._restored is None:
            self._restored = asyncio.Event()
        try:
            if not self.engine.remote:
                return []
            self._restore_who = who
            found = await self._running_kernels(who)
            ours = [
                k
                for k in found
                if (k.get("attachment") or {}).get("server") == self.server_key
                and k.get("kernel_id")
                and k["kernel_id"] not in self
            ]
            results = await asyncio.gather(
                *(self._restore(k) for k in ours), return_exceptions=True
            )
            restored = []
            for kernel, result in zip(ours, results, strict=True):
                if isinstance(result, BaseException):
                    self.log.warning(
                        "Kernel %s could not be re-attached: %s", kernel["kernel_id"], result
                    )
                elif result:
                    restored.append(kernel["kernel_id"])
            if restored:
                self.log.info("Re-attached %d kernel(s): %s", len(restored), ", ".join(restored))
            return restored
        finally:
            self._restored.set()

    async def _running_kernels(self, who: Identity) -> list[dict[str, Any]]:
        """What to re-attach; a service that does not answer yet (restarting with the Hub)
        is asked again for up to ``restore_wait`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.restore_wait
        while True:
            try:
                return await self.engine.running_kernels(who)
            except RuntimeUnavailable as exc:
                if loop.time() + self.restore_poll_interval > deadline:
                    self.log.warning("Could not list the kernels to re-attach: %s", exc)
                    return []
            except Exception as exc:
                self.log.warning("Could not list the kernels to re-attach: %s", exc)
                return []
            await asyncio.sleep(self.restore_poll_interval)

    async def _restore(self, kernel: dict[str, Any]) -> bool:
        """One kernel, as jupyter_server makes them: its manager (same id), provisioner
        (``load_provisioner_info``), restarter, activity watching and session rows."""
        kernel_id = kernel["kernel_id"]
        attachment = kernel["attachment"]
        km = self.kernel_manager_factory(
            connection_file=os.path.join(self.connection_dir, f"kernel-{kernel_id}.json"),
            parent=self,
            log=self.log,
            kernel_name=attachment["kernel_name"],
            kernel_spec_manager=self.kernel_spec_manager,
        )
        km.kernel_id = kernel_id
        rows = attachment.get("sessions") or []
        launch_args: dict[str, Any] = {"cwd": attachment.get("cwd") or self.root_dir}
        sm = getattr(self.parent, "session_manager", None)
        if rows and sm is not None:
            launch_args["env"] = sm.get_kernel_env(rows[0]["path"], rows[0]["name"] or None)
        km._launch_args = launch_args  # what a restart starts it with again
        km._attempted_start = True
        running = kernel.get("status") == "RUNNING"
        if running and not await self._attach(km, kernel):
            return False
        km.execution_state = "idle" if running else "starting"
        km.reason = ""
        km.last_activity = utcnow()
        self._kernels[kernel_id] = km
        self._session_ids[kernel_id] = kernel["session_id"]
        self._kernel_connections[kernel_id] = 0
        KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=km.kernel_name).inc()
        if running:
            km.ready.set_result(None)
            self._watch(kernel_id)
        else:
            task = asyncio.ensure_future(self._until_running(km, kernel))
            self._restoring[kernel_id] = task
            self._pending_kernels[kernel_id] = task
        if not self._initialized_culler:
            self.initialize_culler()
        if sm is not None:
            for row in rows:
                await self._restore_row(sm, row, kernel_id)
        rows_now = self._session_rows().get(kernel_id, [])
        self._noted[kernel_id] = (kernel["session_id"], self._attachment(kernel_id, rows_now))
        return True

    async def _attach(self, km: Any, kernel: dict[str, Any]) -> bool:
        """Connect ``km`` to the kernel running in the service; False (its session ended)
        when the kernel turns out dead."""
        kernel_id = kernel["kernel_id"]
        # Its ports are the running kernel's, never random ones a restart may replace.
        km._random_port_names = []
        km.load_connection_info(kernel["connection_info"])
        spec = await asyncio.to_thread(lambda: km.kernel_spec)
        factory = KernelProvisionerFactory.instance(parent=self.parent)
        km.provisioner = factory.create_provisioner_instance(kernel_id, spec, parent=km)
        info = {
            "kernel_id": kernel_id,
            "connection_info": km.get_connection_info(),
            "session_id": kernel["session_id"],
            "runtime": kernel.get("runtime") or "docker",
            "container_id": kernel.get("container_id"),
            "container_name": kernel.get("container_name") or "",
        }
        await km.provisioner.load_provisioner_info(info)
        if await km.provisioner.poll() is not None:
            # It died while nobody watched: its session ends, its devices go back.
            await self.engine.end_session(None, kernel["session_id"], DIED_AWAY)
            await km.provisioner.cleanup(restart=False)  # its ports go back
            self.log.info("Kernel %s died while this server was away: ended", kernel_id)
            return False
        await asyncio.to_thread(km.write_connection_file)
        km.start_restarter()
        if km._restarter is not None:  # it has run for a while: not its first start
            km._restarter._initial_startup = False
        km._connect_control_socket()
        return True

    def _watch(self, kernel_id: str) -> None:
        """What jupyter_server does once a kernel is ready (``_finish_kernel_start``)."""
        km = self._kernels[kernel_id]
        self._kernel_ports[kernel_id] = km.ports
        self.start_watching_activity(kernel_id)
        self.add_restart_callback(kernel_id, lambda: self._handle_kernel_died(kernel_id), "dead")

    async def _until_running(self, km: Any, kernel: dict[str, Any]) -> None:
        """A re-attached kernel whose start goes on in the service (queued for its GPUs,
        say): ready once it runs; gone (its notebook asks for a new one) if it ends first."""
        kernel_id, session_id = kernel["kernel_id"], kernel["session_id"]
        try:
            while True:
                await asyncio.sleep(self.restore_poll_interval)
                try:
                    found = await self.engine.running_kernels(self._restore_who)
                except GPUSessionsError as exc:
                    self.log.debug("Kernel %s: still waiting for its start (%s)", kernel_id, exc)
                    continue
                entry = next((k for k in found if k.get("session_id") == session_id), None)
                if entry is None:
                    raise StartCancelled(
                        "This kernel's start ended while its server was away: start a new kernel."
                    )
                if entry.get("status") == "RUNNING":
                    break
            if not await self._attach(km, entry):
                raise StartCancelled(f"This kernel ended: {DIED_AWAY}.")
        except asyncio.CancelledError:
            if not km.ready.done():  # shut down or detached while waiting
                km.ready.set_exception(StartCancelled("This kernel's start was let go of."))
                km.ready.exception()  # nobody else needs to see it
            raise
        except Exception as exc:
            km.execution_state, km.reason = "dead", str(exc)
            if not km.ready.done():
                km.ready.set_exception(exc)
                km.ready.exception()
            if kernel_id not in self._shutting_down and self._kernels.get(kernel_id) is km:
                self.log.info("Kernel %s did not start: %s", kernel_id, exc)
                KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=km.kernel_name).dec()
                self._kernel_connections.pop(kernel_id, None)
                self.remove_kernel(kernel_id)
            return
        finally:
            self._restoring.pop(kernel_id, None)
            if self._pending_kernels.get(kernel_id) is asyncio.current_task():
                self._pending_kernels.pop(kernel_id, None)
        km.execution_state = "idle"
        km.ready.set_result(None)
        self._watch(kernel_id)
        self.log.info("Kernel %s: its start finished in the manager service", kernel_id)

    @staticmethod
    async def _restore_row(sm: Any, row: dict[str, str], kernel_id: str) -> None:
        """jupyter_server's session row again, with its id (an open notebook's session)."""
        found = sm.cursor.execute("SELECT 1 FROM session WHERE session_id=?", (row["id"],))
        if found.fetchone() is not None:
            return
        await sm.save_session(
            row["id"],
            path=row["path"],
            name=row["name"] or None,
            type=row["type"] or None,
            kernel_id=kernel_id,
        )


def _failure(km: Any) -> BaseException | None:
    ready = getattr(km, "ready", None)
    if ready is None or not ready.done() or ready.cancelled():
        return None
    return ready.exception()


class _QuietFailedStarts(logging.Filter):
    """jupyter_client logs a failed kernel start as an error with a traceback, twice. For
    the engine's own errors the message says all there is (the kernel's exit and log
    tail): one line, at INFO for a start ended on purpose, at WARNING otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, GPUSessionsError):
            return True
        if getattr(error, "_jgs_logged", False):
            return False
        error._jgs_logged = True  # type: ignore[attr-defined]
        level = logging.INFO if isinstance(error, StartCancelled) else logging.WARNING
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.msg, record.args, record.exc_info, record.exc_text = str(error), (), None, None
        return True


class EngineRefusal(web.HTTPError):
    """An HTTP error carrying the engine's message as it is (not a format string)."""

    def __str__(self) -> str:
        return f"HTTP {self.status_code}: {self.log_message}"


def engine_http_error(exc: GPUSessionsError | TraitError) -> web.HTTPError:
    """The engine's refusal as jupyter_server answers errors: the code the GPU sessions API
    uses for it, the engine's message unchanged. A provisioner setting of the kernelspec
    that does not validate (``"memory": "8XB"``) is a 400."""
    if isinstance(exc, TraitError):
        return EngineRefusal(400, f"This kernel's kernelspec has an invalid setting: {exc}")
    return EngineRefusal(status_for(exc) or 400, exc.message)
