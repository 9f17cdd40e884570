"""The gateway: the control port, where each connection is admitted in its own task
(``gateway.handshake``) and becomes a session, a data channel or a probe, and the registry
and life cycle around the sessions (a reconnecting agent replaces its old one at once),
keeping what outlives a session: ports held, the access rules' counters, the totals. A
gateway may be one :class:`Worker` of several (``gateway.supervisor``): it then accepts on
the control port its supervisor opened and on its own, and leases public ports through the
supervisor.
Must not import agent."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final, Protocol

from tunnelgate import __version__, credentials, errors, tls
from tunnelgate.address import Address
from tunnelgate.channel import Channel
from tunnelgate.config import (
    AgentPolicy,
    GatewayConfig,
    check_token,
    default_state_dir,
    load_gateway_config,
)
from tunnelgate.control import wait_relays
from tunnelgate.gateway.fleet import Fleet, FleetLeases
from tunnelgate.gateway.forwarding import Forwarder
from tunnelgate.gateway.handshake import ControlHandshake
from tunnelgate.gateway.leases import PortLeases
from tunnelgate.gateway.ports import Ports
from tunnelgate.gateway.probe import serve_probe
from tunnelgate.gateway.session import (
    GatewaySession,
    SessionStatistics,
    Shared,
    accept,
    sessions_of,
    spawn,
)
from tunnelgate.logs import ContextLogger
from tunnelgate.protocol.wire import Bye, Hello, Refused
from tunnelgate.stats import (
    AUTH_FAILURE_REASONS,
    TLS_FAILURE_REASONS,
    AgentRecordStatistics,
    EventLog,
    GatewayTotals,
)
from tunnelgate.transport import Listener, SocketStream, open_listener

logger = logging.getLogger(__package__)

BYE_TIMEOUT: Final = 0.5  # for telling agents the gateway is going away
STORED_TOKEN_FILE: Final = "token"  # in the state directory, without a token or [[agents]]


@dataclasses.dataclass(frozen=True)
class Worker:
    """What a worker process of a gateway is given by its supervisor."""

    index: int
    control: Listener  # the control port, shared by every worker
    own: Listener  # this worker's own control port: its sessions' data channels come here
    addresses: tuple[str, ...]  # every worker's own control address ("host:port"), by index
    leases: PortLeases  # the supervisor's


@dataclasses.dataclass(frozen=True)
class GatewayStatistics:
    address: Address | None
    tls: bool
    handshakes: int  # connections on the control port still in their handshake
    sessions: tuple[SessionStatistics, ...]
    agents: tuple[AgentRecordStatistics, ...]  # every agent known, online or not
    auth_failures: tuple[tuple[str, int], ...]  # (reason, count), AUTH_FAILURE_REASONS
    tls_failures: tuple[tuple[str, int], ...]  # (reason, count), TLS_FAILURE_REASONS
    started_at: float  # wall-clock seconds


# What a reload cannot change: a restart applies it.
RESTART_ONLY: Final = (
    "listen", "tls", "cert", "key", "state_dir", "workers", "worker_ports",
    "fleet", "fleet_name", "fleet_node", "fleet_lease", "fleet_listen", "fleet_advertise",
    "fleet_ca", "fleet_cert", "fleet_key",
)  # fmt: skip


class GatewayView(Protocol):
    """What the admin API and the alerts see of a gateway: a :class:`Gateway` of one process,
    or the :class:`~tunnelgate.gateway.supervisor.Supervisor` of several workers."""

    config: GatewayConfig
    address: Address | None
    fingerprint: str | None
    fleet: Fleet | None  # its link to the fleet's Redis, if it is in one
    forwarder: Forwarder | None  # its side of forwarding between the fleet's gateways

    @property
    def events(self) -> EventLog: ...

    @property
    def identity(self) -> tuple[Path, Path] | None: ...

    async def snapshot(self) -> GatewayStatistics: ...

    async def disconnect(self, agent: str, reason: str) -> bool: ...

    async def close_connection(self, conn: int) -> bool: ...


class Gateway:
    """The public side: ``async with Gateway(config) as gateway:``, or with the keys of
    its TOML file as keyword arguments (``Gateway(listen="127.0.0.1:0", token="…")``)."""

    def __init__(
        self, config: GatewayConfig | None = None, *, worker: Worker | None = None, **options: Any
    ) -> None:
        self.config = config if config is not None else load_gateway_config(None, options)[0]
        self.worker = worker
        self.address: Address | None = None
        self.fingerprint: str | None = None
        self.started_at = time.time()
        self.cert_created = False
        self.stored_token: Path | None = None  # the state directory's token, if it is the one
        self._identity: tuple[Path, Path] | None = None  # certificate and key, with TLS
        self._client_ca_pem: bytes | None = None  # as loaded into the context
        self._listeners: list[Listener] = []
        self._main: asyncio.Task[None] | None = None
        self._accepting: list[asyncio.Task[None]] = []
        self._sessions: dict[str, GatewaySession] = {}  # by agent name, not draining
        self._by_id: dict[str, GatewaySession] = {}  # every running session
        self._probing: set[str] = set()  # agents with a probe channel open (one each)
        shared: dict[str, Any] = {}
        if worker is not None:  # connection ids unique across the workers: i+1, i+1+N, …
            shared = {
                "ports": Ports(reuse_port=True),
                "leases": worker.leases,
                "workers": worker.addresses,
                "worker": worker.index,
                "conn_ids": itertools.count(worker.index + 1, len(worker.addresses)),
            }
        self.fleet: Fleet | None = None
        # What reads its configuration again (the CLI's, from its file): another gateway of the
        # fleet may ask for it.
        self.reloader: Callable[[], Awaitable[str]] | None = None
        self._tasks: asyncio.TaskGroup | None = None  # the gateway's, while it runs
        if self.config.fleet and worker is None:
            self.fleet = self._fleet(self.config)
            shared["leases"] = FleetLeases(self.fleet, lambda: self._tasks)
        self._shared = Shared(lambda: self.config, self._forget_name, **shared)
        # Its side of forwarding between the fleet's gateways, with fleet_listen.
        self.forwarder: Forwarder | None = None
        if self.fleet is not None and self.config.fleet_listen is not None:
            self.forwarder = Forwarder(
                lambda: self.config, self.fleet, self._shared, lambda: self._tasks
            )
            shared["leases"].on_granted = self.forwarder.take_port
        self._stopping = False
        self._door = ControlHandshake(lambda: self.config, self._shared.totals)
        self._reloading = asyncio.Lock()
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Load the TLS identity, bind the control port and start serving."""
        self.config, self.stored_token = with_stored_token(self.config)
        config = self.config
        if config.tls:
            cert, key, self.cert_created = identity_files(config)
            self._identity = (cert, key)
            self._client_ca_pem = _contents(config.client_ca)
            self._door.context = tls.server_context(cert, key, config.client_ca)
            self.fingerprint = tls.certificate_fingerprint(cert)
        else:
            logger.warning(
                "TLS is OFF (--no-tls): tokens are safe, but relayed bytes cross the "
                "network in clear and anyone on the path can read or change them"
            )
        secured = "TLS" if config.tls else "no TLS"
        if (worker := self.worker) is None:
            self._listeners = [open_listener(config.listen.host, config.listen.port)]
        else:
            self._listeners = [worker.control, worker.own]
        self.address = self._listeners[0].address
        self._remember_agents()
        self._main = asyncio.create_task(self._run(self._listeners), name="gateway")
        await self._ready.wait()
        if (fleet := self.fleet) is not None:
            fleet.node = config.fleet_node or f"{os.uname().nodename}:{self.address.port}"
            if (forwarder := self.forwarder) is not None:
                fleet.link = forwarder.start()
            await fleet.start()
            assert self._tasks is not None
            self._tasks.create_task(fleet.run(), name="fleet")
            self._tasks.create_task(fleet.listen(), name="fleet actions")
            state = "up" if fleet.up else f"down ({fleet.error})"
            logger.info("in fleet %s as %s; its registry is %s", fleet.name, fleet.node, state)
            if forwarder is not None:
                forwarder.serve(self._tasks)
                logger.info("taking clients forwarded by the fleet's gateways on %s", fleet.link)
        if worker is None:
            logger.info("gateway listening on %s (%s)", self.address, secured)
        else:
            logger.info(
                "worker %d of %d serving the control port %s and its own %s (%s)",
                worker.index,
                len(worker.addresses),
                self.address,
                worker.own.address,
                secured,
            )

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop gracefully: accept no more agents or clients, tell every agent, give open
        client connections ``drain_timeout`` seconds (the config's) to finish, then reset."""
        if self._main is None:
            return
        drain_timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        self._stopping = True
        if self.forwarder is not None:
            self.forwarder.stop_forwarding()
        for task in self._accepting:
            task.cancel()
        if self._accepting:
            await asyncio.wait(self._accepting)
        self._close_listeners()
        sessions = list(self._by_id.values())
        for session in sessions:
            await session.drain("gateway shutting down")
        await self._say_bye(sessions)
        # The clients of its sessions, and those it forwards to another gateway of the fleet.
        relays = [s.clients for s in sessions]
        relays += [self.forwarder.clients] if self.forwarder is not None else []
        if (open_clients := sum(len(clients) for clients in relays)) and drain_timeout > 0:
            logger.info(
                "draining: waiting up to %g s for %d client connection(s) to finish",
                drain_timeout,
                open_clients,
            )
            loop = asyncio.get_running_loop()
            deadline, left = loop.time() + drain_timeout, 0
            for clients in relays:
                left += await wait_relays(clients, max(0.0, deadline - loop.time()))
            if left:
                logger.warning("drain deadline reached: resetting %d client connection(s)", left)
            else:
                logger.info("drained: every client connection finished")
        await self.aclose()

    async def aclose(self) -> None:
        """Stop at once: end every session (their open client connections are reset)."""
        await self._say_bye(list(self._by_id.values()))
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
            self._main = None
            logger.info("gateway stopped")
        if self.forwarder is not None:
            self.forwarder.close()
        if self.fleet is not None:
            await self.fleet.aclose()
        self._close_listeners()

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()  # a worker's: its descriptors only (the supervisor keeps its own)
        self._listeners = []

    async def reload(self, config: GatewayConfig) -> None:
        """Apply a new configuration (SIGHUP): sessions it no longer allows are disconnected,
        the others go on under it. Listen address, TLS and certificate need a restart; a
        ``client_ca`` that cannot be loaded raises :class:`ConfigError`, changing nothing."""
        async with self._reloading:
            old = self.config
            if fixed := [k for k in RESTART_ONLY if getattr(old, k) != getattr(config, k)]:
                logger.warning(
                    "reload: %s cannot change while running; restart to apply", ", ".join(fixed)
                )
                config = dataclasses.replace(config, **{k: getattr(old, k) for k in fixed})
            ca_pem = _contents(config.client_ca)
            changed = config.client_ca != old.client_ca or ca_pem != self._client_ca_pem
            if self._identity is not None and changed:
                # Only then: a new context's new ticket keys stop data channels resuming.
                self._door.context = tls.server_context(*self._identity, config.client_ca)
                self._client_ca_pem = ca_pem
            self.config = config
            self._remember_agents()
            for name, group in self._shared.groups.by_name.items():
                if (settings := config.groups.get(name)) is not None:
                    group.balance = settings.balance  # a group gone: its members are, below
            kept = 0
            for session in list(self._sessions.values()):
                if (reason := await self._still_allowed(session)) is None:
                    kept += 1
                    session.update_gates()
                else:
                    session.log.warning("disconnecting the agent: %s", reason)
                    await session.kill()
            summary = f"{len(config.agents)} agent policies; {kept} session(s) kept"
            logger.info("configuration reloaded: %s", summary)
            self.totals.events.add(time.time(), "reload", detail=summary)

    async def _still_allowed(self, session: GatewaySession) -> str | None:
        """Why ``session`` may not go on under the current config, or None (it gets the policy)."""
        by_name = {p.name: p for p in reversed(self.config.agents)}  # the first of each name
        if (policy := by_name.get(session.agent) or by_name.get("")) is None:
            return "it was removed from the configuration"
        if session.key:
            keys = await self._door.keys_of(policy, session.agent)
            if not any(hmac.compare_digest(session.key, key) for key in keys):
                return "its token was revoked"
        elif policy.tokens or policy.stored_keys:
            return "its policy now requires a token"
        if (outside := session.services_outside(policy)) is None:
            session.policy = policy
        return outside

    async def serve_forever(self) -> None:
        """Wait until the gateway stops; a cancelled wait leaves it running (for aclose)."""
        assert self._main is not None, "start() first"
        await asyncio.shield(self._main)

    def sessions(self) -> dict[str, list[Address]]:
        """A snapshot: agent name → the public addresses of its services."""
        return {
            name: [service.address for service in session.services.values()]
            for name, session in self._sessions.items()
        }

    @property
    def identity(self) -> tuple[Path, Path] | None:
        """The certificate and key files of the control port's TLS, once started."""
        return self._identity

    async def disconnect(self, agent: str, reason: str) -> bool:
        """End ``agent``'s session now (it may reconnect), here and, in a fleet, on every
        gateway; False if no gateway holds it."""
        here = await self._disconnect_here(agent, reason)
        if self.fleet is None:
            return here
        try:
            elsewhere = await self.fleet.disconnect(agent, reason)
        except errors.TransportError as exc:
            logger.warning("disconnecting %s on the other gateways of the fleet: %s", agent, exc)
            elsewhere = False
        return here or elsewhere

    async def _disconnect_here(self, agent: str, reason: str) -> bool:
        if (session := self._sessions.get(agent)) is None:
            return False
        session.log.warning("disconnecting the agent: %s", reason)
        await session.kill()
        return True

    async def close_connection(self, conn: int) -> bool:
        """Reset one client connection, by its id; False if none is open."""
        return any(session.close_client(conn) for session in self._by_id.values())

    @property
    def totals(self) -> GatewayTotals:
        return self._shared.totals

    @property
    def events(self) -> EventLog:
        return self._shared.totals.events

    async def snapshot(self) -> GatewayStatistics:
        """:meth:`statistics`, as a supervisor of several workers answers it."""
        return self.statistics()

    def statistics(self) -> GatewayStatistics:
        sessions = tuple(session.statistics() for session in self._by_id.values())
        open_bytes: dict[tuple[str, str], tuple[int, int]] = {}
        for s in sessions:
            for c in s.clients:
                up, down = open_bytes.get((s.agent, c.service), (0, 0))
                open_bytes[(s.agent, c.service)] = (up + c.up, down + c.down)
        now, totals = time.time(), self.totals
        return GatewayStatistics(
            self.address,
            self._door.context is not None,
            self._door.handshakes.running,
            sessions,
            tuple(record.statistics(now, open_bytes) for record in totals.agents.values()),
            tuple((reason, totals.auth_failures[reason]) for reason in AUTH_FAILURE_REASONS),
            tuple((reason, totals.tls_failures[reason]) for reason in TLS_FAILURE_REASONS),
            self.started_at,
        )

    def _remember_agents(self) -> None:
        """Agents named in the config are known (offline) before they first connect."""
        for policy in self.config.agents:
            if policy.name:
                self.totals.agent(policy.name)

    async def _run(self, listeners: list[Listener]) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                # The agent groups' accept loops and the fleet's tasks run here.
                self._shared.groups.tasks = self._tasks = group

                def handle(stream: SocketStream, peer: str) -> None:
                    if self._door.may_start(stream, peer):
                        spawn(group, stream, self._guard_connection(stream, peer))

                for index, listener in enumerate(listeners):
                    where = "the worker's own port" if index else "the control port"
                    accepting = group.create_task(accept(listener, handle, logger, where))
                    self._accepting.append(accepting)
                self._ready.set()
        finally:
            self._shared.groups.tasks = self._tasks = None

    async def _say_bye(self, sessions: list[GatewaySession]) -> None:
        """Tell each agent not told yet that the gateway is going away (within BYE_TIMEOUT)."""
        untold = [s for s in sessions if not s.told_bye]
        for session in untold:
            session.told_bye = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BYE_TIMEOUT):
                await asyncio.gather(*(_send_bye(s.channel) for s in untold))

    def _fleet(self, config: GatewayConfig) -> Fleet:
        """This gateway's link to its fleet (its node's name is known once it listens)."""

        def describe() -> dict[str, Any]:
            agents = sorted(self._sessions)
            return {"address": str(self.address), "version": __version__, "agents": agents}

        def agents() -> dict[str, list[dict[str, Any]]]:
            return {
                name: [
                    {"name": s.name, "address": str(s.address)} for s in session.services.values()
                ]
                for name, session in self._sessions.items()
            }

        def changed(up: bool, why: str) -> None:
            kind = "fleet_up" if up else "fleet_down"
            self._shared.totals.events.add(time.time(), kind, detail=why)

        def disconnect(agent: str, why: str) -> None:  # asked by another gateway
            if agent in self._sessions and self._tasks is not None:
                self._tasks.create_task(self._disconnect_here(agent, why))

        def reload(why: str) -> None:  # asked by another gateway
            if (reloader := self.reloader) is None or self._tasks is None:
                logger.warning("%s: this gateway has no configuration file to read again", why)
                return
            logger.info("reloading the configuration: %s", why)

            async def reloading() -> None:
                await reloader()

            self._tasks.create_task(reloading())

        def routes() -> None:  # the fleet's routes changed: forward the ports held elsewhere
            if self.forwarder is not None and not self._stopping:
                self.forwarder.schedule()

        return Fleet(
            config.fleet, config.fleet_name, "", config.fleet_lease, describe, agents,
            self._lost_port, changed, disconnect, reload, routes,
        )  # fmt: skip

    def _lost_port(self, port: int, why: str) -> None:
        """The fleet gave a port this gateway serves to another owner: end the sessions that
        serve it (their agents reconnect, and are told the port is taken)."""
        self._shared.totals.events.add(time.time(), "fleet_lost", detail=why)
        holders = [h for (_, held), h in self._shared.ports.holders.items() if held == port]
        for session in {s for holder in holders for s in sessions_of(holder)}:
            session.log.warning("%s: ending the session", why)
            if self._tasks is not None:
                self._tasks.create_task(session.kill())

    def _forget_name(self, session: GatewaySession) -> None:  # it drains, or ended
        if self._sessions.get(session.agent) is session:
            del self._sessions[session.agent]

    async def _guard_connection(self, stream: SocketStream, peer: str) -> None:
        """Root of a control-port connection's task: every error ends here, logged once."""
        owned = False  # True once a session (or its pool) closes the connection
        channel: Channel | None = None
        try:
            channel, hello, admitted = await self._door.admit(stream, peer)
            if hello.role != "data" and self._stopping:  # the control port closed meanwhile
                await channel.send_message(Refused("shutdown", "the gateway is shutting down"))
            elif hello.role == "probe":
                owned = True
                await self._probe(channel, hello.agent, peer)
            elif hello.role == "control" and self._shared.workers and not hello.workers:
                reason = (
                    f"this gateway runs {len(self._shared.workers)} worker processes: the agent "
                    "must hold a session with each (upgrade it)"
                )
                logger.warning("refusing agent %r from %s: %s", hello.agent, peer, reason)
                await channel.send_message(Refused("version", reason))
            elif hello.role == "control":
                owned = True
                session = GatewaySession(
                    hello.agent, peer, admitted, channel, self._shared, hello.software, hello.reuse
                )
                if (old := self._sessions.get(hello.agent)) is not None:
                    session.log.info("agent reconnected; replacing its session %s at once", old.id)
                    await old.kill()
                self._sessions[hello.agent] = self._by_id[session.id] = session
                try:
                    await session.run()
                finally:
                    self._by_id.pop(session.id, None)
            else:
                await self._add_data_channel(channel, hello)
                owned = True
        except TimeoutError:  # in the handshake, counted there
            logger.warning("closing connection from %s: handshake timed out", peer)
        except errors.AuthenticationError:
            pass  # logged where it was found, with the agent's name
        except (errors.ProtocolError, errors.TransportError, errors.ConnectionClosed) as exc:
            logger.warning("closing connection from %s: %s", peer, exc)
        except Exception:
            logger.exception("unexpected error on connection from %s", peer)
        finally:
            if not owned:
                (channel or stream).abort()

    async def _probe(self, channel: Channel, agent: str, peer: str) -> None:
        """A probe channel (``tunnelgate doctor``): no session is made or replaced."""
        if agent in self._probing:
            await channel.send_message(Refused("busy", "a probe for this agent is running"))
            channel.close()
            return
        self._probing.add(agent)
        try:
            await serve_probe(channel, peer, ContextLogger(logger, agent=agent))
        finally:
            self._probing.discard(agent)

    async def _add_data_channel(self, channel: Channel, hello: Hello) -> None:
        session = self._by_id.get(hello.session)
        if session is None or session.agent != hello.agent or not session.running:
            reason = f"data channel for unknown session {hello.session!r}"
            await channel.send_message(Refused("session", reason))
            raise errors.ConnectionClosed("closed", reason)
        session.add_data_channel(channel)


