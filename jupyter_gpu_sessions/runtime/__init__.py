"""Where kernels run: Docker containers, or local processes on hosts without Docker."""

from .base import KernelRuntime, RuntimeHandle

__all__ = ["KernelRuntime", "RuntimeHandle"]
