"""Launching a kernel: what the provisioner asks for, and how it becomes a container.

The working directory and the uid a kernel runs as, its allowlisted environment, the
devices its allocations attach (whole GPUs, MIG instances, shares), its vfolder mounts,
the launch spec the runtime gets, and the wait until its heartbeat answers.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import pwd
import threading
from dataclasses import replace
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio
from traitlets import TraitError

from ..core.errors import GPUSessionsError, InvalidRequest, KernelLaunchError
from ..core.models import GPUDevice, LaunchSpec, Mount, RuntimeHandle, Session
from ..engine import KernelLaunch
from ..runtime.base import STORE_LABEL, KernelRuntime
from ..runtime.docker import CONTAINER_STATE_DIR
from .api_access import API_ENV, SERVER_SECRETS, write_kernel_file
from .lifecycle import STARTING
from .reconciling import SERVICE_LABEL
from .settings import parse_kernel_user

if TYPE_CHECKING:
    from ..core.vfolders import VFolderMount
    from . import GPUSessionManager

# Host paths that must never become a kernel's bind-mounted working directory.
_FORBIDDEN_WORKDIRS = {"/", "/var", "/run", "/home"}
_FORBIDDEN_WORKDIR_TREES = (
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/boot",
)


class _EndedMeanwhile(Exception):
    """A start found its session ended by someone else (raised and caught internally)."""


NOTICE_FILE = "notice.py"
# Run by an IPython kernel at start (exec_files): says once, on stderr of the first cell,
# why the kernel was restarted, as a local kernel's "The kernel died" does.
_NOTICE_CODE = """\
def _jgs_notice():
    import sys

    said = []

    def say(*_args):
        if not said:
            said.append(True)
            print("[jupyter-gpu-sessions] " + {message}, file=sys.stderr)

    get_ipython().events.register("pre_run_cell", say)


_jgs_notice()
del _jgs_notice
"""
# Also run at every IPython kernel's start: loads the kernel-side extension (%session,
# %vfolder) when the image has the package; silently nothing when it has not.
_AUTOLOAD_CODE = """\
def _jgs_load():
    try:
        import importlib.util

        if importlib.util.find_spec("jupyter_gpu_sessions") is not None:
            get_ipython().extension_manager.load_extension("jupyter_gpu_sessions")
    except BaseException:
        pass


