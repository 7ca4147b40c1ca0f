"""jupyter-gpu-sessions: every Jupyter kernel a session in a container with its own GPUs."""

from ._version import __version__

__all__ = ["__version__"]
