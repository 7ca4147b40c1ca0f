"""Helpers for tests of the REST API: a server with several users, and a JSON client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

from jupyter_gpu_sessions.core.models import ProcessRef, ResourceRequest, Session
from jupyter_gpu_sessions.core.status import SessionStatus
from jupyter_gpu_sessions.engine import use_engine
from jupyter_gpu_sessions.manager import GPUSessionManager, current_process

from .support import REPO

TOKENS = {"alice": "alice-token", "bob": "bob-token", "carol": "carol-token", "root": "adm-token"}
ADMIN = "root"


def shipped_server_config() -> dict[str, Any]:
    """The server configuration the package installs (the extension, its kernel manager),
    so server tests run what users get."""
    path = REPO / "jupyter-config" / "jupyter_server_config.d" / "jupyter_gpu_sessions.json"
    return json.loads(path.read_text())


def api_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A server whose identity provider knows alice, bob, carol and an admin (root) by
    token, that answers nobody without credentials, on its own store and vfolder root."""
    config = {
        "ServerApp": {
            **shipped_server_config()["ServerApp"],
            "identity_provider_class": "tests.identity.TokenUsers",
            "allow_unauthenticated_access": False,
        },
        "TokenUsers": {"users": {token: user for user, token in TOKENS.items()}},
        "GPUSessionsExtension": {"admin_users": [ADMIN], "idle_check_interval": 1.0},
        "GPUSessionManager": {
            "db_url": f"sqlite:///{tmp_path}/api.sqlite",
            "simulated_gpus": "4xA100-80GB",
            "groups": {"ml": ["alice", "carol"]},
        },
        "VFolderService": {"root": str(tmp_path / "vfolders")},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return Config(config)


def server_fixtures(**sections: dict[str, Any]):
    """A module's ``jp_server_config`` (``api_config`` with ``sections``, on a fresh
    manager) and ``jp_auth_header`` (the admin's token, for jupyter_server's own APIs):
    ``jp_server_config, jp_auth_header = server_fixtures(...)``."""

    @pytest.fixture
    def jp_server_config(tmp_path):
        reset_manager()
        yield api_config(tmp_path, **sections)
        reset_manager()

    @pytest.fixture
    def jp_auth_header():
        return {"Authorization": f"token {TOKENS[ADMIN]}"}

    return jp_server_config, jp_auth_header


def reset_manager() -> None:
    engine = use_engine(None)
    if engine is not None:
        engine.close()


class Api:
    """``await api.get("sessions", user="bob")`` → (status, JSON or None); never raises on
    an HTTP error, so tests can look at 4xx answers."""

    def __init__(self, fetch) -> None:
        self.fetch = fetch

    async def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = "alice",
        body: Any = None,
        raw: bytes | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        headers = dict(headers or {})
        headers["Authorization"] = f"token {TOKENS[user]}" if user else ""
        kwargs: dict[str, Any] = {}
        if raw is not None:
            kwargs["body"] = raw
        elif body is not None:
            kwargs["body"] = json.dumps(body)
        elif method in ("POST", "PUT", "PATCH"):
            kwargs["body"] = b""
        response = await self.fetch(
            "gpu-sessions",
            "api",
            *path.split("/"),
            method=method,
            headers=headers,
            params={k: str(v) for k, v in (params or {}).items()},
            raise_error=False,
            allow_nonstandard_methods=True,
            **kwargs,
        )
        text = response.body or b""
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = text
        return response.code, data

    def __getattr__(self, method: str):
        if method in ("get", "post", "put", "patch", "delete"):
            return lambda path, **kw: self.call(method.upper(), path, **kw)
        raise AttributeError(method)


def stored_session(
    manager: GPUSessionManager,
    owner: str,
    status: SessionStatus = SessionStatus.PENDING,
    *,
    name: str = "",
    gpus: int = 0,
    depends_on: tuple[str, ...] = (),
) -> Session:
    """A session row as the manager would write it, walked to ``status`` by the store."""
    import uuid

    session = manager.store.add(
        Session(
            id=uuid.uuid4().hex,
            owner=owner,
            image="test-image",
            request=ResourceRequest(gpus=gpus),
            runtime="docker",
            process=current_process() if owner else ProcessRef("h", 1, 0.0),
            name=name,
            depends_on=depends_on,
        )
    )
    path = {
        SessionStatus.PENDING: [],
        SessionStatus.CANCELLED: [SessionStatus.CANCELLED],
        SessionStatus.PREPARING: [SessionStatus.PREPARING],
        SessionStatus.RUNNING: [SessionStatus.PREPARING, SessionStatus.RUNNING],
        SessionStatus.TERMINATED: [
            SessionStatus.PREPARING,
            SessionStatus.RUNNING,
            SessionStatus.TERMINATING,
            SessionStatus.TERMINATED,
        ],
        SessionStatus.ERROR: [SessionStatus.PREPARING, SessionStatus.ERROR],
    }[status]
    for step in path:
        session = manager.store.transition(session.id, step, f"test: {step.value.lower()}")
    return session