_jgs_load()
del _jgs_load
"""


class KernelLaunching:
    """Turning a session and its launch into a running kernel; mixed into the manager."""

    def _working_dir(self: GPUSessionManager, cwd: str) -> str:
        path = os.path.realpath(cwd or os.getcwd())
        if not os.path.isdir(path):
            raise InvalidRequest(f"the kernel's working directory {cwd!r} is not a directory")
        if path in _FORBIDDEN_WORKDIRS or any(
            path == tree or path.startswith(tree + "/") for tree in _FORBIDDEN_WORKDIR_TREES
        ):
            raise InvalidRequest(
                f"the kernel's working directory {path!r} is a system directory and cannot be "
                "mounted into a container: start the kernel from a notebook directory, or set "
                "the kernelspec's working_dir"
            )
        return path

    def _kernel_user(self: GPUSessionManager, owner: str, working_dir: str) -> tuple[int, int]:
        """The uid and gid ``owner``'s kernel runs as (see ``kernel_user_map``)."""
        if self.kernel_uid is not None:
            gid = self.kernel_gid if self.kernel_gid is not None else self.kernel_uid
            return self.kernel_uid, gid
        mapped = self._mapped_kernel_user(owner)
        if mapped is not None:
            return mapped
        if os.geteuid() != 0:
            return os.geteuid(), os.getegid()
        try:
            account = pwd.getpwnam(owner)
        except (KeyError, ValueError):  # no such OS user (ValueError: an embedded NUL)
            account = None
        if account is not None and account.pw_uid != 0:
            return account.pw_uid, account.pw_gid
        # Never in the manager service: its callers name the directory, and could name
        # someone else's to run as them.
        if self.match_notebook_owner and not self.service_name:
            st = os.stat(working_dir)
            if st.st_uid != 0:
                return st.st_uid, st.st_gid
        return self.fallback_uid, self.fallback_uid

    def _mapped_kernel_user(self: GPUSessionManager, owner: str) -> tuple[int, int] | None:
        """What ``kernel_user_map`` says for ``owner``, or None when it says nothing."""
        mapping = self.kernel_user_map
        what = f"kernel_user_map[{owner!r}]"
        if callable(mapping):
            value = mapping(owner)
            if value is None:
                return None
            if isinstance(value, tuple | list) and len(value) == 2:
                value = f"{value[0]}:{value[1]}"
            what = f"kernel_user_map({owner!r})"
        elif owner in mapping:
            value = mapping[owner]
        else:
            return None
        try:
            uid, gid = parse_kernel_user(value, what)
        except TraitError as exc:
            raise InvalidRequest(
                f"{exc}: fix c.GPUSessionManager.kernel_user_map (ask an admin)"
            ) from None
        if gid is None:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = uid
        return uid, gid

    def _kernel_env(self: GPUSessionManager, launch: KernelLaunch) -> dict[str, str]:
        allowed = set(self.env_allowlist)
        if launch.runtime == "local":
            allowed |= set(self.local_env_allowlist)
        allowed -= SERVER_SECRETS | API_ENV  # the server's credentials never pass
        env = {k: v for k, v in launch.env.items() if k in allowed}
        share = launch.request.gpu_share
        if share:
            # A time-sliced share: the frameworks' own memory caps (soft — a process can
            # ignore them), and the MPS thread limit where an MPS daemon runs.
            env.update(
                JUPYTER_GPU_SESSIONS_GPU_SHARE=f"{share:g}",
                XLA_PYTHON_CLIENT_MEM_FRACTION=f"{share:g}",
                TF_FORCE_GPU_ALLOW_GROWTH="true",
                CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=str(max(1, int(share * 100))),
            )
        env.update(launch.explicit_env)
        dropped = sorted(k for k in env if k in SERVER_SECRETS)
        if dropped:
            self.log.warning(
                "Not passing %s to kernel %s: the server's credentials never reach a kernel "
                "(it gets its session's own token)",
                ", ".join(dropped),
                launch.kernel_id,
            )
        return {k: v for k, v in env.items() if k not in SERVER_SECRETS}

    def _attached_devices(self: GPUSessionManager, session: Session) -> tuple[GPUDevice, ...]:
        """What the container gets for its allocations: whole GPUs, MIG instances (by their
        own UUID, through the parent's device node), or the GPU a share runs on."""
        by_uuid = {d.uuid: d for d in self.inventory.devices()}
        attached = []
        for allocation in session.allocations:
            parent = by_uuid.get(allocation.gpu_uuid)
            if parent is None:
                raise KernelLaunchError(
                    f"GPU {allocation.gpu_uuid} allocated to this session is not in this "
                    "host's inventory any more"
                )
            if allocation.kind == "mig":
                attached.append(replace(parent, uuid=allocation.device_uuid, mig_instances=()))
            else:
                attached.append(parent)
        return tuple(attached)

    def _launch_spec(self: GPUSessionManager, session: Session, launch: KernelLaunch) -> LaunchSpec:
        uid, gid = self._kernel_user(launch.owner, launch.cwd)
        state_dir = os.path.join(self.state_root, session.id)
        return LaunchSpec(
            session_id=session.id,
            kernel_id=launch.kernel_id,
            owner=launch.owner,
            image=launch.image,
            argv=self._kernel_argv(launch, state_dir),
            env={**self._kernel_env(launch), **self.session_api_env(session)},
            working_dir=launch.cwd,
            resources=launch.request,
            connection_file=launch.connection_file,
            connection_info=launch.connection_info,
            state_dir=state_dir,
            uid=uid,
            gid=gid,
            devices=self._attached_devices(session),
            mounts=tuple(
                Mount(m.host_path, m.container_path, m.read_only)
                for m in self._vfolder_mounts(launch)
            )
            + self.session_api_mounts(session),
            labels={
                **launch.labels,
                STORE_LABEL: self.store_id,
                **({SERVICE_LABEL: self.service_name} if self.service_name else {}),
            },
        )

    @staticmethod
    def _kernel_argv(launch: KernelLaunch, state_dir: str) -> list[str]:
        """The kernel's command; an IPython kernel also runs the session's notice file."""
        argv = list(launch.argv)
        if launch.connection_file and any("ipykernel" in arg for arg in argv):
            folder = CONTAINER_STATE_DIR if launch.runtime == "docker" else state_dir
            argv.append(f"--IPKernelApp.exec_files={json.dumps([f'{folder}/{NOTICE_FILE}'])}")
        return argv

    def _vfolder_mounts(self: GPUSessionManager, launch: KernelLaunch) -> list[VFolderMount]:
        """The vfolders a kernel asked for, checked against what its owner may mount now."""
        if not launch.vfolders:
            return []
        if launch.runtime != "docker":
            raise InvalidRequest(
                "vfolders are mounted only into container kernels (runtime 'docker'); "
                f"this kernel uses the {launch.runtime!r} runtime: remove its vfolders, or "
                "use a container kernelspec"
            )
        return self.vfolders.resolve_mounts(self.identity(launch.owner), list(launch.vfolders))

    def _prepare_state_dir(
        self: GPUSessionManager,
        spec: LaunchSpec,
        notice: str = "",
        session: Session | None = None,
    ) -> None:
        """The kernel's state directory: the start-up file an IPython kernel runs (loads
        the %session magics; the notice its first cell shows, e.g. why it was restarted)
        and, given its ``session``, ``session.json``."""
        os.makedirs(spec.state_dir, mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(spec.state_dir, spec.uid, spec.gid)
        code = _AUTOLOAD_CODE
        if notice:
            code += "\n\n" + _NOTICE_CODE.format(message=json.dumps(notice))
        # 0644: the kernel reads it; written over whatever a previous kernel left there.
        write_kernel_file(
            os.path.join(spec.state_dir, NOTICE_FILE), code, spec.uid, spec.gid, 0o644
        )
        if session is not None:
            self.write_session_info(session, spec)

    async def _wait_until_alive(
        self,
        runtime: KernelRuntime,
        handle: RuntimeHandle,
        spec: LaunchSpec,
        timeout: float,
        session_id: str,
    ) -> None:
        """Until the kernel's heartbeat answers; fail early when it exits, when its session
        is ended meanwhile (by anyone), or at ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ip = spec.connection_info.get("ip") or "127.0.0.1"
        url = f"tcp://{ip}:{spec.connection_info['hb_port']}"
        context = _heartbeat_context()
        checked = -math.inf
        while True:
            # An end asked for meanwhile: this process's own at once, another's (read from
            # the store) within half a second.
            if session_id in self._ending or loop.time() - checked >= 0.5:
                checked = loop.time()
                current = await asyncio.to_thread(self.store.get, session_id, history=False)
                if current.status not in STARTING:
                    raise _EndedMeanwhile()
            state = await runtime.poll(handle)
            if state is not None:
                raise KernelLaunchError(
                    f"The kernel {state.describe()} before it was ready "
                    f"({await runtime.describe(handle)}). " + await self._log_tail(runtime, handle)
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise KernelLaunchError(
                    f"The kernel did not answer within {timeout:g}s (launch_timeout); "
                    f"{await runtime.describe(handle)}. It has been removed. "
                    + await self._log_tail(runtime, handle),
                    reason="launch-timeout",
                )
            if await _heartbeat(context, url, min(0.5, remaining)):
                return

    @staticmethod
    async def _log_tail(runtime: KernelRuntime, handle: RuntimeHandle) -> str:
        try:
            text = (await runtime.logs(handle, tail=20)).rstrip()
        except GPUSessionsError:
            text = ""
        return f"Last lines of its log:\n{text}" if text else "It wrote nothing to its log."


_heartbeats: tuple[int, zmq.asyncio.Context] | None = None
_heartbeats_lock = threading.Lock()


def _heartbeat_context() -> zmq.asyncio.Context:
    """The ZMQ context of this process's heartbeat checks, made once (again after a fork). A
    context runs an I/O thread: one per start would be started, then joined on the event
    loop, at every kernel start. Each check closes its own socket."""
    global _heartbeats
    with _heartbeats_lock:
        if _heartbeats is None or _heartbeats[0] != os.getpid() or _heartbeats[1].closed:
            _heartbeats = (os.getpid(), zmq.asyncio.Context())
        return _heartbeats[1]


async def _heartbeat(context: zmq.asyncio.Context, url: str, timeout: float) -> bool:
    """One ping on the kernel's heartbeat channel; True when it echoes within ``timeout``.

    ``IMMEDIATE`` queues the ping only on a completed handshake: Docker's port proxy
    accepts (and then drops) connections before the kernel listens, and a ping queued on
    such a connection would be lost, costing a whole timeout.
    """
    socket = context.socket(zmq.REQ)
    socket.linger = 0
    socket.immediate = 1
    socket.reconnect_ivl = 20  # ms; the default 100 ms adds up to a visible delay
    try:
        socket.connect(url)
        await asyncio.wait_for(socket.send(b"ping"), timeout)
        return bool(await socket.poll(timeout=int(timeout * 1000)))
    except asyncio.TimeoutError:
        return False
    finally:
        socket.close(linger=0)
