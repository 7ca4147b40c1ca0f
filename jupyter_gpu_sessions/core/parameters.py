"""A GPU session kernel's launch parameters: the JSON Schema a kernelspec carries in
``metadata.parameters`` (JEP 87, parameterized kernelspecs), and a notebook's saved choice.

The schema's properties are flat, as JEP 87 has them: ``gpus``, ``gpu_profile``,
``gpu_share``, ``cpus``, ``memory``, ``image``, ``vfolders``. A notebook saves its choice
under ``metadata["jupyter-gpu-sessions"]`` as
``{"resources": {"gpus", "gpu_profile", "gpu_share", "cpus", "memory"}, "image": …,
"vfolders": [{"name": …, "permission": "ro" | "rw"}, …]}`` (a vfolder may also be written
``"name"`` or ``"name:ro"``, as earlier versions saved them).

A kernelspec written to disk cannot know the host it will run on: its schema holds the
engine's own limits (:func:`static_bounds`). The server's ``GET gpu-sessions/api/launcher``
serves the same schema bounded by the host and by the caller's policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest
from .models import MAX_GPUS_PER_SESSION
from .vfolders import check_vfolder_name

CHOICE_KEY = "jupyter-gpu-sessions"
RESOURCE_KEYS = ("gpus", "gpu_profile", "gpu_share", "cpus", "memory")
GPU_FORMS = ("gpus", "gpu_profile", "gpu_share")
CHOICE_KEYS = ("resources", "image", "vfolders")
MOUNT_PERMISSIONS = ("ro", "rw")
# What parse_size accepts: a number with an optional decimal or binary unit.
MEMORY_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtT][iI]?[bB]?|[bB])?\s*$"
MIG_PATTERN = r"^$|^[0-9]g\.[0-9]+gb$"
_NO_GPU = {"gpus": 0, "gpu_profile": "", "gpu_share": 0.0}  # each GPU form's "none"
LIVE_SCHEMA = "GET {base_url}gpu-sessions/api/launcher"


@dataclass
class Bounds:
    """What a schema lets a person choose. ``None`` for a size or a CPU count: no bound
    known. ``mig_profiles`` None: any well-formed profile name (static schemas)."""

    max_gpus: int = MAX_GPUS_PER_SESSION
    mig_profiles: list[str] | None = None
    max_share: float = 0.99
    max_cpus: float | None = None
    max_memory: int | None = None
    images: list[str] = field(default_factory=list)
    vfolders: list[str] | None = None  # names the caller may mount; None: any name
    live: bool = False


def static_bounds(image: str | None = None) -> Bounds:
    """The engine's own limits: what a kernelspec file on disk can promise."""
    return Bounds(images=[image] if image else [])


def defaults_from_config(config: dict[str, Any], default_image: str = "") -> dict[str, Any]:
    """A kernelspec's provisioner config as a saved choice (what its kernels get when a
    notebook chooses nothing)."""
    resources: dict[str, Any] = {
        "gpus": int(config.get("gpus") or 0),
        "gpu_profile": str(config.get("gpu_profile") or ""),
        "gpu_share": float(config.get("gpu_share") or 0),
    }
    if config.get("cpus") not in (None, ""):
        resources["cpus"] = float(config["cpus"])
    if config.get("memory"):
        resources["memory"] = str(config["memory"])
    vfolders = []
    for item in config.get("vfolders") or []:
        name, _, permission = str(item).partition(":")
        vfolders.append({"name": name, "permission": "ro" if permission == "ro" else "rw"})
    return {
        "resources": resources,
        "image": str(config.get("image") or default_image),
        "vfolders": vfolders,
    }


