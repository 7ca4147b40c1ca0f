"""The kernel image recipe as data; its hash names the image, so a changed recipe rebuilds.

The default image is two layers: the base, a root filesystem built from the recipe (its
hash is the base's tag), and on top the kernel-side package (``%session`` magics, client,
widgets) copied from this installation, so a change to ``kernel/`` rebuilds in seconds,
not the whole root filesystem. Its tag: ``<recipe hash>-<hash of those files>``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

IMAGE_REPOSITORY = "jupyter-gpu-sessions/python3"
BUILD_COMMAND = "jupyter gpu-sessions image build"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
# What of this package runs inside kernels (stdlib, IPython, ipywidgets, tornado only).
KERNEL_PACKAGE_FILES = ("__init__.py", "_version.py", "widgets.py")
KERNEL_PACKAGE_DIRS = ("kernel",)


@dataclass(frozen=True)
class ImageRecipe:
    """A Debian root filesystem with Python, plus wheels installed on top.

    Debian's packages come from the host's own apt sources (no registry needed); the
    Python packages are wheels downloaded on the host with ``pip download`` and installed
    inside the root filesystem, because containers here cannot reach a package index.
    """

    suite: str = "bookworm"
    python_version: str = "3.11"  # the suite's python3
    glibc: str = "2.36"  # the suite's glibc, bounds which manylinux wheels fit
    debian_packages: tuple[str, ...] = (
        "python3",
        "python3-pip",
        "python3-numpy",
        "ca-certificates",
        "procps",
    )
    wheels: tuple[str, ...] = ("ipykernel>=7.1,<8", "ipywidgets>=8.1,<9")
    env: tuple[tuple[str, str], ...] = (
        ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        ("LANG", "C.UTF-8"),
        ("PYTHONUNBUFFERED", "1"),
    )
    arch: str = field(default_factory=platform.machine)
    # Bump when the build steps change in a way the fields above do not show.
    revision: int = 3

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def tag(self) -> str:
        return f"{IMAGE_REPOSITORY}:{self.digest()}"


DEFAULT_RECIPE = ImageRecipe()


def kernel_package_files(package_dir: Path = PACKAGE_DIR) -> list[tuple[str, Path]]:
    """(path relative to the package, file) of every file the image's layer carries."""
    found = [(name, package_dir / name) for name in KERNEL_PACKAGE_FILES]
    for folder in KERNEL_PACKAGE_DIRS:
        for path in sorted((package_dir / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found.append((path.relative_to(package_dir).as_posix(), path))
    return [(name, path) for name, path in found if path.is_file()]


@functools.lru_cache(maxsize=1)
def kernel_package_digest() -> str:
    """A hash of the kernel-side files (fixed for the life of a process, so every part of
    it names the same image)."""
    digest = hashlib.sha256()
    for name, path in kernel_package_files():
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:8]


def default_image() -> str:
    """The tag of the default kernel image this version of the package builds: the base
    of the recipe with the kernel-side package on top."""
    return f"{DEFAULT_RECIPE.tag}-{kernel_package_digest()}"


def build_hint(image: str) -> str:
    """What to run to get ``image`` onto this host."""
    if image == default_image() or image.split(":")[0] == IMAGE_REPOSITORY:
        return f"Build it with: {BUILD_COMMAND}"
    return (
        f"Pull it (`docker pull {image}`) or build it (`docker build -t {image} …`; "
        "see the CUDA recipe in the README), or use the default image, built with: "
        f"{BUILD_COMMAND}"
    )