def self_signed_identity(config: GatewayConfig) -> tuple[Path, list[str]] | None:
    """Where the gateway keeps its self-signed identity and the names it is made for;
    None if it needs none (no TLS, or ``cert`` and ``key`` given)."""
    if not config.tls or (config.cert is not None and config.key is not None):
        return None
    return config.state_dir or default_state_dir(), [config.listen.host]


def identity_files(config: GatewayConfig) -> tuple[Path, Path, bool]:
    """The certificate and key of the control port's TLS: the configured ones, else the
    state directory's self-signed identity, made on first use; and whether it was made."""
    if (own := self_signed_identity(config)) is None:
        assert config.cert is not None and config.key is not None
        return config.cert, config.key, False
    return tls.ensure_self_signed(*own)


def with_stored_token(config: GatewayConfig) -> tuple[GatewayConfig, Path | None]:
    """Without [[agents]] or a token: the config with the state directory's token (made,
    mode 0600, on first start) and its path; else the config and None."""
    if config.agents:
        return config, None
    path = (config.state_dir or default_state_dir()) / STORED_TOKEN_FILE
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(credentials.generate_token() + "\n")
        token = check_token(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problem = f"cannot read or create the stored token: {exc.strerror or exc}"
        raise errors.ConfigError([errors.ConfigProblem(str(path), "-", problem)]) from None
    except ValueError as exc:  # UnicodeDecodeError too
        problem = f"the stored token is unusable ({exc}); delete it"
        raise errors.ConfigError([errors.ConfigProblem(str(path), "-", problem)]) from None
    agents = (AgentPolicy("", (token,), config.allow_ports),)
    return dataclasses.replace(config, agents=agents), path


def _contents(path: Path | None) -> bytes | None:
    """A file's bytes, or None (if it cannot be read, loading it reports why)."""
    try:
        return path.read_bytes() if path is not None else None
    except OSError:
        return None


async def _send_bye(channel: Channel) -> None:
    with contextlib.suppress(errors.TransportError):
        await channel.send_message(Bye("gateway shutting down"))
