"""The kernel image recipe as data; its hash names the image, so a changed recipe rebuilds."""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field

IMAGE_REPOSITORY = "jupyter-gpu-sessions/python3"
BUILD_COMMAND = "jupyter gpu-sessions image build"


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


def default_image() -> str:
    """The tag of the default kernel image this version of the package builds."""
    return DEFAULT_RECIPE.tag


def build_hint(image: str) -> str:
    """What to run to get ``image`` onto this host."""
    if image == default_image() or image.split(":")[0] == IMAGE_REPOSITORY:
        return f"Build it with: {BUILD_COMMAND}"
    return (
        f"Pull it (`docker pull {image}`) or build it (`docker build -t {image} …`; "
        "see the CUDA recipe in the README), or use the default image, built with: "
        f"{BUILD_COMMAND}"
    )
