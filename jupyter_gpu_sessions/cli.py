"""`jupyter gpu-sessions …`: doctor, image build, kernelspec install, gpus, the manager
service, and the ``session``/``vfolder`` forms of the notebook magics."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import sys

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_core.application import JupyterApp
from jupyter_core.paths import jupyter_config_path, jupyter_runtime_dir
from traitlets import Bool, Float, Int, Unicode

from ._version import __version__
from .core.errors import GPUSessionsError
from .core.identity import Identity
from .core.units import format_size
from .engine import current_engine
from .image import default_image
from .kernel import commands
from .kernel.client import ENV_URL, APIError, Client
from .kernel.commands import CommandError, Context
from .kernel.render import Outcome
from .kernelspecs import PROVISIONER_NAME, install_kernelspec, kernel_json
from .provisioner import current_owner

SHIPPED_KERNELS = ("python3-container", "python3-gpu")


class _Base(JupyterApp):
    version = __version__

    def fail(self, error: GPUSessionsError | str, code: int = 1) -> None:
        print(f"error: {error}", file=sys.stderr)
        self.exit(code)


class DoctorApp(_Base):
    name = "jupyter-gpu-sessions-doctor"
    description = "Check what GPU sessions need on this host, and say how to fix what is missing."

    def _line(self, ok: bool | None, what: str, fix: str = "") -> None:
        mark = {True: "ok  ", False: "FAIL", None: "info"}[ok]
        print(f"[{mark}] {what}")
        if fix:
            print(f"       fix: {fix}")

    def start(self) -> None:
        problems = 0
        engine = current_engine(self.config)
        try:
            for ok, what, fix in engine.diagnose():
                problems += ok is False
                self._line(ok, what, fix)
        finally:
            engine.close()
        problems += self._check_extension()
        specs = KernelSpecManager().find_kernel_specs()
        for name in SHIPPED_KERNELS:
            if name in specs:
                self._line(True, f"kernelspec {name} installed ({specs[name]})")
            else:
                problems += 1
                self._line(
                    False,
                    f"kernelspec {name} not found",
                    "reinstall the package: pip install jupyter-gpu-sessions",
                )
        print("All set." if not problems else f"{problems} problem(s) found.")
        self.exit(1 if problems else 0)

    def _check_extension(self) -> int:
        """Is the server extension enabled (the REST API, idle culling, vfolders)?"""
        from jupyter_server.extension.config import ExtensionConfigManager

        config = ExtensionConfigManager(read_config_path=jupyter_config_path())
        if config.get_jpserver_extensions().get("jupyter_gpu_sessions"):
            self._line(True, "server extension jupyter_gpu_sessions enabled")
            return 0
        self._line(
            False,
            "server extension jupyter_gpu_sessions not enabled (no REST API, no idle culling)",
            "jupyter server extension enable --sys-prefix jupyter_gpu_sessions",
        )
        return 1


class ImageBuildApp(_Base):
    name = "jupyter-gpu-sessions-image-build"
    description = (
        "Build the default kernel image offline (Debian via mmdebstrap, wheels via pip "
        "download, then docker import). Skipped when its tag is already present."
    )
    force = Bool(False, help="Rebuild even when the tag is present.").tag(config=True)
    flags = {"force": ({"ImageBuildApp": {"force": True}}, "Rebuild even when present.")}

    def start(self) -> None:
        from .image.build import build_image

        try:
            tag = build_image(force=self.force, out=sys.stdout)
        except GPUSessionsError as exc:
            self.fail(exc)
        print(tag)


class ImageTagApp(_Base):
    name = "jupyter-gpu-sessions-image-tag"
    description = "Print the tag of the default kernel image of this version."

    def start(self) -> None:
        print(default_image())


class ImageDockerfileApp(_Base):
    name = "jupyter-gpu-sessions-image-dockerfile"
    description = "Print a Dockerfile for a CUDA kernel image (needs a registry to build)."

    def start(self) -> None:
        from importlib.resources import files

        print(files("jupyter_gpu_sessions.image").joinpath("cuda.Dockerfile").read_text(), end="")


class ImageApp(_Base):
    name = "jupyter-gpu-sessions-image"
    description = "Kernel images."
    subcommands = {
        "build": (ImageBuildApp, ImageBuildApp.description),
        "tag": (ImageTagApp, ImageTagApp.description),
        "dockerfile": (ImageDockerfileApp, ImageDockerfileApp.description),
    }

    def start(self) -> None:
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        super().start()


class KernelspecInstallApp(_Base):
    name = "jupyter-gpu-sessions-kernelspec-install"
    description = "Install a kernelspec that runs its kernels as GPU sessions."
    kernel_name = Unicode("", help="Kernel name (directory), e.g. python3-2gpu.").tag(config=True)
    display_name = Unicode("", help="Name shown in the launcher.").tag(config=True)
    image = Unicode("", help="Container image (default: the built default image).").tag(config=True)
    gpus = Int(0, help="Whole GPUs.").tag(config=True)
    cpus = Float(0, help="CPU limit (0: none).").tag(config=True)
    memory = Unicode("", help='Memory limit, e.g. "16GiB".').tag(config=True)
    shm_size = Unicode("", help='Size of /dev/shm, e.g. "1GiB".').tag(config=True)
    runtime = Unicode("docker", help="docker or local.").tag(config=True)
    user = Bool(False, help="Install for the current user only.").tag(config=True)
    prefix = Unicode("", help="Install under this prefix (e.g. sys.prefix).").tag(config=True)
    aliases = {
        "name": "KernelspecInstallApp.kernel_name",
        "display-name": "KernelspecInstallApp.display_name",
        "image": "KernelspecInstallApp.image",
        "gpus": "KernelspecInstallApp.gpus",
        "cpus": "KernelspecInstallApp.cpus",
        "memory": "KernelspecInstallApp.memory",
        "shm-size": "KernelspecInstallApp.shm_size",
        "runtime": "KernelspecInstallApp.runtime",
        "prefix": "KernelspecInstallApp.prefix",
    }
    flags = {
        "user": ({"KernelspecInstallApp": {"user": True}}, "Install for the current user."),
        "sys-prefix": (
            {"KernelspecInstallApp": {"prefix": sys.prefix}},
            "Install into this Python environment.",
        ),
    }

    def start(self) -> None:
        if not self.kernel_name:
            self.fail("--name is required, e.g. --name python3-2gpu")
        gpu_text = f"{self.gpus} GPU" + ("s" if self.gpus != 1 else "")
        display = (
            self.display_name or f"Python 3 ({gpu_text}{', ' + self.image if self.image else ''})"
        )
        try:
            spec = kernel_json(
                display_name=display,
                gpus=self.gpus,
                cpus=self.cpus or None,
                memory=self.memory or None,
                shm_size=self.shm_size or None,
                image=self.image or None,
                runtime=self.runtime,
            )
            path = install_kernelspec(
                self.kernel_name, spec, user=self.user, prefix=self.prefix or None
            )
        except (GPUSessionsError, OSError) as exc:
            self.fail(exc)
        print(f"Installed kernelspec {self.kernel_name} ({display}) in {path}")


class KernelspecApp(_Base):
    name = "jupyter-gpu-sessions-kernelspec"
    description = "Kernelspecs that use the " + PROVISIONER_NAME + "."
    subcommands = {"install": (KernelspecInstallApp, KernelspecInstallApp.description)}

    def start(self) -> None:
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        super().start()


class GPUsApp(_Base):
    name = "jupyter-gpu-sessions-gpus"
    description = "List this host's GPUs (and MIG instances), and which session holds each."

    def start(self) -> None:
        engine = current_engine(self.config)
        try:
            # Whoever can run this reads the host's store: they see every holder.
            who = Identity(current_owner(), frozenset(), is_admin=True)
            snapshot = asyncio.run(engine.gpus(who))["gpus"]
        finally:
            engine.close()
        if not snapshot:
            print("No GPUs (no NVIDIA driver, and JUPYTER_GPU_SESSIONS_SIMULATED_GPUS unset).")
            return

        def held_by(gpu: dict, uuid: str) -> list[str]:
            return [
                f"{h['owner'] or '?'}{share} (session {h['session_id'][:8]})"
                for h in gpu["holders"]
                if uuid in h["devices"]
                for share in [f" {h['shares'][uuid]:g}" if uuid in h["shares"] else ""]
            ]

        def state(use: dict | None) -> str:
            use = use or {}
            busy = "-" if use.get("gpu") is None else f"{use['gpu']}%"
            used = use.get("memory_used")
            return f"{busy:>5} {'-' if used is None else format_size(used):>8}"

        print(
            f"{'#':>4}  {'UUID':<44}  {'NAME':<28}  {'MEMORY':>8}  {'UTIL':>5} {'USED':>8}  HELD BY"
        )
        for d in snapshot:
            held = ", ".join(held_by(d, d["uuid"])) or ("MIG" if d["mig_mode"] else "free")
            print(
                f"{d['index']:>4}  {d['uuid']:<44}  {d['name']:<28}  "
                f"{format_size(d['memory']):>8}  {state(d['utilization'])}  {held}"
            )
            for m in d["mig_instances"]:
                held = ", ".join(held_by(d, m["uuid"])) or "free"
                print(
                    f"{'':>4}  {m['uuid']:<44}  {'  ' + m['profile']:<28}  "
                    f"{format_size(m['memory']):>8}  {'':>5} {'':>8}  {held}"
                )


class ClearHistoryApp(_Base):
    name = "jupyter-gpu-sessions-clear-history"
    description = (
        "Delete ended sessions (and their history) older than --retention, e.g. 1yr, 6mo, "
        "30d or 12h; --vacuum then gives the space back to the file system. Live sessions "
        "are never touched."
    )
    retention = Unicode("", help="How long ended sessions are kept: 1yr, 6mo, 30d, 12h.").tag(
        config=True
    )
    vacuum = Bool(False, help="VACUUM the database afterwards.").tag(config=True)
    aliases = {"retention": "ClearHistoryApp.retention"}
    flags = {"vacuum": ({"ClearHistoryApp": {"vacuum": True}}, "VACUUM the database afterwards.")}

    def start(self) -> None:
        from .core.units import parse_duration

        if not self.retention:
            self.log.error("Say how long ended sessions are kept: --retention 1yr (or 6mo, 30d).")
            self.exit(2)
        try:
            retention = parse_duration(self.retention, what="--retention")
        except GPUSessionsError as exc:
            self.log.error("%s", exc)
            self.exit(2)
        engine = current_engine(self.config)
        who = Identity(current_owner(), frozenset(), is_admin=True)
        try:
            deleted = asyncio.run(engine.clear_history(who, retention, vacuum=self.vacuum))
        except GPUSessionsError as exc:
            self.fail(exc, code=2)
        finally:
            engine.close()
        print(
            f"Deleted {deleted} ended session(s) older than {self.retention}"
            + (" and vacuumed the database." if self.vacuum else ".")
        )


def running_servers() -> list[dict]:
    """This user's running Jupyter servers, newest first (their ``jpserver-*.json``)."""
    found = []
    for path in glob.glob(os.path.join(jupyter_runtime_dir(), "jpserver-*.json")):
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable, or its server is gone
        found.append((os.path.getmtime(path), info))
    return [info for _, info in sorted(found, key=lambda item: item[0], reverse=True)]


