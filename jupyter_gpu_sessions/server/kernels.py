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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets import Bool, TraitError, Unicode

from ..core.errors import GPUSessionsError, StartCancelled
from ..engine import Engine, current_engine
from .base import status_for

PROVISIONER_NAME = "gpu-container-provisioner"
# Why a kernel whose restarts all failed is ended (shown in its history).
RESTARTER_GAVE_UP = "jupyter_server's restarter gave up on the kernel"
_REMOVED_KEPT = 10_000  # kernel ids remembered as removed (for the reconcile pass)
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
        admitted = self._admitted.get(kernel_id)
        if session is None and admitted is not None and start is not None:
            await asyncio.wait({start, admitted}, return_when=asyncio.FIRST_COMPLETED)
            session = admitted.result() if admitted.done() and not admitted.cancelled() else None
        if session is None:
            return  # not a session kernel, or its start already failed
        reason = self.engine.stop_reason(session.id) or "kernel shut down while starting"
        try:
            await self.engine.end_session(None, session.id, reason)
        except GPUSessionsError as exc:
            self.log.warning("Kernel %s: could not end its starting session: %s", kernel_id, exc)

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
        self._removed[kernel_id] = time.monotonic()
        if len(self._removed) > _REMOVED_KEPT:
            for old in sorted(self._removed, key=self._removed.get)[: _REMOVED_KEPT // 2]:
                del self._removed[old]
        return super().remove_kernel(kernel_id)

    def removed_kernel_ids(self) -> set[str]:
        """Kernels this server started and no longer manages (the reconcile pass ends their
        sessions if they still run)."""
        return set(self._removed) - set(self._kernels)


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
