"""jupyter-gpu-sessions: every Jupyter kernel a session in a container with its own GPUs."""

from ._version import __version__

__all__ = ["__version__"]


def load_ipython_extension(ipython) -> None:
    """``%load_ext jupyter_gpu_sessions``: the ``%session`` and ``%vfolder`` magics."""
    from .kernel.magics import load_ipython_extension as load

    load(ipython)


def _jupyter_labextension_paths() -> list[dict]:
    """The prebuilt JupyterLab extension (``jupyter labextension develop`` finds it here)."""
    return [{"src": "labextension", "dest": "jupyter-gpu-sessions"}]


def _jupyter_server_extension_points() -> list[dict]:
    from .server.app import GPUSessionsExtension

    return [{"module": "jupyter_gpu_sessions", "app": GPUSessionsExtension}]
