"""Per-user and per-group limits, resolved into one effective policy per owner."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import InvalidRequest
from .units import format_size, parse_count, parse_cpus, parse_duration, parse_size


@dataclass(frozen=True)
class Policy:
    """Limits for one owner; ``None`` means unlimited. ``max_gpus`` counts whole-GPU
    equivalents (a 0.25 share counts 0.25, a 1g.10gb MIG instance 1/7)."""

    max_concurrent_sessions: int | None = None
    max_pending_sessions: int | None = None
    max_gpus: float | None = None
    max_cpus: float | None = None
    max_memory: int | None = None
    max_session_lifetime: float | None = None  # seconds
    idle_timeout: float | None = None  # seconds; enforced by the server extension
    # Storage (vfolders). The count covers the owner's *user* vfolders, the trash included
    # until purged; the size is the largest quota one vfolder may have and the quota given
    # when none is asked; the total is the bytes stored across the owner's user vfolders.
    max_vfolder_count: int | None = None
    max_vfolder_size: int | None = None  # bytes
    max_vfolder_total_size: int | None = None  # bytes
    # GPU-aware idle reclaim (manager/gpu_idle.py): a kernel holding GPUs whose own
    # processes kept them busy under ``gpu_idle_threshold`` percent for ``gpu_idle_window``
    # is warned, then ended. Both must apply to an owner for the reclaim to apply.
    gpu_idle_threshold: float | None = None  # percent of SM time, 0-100
    gpu_idle_window: float | None = None  # seconds

    @classmethod
    def parse(cls, mapping: Mapping[str, Any], *, scope: str = "policy") -> Policy:
        """From config values (``{"max_memory": "64GiB", "idle_timeout": "2h",
        "gpu_idle_threshold": "5%"}``)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise InvalidRequest(
                f"{scope}: unknown limit(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for name, raw in mapping.items():
            if raw is None:
                continue
            what = f"{scope}.{name}"
            if isinstance(raw, bool):
                raise InvalidRequest(f"{what} must be a number, a size or a duration, not {raw}")
            if name in _COUNTS:
                values[name] = parse_count(raw, what=what, maximum=1_000_000)
            elif name == "max_gpus":
                values[name] = float(parse_cpus(raw, what=what)) if raw != 0 else 0.0
            elif name == "max_cpus":
                values[name] = parse_cpus(raw, what=what)
            elif name in _SIZES:
                values[name] = parse_size(raw, what=what)
            elif name in _PERCENTS:
                values[name] = parse_percent(raw, what=what)
            else:
                values[name] = parse_duration(raw, what=what)
        return cls(**values)

    def overridden_by(self, other: Policy) -> Policy:
        """This policy with every limit ``other`` sets replaced by ``other``'s."""
        changes = {f.name: getattr(other, f.name) for f in fields(other)}
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def most_generous(self, other: Policy) -> Policy:
        """Per limit, the more generous of the two: what several groups grant together (the
        larger, except ``gpu_idle_threshold``, where the lower lets more run). A limit one
        of them does not set is taken from the other (unset is not "unlimited")."""
        return self._merged(other, strictest=False)

    def strictest(self, other: Policy) -> Policy:
        """Per limit, the stricter of the two (the smaller, except ``gpu_idle_threshold``,
        where the higher reclaims more). A limit one of them does not set is taken from
        the other."""
        return self._merged(other, strictest=True)

    def _merged(self, other: Policy, *, strictest: bool) -> Policy:
        merged = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is None or b is None:
                merged[f.name] = a if b is None else b
                continue
            # Larger is more generous for every limit but the idle threshold.
            larger = (f.name in _LOWER_IS_GENEROUS) == strictest
            merged[f.name] = max(a, b) if larger else min(a, b)
        return Policy(**merged)

    def describe(self, name: str) -> str:
        value = getattr(self, name)
        if name in _SIZES and value is not None:
            return format_size(value)
        if name in _PERCENTS and value is not None:
            return f"{value:g}%"
        return f"{value:g}" if isinstance(value, float) else str(value)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_COUNTS = ("max_concurrent_sessions", "max_pending_sessions", "max_vfolder_count")
_SIZES = ("max_memory", "max_vfolder_size", "max_vfolder_total_size")
_PERCENTS = ("gpu_idle_threshold",)
# Limits where a lower value lets more run (a lower idle threshold reclaims fewer kernels).
_LOWER_IS_GENEROUS = ("gpu_idle_threshold",)
# How the policies of an owner's several groups combine, limit by limit.
MERGE_MODES = ("most-generous", "strictest")


def parse_percent(value: str | int | float, *, what: str) -> float:
    """A percent from 0 to 100: ``5``, ``2.5`` or ``"5%"``."""
    text = value.strip().removesuffix("%").strip() if isinstance(value, str) else value
    try:
        if isinstance(text, bool):
            raise TypeError
        percent = float(text)
    except (TypeError, ValueError):
        raise InvalidRequest(
            f'{what} {value!r} is not a percent: use a number from 0 to 100, such as 5 or "5%"'
        ) from None
    if not 0 <= percent <= 100:  # also refuses NaN
        raise InvalidRequest(f"{what} {value!r} is out of range: use a percent from 0 to 100")
    return percent


class PolicySet:
    """The default policy, per-group and per-user policies.

    The effective policy of an owner: the default, overridden by the owner's groups'
    policies merged limit by limit (``merge``: the most generous of those that set a
    limit, or the strictest), overridden by the owner's own policy.
    """

    def __init__(
        self,
        default: Policy | None = None,
        groups: Mapping[str, Policy] | None = None,
        users: Mapping[str, Policy] | None = None,
        *,
        merge: str = "most-generous",
    ) -> None:
        if merge not in MERGE_MODES:
            raise InvalidRequest(
                f"group policy merge {merge!r} is not understood: use {' or '.join(MERGE_MODES)}"
            )
        self.default = default or Policy()
        self.groups = dict(groups or {})
        self.users = dict(users or {})
        self.merge = merge

    @classmethod
    def from_config(
        cls, config: Mapping[str, Mapping[str, Any]], *, merge: str = "most-generous"
    ) -> PolicySet:
        """``{"default": {...}, "group:ml": {...}, "user:ada": {...}}``."""
        default, groups, users = Policy(), {}, {}
        for scope, limits in config.items():
            policy = Policy.parse(limits, scope=scope)
            if scope == "default":
                default = policy
            elif scope.startswith("group:") and len(scope) > 6:
                groups[scope[6:]] = policy
            elif scope.startswith("user:") and len(scope) > 5:
                users[scope[5:]] = policy
            else:
                raise InvalidRequest(
                    f"policy scope {scope!r} is not understood: use 'default', 'group:NAME' "
                    "or 'user:NAME'"
                )
        return cls(default, groups, users, merge=merge)

    def source_of(self, name: str, owner: str, groups: Iterable[str] = ()) -> str:
        """The scope that sets limit ``name`` for ``owner`` ("user:ada", "group:ml",
        "default"), as :meth:`for_owner` resolves it."""
        user = self.users.get(owner)
        if user is not None and getattr(user, name) is not None:
            return f"user:{owner}"
        value = getattr(self.for_owner(owner, groups), name)
        for group in sorted(groups):
            policy = self.groups.get(group)
            if policy is not None and getattr(policy, name) is not None:
                if getattr(policy, name) == value:
                    return f"group:{group}"
        return "default"

    def for_owner(self, owner: str, groups: Iterable[str] = ()) -> Policy:
        policy = self.default
        granted = [self.groups[g] for g in groups if g in self.groups]
        if granted:
            merged = granted[0]
            for other in granted[1:]:
                if self.merge == "strictest":
                    merged = merged.strictest(other)
                else:
                    merged = merged.most_generous(other)
            policy = policy.overridden_by(merged)
        if owner in self.users:
            policy = policy.overridden_by(self.users[owner])
        return policy