def parameters_schema(defaults: dict[str, Any], bounds: Bounds) -> dict[str, Any]:
    """The JSON Schema (draft-07) of a kernel's launch parameters, JEP 87's
    ``metadata.parameters``, with ``defaults`` (a saved choice) as its defaults."""
    resources = defaults.get("resources", {})
    gpus: dict[str, Any] = {
        "type": "integer",
        "title": "GPUs",
        "description": "Whole GPUs (0: none). Use one GPU form only: gpus, gpu_profile or "
        "gpu_share.",
        "minimum": 0,
        "maximum": bounds.max_gpus,
        "default": resources.get("gpus", 0),
    }
    profile: dict[str, Any] = {
        "type": "string",
        "title": "MIG profile",
        "description": "One MIG instance of this profile instead of whole GPUs (empty: none).",
        "default": resources.get("gpu_profile", ""),
    }
    if bounds.mig_profiles is None:
        profile["pattern"] = MIG_PATTERN
    else:
        profile["enum"] = ["", *bounds.mig_profiles]
    share = {
        "type": "number",
        "title": "GPU share",
        "description": "A time-sliced fraction of one GPU, 0.01 to below 1 (0: none); its "
        "memory caps are soft limits, not isolation.",
        "minimum": 0,
        "maximum": bounds.max_share,
        "default": resources.get("gpu_share", 0),
    }
    cpus: dict[str, Any] = {
        "type": "number",
        "title": "CPUs",
        "description": "CPU limit, at least 0.01 (unset: no limit). Container kernels only.",
        "minimum": 0.01,
    }
    if bounds.max_cpus is not None:
        cpus["maximum"] = bounds.max_cpus
    if "cpus" in resources:
        cpus["default"] = resources["cpus"]
    memory: dict[str, Any] = {
        "type": "string",
        "title": "Memory",
        "description": 'Memory limit with a unit, e.g. "8GiB" or "512MiB", at least 16MiB '
        "(unset: no limit). Container kernels only.",
        "pattern": MEMORY_PATTERN,
    }
    if bounds.max_memory is not None:
        memory["x-maximum-bytes"] = bounds.max_memory
        memory["description"] += f" At most {_size(bounds.max_memory)}."
    if "memory" in resources:
        memory["default"] = resources["memory"]
    image: dict[str, Any] = {
        "type": "string",
        "title": "Image",
        "description": "The kernel's container image, from the server's allowlist "
        "(GPUSessionManager.allowed_images).",
        "enum": list(dict.fromkeys(bounds.images)) or [defaults.get("image", "")],
        "default": defaults.get("image", ""),
    }
    if "" in image["enum"]:
        image["description"] += ' "": the server\'s default image.'

    name: dict[str, Any] = {"type": "string", "title": "vfolder"}
    if bounds.vfolders is None:
        name["pattern"] = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
    else:
        name["enum"] = list(bounds.vfolders)
    vfolders = {
        "type": "array",
        "title": "vfolders",
        "description": "Storage folders mounted at /home/work/<name>, each read-only or "
        "read-write (never more than your own permission on it).",
        "uniqueItems": True,
        "items": {
            "type": "object",
            "properties": {
                "name": name,
                "permission": {"type": "string", "enum": list(MOUNT_PERMISSIONS)},
            },
            "required": ["name", "permission"],
            "additionalProperties": False,
        },
        "default": defaults.get("vfolders", []),
    }
    if bounds.vfolders == []:
        vfolders["maxItems"] = 0
    where = (
        "bounded by this host and the caller's policy"
        if bounds.live
        else f"the engine's own limits; the host's and the user's bounds are served by "
        f"{LIVE_SCHEMA}"
    )
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": f"jupyter-gpu-sessions launch parameters (JEP 87): {where}. A notebook "
        f'saves its choice in metadata["{CHOICE_KEY}"] as {{"resources": {{gpus, '
        'gpu_profile, gpu_share, cpus, memory}, "image": ..., "vfolders": [...]}.',
        "title": "Resources",
        "type": "object",
        "properties": {
            "gpus": gpus,
            "gpu_profile": profile,
            "gpu_share": share,
            "cpus": cpus,
            "memory": memory,
            "image": image,
            "vfolders": vfolders,
        },
        "additionalProperties": False,
    }


def _size(size: int) -> str:
    from .units import format_size

    return format_size(size)


@dataclass
class Choice:
    """A notebook's saved choice, its types checked: ``resources`` holds only the keys the
    notebook set; ``image`` None keeps the kernelspec's; ``vfolders`` as mount strings
    (``"data"``, ``"team-ds:ro"``)."""

    resources: dict[str, Any] = field(default_factory=dict)
    image: str | None = None
    vfolders: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.resources and self.image is None and not self.vfolders


