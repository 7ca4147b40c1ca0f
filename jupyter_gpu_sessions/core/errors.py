"""The one exception hierarchy: every error carries a message a person can act on."""

from __future__ import annotations

import os


class GPUSessionsError(Exception):
    """Base of every error this package raises on purpose.

    ``reason`` is a short machine-readable slug (for APIs and session history);
    the message says what happened and what to do about it.
    """

    reason = "error"

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidRequest(GPUSessionsError, ValueError):
    """A user-supplied value (size, count, name) is malformed or out of range."""

    reason = "invalid-request"


class UnsatisfiableRequest(GPUSessionsError):
    """A well-formed request this host can never satisfy (e.g. more GPUs than it has)."""

    reason = "unsatisfiable"


class PolicyViolation(GPUSessionsError):
    """A request the owner's policy does not allow (max_gpus, max_pending_sessions, …)."""

    reason = "policy"


class RuntimeUnavailable(GPUSessionsError):
    """The container engine (or other runtime) cannot be reached."""

    reason = "runtime-unavailable"


class ImageNotFound(GPUSessionsError):
    """The kernel image is not present on this host."""

    reason = "image-not-found"


class KernelLaunchError(GPUSessionsError):
    """The kernel's container or process failed to start or never became ready."""

    reason = "launch-failed"


class StartCancelled(KernelLaunchError):
    """A kernel start that was ended before its kernel ran: deleted or shut down while it
    queued or started, or out of queue time. Nothing is left of it."""

    reason = "cancelled"


class ImageBuildError(GPUSessionsError):
    """Building the kernel image failed."""

    reason = "image-build-failed"


class NotFound(GPUSessionsError):
    """No such thing, or not one the caller may see (its existence is not revealed)."""

    reason = "not-found"


class SessionNotFound(NotFound):
    """No session with this id in the store."""


class Forbidden(GPUSessionsError):
    """The caller may see the thing but not do this with it (an admin-only action, a
    read-only share)."""

    reason = "forbidden"


class Conflict(GPUSessionsError):
    """The request clashes with the current state (a name taken, a session that never ran)."""

    reason = "conflict"


class QuotaExceeded(GPUSessionsError):
    """Storing this would pass a vfolder's or an owner's storage quota."""

    reason = "quota-exceeded"


def docker_socket_hint(base_url: str | None) -> str:
    """What to do when the Docker engine does not answer (``RuntimeUnavailable``)."""
    url = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    return (
        f"Cannot reach the Docker engine at {url}. Check it with `docker info`; start it with "
        "`sudo systemctl start docker` (or `sudo dockerd &`), and make sure the user running "
        "Jupyter may use that socket (e.g. is in the `docker` group). On a host without Docker, "
        "set the kernel's runtime to `local`."
    )
