"""Storage folders (vfolders): names, permissions, mount requests and the records themselves."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

from .errors import InvalidRequest

MAX_NAME_LENGTH = 64
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_NAME_RULE = (
    f"use 1 to {MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', starting with a letter or "
    "a digit, such as 'data' or 'team-ds'"
)

VFOLDER_TYPES = ("user", "project")
BACKENDS = ("directory", "loopback")
CONTAINER_ROOT = "/home/work"


def check_vfolder_name(name: Any) -> str:
    """``name`` if it may name a vfolder (it becomes ``/home/work/<name>`` in kernels)."""
    if not isinstance(name, str):
        raise InvalidRequest(f"vfolder name {name!r} is not a string: {_NAME_RULE}")
    if not name:
        raise InvalidRequest(f"a vfolder name is required: {_NAME_RULE}")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidRequest(
            f"vfolder name {name[:20]!r}… is {len(name)} characters long, more than "
            f"{MAX_NAME_LENGTH}: {_NAME_RULE}"
        )
    problem = None
    if "\x00" in name:
        problem = "contains a NUL character"
    elif "/" in name or "\\" in name:
        problem = "contains a slash"
    elif ".." in name:
        problem = "contains '..'"
    elif name.startswith("."):
        problem = "starts with a dot (hidden names are not allowed)"
    elif not _NAME_RE.match(name):
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "._-"))})
        problem = (
            "starts with " + repr(name[0])
            if not bad
            else "contains " + ", ".join(repr(c) for c in bad)
        )
    if problem:
        raise InvalidRequest(f"vfolder name {name!r} {problem}: {_NAME_RULE}")
    return name


def is_vfolder_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


class Permission(str, Enum):
    """What one person may do with a vfolder, each level including the ones below:
    ``ro`` read, ``rw`` also write (upload, mkdir, overwrite), ``wd`` also delete."""

    RO = "ro"
    RW = "rw"
    WD = "wd"

    @classmethod
    def parse(cls, value: Any, *, what: str = "permission") -> Permission:
        if isinstance(value, Permission):
            return value
        try:
            return cls(str(value).strip().lower()) if isinstance(value, str) else cls(value)
        except ValueError:
            raise InvalidRequest(
                f"{what} {value!r} is not a vfolder permission: use 'ro' (read-only), "
                "'rw' (read-write) or 'wd' (read-write-delete)"
            ) from None

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def can_write(self) -> bool:
        return self.rank >= _RANK[Permission.RW]

    @property
    def can_delete(self) -> bool:
        return self is Permission.WD

    def allows(self, needed: Permission) -> bool:
        return self.rank >= needed.rank

    @staticmethod
    def lower(a: Permission, b: Permission) -> Permission:
        """The lesser of two permissions (a request can only lower what one has)."""
        return a if a.rank <= b.rank else b

    def describe(self) -> str:
        return _DESCRIPTION[self]

    def __str__(self) -> str:
        return self.value


_RANK = {Permission.RO: 0, Permission.RW: 1, Permission.WD: 2}
_DESCRIPTION = {
    Permission.RO: "read-only (ro)",
    Permission.RW: "read-write (rw)",
    Permission.WD: "read-write-delete (wd)",
}


def parse_mount(spec: Any) -> tuple[str, Permission | None]:
    """``"data"`` → ``("data", None)``; ``"team-ds:ro"`` → ``("team-ds", Permission.RO)``.

    The name may also be a vfolder's 32-hex id."""
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidRequest(
            f"vfolder mount {spec!r} is not understood: use a vfolder name, optionally with a "
            "permission, such as 'data' or 'team-ds:ro'"
        )
    name, sep, perm = spec.strip().partition(":")
    check_vfolder_name(name)
    if not sep:
        return name, None
    return name, Permission.parse(perm, what=f"permission in vfolder mount {spec!r}")


@dataclass(frozen=True)
class VFolder:
    """One storage folder. ``owner`` is the user of a user vfolder, the creating admin of a
    project vfolder; ``group`` and ``group_permission`` are set for project vfolders only.
    ``quota`` is bytes (``None``: no limit, directory backend only)."""

    id: str
    name: str
    type: str
    owner: str
    group: str | None
    backend: str
    quota: int | None
    cloneable: bool
    status: str
    group_permission: Permission | None
    created_at: float
    trashed_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["group_permission"] = self.group_permission.value if self.group_permission else None
        return data

    def describe(self) -> str:
        if self.type == "project":
            return f"project vfolder {self.name!r} of group {self.group!r}"
        return f"vfolder {self.name!r} of {self.owner}"


@dataclass(frozen=True)
class Share:
    """An invitation to use a vfolder (``invited`` → ``accepted`` | ``declined``), or an
    admin's per-user override of a project vfolder's group permission (``accepted``)."""

    id: str
    vfolder_id: str
    user: str
    permission: Permission
    state: str
    invited_by: str
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["permission"] = self.permission.value
        return data


@dataclass(frozen=True)
class VFolderMount:
    """A vfolder as a kernel start mounts it: ``host_path`` at ``container_path``."""

    vfolder_id: str
    name: str
    host_path: str
    container_path: str
    read_only: bool
    permission: Permission
    reason: str = ""  # why it is read-only beyond the permission (over its quota), if so

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["permission"] = self.permission.value
        return data


@dataclass(frozen=True)
class FileEntry:
    """One entry of a vfolder's directory. ``type`` is ``file``, ``dir``, ``symlink`` or
    ``other`` (a FIFO, socket or device node a kernel made); symlinks are never followed."""

    name: str
    type: str
    size: int
    mtime: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