def _bad(where: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: metadata {CHOICE_KEY}.{message}", reason="invalid-parameters")


def parse_choice(raw: Any, where: str = "the notebook") -> Choice:
    """The choice saved under ``metadata["jupyter-gpu-sessions"]``; wrong types or unknown
    keys are :class:`InvalidRequest` naming the key and what it takes. Ranges (the host,
    the policy) are checked where the request is made and submitted."""
    if raw is None:
        return Choice()
    if not isinstance(raw, dict):
        raise InvalidRequest(
            f'{where}: metadata {CHOICE_KEY} must be an object such as {{"resources": '
            f'{{"gpus": 1}}}}, not {type(raw).__name__}',
            reason="invalid-parameters",
        )
    unknown = sorted(set(raw) - set(CHOICE_KEYS))
    if unknown:
        raise _bad(where, f"{unknown[0]} is not a known key: use {', '.join(CHOICE_KEYS)}")
    choice = Choice()
    resources = raw.get("resources")
    if resources is not None:
        if not isinstance(resources, dict):
            raise _bad(where, 'resources must be an object such as {"gpus": 2, "cpus": 4}')
        for key, value in resources.items():
            if key not in RESOURCE_KEYS:
                raise _bad(
                    where, f"resources.{key} is not a resource: use {', '.join(RESOURCE_KEYS)}"
                )
            choice.resources[key] = _resource(where, key, value)
    image = raw.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise _bad(where, f"image must be an image name (a string), not {image!r:.40}")
        choice.image = image or None
    vfolders = raw.get("vfolders")
    if vfolders is not None:
        if not isinstance(vfolders, list):
            raise _bad(
                where,
                'vfolders must be a list such as [{"name": "data", "permission": "ro"}] or '
                '["data", "team-ds:ro"]',
            )
        choice.vfolders = [_mount(where, item) for item in vfolders]
    return choice


def _resource(where: str, key: str, value: Any) -> Any:
    if value is None:
        return None
    if key == "gpus":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, f"resources.gpus must be a whole number of GPUs, not {value!r:.40}")
        if not 0 <= value <= MAX_GPUS_PER_SESSION:
            raise _bad(
                where, f"resources.gpus {value} is out of range: use 0 to {MAX_GPUS_PER_SESSION}"
            )
        return value
    if key == "gpu_profile":
        if not isinstance(value, str):
            raise _bad(
                where,
                f"resources.gpu_profile must be a MIG profile name such as "
                f"'1g.10gb', not {value!r:.40}",
            )
        return value
    if key in ("gpu_share", "cpus"):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            what = (
                "a fraction of one GPU such as 0.25"
                if key == "gpu_share"
                else ("a number of CPUs such as 2 or 0.5")
            )
            raise _bad(where, f"resources.{key} must be {what}, not {value!r:.40}")
        return float(value)
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise _bad(where, f'resources.memory must be a size such as "8GiB", not {value!r:.40}')
    return value


def _mount(where: str, item: Any) -> str:
    if isinstance(item, str):
        name, _, permission = item.partition(":")
    elif isinstance(item, dict):
        unknown = sorted(set(item) - {"name", "permission"})
        if unknown or not isinstance(item.get("name"), str):
            raise _bad(
                where,
                f'vfolders entry {item!r:.60} must be {{"name": "...", "permission": "ro"}} '
                "(permission ro or rw)",
            )
        name, permission = item["name"], item.get("permission", "")
    else:
        raise _bad(
            where,
            f'vfolders entry {item!r:.40} must be {{"name": "...", "permission": "ro"}} or a name',
        )
    if permission and permission not in (*MOUNT_PERMISSIONS, "wd"):
        raise _bad(where, f"vfolders.{name} permission {permission!r:.20} is not ro or rw")
    try:
        check_vfolder_name(name)
    except InvalidRequest as exc:
        raise _bad(where, f"vfolders: {exc.message}") from None
    return f"{name}:{permission}" if permission else name


def apply_choice(config: dict[str, Any], choice: Choice) -> dict[str, Any]:
    """The kernelspec's resources (``config``: the provisioner's values) with the
    notebook's choice over them. A choice naming any GPU form replaces all three (so
    ``{"gpus": 2}`` over a kernelspec's ``gpu_share`` asks for two whole GPUs)."""
    merged = {key: config.get(key) for key in RESOURCE_KEYS}
    chosen = choice.resources
    if any(key in chosen for key in GPU_FORMS):
        for key in GPU_FORMS:
            value = chosen.get(key)
            merged[key] = _NO_GPU[key] if value is None else value
    for key in ("cpus", "memory"):
        if key in chosen:
            merged[key] = chosen[key]
    return merged
