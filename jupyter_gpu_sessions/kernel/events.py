"""Live events for the widgets: the API's events websocket (session status changes, GPU
utilization ticks) read on the kernel's own asyncio loop, over the unix socket when the
kernel has one, reconnecting with backoff and polling the REST API while it cannot.

Everything here is a coroutine on the running loop: no thread is ever started (host names
that are IP literals or ``localhost`` are resolved without the executor's thread).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.netutil import DefaultLoopResolver, Resolver
from tornado.simple_httpclient import SimpleAsyncHTTPClient
from tornado.websocket import WebSocketClientConnection, websocket_connect

from .client import APIError, Client

POLL_SECONDS = 2.0  # how often the REST API is asked while the websocket is down
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
PING_SECONDS = 20.0


class APIResolver(Resolver):
    """Where the API's host is: the unix socket when there is one; IP literals and
    ``localhost`` directly; anything else through the loop's resolver."""

    def initialize(self, socket_path: str | None = None) -> None:  # type: ignore[override]
        self.socket_path = socket_path
        self._fallback: Resolver | None = None

    async def resolve(
        self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, Any]]:
        if self.socket_path:
            return [(socket.AF_UNIX, self.socket_path)]
        name = host.strip("[]")
        if name == "localhost":
            return [(socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET6, ("::1", port))]
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            if self._fallback is None:
                self._fallback = DefaultLoopResolver()
            return await self._fallback.resolve(host, port, family)
        if ip.version == 6:
            return [(socket.AF_INET6, (name, port, 0, 0))]
        return [(socket.AF_INET, (name, port))]


def one_line(exc: BaseException | str) -> str:
    """What went wrong, in one line (never a traceback)."""
    text = (str(exc).strip() or type(exc).__name__) if isinstance(exc, BaseException) else exc
    return (text.splitlines() or [""])[0][:300]


def _headers(client: Client) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    if client.token:
        headers["Authorization"] = f"token {client.token}"
    return headers


def _where(client: Client) -> str:
    return client.socket_path or urlsplit(client.base_url).netloc


