"""What the launcher shows one person: each GPU session kernelspec with its launch
parameters' JSON Schema (JEP 87) bounded by this host and the person's policy, what is
free now, and, per choice, whether it would start, queue (and behind whom, waiting for
what) or is forbidden (and by which limit). A busy choice is never forbidden."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from ..core.errors import InvalidRequest
from ..core.identity import Identity
from ..core.models import MAX_GPUS_PER_SESSION, ResourceRequest, mig_fraction
from ..core.parameters import Bounds, defaults_from_config, parameters_schema
from ..core.policy import Policy
from ..core.units import format_size
from ..scheduler import Capacity
from ..store.sessions import OwnerTotals
from .scheduling import host_memory

if TYPE_CHECKING:
    from . import GPUSessionManager

_EPSILON = 1e-9
SHARE_CHOICES = (0.25, 0.5, 0.75)
_LIMITS = (
    "max_gpus",
    "max_cpus",
    "max_memory",
    "max_concurrent_sessions",
    "max_pending_sessions",
)


class _Judge:
    """Whether one request would start now, queue, or is forbidden, for one person."""

    def __init__(
        self,
        manager: GPUSessionManager,
        who: Identity,
        capacity: Capacity,
        policy: Policy,
        usage: Any,
        pending: int,
    ) -> None:
        self.manager = manager
        self.who = who
        self.capacity = capacity
        self.policy = policy
        self.usage = usage
        self.pending = pending
        self.host_cpus = os.cpu_count() or 1
        self.host_memory = host_memory()

    def limit(self, name: str) -> str:
        """``"max_gpus 2 (policy user:alice)"``."""
        source = self.manager.policy_source(self.who.username, name)
        return f"{name} {self.policy.describe(name)} (policy {source})"

    def __call__(self, request: ResourceRequest) -> dict[str, Any]:
        policy, use = self.policy, self.usage
        asked = (
            ("max_gpus", request.gpu_equivalent),
            ("max_cpus", request.cpus or 0),
            ("max_memory", request.memory or 0),
        )
        for name, value in asked:
            limit = getattr(policy, name)
            if limit is not None and value > limit + _EPSILON:
                return {"status": "forbidden", "limit": self.limit(name)}
        problem = self.capacity.unsatisfiable(request)
        if problem:
            return {"status": "forbidden", "limit": f"this host: {problem}"}
        if request.cpus is not None and request.cpus > self.host_cpus:
            return {"status": "forbidden", "limit": f"this host has {self.host_cpus} CPUs"}
        if request.memory and self.host_memory and request.memory > self.host_memory:
            return {
                "status": "forbidden",
                "limit": f"this host has {format_size(self.host_memory)} memory",
            }
        if policy.max_pending_sessions is not None and use.pending >= policy.max_pending_sessions:
            return {"status": "forbidden", "limit": self.limit("max_pending_sessions")}
        waits = []
        if (
            policy.max_concurrent_sessions is not None
            and use.sessions + 1 > policy.max_concurrent_sessions
        ):
            limit = self.limit("max_concurrent_sessions")
            waits.append(f"one of your {use.sessions} sessions to end ({limit})")
        held = (
            ("max_gpus", use.gpus, request.gpu_equivalent, "GPUs"),
            ("max_cpus", use.cpus, request.cpus or 0, "CPUs"),
        )
        for name, holds, more, what in held:
            limit = getattr(policy, name)
            if limit is not None and more and holds + more > limit + _EPSILON:
                waits.append(
                    f"your own sessions to give back {what}: you hold {holds:g} "
                    f"({self.limit(name)})"
                )
        if policy.max_memory is not None and request.memory:
            if use.memory + request.memory > policy.max_memory:
                waits.append(
                    f"your own sessions to give back memory: you hold "
                    f"{format_size(use.memory)} ({self.limit('max_memory')})"
                )
        if self.capacity.place(request, "launcher") is None:
            waits.append(f"GPUs to be freed: {self.capacity.free_summary(request)}")
        if not waits:
            return {"status": "allowed"}
        return {
            "status": "would-queue",
            "position": self.pending + 1,
            "queued_ahead": self.pending,
            "waits_for": "; ".join(waits),
        }


def launcher_json(
    manager: GPUSessionManager, who: Identity, kernelspecs: list[dict[str, Any]]
) -> dict[str, Any]:
    """The launcher's view for ``who`` of ``kernelspecs`` (each ``{"name",
    "display_name", "config"}``: its provisioner config). Blocking."""
    devices = manager.inventory.devices()
    capacity = Capacity(devices, manager.store.allocations())
    manager.refresh_policies()
    policy = manager.policy_for(who.username)
    everyone = manager.store.usage()
    mine = everyone.get(who.username) or OwnerTotals()
    pending = sum(u.pending for u in everyone.values())
    judge = _Judge(manager, who, capacity, policy, mine, pending)
    free = capacity.free()
    free["summary"] = capacity.free_summary()
    plain = int(free["gpus_total"])
    profiles = sorted(free["mig"])
    memory = host_memory()
    images = manager.image_allowlist()
    mountable = [
        {
            "name": v["name"],
            "permission": v["permission"],
            "mount_permissions": ["ro", "rw"] if v["permission"] in ("rw", "wd") else ["ro"],
        }
        for v in manager.vfolders.list(who)
    ]
    context = {
        "judge": judge,
        "policy": policy,
        "plain": plain,
        "profiles": profiles,
        "memory": memory,
        "images": images,
        "vfolders": [v["name"] for v in mountable],
        "default_image": manager.default_image,
    }
    return {
        "user": who.username,
        "host": {
            "gpus": len(devices),
            "whole_gpus": plain,
            "gpu_models": sorted({d.name for d in devices}),
            "mig_profiles": profiles,
            "cpus": judge.host_cpus,
            "memory": memory,
        },
        "free": free,
        "queue": {"pending": pending},
        "policy": {
            "limits": policy.to_dict(),
            "sources": {
                name: manager.policy_source(who.username, name)
                for name in _LIMITS
                if getattr(policy, name) is not None
            },
            "usage": {
                "sessions": mine.sessions,
                "pending_sessions": mine.pending,
                "gpus": mine.gpus,
                "cpus": mine.cpus,
                "memory": mine.memory,
            },
        },
        "images": images,
        "vfolders": mountable,
        "kernelspecs": [_kernelspec(spec, context) for spec in kernelspecs],
    }


def _kernelspec(spec: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    config = spec.get("config") or {}
    judge: _Judge = ctx["judge"]
    policy: Policy = ctx["policy"]
    runtime = str(config.get("runtime") or "docker")
    entry: dict[str, Any] = {
        "name": spec["name"],
        "display_name": spec.get("display_name") or spec["name"],
        "runtime": runtime,
        "defaults": {"resources": {}, "image": ctx["default_image"], "vfolders": []},
    }
    try:
        defaults = defaults_from_config(config, ctx["default_image"])
        entry["defaults"] = defaults
        base = ResourceRequest.parse(
            gpus=config.get("gpus") or 0,  # the provisioner's defaults for what is unset
            cpus=config.get("cpus"),
            memory=config.get("memory"),
            gpu_profile=config.get("gpu_profile"),
            gpu_share=config.get("gpu_share"),
        )
    except (InvalidRequest, TypeError, ValueError) as exc:
        entry["error"] = f"its kernelspec has an invalid setting: {exc}"
        return entry
    plain = ctx["plain"]
    max_gpus = min(plain, MAX_GPUS_PER_SESSION)
    if policy.max_gpus is not None:
        max_gpus = min(max_gpus, math.floor(policy.max_gpus + _EPSILON))
    profiles = [
        p
        for p in ctx["profiles"]
        if policy.max_gpus is None or mig_fraction(p) <= policy.max_gpus + _EPSILON
    ]
    max_share = 0.99 if plain else 0.0
    if policy.max_gpus is not None:
        max_share = min(max_share, policy.max_gpus)
    max_cpus = float(judge.host_cpus)
    if policy.max_cpus is not None:
        max_cpus = min(max_cpus, policy.max_cpus)
    max_memory = ctx["memory"]
    if policy.max_memory is not None:
        max_memory = min(max_memory or policy.max_memory, policy.max_memory)
    images = list(dict.fromkeys([defaults["image"], *ctx["images"]]))
    own = [v["name"] for v in defaults["vfolders"]]
    vfolders = list(dict.fromkeys([*own, *ctx["vfolders"]])) if runtime == "docker" else own
    bounds = Bounds(
        max_gpus=max_gpus,
        mig_profiles=profiles,
        max_share=max_share,
        max_cpus=max_cpus,
        max_memory=max_memory,
        images=images,
        vfolders=vfolders,
        live=True,
    )
    entry["parameters"] = parameters_schema(defaults, bounds)
    entry["status"] = judge(base)

    def variant(**gpu: Any) -> ResourceRequest:
        return ResourceRequest(
            gpus=gpu.get("gpus", 0),
            gpu_profile=gpu.get("gpu_profile"),
            gpu_share=gpu.get("gpu_share"),
            cpus=base.cpus,
            memory=base.memory,
            shm_size=base.shm_size,
        )

    shares = sorted({*SHARE_CHOICES, *([base.gpu_share] if base.gpu_share else [])})
    entry["choices"] = {
        "gpus": [
            {"value": n, **judge(variant(gpus=n))}
            for n in range(0, min(plain, MAX_GPUS_PER_SESSION) + 1)
        ],
        "gpu_profile": [{"value": p, **judge(variant(gpu_profile=p))} for p in ctx["profiles"]],
        "gpu_share": [{"value": f, **judge(variant(gpu_share=f))} for f in shares] if plain else [],
        "cpus": _bound(judge, "max_cpus", max_cpus, f"this host has {judge.host_cpus} CPUs"),
        "memory": _bound(
            judge,
            "max_memory",
            max_memory,
            f"this host has {format_size(ctx['memory'])} memory" if ctx["memory"] else "",
        ),
        "image": [{"value": image, "status": "allowed"} for image in images],
    }
    return entry


def _bound(judge: _Judge, name: str, maximum: Any, host: str) -> dict[str, Any]:
    """The most a person may ask for of a continuous resource, and what sets it."""
    limit = getattr(judge.policy, name)
    by_policy = limit is not None and (maximum is None or limit <= maximum)
    return {"maximum": maximum, "limit": judge.limit(name) if by_policy else host}
