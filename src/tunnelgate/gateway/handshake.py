"""What comes before a session on the control port: how many handshakes may run (in all
and per address), TLS, the challenge and the agent's proof, and what each failure costs
(a count, a throttled warning, an answer delayed by the address's failures). Must not
import agent.

:class:`ControlHandshake` turns an accepted connection into an authenticated channel and
the agent's ``Hello`` (:meth:`~ControlHandshake.admit`), or aborts it; the gateway then
makes a session, adds a data channel or serves a probe. It keeps the derived keys of clear
tokens, which a reload reuses to check the sessions it keeps.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Final

from tunnelgate import credentials, errors
from tunnelgate.channel import Channel
from tunnelgate.config import AgentPolicy, GatewayConfig
from tunnelgate.gateway.admission import WARNING_INTERVAL, AuthFailures, Handshakes, host_of
from tunnelgate.logs import Throttle
from tunnelgate.protocol.session import Admitted, Candidate, Side, auth_refusal_reason, authenticate
from tunnelgate.protocol.wire import NONCE_SIZE, PROTOCOL_VERSION, Challenge, Hello, Refused
from tunnelgate.stats import GatewayTotals, tls_failure_reason
from tunnelgate.transport import SocketStream, TLSContext, TLSStream

logger = logging.getLogger(__package__)

DERIVED_KEYS: Final = 4096  # stored keys derived from clear tokens, kept per (token, agent)


class ControlHandshake:
    """The control port's admission of agents, under ``config()`` (the gateway's, as
    reloaded), counted in ``totals``; ``context``: the TLS server context, None without TLS
    (the gateway sets it, and changes it on a reload)."""

    def __init__(self, config: Callable[[], GatewayConfig], totals: GatewayTotals) -> None:
        self._config = config
        self._totals = totals
        self.context: TLSContext | None = None
        self.handshakes = Handshakes(AuthFailures())
        self._auth_warnings = Throttle(WARNING_INTERVAL)
        self._refusals = Throttle(WARNING_INTERVAL)
        self._derived: dict[tuple[bytes, str], bytes] = {}  # (token, agent) -> stored key

    def may_start(self, stream: SocketStream, peer: str) -> bool:
        """Whether a handshake from ``peer`` may start now; if not, the connection is reset
        and a throttled warning says why."""
        now = time.monotonic()
        refusal = self.handshakes.refusal(host_of(peer), now, self._config().max_handshakes)
        if refusal is None:
            return True
        self._refusals.warning(logger, now, "dropping connection from %s: %s", peer, refusal)
        stream.abort()
        return False

    async def admit(
        self, stream: SocketStream, peer: str
    ) -> tuple[Channel, Hello, Admitted[AgentPolicy]]:
        """TLS, the challenge and the proof, within ``handshake_timeout``: the channel, the
        agent's Hello, and the policy and stored key it proved. On failure the connection is
        aborted, the failure counted, and the error raised (TimeoutError, TransportError,
        ProtocolError, AuthenticationError (logged here), ConnectionClosed)."""
        channel: Channel | None = None
        host = host_of(peer)
        self.handshakes.begin(host)
        try:
            async with asyncio.timeout(self._config().handshake_timeout):
                try:
                    channel = await self._secure(stream)
                except errors.TransportError as exc:
                    self._totals.tls_failures[tls_failure_reason(str(exc))] += 1
                    raise
                hello, admitted = await self._prove(channel, peer)
            return channel, hello, admitted
        except TimeoutError:  # counts as a failure: else it could hold many handshakes open
            self.handshakes.failures.failed(host, time.monotonic())
            failures = self._totals.auth_failures if channel else self._totals.tls_failures
            failures["timeout"] += 1
            (channel or stream).abort()
            raise
        except errors.ProtocolError as exc:
            kind = "version" if isinstance(exc, errors.VersionMismatchError) else "protocol"
            self._totals.auth_failures[kind] += 1
            (channel or stream).abort()
            raise
        except BaseException:
            (channel or stream).abort()
            raise
        finally:
            self.handshakes.end(host)

    async def _secure(self, stream: SocketStream) -> Channel:
        if self.context is None:
            return Channel(stream, Side.GATEWAY)
        tls_stream = TLSStream(stream, self.context, server_side=True)
        await tls_stream.handshake()  # resets the connection if it fails
        return Channel(tls_stream, Side.GATEWAY)

    async def _prove(self, channel: Channel, peer: str) -> tuple[Hello, Admitted[AgentPolicy]]:
        """Challenge, Hello, and the policy and stored key the agent proved."""
        config = self._config()
        nonce = secrets.token_bytes(NONCE_SIZE)
        await channel.send_message(Challenge(PROTOCOL_VERSION, nonce))
        try:
            hello = await channel.receive()
        except errors.VersionMismatchError as exc:
            await channel.send_message(Refused("version", exc.reason))
            raise
        assert isinstance(hello, Hello)
        # With client_ca, the certificate must name the agent (and alone admits a tokenless policy).
        names = channel.stream.peer_certificate_names() if config.client_ca else None
        candidates = [
            Candidate(policy, await self.keys_of(policy, hello.agent))
            for policy in config.agents
            if not policy.name or policy.name == hello.agent
        ]
        verdict = authenticate(hello, nonce, candidates, names)
        if isinstance(verdict, Admitted):
            return hello, verdict
        self._totals.auth_failures[verdict.split()[0]] += 1  # "token" or "certificate"
        failures, delay = self.handshakes.failures.failed(host_of(peer), time.monotonic())
        delay = min(delay, config.handshake_timeout / 2)  # the answer must still come
        logged = self._auth_warnings.warning(
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
        if logged:  # the event log is throttled like the log, so a flood cannot fill it
            detail = f"from {peer} ({hello.role} channel): {verdict}"
            self._totals.events.add(time.time(), "auth_failure", hello.agent, detail=detail)
        await asyncio.sleep(delay)
        await channel.send_message(Refused("auth", auth_refusal_reason(hello, verdict)))
        raise errors.AuthenticationError("logged above")

    async def keys_of(self, policy: AgentPolicy, agent: str) -> list[bytes]:
        """A policy's stored keys for one agent; clear tokens derived once, off the loop."""
        keys = list(policy.stored_keys)
        for token in policy.tokens:
            if (key := self._derived.get((token, agent))) is None:
                key = (await asyncio.to_thread(credentials.derive, token, agent)).stored_key
                if len(self._derived) >= DERIVED_KEYS:
                    del self._derived[next(iter(self._derived))]
                self._derived[(token, agent)] = key
            keys.append(key)
        return keys
