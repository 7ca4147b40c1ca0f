"""Who owns a kernel and what they may use: groups, identities, and policy checks."""

from __future__ import annotations

import grp
import os
import pwd
from typing import TYPE_CHECKING

from ..core.errors import PolicyViolation
from ..core.identity import Identity
from ..core.models import ResourceRequest
from ..core.policy import Policy, PolicySet
from ..core.units import format_size

if TYPE_CHECKING:
    from . import GPUSessionManager


def owner_groups(owner: str) -> list[str]:
    """The owner's OS groups (for group policies); none for users unknown to the OS."""
    try:
        gid = pwd.getpwnam(owner).pw_gid
        return [grp.getgrgid(g).gr_name for g in os.getgrouplist(owner, gid)]
    except (KeyError, OSError, ValueError):
        return []


class IdentityAndPolicies:
    """Groups (OS, configured, the Hub's), identities and the effective policies, and the
    check a request passes before it queues; mixed into the manager."""

    def groups_of(self: GPUSessionManager, username: str) -> frozenset[str]:
        """OS groups, configured groups, and the groups the API last saw the user with."""
        found = set(owner_groups(username))
        found.update(g for g, members in self.groups.items() if username in members)
        try:
            found.update(self.admin.user_groups(username))
        except Exception:  # a missing store must not hide the OS and configured groups
            self.log.debug("No stored groups for %s", username, exc_info=True)
        return frozenset(found)

    def identity(self: GPUSessionManager, username: str, *, is_admin: bool = False) -> Identity:
        return Identity(username, self.groups_of(username), is_admin)

    def known_user(self: GPUSessionManager, username: str) -> bool:
        """Someone this host knows: an OS account, a configured group member, or a user
        the API has seen."""
        try:
            pwd.getpwnam(username)
            return True
        except (KeyError, ValueError):  # ValueError: an embedded NUL
            pass
        if any(username in members for members in self.groups.values()):
            return True
        return self.admin.known_user(username)

    def refresh_policies(self: GPUSessionManager) -> PolicySet:
        """The configured policies with those set through the API on top (a stored scope
        replaces the configured one). Read at every submit and scheduling pass, so a
        change applies to the next kernel start."""
        stored = self.admin.policies()
        if not stored:
            self._effective_policies = self._policies
        else:
            merged = dict(self.policies)
            merged.update(stored)
            self._effective_policies = PolicySet.from_config(merged, merge=self.group_policy_merge)
        return self._effective_policies

    def policy_for(self: GPUSessionManager, owner: str) -> Policy:
        return self._effective_policies.for_owner(owner, self.groups_of(owner))

    def policy_source(self: GPUSessionManager, owner: str, name: str) -> str:
        """The scope ("user:ada", "group:ml", "default") that sets ``owner``'s limit
        ``name``, for messages that say which policy forbids a choice."""
        return self._effective_policies.source_of(name, owner, self.groups_of(owner))

    @staticmethod
    def _check_policy(
        owner: str, request: ResourceRequest, policy: Policy, what: str = "kernel"
    ) -> None:
        checks = [
            (
                "max_gpus",
                request.gpu_equivalent,
                policy.max_gpus,
                f"{request.gpu_equivalent:g} GPUs",
            ),
            ("max_cpus", request.cpus or 0, policy.max_cpus, f"{request.cpus or 0:g} CPUs"),
            (
                "max_memory",
                request.memory or 0,
                policy.max_memory,
                format_size(request.memory or 0),
            ),
        ]
        for name, asked, limit, text in checks:
            if limit is not None and asked > limit:
                raise PolicyViolation(
                    f"This {what} asks for {text}, more than {owner}'s policy allows "
                    f"({name} = {policy.describe(name)}): ask for less, or ask an admin."
                )
