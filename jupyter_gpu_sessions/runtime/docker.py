"""DockerRuntime: each kernel a hardened container, driven through the docker SDK."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any

from ..core.errors import (
    InvalidRequest,
    KernelLaunchError,
    RuntimeUnavailable,
    docker_socket_hint,
)
from ..core.models import ExitState, LaunchSpec
from ..devices.attach import attach_devices, cdi_available, choose_mode
from .base import (
    SESSION_LABEL,
    STORE_LABEL,
    KernelRuntime,
    RuntimeHandle,
    session_labels,
    spec_digest,
)

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
# Inside the container: where the kernel's copy of its connection file lives, and $HOME.
CONTAINER_STATE_DIR = "/run/jupyter-gpu-sessions"
CONTAINER_HOME = "/home/work"


class DockerRuntime(KernelRuntime):
    """Containers with tini as init, a non-root uid, no capabilities, no new privileges,
    pids/memory/CPU limits, an allowlisted environment and ``io.jupyter.gpu-sessions.*``
    labels; kernel ports published on 127.0.0.1 only."""

    name = "docker"

    def __init__(
        self,
        *,
        base_url: str | None = None,
        gpu_attach_mode: str = "auto",
        home_size: int = 1024**3,
        default_pids_limit: int = 4096,
    ) -> None:
        self.base_url = base_url or None
        self.gpu_attach_mode = gpu_attach_mode
        self.home_size = home_size
        self.default_pids_limit = default_pids_limit
        self._client = None
        self._client_lock = threading.Lock()
        self._engine_info: dict[str, Any] | None = None

    # -- client ----------------------------------------------------------------------------
    def client(self):
        """The docker client, created on first use; raises :class:`RuntimeUnavailable`."""
        import docker
        from docker.errors import DockerException

        with self._client_lock:
            if self._client is None:
                try:
                    # Asks the engine for its API version: reaching it is checked here,
                    # without a ping of its own.
                    if self.base_url:
                        client = docker.DockerClient(base_url=self.base_url, timeout=60)
                    else:
                        client = docker.from_env(timeout=60)
                except DockerException as exc:
                    raise RuntimeUnavailable(
                        f"{docker_socket_hint(self.base_url)} ({exc})"
                    ) from exc
                if client.api.base_url.startswith("http+docker://"):
                    # A unix socket (or named pipe, or ssh): no HTTP proxy, CA bundle or netrc
                    # entry applies, so requests need not look for them in the environment
                    # at every call (a scan of os.environ: a good part of a call's CPU).
                    client.api.trust_env = False
                self._client = client
            return self._client

    def engine_info(self) -> dict[str, Any]:
        if self._engine_info is None:
            self._engine_info = self.client().info()
        return self._engine_info

    def nvidia_runtime_available(self) -> bool:
        return "nvidia" in (self.engine_info().get("Runtimes") or {})

    def cdi_supported(self) -> bool:
        """CDI device requests need Docker ≥ 25 and an NVIDIA CDI spec on the host."""
        version = str(self.engine_info().get("ServerVersion") or "0")
        try:
            major = int(version.split(".")[0])
        except ValueError:
            return False
        return major >= 25 and cdi_available()

    async def _call(self, fn, *args, **kwargs):
        """Run a blocking docker call in a thread, mapping "engine gone" to our error.
        ``fn`` is called with the client first (made on first use, in that same thread):
        one trip to a thread per call."""
        from docker.errors import APIError, DockerException, NotFound
        from requests.exceptions import ConnectionError as RequestsConnectionError

        def call():
            return fn(self.client(), *args, **kwargs)

        try:
            return await asyncio.to_thread(call)
        except (NotFound, APIError):
            raise
        except (DockerException, RequestsConnectionError) as exc:
            raise RuntimeUnavailable(f"{docker_socket_hint(self.base_url)} ({exc})") from exc

    # -- images ----------------------------------------------------------------------------
    async def check_image(self, image: str) -> bool:
        from docker.errors import APIError, ImageNotFound

        try:
            await self._call(lambda client: client.api.inspect_image(image))
        except ImageNotFound:
            return False
        except APIError as exc:
            if exc.status_code == 400:  # not a reference the engine understands
                raise InvalidRequest(
                    f"image {image!r} is not a valid image reference (e.g. python:3.12): "
                    f"{exc.explanation or exc}"
                ) from None
            raise
        return True

    # -- lifecycle -------------------------------------------------------------------------
    def _container_args(self, spec: LaunchSpec) -> dict[str, Any]:
        from docker.types import DeviceRequest
        from docker.types import Mount as DockerMount

        res = spec.resources
        host_conn = spec.connection_file
        inner_conn = f"{CONTAINER_STATE_DIR}/{os.path.basename(host_conn)}"
        command = [inner_conn if arg == host_conn else arg for arg in spec.argv]
        if spec.batch:  # a batch session's command: as given, no kernel ports
            command = list(spec.argv)
        mode = (
            choose_mode(
                spec.devices,
                self.gpu_attach_mode,
                nvidia_runtime=self.nvidia_runtime_available(),
                cdi=self.cdi_supported(),
            )
            if spec.devices
            else self.gpu_attach_mode
        )
        attachment = attach_devices(spec.devices, mode)
        env = {**spec.env, **attachment.env, "HOME": CONTAINER_HOME}
        mounts = [
            DockerMount(target=spec.working_dir, source=spec.working_dir, type="bind"),
            DockerMount(target=CONTAINER_STATE_DIR, source=spec.state_dir, type="bind"),
        ] + [
            DockerMount(target=m.target, source=m.source, type="bind", read_only=m.read_only)
            for m in spec.mounts
        ]
        args: dict[str, Any] = {
            "image": spec.image,
            "command": command,
            "name": f"jgs-{spec.session_id[:12]}",
            "hostname": f"jgs-{spec.session_id[:8]}",
            "user": f"{spec.uid}:{spec.gid}",
            "environment": env,
            "working_dir": spec.working_dir,
            "labels": session_labels(spec),
            "init": True,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "pids_limit": res.pids_limit or self.default_pids_limit,
            "ports": {
                f"{spec.connection_info[name]}/tcp": ("127.0.0.1", spec.connection_info[name])
                for name in PORT_NAMES
            }
            if not spec.batch
            else {},
            "mounts": mounts,
            "tmpfs": {
                CONTAINER_HOME: f"uid={spec.uid},gid={spec.gid},mode=0755,size={self.home_size}"
            },
            "detach": True,
        }
        if res.memory is not None:
            args["mem_limit"] = res.memory
            args["memswap_limit"] = res.memory  # no swap beyond the limit
        if res.cpus is not None:
            args["nano_cpus"] = int(res.cpus * 1e9)
        if res.shm_size is not None:
            args["shm_size"] = res.shm_size
        if attachment.device_nodes:
            args["devices"] = [f"{host}:{inner}:rwm" for host, inner in attachment.device_nodes]
        if attachment.device_requests:
            args["device_requests"] = [DeviceRequest(**r) for r in attachment.device_requests]
        return args

    def _write_connection_copy(self, spec: LaunchSpec) -> None:
        """The kernel's own copy: binds on all container interfaces, owned by the kernel's
        uid (ipykernel rewrites it at start, so it must be writable)."""
        info = {k: v for k, v in spec.connection_info.items()}
        for key, value in list(info.items()):
            if isinstance(value, bytes):
                info[key] = value.decode()
        info["ip"] = "0.0.0.0"
        path = os.path.join(spec.state_dir, os.path.basename(spec.connection_file))
        # The kernel may write to its state directory: what it left at this name (a
        # symlink to a host file, say) is replaced, never followed, by a (root) restart.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1)
            if os.geteuid() == 0:
                os.fchown(f.fileno(), spec.uid, spec.gid)

    async def start(self, spec: LaunchSpec, previous: RuntimeHandle | None = None) -> RuntimeHandle:
        from docker.errors import APIError, NotFound

        def prepare() -> dict[str, Any]:  # one trip to a thread for the three
            self.client()
            if not spec.batch:
                self._write_connection_copy(spec)
            return self._container_args(spec)

        args = await asyncio.to_thread(prepare)
        digest = spec_digest(args)
        if previous is not None and previous.digest == digest:
            # A restart with an unchanged spec: start the stopped container again. Same
            # ports, mounts and devices, and no create cost.
            try:
                await self._call(lambda client: client.api.start(previous.id))
                return previous
            except (NotFound, APIError):
                pass  # gone or unusable: fall through to a fresh container
        if previous is not None:
            await self.remove(previous)
        try:
            container_id, name = await self._call(_create, args)
        except APIError as exc:
            raise KernelLaunchError(
                f"Docker refused to create the kernel container for image {spec.image!r}: "
                f"{exc.explanation or exc}"
            ) from exc
        handle = RuntimeHandle(self.name, container_id, name, digest)
        try:
            await self._call(lambda client: client.api.start(container_id))
        except BaseException as exc:
            await self.remove(handle)
            if isinstance(exc, APIError):
                raise KernelLaunchError(
                    f"Docker could not start the kernel container ({name}): "
                    f"{exc.explanation or exc}"
                ) from exc
            raise
        return handle

    async def _inspect(self, handle: RuntimeHandle) -> dict[str, Any] | None:
        from docker.errors import NotFound

        try:
            return await self._call(lambda client: client.api.inspect_container(handle.id))
        except NotFound:
            return None

    async def poll(self, handle: RuntimeHandle) -> ExitState | None:
        info = await self._inspect(handle)
        if info is None:
            return ExitState(exit_code=255, error=f"container {handle.name} no longer exists")
        state = info["State"]
        if state.get("Running") or state.get("Status") in ("created", "restarting"):
            return None
        return ExitState(
            exit_code=int(state.get("ExitCode", 255)),
            oom_killed=bool(state.get("OOMKilled")),
            error=state.get("Error") or "",
        )

    async def wait(self, handle: RuntimeHandle) -> ExitState:
        """Until the container has exited, then how. The engine's blocking wait runs on a
        thread of its own (a batch command may run for days: it must not hold one of the
        loop's shared executor threads) and hands its end back to the loop."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if not ended.done():
                ended.set_result(error)

        def block() -> None:
            error: BaseException | None = None
            try:
                self.client().api.wait(handle.id, timeout=None)
            except BaseException as exc:  # gone, or the engine went away: poll below
                error = exc
            try:
                loop.call_soon_threadsafe(settle, error)
            except RuntimeError:
                pass  # the loop closed meanwhile: nobody waits any more

        threading.Thread(target=block, name=f"wait-{handle.name}", daemon=True).start()
        if await ended is not None:
            await KernelRuntime.wait(self, handle)  # the engine's wait failed: poll instead
        state = await self.poll(handle)
        return state if state is not None else await KernelRuntime.wait(self, handle)

    async def stop(self, handle: RuntimeHandle, timeout: float) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds (``docker stop``); a no-op when
        the container has already stopped or is gone."""
        from docker.errors import APIError, NotFound

        try:
            await self._call(lambda client: client.api.stop(handle.id, timeout=int(timeout)))
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code not in (304, 409):  # not running, or being removed
                raise

    async def signal(self, handle: RuntimeHandle, signum: int) -> None:
        from docker.errors import APIError, NotFound

        if signum == 0:
            return
        try:
            await self._call(lambda client: client.api.kill(handle.id, signal=int(signum)))
        except NotFound:
            pass
        except APIError as exc:
            if exc.status_code != 409:  # 409: the container is not running
                raise

    async def remove(self, handle: RuntimeHandle) -> None:
        """Kill and delete the container. "Already gone" and "removal already in progress"
        (another cleanup got there first) both count as done once the container has
        stopped running, so a caller may release its devices after this returns."""
        from docker.errors import APIError, NotFound

        try:
            await self._call(
                lambda client: client.api.remove_container(handle.id, force=True, v=True)
            )
        except NotFound:
            return
        except APIError as exc:
            if exc.status_code != 409:
                raise
            # Someone else is removing it: done once it no longer runs.
            for _ in range(100):
                info = await self._inspect(handle)
                if info is None or not info["State"].get("Running"):
                    return
                await asyncio.sleep(0.1)
            raise

    async def logs(self, handle: RuntimeHandle, tail: int = 20) -> str:
        """The last lines of the container's log; "" when it is gone or being removed (a
        cleanup that races another must not fail on its way to freeing the devices)."""
        from docker.errors import APIError, NotFound

        try:
            raw = await self._call(lambda client: client.api.logs(handle.id, tail=tail))
        except NotFound:
            return ""
        except APIError as exc:
            if exc.status_code == 409:  # "dead or marked for removal"
                return ""
            raise
        return raw.decode(errors="replace")

    async def session_handles(self, store_id: str, session_id: str) -> list[RuntimeHandle]:
        """Every container of one session on this engine (a start in another process may
        have created one it has not recorded yet)."""
        labels = [f"{SESSION_LABEL}={session_id}", f"{STORE_LABEL}={store_id}"]
        found = await self._call(
            lambda client: client.api.containers(all=True, filters={"label": labels})
        )
        return [RuntimeHandle(self.name, c["Id"], c["Names"][0].lstrip("/")) for c in found]

    async def pids(self, handle: RuntimeHandle) -> list[int]:
        """The container's processes by host PID (the engine's ``top``: tini, the kernel and
        whatever it started); ``[]`` when the container is gone or not running."""
        from docker.errors import APIError, NotFound

        try:
            top = await self._call(lambda client: client.api.top(handle.id, ps_args="-eo pid"))
        except NotFound:
            return []
        except APIError as exc:
            if exc.status_code == 409:  # not running (or being removed)
                return []
            raise
        column = (top.get("Titles") or ["PID"]).index("PID")
        return [int(row[column]) for row in top.get("Processes") or () if row[column].isdigit()]

    async def describe(self, handle: RuntimeHandle) -> str:
        info = await self._inspect(handle)
        if info is None:
            return f"container {handle.name} no longer exists"
        state = info["State"]
        text = f"container {handle.name} is {state.get('Status')}"
        if not state.get("Running"):
            text += f" (exit code {state.get('ExitCode')}"
            text += ", OOMKilled)" if state.get("OOMKilled") else ")"
        return text

    def labelled_containers(self, store_id: str | None = None) -> list[Any]:
        """Every session container on this engine, running or not, optionally only those
        recorded by one store (blocking)."""
        labels = [SESSION_LABEL] + ([f"{STORE_LABEL}={store_id}"] if store_id else [])
        return self.client().containers.list(all=True, filters={"label": labels})


def _create(client, args: dict[str, Any]) -> tuple[str, str]:
    """Create the container (blocking): its id and name. The SDK's ``containers.create``
    then inspects the new container to build its model; the id the engine answered and the
    name we chose are all a start needs, so the same create goes through the API client."""
    try:
        from docker.models.containers import _create_container_args
    except ImportError:  # an SDK without it: the model's way, one inspect more
        container = client.containers.create(**args)
        return container.id, container.name
    kwargs = {**args, "version": client.api.api_version}
    response = client.api.create_container(**_create_container_args(kwargs))
    return response["Id"], args["name"]
