"""The gateway: the registry and life cycle around its sessions.

:class:`Gateway` listens on the control port. Every connection there is
secured (TLS) and handshaken in its own task, under a deadline, never in the
accept loop; the session core (:mod:`tunnelgate.protocol.session`) decides
what may pass and whom the proof admits. An authenticated control channel
becomes a :class:`~tunnelgate.gateway.session.GatewaySession`, which owns
everything of its agent from then on; a data channel joins its session's
pool. The gateway keeps the sessions by agent name (a reconnecting agent
replaces its old session at once) and by id, the public ports they hold, and
what outlives a session: failed authentications per address, derived keys,
and the access rules' counters. It also drains, stops and reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import itertools
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tunnelgate import credentials, tls
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
from tunnelgate.errors import (
    AuthenticationError,
    ConfigError,
    ConfigProblem,
    ConnectionClosed,
    ProtocolError,
    TransportError,
    VersionMismatchError,
)
from tunnelgate.gateway.admission import (
    WARNING_INTERVAL,
    AuthFailures,
    ClientGates,
    Handshakes,
)
from tunnelgate.gateway.ports import Ports
from tunnelgate.gateway.session import GatewaySession, SessionStatistics, host_of, spawn
from tunnelgate.logs import Throttle
from tunnelgate.protocol.session import Admitted, Candidate, Side, auth_refusal_reason, authenticate
from tunnelgate.protocol.wire import NONCE_SIZE, PROTOCOL_VERSION, Bye, Challenge, Hello, Refused
from tunnelgate.transport import Listener, SocketStream, TLSContext, TLSStream, open_listener

logger = logging.getLogger(__package__)

BYE_TIMEOUT: Final = 0.5  # for telling agents the gateway is going away
STORED_TOKEN_FILE: Final = "token"  # in the state directory, without a token or [[agents]]
DERIVED_KEYS: Final = 4096  # stored keys derived from clear tokens, kept per (token, agent)


@dataclass(frozen=True)
class GatewayStatistics:
    address: Address | None
    tls: bool
    handshakes: int  # connections on the control port still in their handshake
    sessions: tuple[SessionStatistics, ...]


class Gateway:
    """The public side. Use as ``async with Gateway(...) as gateway:``.

    Pass a :class:`GatewayConfig`, or the keys of the gateway's TOML file as
    keyword arguments (``Gateway(listen="127.0.0.1:0", token="…", tls=False)``).
    """

    def __init__(self, config: GatewayConfig | None = None, **options: Any) -> None:
        if config is None:
            config, _ = load_gateway_config(None, options)
        self.config = config
        self.address: Address | None = None
        self.fingerprint: str | None = None
        self.cert_created = False
        self.stored_token: Path | None = None  # the state directory's token, if it is the one
        self._context: TLSContext | None = None
        self._identity: tuple[Path, Path] | None = None  # certificate and key, with TLS
        self._client_ca_pem: bytes | None = None  # as loaded into the context
        self._listener: Listener | None = None
        self._main: asyncio.Task[None] | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._sessions: dict[str, GatewaySession] = {}  # by agent name, not draining
        self._by_id: dict[str, GatewaySession] = {}  # every running session
        self._ports = Ports()
        self._gates = ClientGates()
        self._stopping = False
        self._auth_failures = AuthFailures()
        self._handshakes = Handshakes(self._auth_failures)
        self._auth_warnings = Throttle(WARNING_INTERVAL)
        self._handshake_refusals = Throttle(WARNING_INTERVAL)
        self._derived: dict[tuple[bytes, str], bytes] = {}  # (token, agent) -> stored key
        self._reloading = asyncio.Lock()
        self._conn_ids = itertools.count(1)
        self._ready = asyncio.Event()

    # --- life cycle ---------------------------------------------------------

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
            cert, key = config.cert, config.key
            if cert is None or key is None:
                state_dir = config.state_dir or default_state_dir()
                cert, key, self.cert_created = tls.ensure_self_signed(
                    state_dir, [config.listen.host]
                )
            self._identity = (cert, key)
            self._client_ca_pem = _contents(config.client_ca)
            self._context = tls.server_context(cert, key, config.client_ca)
            self.fingerprint = tls.certificate_fingerprint(cert)
        else:
            logger.warning(
                "TLS is OFF (--no-tls): tokens are safe, but relayed bytes cross the "
                "network in clear and anyone on the path can read or change them"
            )
        self._listener = open_listener(config.listen.host, config.listen.port)
        self.address = self._listener.address
        self._main = asyncio.create_task(self._run(self._listener), name="gateway")
        await self._ready.wait()
        logger.info("gateway listening on %s (%s)", self.address, "TLS" if config.tls else "no TLS")

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop gracefully: accept no more agents or clients, tell every agent,
        let open client connections finish for up to ``drain_timeout`` seconds
        (default: the config's ``drain_timeout``), then close; connections
        still open at the deadline are reset."""
        if self._main is None:
            return
        if drain_timeout is None:
            drain_timeout = self.config.drain_timeout
        await self._stop_accepting_agents()
        sessions = list(self._by_id.values())
        for session in sessions:
            await session.drain("gateway shutting down")
        await self._say_bye(sessions)
        open_clients = sum(len(s.clients) for s in sessions)
        if open_clients and drain_timeout > 0:
            logger.info(
                "draining: waiting up to %g s for %d client connection(s) to finish",
                drain_timeout,
                open_clients,
            )
            deadline = asyncio.get_running_loop().time() + drain_timeout
            left = 0
            for session in sessions:
                remaining = max(0.0, deadline - asyncio.get_running_loop().time())
                left += await wait_relays(session.clients, remaining)
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
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def reload(self, config: GatewayConfig) -> None:
        """Apply a new configuration (SIGHUP in the CLI) without a restart.

        Agents removed from it, or whose token (or hash) is no longer listed,
        are disconnected; so is one whose services its new policy no longer
        allows (it reconnects and registers again under the new policy).
        Every other session stays untouched, and new limits and access rules
        apply to new connections. The control port's address, TLS and the
        gateway's certificate only change with a restart. A ``client_ca``
        that cannot be loaded raises :class:`ConfigError` and nothing changes.
        """
        async with self._reloading:
            old = self.config
            fixed = [
                key
                for key in ("listen", "tls", "cert", "key", "state_dir")
                if getattr(old, key) != getattr(config, key)
            ]
            if fixed:
                logger.warning(
                    "reload: %s cannot change while running; restart to apply",
                    ", ".join(fixed),
                )
                config = dataclasses.replace(config, **{k: getattr(old, k) for k in fixed})
            ca_pem = _contents(config.client_ca)
            if self._identity is not None and (
                config.client_ca != old.client_ca or ca_pem != self._client_ca_pem
            ):
                # A new context has new ticket keys: agents' data channels stop
                # resuming until they reconnect, so only when the CA changed.
                self._context = tls.server_context(*self._identity, config.client_ca)
                self._client_ca_pem = ca_pem
            self.config = config
            kept = 0
            for session in list(self._sessions.values()):
                reason = await self._still_allowed(session)
                if reason is None:
                    kept += 1
                    session.update_gates()
                    continue
                session.log.warning("disconnecting the agent: %s", reason)
                await session.kill()
            logger.info(
                "configuration reloaded: %d agent policies; %d session(s) kept",
                len(config.agents),
                kept,
            )

    async def _still_allowed(self, session: GatewaySession) -> str | None:
        """None if ``session`` may go on under the current config (its policy
        is then updated), else why not."""
        named = [p for p in self.config.agents if p.name == session.agent]
        unnamed = [p for p in self.config.agents if not p.name]
        policy = next(iter(named or unnamed), None)
        if policy is None:
            return "it was removed from the configuration"
        if session.key:
            keys = await self._keys_of(policy, session.agent)
            if not any(hmac.compare_digest(session.key, key) for key in keys):
                return "its token was revoked"
        elif policy.tokens or policy.stored_keys:
            return "its policy now requires a token"
        if (outside := session.services_outside(policy)) is not None:
            return outside
        session.policy = policy
        return None

    async def serve_forever(self) -> None:
        """Wait until the gateway stops. Cancelling this wait leaves the gateway
        running, so that ``aclose()`` can still say goodbye to the agents."""
        assert self._main is not None, "start() first"
        await asyncio.shield(self._main)

    def sessions(self) -> dict[str, list[Address]]:
        """A snapshot: agent name → the public addresses of its services."""
        return {
            name: [service.address for service in session.services.values()]
            for name, session in self._sessions.items()
        }

    def statistics(self) -> GatewayStatistics:
        """A snapshot of the gateway, every session, service, pool and client."""
        return GatewayStatistics(
            self.address,
            self._context is not None,
            self._handshakes.running,
            tuple(session.statistics() for session in self._by_id.values()),
        )

    async def _run(self, listener: Listener) -> None:
        async with asyncio.TaskGroup() as group:
            self._accepting = group.create_task(self._accept_agents(listener, group))
            self._ready.set()

    async def _stop_accepting_agents(self) -> None:
        self._stopping = True
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.wait({self._accepting})
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _say_bye(self, sessions: list[GatewaySession]) -> None:
        """Tell each agent not told yet that the gateway is going away (within BYE_TIMEOUT)."""
        untold = [s for s in sessions if not s.told_bye]
        for session in untold:
            session.told_bye = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BYE_TIMEOUT):
                await asyncio.gather(
                    *(_send_bye(s.channel, "gateway shutting down") for s in untold)
                )

    def _forget_name(self, session: GatewaySession) -> None:
        """``session`` no longer answers for its agent's name (it drains, or ended)."""
        if self._sessions.get(session.agent) is session:
            del self._sessions[session.agent]

    # --- the control port ---------------------------------------------------

    async def _accept_agents(self, listener: Listener, group: asyncio.TaskGroup) -> None:
        def handle(stream: SocketStream, peer: str) -> None:
            refusal = self._handshakes.refusal(
                host_of(peer), time.monotonic(), self.config.max_handshakes
            )
            if refusal is not None:
                self._handshake_refusals.warning(
                    logger, time.monotonic(), "dropping connection from %s: %s", peer, refusal
                )
                stream.abort()
                return
            spawn(group, stream, self._guard_connection(stream, peer))

        accept_errors = Throttle(WARNING_INTERVAL)

        def on_error(exc: TransportError) -> None:
            message = "accept failed on the control port: %s"
            accept_errors.log(logger, logging.ERROR, time.monotonic(), message, exc)

        await listener.accept_forever(handle, on_error)

    async def _guard_connection(self, stream: SocketStream, peer: str) -> None:
        """Root of a control-port connection's task: every error ends here, logged once."""
        owned = False  # True once a session (or its pool) closes the connection
        channel: Channel | None = None
        host = host_of(peer)
        try:
            self._handshakes.begin(host)
            try:
                async with asyncio.timeout(self.config.handshake_timeout):
                    channel = await self._secure(stream)
                    hello, admitted = await self._handshake(channel, peer)
            finally:
                self._handshakes.end(host)
            if hello.role == "control" and self._stopping:
                # Authenticated while the control port was closing: come back later.
                await channel.send_message(Refused("shutdown", "the gateway is shutting down"))
            elif hello.role == "control":
                owned = True
                await self._run_session(channel, hello, admitted, peer)
            else:
                await self._add_data_channel(channel, hello)
                owned = True
        except TimeoutError:
            # Counted like a failed authentication: an address that keeps
            # handshakes open until the deadline soon gets few at once.
            self._auth_failures.failed(host, time.monotonic())
            logger.warning("closing connection from %s: handshake timed out", peer)
        except AuthenticationError:
            pass  # logged where it was found, with the agent's name
        except (ProtocolError, TransportError, ConnectionClosed) as exc:
            logger.warning("closing connection from %s: %s", peer, exc)
        except Exception:
            logger.exception("unexpected error on connection from %s", peer)
        finally:
            if not owned:
                (channel or stream).abort()

    async def _secure(self, stream: SocketStream) -> Channel:
        """The framed channel over ``stream``, after the TLS handshake if TLS is on."""
        if self._context is None:
            return Channel(stream, Side.GATEWAY)
        tls_stream = TLSStream(stream, self._context, server_side=True)
        await tls_stream.handshake()  # resets the connection if it fails
        return Channel(tls_stream, Side.GATEWAY)

    async def _handshake(self, channel: Channel, peer: str) -> tuple[Hello, Admitted[AgentPolicy]]:
        """Challenge, Hello, and the policy and stored key the agent proved."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        await channel.send_message(Challenge(PROTOCOL_VERSION, nonce))
        try:
            hello = await channel.receive()
        except VersionMismatchError as exc:
            await channel.send_message(Refused("version", exc.reason))
            raise
        assert isinstance(hello, Hello)
        verdict = await self._authenticate(channel, hello, nonce)
        if isinstance(verdict, Admitted):
            return hello, verdict
        failures, delay = self._auth_failures.failed(host_of(peer), time.monotonic())
        delay = min(delay, self.config.handshake_timeout / 2)  # the answer must still come
        self._auth_warnings.warning(
            logger,
            time.monotonic(),
            "authentication failed for agent %r from %s (%s channel): %s; failure %d "
            "from this address, answered in %.1f s",
            hello.agent,
            peer,
            hello.role,
            verdict,
            failures,
            delay,
        )
        await asyncio.sleep(delay)
        await channel.send_message(Refused("auth", auth_refusal_reason(hello, verdict)))
        raise AuthenticationError("logged above")

    async def _authenticate(
        self, channel: Channel, hello: Hello, nonce: bytes
    ) -> Admitted[AgentPolicy] | str:
        """The policy and stored key that made the proof, or why none did.

        With ``client_ca``, the certificate (verified by TLS) must name the
        agent; a policy without tokens then accepts the certificate alone.
        """
        names: frozenset[str] | None = None
        if self.config.client_ca is not None:
            names = channel.stream.peer_certificate_names()
        candidates = [
            Candidate(policy, await self._keys_of(policy, hello.agent))
            for policy in self.config.agents
            if not policy.name or policy.name == hello.agent
        ]
        return authenticate(hello, nonce, candidates, names)

    async def _keys_of(self, policy: AgentPolicy, agent: str) -> list[bytes]:
        """The stored keys of a policy for one agent name; clear tokens are
        derived once (slowly, off the event loop), then remembered."""
        keys = list(policy.stored_keys)
        for token in policy.tokens:
            key = self._derived.get((token, agent))
            if key is None:
                key = (await asyncio.to_thread(credentials.derive, token, agent)).stored_key
                if len(self._derived) >= DERIVED_KEYS:
                    del self._derived[next(iter(self._derived))]
                self._derived[(token, agent)] = key
            keys.append(key)
        return keys

    async def _add_data_channel(self, channel: Channel, hello: Hello) -> None:
        session = self._by_id.get(hello.session)
        if session is None or session.agent != hello.agent or not session.running:
            reason = f"data channel for unknown session {hello.session!r}"
            await channel.send_message(Refused("session", reason))
            raise ConnectionClosed("closed", reason)
        session.add_data_channel(channel)

    # --- sessions -----------------------------------------------------------

    async def _run_session(
        self, channel: Channel, hello: Hello, admitted: Admitted[AgentPolicy], peer: str
    ) -> None:
        session = GatewaySession(
            agent=hello.agent,
            peer=peer,
            policy=admitted.policy,
            key=admitted.key,
            channel=channel,
            config=lambda: self.config,
            ports=self._ports,
            gates=self._gates,
            conn_ids=self._conn_ids,
            session_id=secrets.token_hex(4),
            on_drain=self._forget_name,
        )
        old = self._sessions.get(hello.agent)
        if old is not None:
            session.log.info("agent reconnected; replacing its session %s at once", old.id)
            await old.kill()
        self._sessions[hello.agent] = session
        self._by_id[session.id] = session
        reason, level = "ended", logging.INFO
        try:
            reason, level = await session.run()
        finally:
            self._forget_name(session)
            self._by_id.pop(session.id, None)
            session.release()
            session.channel.abort()
            duration = time.monotonic() - session.started
            names = ", ".join(session.services) or "none"
            if not asyncio.current_task().cancelling():  # type: ignore[union-attr]
                session.log.log(
                    level, "session ended after %.1f s: %s (services: %s)", duration, reason, names
                )
            else:
                session.log.info("session closed after %.1f s (services: %s)", duration, names)


def with_stored_token(config: GatewayConfig) -> tuple[GatewayConfig, Path | None]:
    """With no token given and no [[agents]]: the config with the token stored in the state
    directory (made, mode 0600, on first start), and its path; else the config and None."""
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
        raise ConfigError([ConfigProblem(str(path), "-", problem)]) from None
    except ValueError as exc:  # UnicodeDecodeError too
        problem = f"the stored token is unusable ({exc}); delete it"
        raise ConfigError([ConfigProblem(str(path), "-", problem)]) from None
    return dataclasses.replace(
        config, agents=(AgentPolicy("", (token,), config.allow_ports),)
    ), path


def _contents(path: Path | None) -> bytes | None:
    """A file's bytes (None without one, or if it cannot be read: loading it reports why)."""
    try:
        return path.read_bytes() if path is not None else None
    except OSError:
        return None


async def _send_bye(channel: Channel, reason: str) -> None:
    with contextlib.suppress(TransportError):
        await channel.send_message(Bye(reason))
