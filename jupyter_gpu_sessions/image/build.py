"""Build the default kernel image offline: pip download → mmdebstrap → docker import (the
base), then ``docker build`` of a thin layer with the kernel-side package on top."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import TextIO

from ..core.errors import ImageBuildError, RuntimeUnavailable
from .recipe import (
    DEFAULT_RECIPE,
    IMAGE_REPOSITORY,
    ImageRecipe,
    default_image,
    kernel_package_digest,
    kernel_package_files,
)

_ARCH_MANYLINUX = {"x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


class Progress:
    """Numbered steps with elapsed time; a live status line on a terminal, plain lines in logs."""

    def __init__(self, steps: int, out: TextIO) -> None:
        self.steps = steps
        self.out = out
        self.tty = out.isatty()
        self.step = 0
        self.started = time.monotonic()
        self.step_started = self.started

    def begin(self, text: str) -> None:
        self.step += 1
        self.step_started = time.monotonic()
        self.out.write(f"[{self.step}/{self.steps}] {text}\n")
        self.out.flush()

    def line(self, text: str) -> None:
        text = text.rstrip()
        if not text:
            return
        elapsed = time.monotonic() - self.step_started
        if self.tty:
            width = shutil.get_terminal_size().columns - 12
            self.out.write(f"\r\x1b[K  {elapsed:5.0f}s  {text[:width]}")
        else:
            self.out.write(f"  {elapsed:5.0f}s  {text}\n")
        self.out.flush()

    def end(self, text: str = "done") -> None:
        elapsed = time.monotonic() - self.step_started
        if self.tty:
            self.out.write("\r\x1b[K")
        self.out.write(f"      {text} in {elapsed:.1f}s\n")
        self.out.flush()


def _run(cmd: Sequence[str], progress: Progress, what: str, env: dict | None = None) -> None:
    """Run ``cmd``, streaming its output as progress; keep the tail for the error message."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
        )
    except OSError as exc:
        raise ImageBuildError(f"{what} could not run ({cmd[0]}): {exc}") from exc
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        progress.line(line)
    if proc.wait() != 0:
        raise ImageBuildError(
            f"{what} failed (exit code {proc.returncode}). Last lines:\n" + "\n".join(tail)
        )


def manylinux_platforms(glibc: str, arch: str) -> list[str]:
    """Every wheel platform tag a root filesystem with ``glibc`` on ``arch`` can load."""
    major, minor = (int(p) for p in glibc.split("."))
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    tags += [f"manylinux2014_{arch}", f"linux_{arch}"]
    if arch == "x86_64":
        tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
    return tags


def download_wheels(recipe: ImageRecipe, dest: str, progress: Progress) -> None:
    arch = _ARCH_MANYLINUX.get(recipe.arch, recipe.arch)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--dest",
        dest,
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        recipe.python_version,
    ]
    for tag in manylinux_platforms(recipe.glibc, arch):
        cmd += ["--platform", tag]
    _run([*cmd, *recipe.wheels], progress, "Downloading the kernel's Python wheels")


def python_trees(recipe: ImageRecipe) -> list[str]:
    """The stdlib, Debian's packages and the wheels installed by pip, inside the rootfs."""
    version = recipe.python_version
    return [
        f"/usr/lib/python{version}",
        "/usr/lib/python3/dist-packages",
        f"/usr/local/lib/python{version}/dist-packages",
    ]


def mmdebstrap_command(recipe: ImageRecipe, wheel_dir: str, output: str) -> list[str]:
    pip = shlex.join(
        [
            "env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "python3",
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--break-system-packages",
            "--find-links",
            "/tmp/wheels",
            *recipe.wheels,
        ]
    )
    return [
        "mmdebstrap",
        "--variant=apt",
        "--include=" + ",".join(recipe.debian_packages),
        "--customize-hook=" + f"copy-in {shlex.quote(wheel_dir)} /tmp",
        "--customize-hook=" + f'chroot "$1" {pip}',
        "--customize-hook=" + 'rm -rf "$1/tmp/wheels" "$1/root/.cache"',
        # The tarball does not keep the mtimes timestamp-checked .pyc files were made
        # against, and kernels (non-root) cannot rewrite them: each start would recompile
        # IPython. Unchecked-hash bytecode is never revalidated — right for an immutable
        # image. (A few stdlib test files do not compile; that is harmless, hence `|| true`.)
        "--customize-hook="
        + 'chroot "$1" python3 -m compileall -q -f -j0 --invalidation-mode unchecked-hash '
        + " ".join(python_trees(recipe))
        + " || true",
        recipe.suite,
        output,
    ]


def image_exists(client, tag: str) -> bool:
    from docker.errors import ImageNotFound

    try:
        client.images.get(tag)
    except ImageNotFound:
        return False
    return True


def _docker_client():
    import docker
    from docker.errors import DockerException

    from ..core.errors import docker_socket_hint

    try:
        client = docker.from_env(timeout=300)
        client.ping()
    except DockerException as exc:
        raise RuntimeUnavailable(f"{docker_socket_hint(None)} ({exc})") from exc
    return client


