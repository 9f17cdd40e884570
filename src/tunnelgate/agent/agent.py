"""The agent: the life cycle and the reconnect loops around its sessions.

The agent keeps a session up with each configured gateway, each on its own (a
:class:`_GatewayLink`): run an :class:`~tunnelgate.agent.session.AgentSession` until it ends,
wait a backoff with full jitter, repeat. An authentication failure ends a gateway's loop; it
ends the agent when every gateway refused it. A gateway of several worker processes names them
in its Welcome: the link then keeps a session with each worker, at its own address, each with
its own reconnect loop (a "slot"), the first session's being the one of the worker it reached.
If the workers change (a gateway restarted with others), it dials the gateway again and spreads
anew. The agent is ready while any session has its services. It keeps the counts that outlive
its sessions (:class:`~tunnelgate.stats.AgentTotals`), and counts each reconnect by the reason
its last attempt ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from typing import Any, Final

from tunnelgate.address import Address, format_address
from tunnelgate.agent.session import (
    AgentSession,
    Dialer,
    ExposedService,
    Proofs,
    SessionStatistics,
    dial_error_reason,
    worker_address,
)
from tunnelgate.backoff import backoff
from tunnelgate.config import AgentConfig, load_agent_config
from tunnelgate.control import wait_relays
from tunnelgate.errors import AuthenticationError, ConnectionClosed, ProtocolError, TransportError
from tunnelgate.logs import ContextLogger
from tunnelgate.stats import (
    AgentServiceCounts,
    AgentTotals,
    GatewayRecord,
    GatewayRecordStatistics,
)

logger = logging.getLogger(__package__)

CLOSE_RETRY_INTERVAL: Final = 0.1


class WorkersChanged(Exception):
    """The gateway's workers are not the ones the sessions were spread over: dial it again."""


@dataclass
class _Slot:
    """Where one reconnect loop dials: the gateway, until a Welcome names its workers; then the
    own address of the worker that session reached."""

    dialer: Dialer
    worker: int | None = None  # once known
    fixed_ports: bool = False  # opened for another worker: any-port services ask for the one got


@dataclass(frozen=True)
class AgentStatistics:
    name: str
    sessions: tuple[SessionStatistics, ...]  # the sessions up now
    gateways: tuple[GatewayRecordStatistics, ...]  # every gateway it dials, up or not
    # Every configured service, by name; bytes include those of open connections.
    services: tuple[tuple[str, AgentServiceCounts], ...]


