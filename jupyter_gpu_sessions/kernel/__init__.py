"""The kernel side: a client of the gpu-sessions API, the ``%session``/``%vfolder`` magics
and widgets. Imports the standard library, IPython, ipywidgets and tornado only, so that it
runs in a container image with nothing else of the package installed."""

from .client import APIError, Client, NoServer, own_info, own_session_id

__all__ = ["APIError", "Client", "NoServer", "own_info", "own_session_id"]
