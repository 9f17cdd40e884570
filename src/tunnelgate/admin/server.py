"""The admin HTTP server: health, metrics and the JSON API of one :class:`Site`.

Routes (``/healthz`` and ``/readyz`` answer without credentials, for probes)::

    GET  /healthz            200: the process and its event loop answer
    GET  /readyz             200, or 503 with the reason it is not ready
    GET  /metrics            Prometheus text exposition
    GET  /                   the dashboard (a static page, on the gateway)
    GET  /api/v1/stream      the dashboard's view, as Server-Sent Events, once a second
    GET  /api/v1/...         the site's views, as JSON
    POST /api/v1/...         the site's actions (a JSON body; see below)

Credentials: on a loopback address none are needed. Otherwise the listener
refuses to start without a token; a request shows it as ``Authorization:
Bearer TOKEN`` or as the password of HTTP basic auth (any user name, so a
browser can log in to the dashboard). Tokens are compared in constant time; a
failure is answered after ``FAILURE_DELAY`` and logged with the source
address (never the credential), and at most ``MAX_DELAYED`` failures wait at
once: beyond that, 429 at once.

A POST must carry ``Content-Type: application/json`` and, if the browser sent
an ``Origin``, one naming this server: a cross-site page can send neither
without the server's consent, so actions cannot be forged from another site.
Bodies are capped at ``MAX_BODY``.

Orchestration at the edge of the process: it must not import gateway, agent,
relay or transport; a site adapts a gateway or an agent to it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from tunnelgate.address import Address, is_loopback
from tunnelgate.admin.metrics import exposition
from tunnelgate.errors import TransportError
from tunnelgate.logs import Throttle

logger = logging.getLogger(__package__)

API: Final = "/api/v1"
MAX_BODY: Final = 64 * 1024
FAILURE_DELAY: Final = 1.0  # seconds before a wrong credential is answered
MAX_DELAYED: Final = 32  # wrong credentials being delayed at once; more get 429
WARNING_INTERVAL: Final = 10.0
KEEPALIVE_TIMEOUT: Final = 15.0
STATIC: Final = Path(__file__).parent / "static"
STREAM_INTERVAL: Final = 1.0  # seconds between two dashboard updates
STREAM_WRITE_TIMEOUT: Final = 10.0  # a client that takes no update for this long is dropped
MAX_STREAMS: Final = 64
HEAD_TIMEOUT: Final = 10.0  # for a request's line and headers, from its first byte
BODY_TIMEOUT: Final = 10.0
MAX_CONNECTIONS: Final = 256
_CLOSING: Final = b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_TIMED_OUT: Final = b"HTTP/1.1 408 Request Timeout" + _CLOSING
_TOO_MANY: Final = b"HTTP/1.1 503 Service Unavailable" + _CLOSING


@dataclass(frozen=True)
class Limits:
    """How long and how many, against slow or hostile clients (tests make them short)."""

    head_timeout: float = HEAD_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    stream_interval: float = STREAM_INTERVAL
    stream_write_timeout: float = STREAM_WRITE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_streams: int = MAX_STREAMS


class NotFound(Exception):
    """No such view or object (404)."""


class BadRequest(Exception):
    """The request cannot be served as it is (400), for the reason given."""


class Site(Protocol):
    """What a gateway or an agent shows on its admin listener."""

    side: str  # "gateway" or "agent"

    def ready(self) -> str | None:
        """None when ready to serve, else why not."""

    def degraded(self) -> str | None:
        """Why it serves with less than it should (ready all the same), or None."""

    async def collect(self) -> list[Metric]:
        """The metrics as they are now."""

    async def view(self, path: Sequence[str], query: Mapping[str, str]) -> object:
        """The JSON-encodable view at ``/api/v1/<path>``; raises NotFound."""

    async def act(self, path: Sequence[str], body: Mapping[str, Any]) -> object:
        """Do the action at ``/api/v1/<path>``; raises NotFound or BadRequest."""

    async def start(self) -> None:
        """Start what the site runs beside the server (the history's recorder)."""

    async def close(self) -> None: ...


class AdminServer:
    """Serves one site on ``address``; ``token`` None only on loopback."""

    def __init__(
        self,
        site: Site,
        address: Address,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        *,
        limits: Limits | None = None,
    ) -> None:
        if token is None and not is_loopback(address.host):
            raise ValueError(f"an admin listener on {address} needs a token")
        self.site = site
        self._address = address
        self._token = token.encode() if token is not None else None
        self._ssl = ssl_context
        self.limits = limits or Limits()
        self._runner: web.AppRunner | None = None
        self._delayed = 0
        self._failures = Throttle(WARNING_INTERVAL)
        self.started = time.time()
        self.address: Address | None = None  # as bound, once started
        self._streams = 0
        self._closing = asyncio.Event()
        self._dashboard: tuple[float, bytes] = (0.0, b"")  # one view a tick for every stream

    @property
    def streams(self) -> int:
        """Dashboards streaming now."""
        return self._streams

    @property
    def url(self) -> str:
        assert self.address is not None
        host = self.address.host
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self._ssl else 'http'}://{shown}:{self.address.port}/"

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._guard])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._index)
        app.router.add_static("/static/", STATIC)
        app.router.add_get(API, self._info)
        app.router.add_get(API + "/stream", self._stream)
        app.router.add_get(API + "/{path:.+}", self._view)
        app.router.add_post(API + "/{path:.+}", self._act)
        await self.site.start()
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, keepalive_timeout=KEEPALIVE_TIMEOUT
        )
        await self._runner.setup()
        host = self._address.host or None
        site = _GuardedSite(self._runner, host, self._address.port, ssl_context=self._ssl)
        site.limits = self.limits
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            await self.site.close()
            why = exc.strerror or exc
            raise TransportError(f"admin: cannot listen on {self._address}: {why}") from None
        bound = self._runner.addresses[0]
        self.address = Address(str(bound[0]), int(bound[1]))
        logger.info("admin listening on %s", self.url)

    async def close(self) -> None:
        self._closing.set()  # the streams end
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            await self.site.close()

    # --- the guard: credentials and cross-site requests -----------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if (guard := _Guard.of.get(request.transport)) is not None:
            guard.waiting_since = None  # its head arrived in time
        if request.path not in ("/healthz", "/readyz") and not self._authorized(request):
            return await self._refuse(request)
        if request.method == "POST":
            why = _cross_site(request)
            if why is not None:
                return _error(403, why)
        try:
            response: web.StreamResponse = await handler(request)
        except NotFound as exc:
            return _error(404, str(exc) or "not found")
        except BadRequest as exc:
            return _error(400, str(exc))
        return response

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return True
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        given = b""
        if scheme.lower() == "bearer":
            given = value.strip().encode()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except binascii.Error:
                given = b""
        return hmac.compare_digest(given, self._token)

    async def _refuse(self, request: web.Request) -> web.StreamResponse:
        peer = request.remote or "?"
        self._failures.warning(
            logger, time.monotonic(), "admin: refused %s %s from %s: wrong or no credentials",
            request.method, request.path, peer,
        )  # fmt: skip
        if self._delayed >= MAX_DELAYED:
            return _error(429, "too many failed attempts; try later")
        self._delayed += 1
        try:
            await asyncio.sleep(FAILURE_DELAY)
        finally:
            self._delayed -= 1
        response = _error(401, "credentials required")
        response.headers["WWW-Authenticate"] = 'Basic realm="tunnelgate", charset="UTF-8"'
        return response

    # --- routes -----------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return _json({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        reason = self.site.ready()
        if reason is None:
            degraded = self.site.degraded()
            return _json({"ready": True, **({"degraded": degraded} if degraded else {})})
        return _json({"ready": False, "reason": reason}, status=503)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        body = exposition(await self.site.collect())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _index(self, request: web.Request) -> web.StreamResponse:
        if self.site.side != "gateway":
            raise web.HTTPFound(API)
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        """The dashboard's view every STREAM_INTERVAL. A client that reads slowly gets the
        latest view when it can take one (nothing queues up); one that stops reading is
        dropped after STREAM_WRITE_TIMEOUT. Either way the others never wait for it."""
        await self._dashboard_view()  # NotFound (404) on a site without a dashboard
        limits = self.limits
        if self._streams >= limits.max_streams:
            return _error(503, f"at most {limits.max_streams} live dashboards at once")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        self._streams += 1
        try:
            while not self._closing.is_set():
                async with asyncio.timeout(limits.stream_write_timeout):
                    await response.write(b"data: " + await self._dashboard_view() + b"\n\n")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), limits.stream_interval)
        except (TimeoutError, ConnectionError):
            pass  # a slow or gone client: dropped
        finally:
            self._streams -= 1
        return response

    async def _dashboard_view(self) -> bytes:
        at, view = self._dashboard
        if time.monotonic() - at >= self.limits.stream_interval / 2:
            view = msgspec.json.encode(await self.site.view(("dashboard",), {}))
            self._dashboard = (time.monotonic(), view)
        return view

    async def _info(self, request: web.Request) -> web.StreamResponse:
        return _json(await self.site.view((), request.query))

    async def _view(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"].strip("/").split("/")
        return _json(await self.site.view(path, request.query))

    async def _act(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"].strip("/").split("/")
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                raw = await request.read()
        except TimeoutError:
            return _error(408, f"the body did not arrive within {self.limits.body_timeout:g} s")
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return _json(await self.site.act(path, body))


class _Guard(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection: a request whose line and headers
    take longer than HEAD_TIMEOUT from their first byte (a slowloris) gets 408 and the
    connection closes; beyond MAX_CONNECTIONS a new connection gets 503. aiohttp has no
    such deadline of its own."""

    of: ClassVar[dict[Any, _Guard]] = {}  # by transport, for the middleware

    def __init__(self, inner: asyncio.Protocol, site: _GuardedSite) -> None:
        self.inner = inner
        self.site = site
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.waiting_since: float | None = None  # a request head under way, since

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if len(self.site.guards) >= self.site.limits.max_connections:
            self.transport.write(_TOO_MANY)
            transport.close()
            return
        self.site.guards.add(self)
        _Guard.of[transport] = self
        self.waiting_since = time.monotonic()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.site.guards:
            self.site.guards.discard(self)
            _Guard.of.pop(self.transport, None)
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def expire(self, now: float, timeout: float) -> None:
        if self.waiting_since is not None and now - self.waiting_since > timeout:
            self.transport.write(_TIMED_OUT)
            self.transport.close()


class _GuardedSite(web.TCPSite):
    """aiohttp's TCP site, its connections wrapped in a :class:`_Guard`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.guards: set[_Guard] = set()
        self.limits = Limits()
        self._sweeping: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site; the listening is done here
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Guard(server(), self), self._host, self._port, ssl=self._ssl_context
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]
        self._sweep()

    def _sweep(self) -> None:
        now = time.monotonic()
        for guard in list(self.guards):
            guard.expire(now, self.limits.head_timeout)
        interval = min(1.0, self.limits.head_timeout / 4)
        self._sweeping = asyncio.get_running_loop().call_later(interval, self._sweep)

    async def stop(self) -> None:
        if self._sweeping is not None:
            self._sweeping.cancel()
        await super().stop()


def _cross_site(request: web.Request) -> str | None:
    """Why a POST may come from another site's page, or None."""
    if request.content_type != "application/json":
        return "actions take Content-Type: application/json"
    origin = request.headers.get("Origin")
    if origin is not None and origin.partition("://")[2] != request.host:
        return f"cross-site request from {origin[:100]!r} refused"
    return None


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(value), status=status, content_type="application/json"
    )


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)
