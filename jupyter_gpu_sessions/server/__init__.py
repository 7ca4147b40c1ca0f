"""The Jupyter server extension: REST API, events websocket, idle culling (``server/``)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

OPENAPI = Path(__file__).resolve().parent / "openapi.yaml"


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3 document of the whole API, as shipped in the package."""
    import yaml

    return yaml.safe_load(OPENAPI.read_text())


def __getattr__(name: str) -> Any:
    if name == "GPUSessionsExtension":  # lazily: importing jupyter_server is not free
        from .app import GPUSessionsExtension

        return GPUSessionsExtension
    raise AttributeError(name)