def build_image(
    recipe: ImageRecipe = DEFAULT_RECIPE,
    *,
    client=None,
    force: bool = False,
    out: TextIO = sys.stderr,
) -> str:
    """Build the default kernel image: the base of ``recipe`` (reused when present), then
    the kernel-side package on top; tagged ``<recipe hash>-<package hash>`` and
    ``:latest``. Returns the tag. ``force`` rebuilds both."""
    from docker.errors import DockerException

    client = client or _docker_client()
    tag = default_image() if recipe == DEFAULT_RECIPE else f"{recipe.tag}-{kernel_package_digest()}"
    if not force and image_exists(client, tag):
        out.write(f"Kernel image {tag} is already present (use --force to rebuild).\n")
        return tag
    base = build_base_image(recipe, client=client, force=force, out=out)
    build_kernel_layer(base, tag, client=client, out=out)
    try:
        client.images.get(tag).tag(IMAGE_REPOSITORY, "latest")
    except DockerException as exc:
        raise ImageBuildError(f"docker tag failed: {exc}") from exc
    return tag


def build_kernel_layer(base: str, tag: str, *, client=None, out: TextIO = sys.stderr) -> str:
    """``docker build`` (legacy builder, no registry) of ``base`` plus this installation's
    kernel-side package in the image's dist-packages, compiled as unchecked-hash bytecode
    like the rest of the image. Seconds; needs only the base present."""
    from docker.errors import APIError, BuildError, DockerException

    client = client or _docker_client()
    if not image_exists(client, base):
        raise ImageBuildError(
            f"The base kernel image {base} is missing: build it with `jupyter gpu-sessions "
            "image build`."
        )
    started = time.monotonic()
    target = f"/usr/local/lib/python{DEFAULT_RECIPE.python_version}/dist-packages"
    with tempfile.TemporaryDirectory(prefix="jgs-layer-") as context:
        package = os.path.join(context, "jupyter_gpu_sessions")
        for name, path in kernel_package_files():
            dest = os.path.join(package, name)
            os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
            shutil.copyfile(path, dest)
            os.chmod(dest, 0o644)
        with open(os.path.join(context, "Dockerfile"), "w") as f:
            f.write(
                f"FROM {base}\n"
                f"COPY jupyter_gpu_sessions {target}/jupyter_gpu_sessions\n"
                "RUN python3 -m compileall -q -f --invalidation-mode unchecked-hash "
                f"{target}/jupyter_gpu_sessions\n"
                f'LABEL io.jupyter.gpu-sessions.kernel-package="{kernel_package_digest()}"\n'
            )
        out.write(f"Adding the kernel-side package to {base} as {tag}\n")
        try:
            for chunk in client.api.build(
                path=context, tag=tag, rm=True, forcerm=True, pull=False, decode=True
            ):
                if "error" in chunk:
                    raise ImageBuildError(f"docker build failed: {chunk['error'].strip()}")
        except (APIError, BuildError, DockerException) as exc:
            raise ImageBuildError(f"docker build failed: {exc}") from exc
    out.write(f"Kernel image {tag} built in {time.monotonic() - started:.1f}s.\n")
    return tag


def build_base_image(
    recipe: ImageRecipe = DEFAULT_RECIPE,
    *,
    client=None,
    force: bool = False,
    out: TextIO = sys.stderr,
) -> str:
    """Build ``recipe`` into a local image tagged by its hash; return the tag.

    A present tag is not rebuilt unless ``force``. Needs Docker, ``mmdebstrap`` and root
    (or unprivileged user namespaces for mmdebstrap's unshare mode).
    """
    from docker.errors import DockerException

    tag = recipe.tag
    client = client or _docker_client()
    if not force and image_exists(client, tag):
        out.write(f"Base image {tag} is already present.\n")
        return tag
    if shutil.which("mmdebstrap") is None:
        raise ImageBuildError(
            "mmdebstrap is not installed; it builds the image's Debian root filesystem "
            "offline. Install it with: sudo apt-get install mmdebstrap"
        )
    if _ARCH_MANYLINUX.get(recipe.arch) is None:
        raise ImageBuildError(f"building the default image on {platform.machine()} is untested")

    progress = Progress(3, out)
    out.write(f"Building kernel image {tag}\n")
    with tempfile.TemporaryDirectory(prefix="jgs-image-") as tmp:
        wheels = os.path.join(tmp, "wheels")
        rootfs = os.path.join(tmp, "rootfs.tar")
        progress.begin(f"downloading wheels: {', '.join(recipe.wheels)}")
        download_wheels(recipe, wheels, progress)
        progress.end(f"{len(os.listdir(wheels))} wheels")

        progress.begin(f"building a Debian {recipe.suite} root filesystem with mmdebstrap")
        _run(mmdebstrap_command(recipe, wheels, rootfs), progress, "mmdebstrap")
        progress.end(f"{os.path.getsize(rootfs) / 1024**2:.0f} MiB root filesystem")

        progress.begin("importing it into Docker")
        changes = [f"ENV {key}={value}" for key, value in recipe.env]
        changes.append(f'LABEL io.jupyter.gpu-sessions.recipe="{recipe.digest()}"')
        try:
            client.api.import_image_from_file(
                rootfs, repository=IMAGE_REPOSITORY, tag=recipe.digest(), changes=changes
            )
        except DockerException as exc:
            raise ImageBuildError(f"docker import failed: {exc}") from exc
        progress.end(tag)
    total = time.monotonic() - progress.started
    out.write(f"Base image {tag} built in {total:.0f}s.\n")
    return tag