def api_client(what: str) -> Client:
    """The API a terminal talks to: $JUPYTER_GPU_SESSIONS_URL (and _TOKEN), else the first
    of the user's running Jupyter servers whose gpu-sessions API answers."""
    if os.environ.get(ENV_URL, "").strip():
        return Client.from_env(os.environ, what=what)
    tried = []
    for info in running_servers():
        base = info.get("base_url") or "/"
        if info.get("sock"):
            client = Client(
                f"http://localhost{base}gpu-sessions/api/",
                token=info.get("token"),
                socket_path=info["sock"],
                timeout=5,
            )
        else:
            url = info.get("url") or f"http://127.0.0.1:{info.get('port')}{base}"
            client = Client(
                url.rstrip("/") + "/gpu-sessions/api/", token=info.get("token"), timeout=5
            )
        try:
            client.request("GET", "quota")
        except APIError as exc:
            tried.append(f"{client.base_url}: {exc.message}")
            continue
        client.timeout = 30
        return client
    looked = f" (tried {'; '.join(tried)})" if tried else ""
    raise CommandError(
        f"{what}: no running Jupyter server with jupyter-gpu-sessions answered{looked}: start "
        "one (jupyter lab), or set JUPYTER_GPU_SESSIONS_URL and JUPYTER_GPU_SESSIONS_TOKEN"
    )