class Agent:
    """The private side: ``async with Agent(config) as agent:``, or with the keys of its TOML file
    as keyword arguments: ``Agent(gateway="gw:8080", token="…", expose=["0:localhost:80"])``."""

    def __init__(self, config: AgentConfig | None = None, **options: Any) -> None:
        if config is None:
            config, _ = load_agent_config(None, options)
        self.config = config
        self._log = ContextLogger(logger, agent=config.name)
        self._totals = AgentTotals()
        proofs = Proofs(config)  # one credential for every gateway
        several = len(config.gateways) > 1
        self._links = tuple(
            _GatewayLink(
                self,
                Dialer(config, target, log, proofs),
                self._totals.gateway(str(target.address)),  # shown before the first session
            )
            for target in config.gateways
            for log in [self._log.bind(gateway=str(target.address)) if several else self._log]
        )
        for service in config.services:
            self._totals.service(service.name)
        self._main: asyncio.Task[None] | None = None
        self._closing = False
        self._ready = asyncio.Event()

    @property
    def _sessions(self) -> list[AgentSession]:
        """The sessions up now, with every gateway."""
        return [session for link in self._links for session in link.sessions]

    @property
    def services(self) -> dict[str, ExposedService]:
        """The services the gateways expose now, by name."""
        return {name: s for session in self._sessions for name, s in session.services.items()}

    @property
    def session_id(self) -> str | None:
        """The id of a session up now, if any."""
        return next((s.id for s in self._sessions if s.id is not None), None)

    def statistics(self) -> AgentStatistics:
        """A snapshot of the agent's sessions (their services, pools and connections) and of its
        counts per gateway and per service."""
        sessions = tuple(s.statistics() for s in self._sessions)
        live: dict[str, tuple[int, int, int]] = {}  # service → open connections, bytes up, down
        for session in sessions:
            for c in session.connections:
                active, up, down = live.get(c.service, (0, 0, 0))
                live[c.service] = (active + 1, up + c.up, down + c.down)
        now, totals = time.time(), self._totals
        return AgentStatistics(
            self.config.name,
            sessions,
            tuple(record.statistics(now) for record in totals.gateways.values()),
            tuple(
                (name, service.counts(*live.get(name, (0, 0, 0))))
                for name, service in totals.services.items()
            ),
        )

    def gateways_ready(self) -> dict[str, bool]:
        """For each configured gateway (its address), whether a session with it has the
        services registered now."""
        return {
            str(link.dialer.target.address): any(s.services for s in link.sessions)
            for link in self._links
        }

    def close_connection(self, conn: int) -> bool:
        """Reset one client connection, by its id (the gateway's); False if none is open."""
        return any(session.close_connection(conn) for session in self._sessions)

    async def __aenter__(self) -> Agent:
        if not self.config.tls:
            self._log.warning(
                "TLS is OFF (--no-tls): relayed bytes cross the network in clear, "
                "and nothing proves the gateway is the one you meant"
            )
        self._main = asyncio.create_task(self.run(), name="agent")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop gracefully: tell the gateways, let open connections finish for up to
        ``drain_timeout`` seconds (default: the config's), then reset those still open."""
        if self._main is None:
            return
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        self._closing = True
        await asyncio.gather(*(session.say_bye() for session in self._sessions))
        sessions = list(self._sessions)
        for session in sessions:
            session.stop_opening()
        serving = sum(len(session.serving) for session in sessions)
        if serving and timeout > 0:
            self._log.info(
                "draining: waiting up to %g s for %d connection(s) to finish", timeout, serving
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            left = 0
            for session in sessions:  # each set is live: a task leaves it when done
                left += await wait_relays(session.serving, max(0.0, deadline - loop.time()))
            if left:
                self._log.warning("drain deadline reached: resetting %d connection(s)", left)
            else:
                self._log.info("drained: every connection finished")
        await self.aclose()

    async def aclose(self) -> None:
        """Stop at once: end the sessions (open connections are reset) and stop reconnecting."""
        await asyncio.gather(*(session.say_bye() for session in self._sessions))
        self._closing = True
        main, self._main = self._main, None
        if main is not None:
            # A session's task group unwinding an error can absorb a cancellation: ``_closing``
            # stops the loop then, and cancelling again until the task is done covers the rest.
            while not main.done():
                main.cancel()
                await asyncio.wait({main}, timeout=CLOSE_RETRY_INTERVAL)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                main.result()

    async def run_until_stopped(self) -> None:
        """Wait while the agent runs; raise its fatal error if it gives up. Cancelling the wait
        leaves the agent running, so that ``aclose()`` can still say goodbye to the gateway."""
        assert self._main is not None, "use 'async with Agent(...)' first"
        await asyncio.shield(self._main)

    async def wait_ready(self, timeout: float | None = None) -> dict[str, ExposedService]:
        """Wait until services are registered (with any gateway); raise the fatal error if the
        agent gave up."""
        assert self._main is not None, "use 'async with Agent(...)' first"
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait({ready, self._main}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if not self._ready.is_set():
            self._main.result()  # raises the fatal error
            raise ConnectionClosed("closed", "agent stopped")
        return self.services

    async def run(self) -> None:
        """Keep sessions up with every gateway, each on its own, until cancelled. Raise
        AuthenticationError once every gateway refused this agent (fatal); one that refuses
        while others may serve is logged and no longer dialed."""
        links = self._links
        if len(links) == 1:
            await links[0].run()
            return
        refused = 0

        async def keep(link: _GatewayLink) -> None:
            nonlocal refused
            try:
                await link.run()
            except AuthenticationError as exc:
                refused += 1
                if refused == len(links):
                    raise
                link.record.refused = str(exc)
                link.dialer.log.error(
                    "%s; no longer dialing %s: the other gateways carry the services",
                    exc,
                    link.dialer.target.address,
                )

        try:
            async with asyncio.TaskGroup() as group:
                for link in links:
                    group.create_task(keep(link), name=f"gateway {link.dialer.target.address}")
        except BaseExceptionGroup as caught:
            if (fatal := caught.subgroup(AuthenticationError)) is None:
                raise
            raise _first(fatal) from None

    def _changed(self) -> None:
        """A session ended: the agent is ready while any session is welcomed."""
        if not any(s.id is not None for s in self._sessions):
            self._ready.clear()


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


class _GatewayLink:
    """One configured gateway: the reconnect loop of a session with it, and, if it runs several
    workers, one with each of them (a slot each). Keeps the ports it picked for any-port
    services, asked again on reconnect so that a service keeps its public address."""

    def __init__(self, agent: Agent, dialer: Dialer, record: GatewayRecord) -> None:
        self.agent = agent
        self.dialer = dialer
        self.record = record
        self.sessions: list[AgentSession] = []  # up now, one per worker
        self._chosen_ports: dict[str, int] = {}
        self._workers: tuple[str, ...] = ()  # the gateway's, once a Welcome names them
        self._spread: asyncio.TaskGroup | None = None  # runs the slots of the other workers

    async def run(self) -> None:
        """Keep a session up, one with each worker of a gateway that has several, until
        cancelled; raise AuthenticationError (refused: fatal)."""
        config, address = self.agent.config, self.dialer.target.address
        delays = backoff(config.reconnect_min, config.reconnect_max)
        next(delays)  # the first slot's, across spreads
        while True:
            self._workers = ()
            try:
                async with asyncio.TaskGroup() as group:
                    self._spread = group
                    await self._keep(_Slot(self.dialer), delays)
            except BaseExceptionGroup as caught:  # a slot's end ends them all (the first's too)
                fatal = caught.subgroup(AuthenticationError) or caught.subgroup(WorkersChanged)
                if fatal is None:
                    raise
                first = _first(fatal)
                if not isinstance(first, WorkersChanged):
                    raise first from None
                delay, _ = delays.send(0.0)  # workers that disagree must not make a busy loop
                self.dialer.log.info("%s; dialing %s again in %.1f s", first, address, delay)
                await asyncio.sleep(delay)
            finally:
                self._spread = None

    async def _keep(self, slot: _Slot, delays: Generator[tuple[float, int], float, None]) -> None:
        """Keep ``slot``'s session up until cancelled: run it until it ends, wait, again. Raises
        AuthenticationError (refused: fatal), or WorkersChanged."""
        agent = self.agent
        while True:
            session = AgentSession(
                slot.dialer,
                self._chosen_ports,
                lambda: self._session_ready(slot),
                agent._totals,
                lambda session: self._session_welcomed(slot, session),
                slot.fixed_ports,
            )
            self.sessions.append(session)
            try:
                reason, level = await session.run(), logging.INFO
                counted = "goodbye"
            except (TimeoutError, TransportError, ProtocolError, ConnectionClosed) as exc:
                reason, level = str(exc), logging.WARNING
                if isinstance(exc, TimeoutError):
                    silent = "no heartbeat reply" if session.id else "no welcome from the gateway"
                    reason = f"{silent} within the deadline"
                counted = reconnect_reason(exc, session.id is not None)
            finally:
                self.sessions.remove(session)
                agent._changed()
            if agent._closing:
                raise asyncio.CancelledError
            session.record.reconnecting(counted)
            welcomed = any(s.id is not None for s in self.sessions)
            if slot.worker is not None and session.id is None and not welcomed:
                # No worker answers: the gateway may have restarted with other workers.
                raise WorkersChanged(f"no session with any worker of the gateway ({reason})")
            delay, attempt = delays.send(time.monotonic() - session.started)
            slot.dialer.log.log(
                level,
                "%s; reconnecting to %s in %.1f s (attempt %d)",
                reason,
                slot.dialer.address,
                delay,
                attempt,
            )
            await asyncio.sleep(delay)

    def _session_welcomed(self, slot: _Slot, session: AgentSession) -> None:
        """The first Welcome that names workers fixes the slot's worker and the link's list of
        them; a Welcome that does not fit them ends the spread (WorkersChanged)."""
        if slot.worker is None and session.workers and not self._workers:
            assert session.worker is not None
            self._workers, slot.worker = session.workers, session.worker
            address = worker_address(self.dialer.target.address, session.workers[session.worker])
            slot.dialer = slot.dialer.to(address, self.dialer.log.bind(worker=session.worker))
        elif (session.workers, session.worker) != (self._workers, slot.worker):
            raise WorkersChanged("the gateway's workers changed")

    def _session_ready(self, slot: _Slot) -> None:
        """Services are registered: the agent is ready; the first time a gateway of several
        workers answered, open a session with each other worker (they ask for the ports the
        gateway gave this one)."""
        self.agent._ready.set()
        if slot.fixed_ports or slot.worker is None or self._spread is None:
            return
        group, self._spread = self._spread, None  # once per spread
        log = self.dialer.log
        log.info("the gateway runs %d workers: opening a session with each", len(self._workers))
        config = self.agent.config
        for index, announced in enumerate(self._workers):
            if index != slot.worker:
                address = worker_address(self.dialer.target.address, announced)
                dialer = self.dialer.to(address, log.bind(worker=index))
                delays = backoff(config.reconnect_min, config.reconnect_max)
                next(delays)
                group.create_task(self._keep(_Slot(dialer, index, True), delays))


def reconnect_reason(exc: Exception, welcomed: bool) -> str:
    """Why a session ended with ``exc``, as one of :data:`~tunnelgate.stats.RECONNECT_REASONS`;
    ``welcomed``: it got past the handshake. A TimeoutError is a silent gateway."""
    if isinstance(exc, TimeoutError):
        return "heartbeat" if welcomed else "error"
    if isinstance(exc, ProtocolError):
        return "error"
    if welcomed:  # the control channel ended under the session (EOF, reset)
        return "closed"
    if isinstance(exc, ConnectionClosed):  # the gateway refused the session, or hung up on it
        return "refused"
    if isinstance(exc, TransportError):
        match dial_error_reason(exc):
            case "refused":
                return "refused"
            case "timeout" | "unreachable":
                return "unreachable"
    return "error"


@contextlib.asynccontextmanager
async def expose(
    local_port: int,
    *,
    gateway: str,
    token: str,
    local_host: str = "127.0.0.1",
    remote_port: int = 0,
    timeout: float = 30.0,
    **options: Any,
) -> AsyncIterator[Address]:
    """Expose ``local_host:local_port`` through a gateway; yield its public address. ``options``
    are further agent settings (``fingerprint``, ``ca``, ``name``…) as in its TOML file."""
    spec = f"{remote_port}:{format_address(local_host, local_port)}"
    async with Agent(gateway=gateway, token=token, expose=[spec], **options) as agent:
        services = await agent.wait_ready(timeout)
        if not services:
            raise TransportError("the gateway did not expose the service (see the log)")
        (service,) = services.values()
        host = service.address.host
        if host in ("0.0.0.0", "::", ""):
            host = agent.config.gateway.host
        yield Address(host, service.address.port)