async def fetch(
    client: Client,
    method: str,
    path: str,
    params: Mapping[str, Any] | None = None,
    body: Any = None,
) -> Any:
    """The same request as ``client.request`` but awaited on the running loop (the widgets
    must not block the kernel, nor an in-process server on the same loop)."""
    url = client.base_url + path.lstrip("/")
    query = {k: _param(v) for k, v in (params or {}).items() if v is not None}
    if query:
        url += "?" + urlencode(query)
    headers = _headers(client)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    elif method in ("POST", "PUT", "PATCH"):
        data = b""
    http = SimpleAsyncHTTPClient(force_instance=True, resolver=APIResolver(client.socket_path))
    try:
        response = await http.fetch(
            HTTPRequest(
                url,
                method=method,
                headers=headers,
                body=data,
                request_timeout=client.timeout,
                connect_timeout=min(client.timeout, 10),
                allow_nonstandard_methods=True,
            ),
            raise_error=False,
        )
    finally:
        http.close()
    if response.code == 599 or (response.error and response.code < 400):
        raise APIError(
            f"cannot reach the gpu-sessions API at {_where(client)} "
            f"({one_line(response.error or 'no answer')}): the Jupyter server may have stopped",
            status=0,
            reason="unreachable",
        )
    raw = response.body or b""
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = None
    if response.code >= 400:
        if isinstance(payload, dict) and payload.get("message"):
            raise APIError(
                one_line(str(payload["message"])),
                status=response.code,
                reason=str(payload.get("reason") or "error"),
            )
        raise APIError(
            f"{method} {path}: HTTP {response.code} {response.reason}", status=response.code
        )
    return payload


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def connect_events(client: Client, timeout: float = 10) -> WebSocketClientConnection:
    """The events websocket (``{api}events``), authenticated like every API call."""
    parts = urlsplit(client.base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    url = parts._replace(scheme=scheme).geturl() + "events"
    request = HTTPRequest(url, headers=_headers(client), connect_timeout=timeout)
    # Pings notice a connection that died silently (a suspended laptop, a dropped NAT). The
    # timeout may not pass the interval: tornado 6.5 would clamp it with a warning that
    # lands on the notebook's stderr under the widget.
    return await websocket_connect(
        request,
        resolver=APIResolver(client.socket_path),
        ping_interval=PING_SECONDS,
        ping_timeout=PING_SECONDS,
    )


def _ws_error(exc: BaseException) -> str:
    if isinstance(exc, HTTPClientError):
        if exc.code == 403:
            return "the events websocket refused this token"
        if exc.code == 404:
            return "this server has no events websocket"
        return f"the events websocket answered HTTP {exc.code}"
    return one_line(exc)


class _Poller:
    """Status changes and GPU ticks made from the REST API, for when the websocket is down."""

    def __init__(self, client: Client, gpus: bool) -> None:
        self.client = client
        self.gpus = gpus
        self.known: dict[str, str] | None = None

    async def poll(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        page = await fetch(self.client, "GET", "sessions", {"limit": 500})
        sessions = page.get("sessions", []) if isinstance(page, dict) else []
        seen = {s["id"]: s["status"] for s in sessions}
        if self.known is None:
            events.append({"type": "connected", "via": "polling"})
        else:
            for s in sessions:
                if self.known.get(s["id"]) != s["status"]:
                    events.append(
                        {
                            "type": "status",
                            "session_id": s["id"],
                            "status": s["status"],
                            "reason": s.get("reason", ""),
                            "at": time.time(),
                            "owner": s.get("owner"),
                            "name": s.get("name", ""),
                            "kernel_id": s.get("kernel_id"),
                        }
                    )
        self.known = seen
        if self.gpus:
            answer = await fetch(self.client, "GET", "gpus")
            events.append({"type": "gpus", "gpus": (answer or {}).get("gpus", [])})
        return events


async def stream(
    client: Client,
    *,
    gpus: bool = True,
    websocket: bool = True,
    poll_interval: float = POLL_SECONDS,
    max_backoff: float = MAX_BACKOFF,
) -> AsyncIterator[dict[str, Any]]:
    """Event dicts as the server sends them (``hello``, ``status``, ``gpus``), plus
    ``{"type": "connected", "via": "websocket"|"polling"}`` after each (re)connection — the
    moment to re-read whatever may have changed unseen — and ``{"type": "error",
    "message": …}`` (one line) when the stream is interrupted or a poll fails.

    While the websocket cannot be used (refused, server gone, closed) the REST API is
    polled every ``poll_interval`` seconds (``gpus``: GET gpus too) and the websocket is
    tried again after a backoff that doubles up to ``max_backoff``. Use it with
    ``contextlib.aclosing`` (or cancel the task iterating it): that closes the websocket.
    """
    backoff = FIRST_BACKOFF
    loop = asyncio.get_running_loop()
    ws: WebSocketClientConnection | None = None
    try:
        while True:
            problem = ""
            if websocket:
                try:
                    ws = await connect_events(client)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    problem = _ws_error(exc)
                else:
                    backoff = FIRST_BACKOFF
                    yield {"type": "connected", "via": "websocket"}
                    while True:
                        message = await ws.read_message()
                        if message is None:
                            break
                        try:
                            event = json.loads(message)
                        except ValueError:
                            continue
                        if isinstance(event, dict):
                            yield event
                    ws.close()
                    ws = None
                    problem = "the events websocket closed"
            poller = _Poller(client, gpus)
            if problem:
                yield {
                    "type": "error",
                    "message": f"live updates: {problem}; polling every {poll_interval:g} s",
                }
            until = loop.time() + backoff
            while True:
                try:
                    for event in await poller.poll():
                        yield event
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    yield {"type": "error", "message": one_line(exc)}
                if not websocket:
                    await asyncio.sleep(poll_interval)
                    continue
                if loop.time() >= until:
                    break
                await asyncio.sleep(min(poll_interval, until - loop.time()))
                if loop.time() >= until:
                    break
            backoff = min(backoff * 2, max_backoff)
    finally:
        if ws is not None:
            ws.close()
