"""Notebook widgets for GPU sessions: ``from jupyter_gpu_sessions.widgets import
SessionGraph, GPUMonitor, SessionTable`` (the kernel side; see ``kernel/widgets.py``)."""

from .kernel.widgets import GPUMonitor, SessionGraph, SessionTable

__all__ = ["GPUMonitor", "SessionGraph", "SessionTable"]
