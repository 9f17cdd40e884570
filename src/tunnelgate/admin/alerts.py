"""Alerts by webhook: an agent or a service of the gateway that stays down longer than a
grace period, and its return, POSTed as JSON to the URLs of the ``[[alerts]]`` tables.

:class:`Watch` is the rule, pure (time passed in): which transitions of the event log have
lasted their grace period. :class:`Alerts` follows the gateway's event log from a task of
its own, feeds one ``Watch`` per webhook and delivers from one task per webhook, through a
bounded queue (the oldest alert is dropped when it is full), with bounded retries and a
throttled warning: a webhook that hangs or refuses never holds up the gateway. It rereads
``gateway.config.alerts`` at each poll, so a reload applies to it at once.

Imported only when ``[[alerts]]`` are configured (``cli``), with or without the admin
listener. The gateway must not import it; it must not import ``cli``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Final

import aiohttp

from tunnelgate import __version__
from tunnelgate.config import AlertConfig
from tunnelgate.gateway.gateway import GatewayView
from tunnelgate.logs import Throttle
from tunnelgate.stats import Event

logger = logging.getLogger(__name__)

POLL_INTERVAL: Final = 1.0  # how often the event log is read
RETRY_INTERVAL: Final = 1.0  # before the first retry; doubled before each next one
MAX_QUEUED: Final = 100  # alerts waiting per webhook; the oldest is dropped beyond
WARNING_INTERVAL: Final = 60.0  # one warning a minute per webhook that fails

# The log's kinds: whether each is a going down or a coming up, and the alert that says so.
_DOWN: Final = {"agent_down": "agent_offline", "service_down": "service_down"}
_UP: Final = {"agent_up": "agent_online", "service_up": "service_up"}


@dataclass(frozen=True)
class Alert:
    event: str  # one of config.ALERT_EVENTS
    agent: str
    service: str  # "" for an agent's alert
    time: float  # wall-clock seconds of the transition (the going down, the coming back)
    detail: str  # the reason it went down, or where it came back from


class Watch:
    """The down and up of every agent and service, and which alerts they make: a target
    (an agent, or an agent's service) that is down ``grace`` seconds is reported down; once
    reported, its return is reported; one back within the grace period is not reported at
    all. A target may be up in several sessions at once (a reconnect overlaps the old
    session): it is down when the last one ends."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._up: Counter[tuple[str, str]] = Counter()  # sessions in which each target is up
        self._down: dict[tuple[str, str], Event] = {}  # went down, grace not over yet
        self._reported: set[tuple[str, str]] = set()  # reported down, not back yet

    @property
    def pending(self) -> int:
        """Targets down and within their grace period."""
        return len(self._down)

    def observe(self, event: Event) -> list[Alert]:
        """The alerts due by the time of ``event``, then the one it makes (if any)."""
        alerts = self.due(event.time)
        if event.kind not in _DOWN and event.kind not in _UP:
            return alerts
        key = (event.agent, event.service if event.kind.startswith("service") else "")
        if event.kind in _UP:
            self._up[key] += 1
            if self._up[key] == 1 and self._down.pop(key, None) is None and key in self._reported:
                self._reported.discard(key)
                alerts.append(Alert(_UP[event.kind], *key, event.time, event.detail))
        elif self._up[key] > 1:
            self._up[key] -= 1
        else:  # the last session it was up in ended (or one that began before we looked)
            self._up.pop(key, None)
            if key not in self._reported:
                self._down.setdefault(key, event)
        return alerts

    def due(self, now: float) -> list[Alert]:
        """Down reports whose grace period is over at ``now``, oldest first."""
        over = [key for key, event in self._down.items() if event.time + self.grace <= now]
        alerts = []
        for key in over:
            event = self._down.pop(key)
            self._reported.add(key)
            alerts.append(Alert(_DOWN[event.kind], *key, event.time, event.detail))
        return alerts


@dataclass(frozen=True)
class AlertStatistics:
    """Counts over every webhook since the start, reloads included."""

    ok: int  # delivered (a 2xx answer)
    failed: int  # every attempt failed
    dropped: int  # the queue was full: dropped before any attempt
    attempts: int  # requests made, retries included
    queued: int  # waiting now
    pending: int  # targets down within their grace period, over every webhook


class _Webhook:
    """One ``[[alerts]]`` URL: its watch, its queue, and the task that delivers from it."""

    def __init__(self, config: AlertConfig, counts: Counter[str], max_queued: int) -> None:
        self.config = config
        self.watch = Watch(config.grace)
        self.queue: deque[bytes] = deque()
        self.task: asyncio.Task[None] | None = None
        self._counts = counts
        self._max_queued = max_queued
        self._queued = asyncio.Event()
        self._warnings = Throttle(WARNING_INTERVAL)

    def reconfigure(self, config: AlertConfig) -> None:
        """The same URL's new settings; what its watch knows is kept."""
        self.config = config
        self.watch.grace = config.grace

    def put(self, body: bytes) -> None:
        if len(self.queue) >= self._max_queued:
            self.queue.popleft()
            self._counts["dropped"] += 1
            self._warnings.warning(
                logger,
                time.monotonic(),
                "alerts to %s: queue full, the oldest dropped",
                self.config.origin,
            )
        self.queue.append(body)
        self._queued.set()

    async def deliver_forever(self, session: aiohttp.ClientSession, retry_interval: float) -> None:
        while True:
            await self._queued.wait()
            body = self.queue.popleft()
            if not self.queue:
                self._queued.clear()
            try:
                await self._deliver(session, body, retry_interval)
            except Exception:  # a bug here must not stop the alerts that follow
                logger.exception("alert to %s: unexpected error", self.config.origin)
                self._counts["failed"] += 1

    async def _deliver(
        self, session: aiohttp.ClientSession, body: bytes, retry_interval: float
    ) -> None:
        config = self.config
        for attempt in range(config.retries + 1):
            if attempt:
                await asyncio.sleep(retry_interval * 2 ** (attempt - 1))
            self._counts["attempts"] += 1
            error = await self._post(session, body)
            if error is None:
                self._counts["ok"] += 1
                return
            logger.debug("alert to %s: attempt %d failed: %s", config.origin, attempt + 1, error)
        self._counts["failed"] += 1
        self._warnings.warning(
            logger,
            time.monotonic(),
            "alert to %s not delivered after %d attempt(s): %s",
            config.origin,
            config.retries + 1,
            error,
        )

    async def _post(self, session: aiohttp.ClientSession, body: bytes) -> str | None:
        """None once the webhook took ``body``; else what went wrong."""
        config = self.config
        headers = {"Content-Type": "application/json", "User-Agent": f"tunnelgate/{__version__}"}
        if config.secret is not None:
            digest = hmac.new(config.secret, body, hashlib.sha256).hexdigest()
            headers["X-Tunnelgate-Signature"] = f"sha256={digest}"
            headers["X-Tunnelgate-Timestamp"] = str(int(time.time()))
        timeout = aiohttp.ClientTimeout(total=config.timeout)
        try:
            async with session.post(
                config.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return None
                return f"answered {response.status} {response.reason or ''}".rstrip()
        except TimeoutError:
            return f"no answer within {config.timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return str(exc) or type(exc).__name__


class Alerts:
    """``async with Alerts(gateway):`` sends the ``[[alerts]]`` of ``gateway.config``."""

    def __init__(
        self,
        gateway: GatewayView,
        *,
        poll_interval: float = POLL_INTERVAL,
        retry_interval: float = RETRY_INTERVAL,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self.gateway = gateway
        self.last_event = 0  # the id of the last event of the log read
        self._poll_interval = poll_interval
        self._retry_interval = retry_interval
        self._max_queued = max_queued
        self._counts: Counter[str] = Counter()
        self._webhooks: dict[str, _Webhook] = {}  # by URL
        self._session: aiohttp.ClientSession | None = None
        self._main: asyncio.Task[None] | None = None
        self._missed = Throttle(WARNING_INTERVAL)

    async def __aenter__(self) -> Alerts:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Follow the event log from now on: what happened before is not reported."""
        events = self.gateway.events.since()
        self.last_event = events[-1].id if events else 0
        self._session = aiohttp.ClientSession()
        self._main = asyncio.create_task(self._run(self._session), name="alerts")

    async def aclose(self) -> None:
        """Stop at once; alerts still queued or in their grace period are not sent."""
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
            self._main = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def statistics(self) -> AlertStatistics:
        hooks = self._webhooks.values()
        counts = self._counts
        return AlertStatistics(
            ok=counts["ok"],
            failed=counts["failed"],
            dropped=counts["dropped"],
            attempts=counts["attempts"],
            queued=sum(len(hook.queue) for hook in hooks),
            pending=sum(hook.watch.pending for hook in hooks),
        )

    async def _run(self, session: aiohttp.ClientSession) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                while True:
                    self._configure(group, session)
                    self._follow()
                    await asyncio.sleep(self._poll_interval)
        except Exception:  # a bug: the gateway goes on without alerts
            logger.exception("alerts stopped by an unexpected error")
        finally:
            self._webhooks.clear()

    def _configure(self, group: asyncio.TaskGroup, session: aiohttp.ClientSession) -> None:
        """The webhooks as ``gateway.config`` lists them now (a reload may have changed it)."""
        configs = {config.url: config for config in self.gateway.config.alerts}
        for url in [url for url in self._webhooks if url not in configs]:
            hook = self._webhooks.pop(url)
            if hook.task is not None:
                hook.task.cancel()
        for url, config in configs.items():
            if (known := self._webhooks.get(url)) is not None:
                if known.config != config:
                    known.reconfigure(config)
            else:
                hook = self._webhooks[url] = _Webhook(config, self._counts, self._max_queued)
                hook.task = group.create_task(
                    hook.deliver_forever(session, self._retry_interval), name="alert webhook"
                )
                logger.info("alerts: sending %s to %s", ", ".join(config.events), config.origin)

    def _follow(self) -> None:
        """Feed the events logged since the last poll to every webhook's watch."""
        events = self.gateway.events.since(self.last_event)
        if events and events[0].id > self.last_event + 1:
            missed = events[0].id - self.last_event - 1
            self._missed.warning(
                logger, time.monotonic(), "alerts: %d event(s) passed unread; some may be lost",
                missed,
            )  # fmt: skip
        if events:
            self.last_event = events[-1].id
        now = time.time()
        for hook in self._webhooks.values():
            alerts = [a for event in events for a in hook.watch.observe(event)]
            alerts += hook.watch.due(now)
            for alert in alerts:
                if alert.event in hook.config.events:
                    hook.put(self._body(alert))

    def _body(self, alert: Alert) -> bytes:
        payload = {
            "event": alert.event,
            "agent": alert.agent,
            "service": alert.service or None,
            "time": alert.time,
            "detail": alert.detail,
            "gateway": self._gateway_address(),
        }
        return json.dumps(payload, separators=(",", ":")).encode()

    def _gateway_address(self) -> str:
        """The control port's address, the host name for a wildcard one."""
        address = self.gateway.address
        if address is None:
            return ""
        if address.host in ("0.0.0.0", "::", ""):
            return f"{socket.gethostname()}:{address.port}"
        return str(address)