class _CommandsApp(_Base):
    """``session …`` / ``vfolder …``: the command layer of the magics, as text."""

    group = ""

    def initialize(self, argv=None) -> None:
        # The forms are parsed by the command layer (argparse), not by traitlets.
        self.command_argv = list(argv or [])

    def start(self) -> None:
        ctx = Context(
            prog=f"jupyter gpu-sessions {self.group}",
            out=lambda line: print(line, flush=True),
            client_factory=api_client,
        )
        try:
            result = commands.run(self.group, self.command_argv, ctx)
        except CommandError as exc:
            print(exc.message, file=sys.stderr)
            self.exit(2 if exc.usage else 1)
        if result is not None:
            print(result.text())
        if isinstance(result, Outcome):
            self.exit(result.exit_status)


class SessionApp(_CommandsApp):
    name = "jupyter-gpu-sessions-session"
    description = (
        "My sessions: list, info, start, run, logs, rm, show-graph, gpus, quota (as %session)."
    )
    group = "session"


class VFolderApp(_CommandsApp):
    name = "jupyter-gpu-sessions-vfolder"
    description = "My vfolders: list, create, info, share, clone, rm, restore (as %vfolder)."
    group = "vfolder"


class GPUSessionsApp(_Base):
    name = "jupyter-gpu-sessions"
    description = "GPU sessions for Jupyter: every kernel a container with its own GPUs."
    subcommands = {
        "doctor": (DoctorApp, DoctorApp.description),
        "image": (ImageApp, ImageApp.description),
        "kernelspec": (KernelspecApp, KernelspecApp.description),
        "gpus": (GPUsApp, GPUsApp.description),
        "clear-history": (ClearHistoryApp, ClearHistoryApp.description),
        "session": (SessionApp, SessionApp.description),
        "vfolder": (VFolderApp, VFolderApp.description),
        # Imported when asked for: the service is a whole jupyter_server application.
        "manager": (
            "jupyter_gpu_sessions.server.service.ManagerApp",
            "Run the manager as a service (for JupyterHub): the engine, its REST API and "
            "the engine RPC that users' servers in remote mode call.",
        ),
    }

    def start(self) -> None:
        if self.subapp is None:
            self.print_subcommands()
            self.exit(1)
        super().start()


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    GPUSessionsApp.launch_instance()


if __name__ == "__main__":
    main()
