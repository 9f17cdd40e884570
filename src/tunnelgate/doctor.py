"""``tunnelgate doctor``: an agent's configuration checked end to end, one :class:`Check`
at a time, each saying in plain words what passed or what is wrong and what to try.

In order: the gateway's name resolves; its port accepts a connection; TLS (the handshake,
and the certificate against the pinned fingerprint or the CA); the token (or certificate)
is accepted; each local service accepts a connection; then the live tunnel is measured:
round trips and throughput each way. A check that depends on a failed one is skipped
with the reason; the local services are checked whatever the gateway does.

Nothing here disturbs a running agent of the same name. A second control channel would
replace its session (the gateway takes a reconnecting agent at its word), so the doctor
never opens one: it opens a *probe* channel (the Hello's role "probe"), authenticated
like a control channel and joining no session. The gateway's first Pong on it says the
token was accepted, and the measurements run on it (see ``gateway/probe.py``). A gateway
older than the probe closes the connection at that Hello: the token is then checked with
a data channel for no session, which such a gateway refuses with "session" only after the
proof passed, and the measurement is skipped.

Orchestration: it uses the agent's :class:`~tunnelgate.agent.session.Dialer`, channels
and transports; it must not import gateway, admin, cli, or socket and ssl (connections
are seen as streams).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

from tunnelgate.address import Address
from tunnelgate.agent.session import Dialer
from tunnelgate.channel import Channel
from tunnelgate.config import DOCTOR_SECONDS, AgentConfig, GatewayTarget, ServiceConfig
from tunnelgate.errors import (
    AuthenticationError,
    CertificateRefusedError,
    ConnectionClosed,
    PeerVerificationError,
    ProtocolError,
    TransportError,
)
from tunnelgate.logs import ContextLogger
from tunnelgate.protocol import wire
from tunnelgate.protocol.session import Side
from tunnelgate.transport import SocketStream, Stream, connect, resolve

logger = logging.getLogger(__name__)

TIMED_PINGS: Final = 5  # round trips measured (after the first, which waits for the proof)
SINK_CHUNK_SIZE: Final = 64 * 1024  # payload of each DATA frame sent to the gateway
BYE_TIMEOUT: Final = 0.5
OLD_GATEWAY: Final = "this gateway does not support the measurement (it is older than this doctor)"

Status = Literal["ok", "FAIL", "skip"]
T = TypeVar("T")


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, how it went, and what to try."""

    name: str
    status: Status
    detail: str
    hint: str = ""

    def __str__(self) -> str:
        line = f"{self.status:<4}  {self.name:<14} {self.detail}"
        return line + (f"\n{'':20}hint: {self.hint}" if self.hint else "")


@dataclass(frozen=True)
class _Skip(Exception):
    """Later checks of the gateway cannot run, for ``reason``."""

    reason: str


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _rate(size: int, seconds: float) -> str:
    bits = size * 8 / max(seconds, 1e-9)
    return f"{bits / 1e6:.1f} Mbit/s ({size / 1e6:.1f} MB in {seconds:.2f} s)"


class Doctor:
    """The checks of one agent configuration with one of its gateways (``target``), reported
    one by one to ``report``; with several gateways, each line names the gateway."""

    def __init__(
        self,
        config: AgentConfig,
        seconds: float,
        report: Callable[[Check], None],
        target: GatewayTarget | None = None,
    ) -> None:
        self.config = config
        self.target = target = target or config.gateways[0]
        self.seconds = seconds
        self.checks: list[Check] = []
        self._report = report
        self._dialer = Dialer(config, target, ContextLogger(logger, gateway=str(target.address)))
        self._named = len(config.gateways) > 1

    def _add(self, name: str, status: Status, detail: str, hint: str = "") -> None:
        if self._named and not name.startswith("service "):
            detail = f"{self.target.address}: {detail}"
        check = Check(name, status, detail, hint)
        self.checks.append(check)
        self._report(check)

    async def run(self, services: bool = True) -> bool:
        """Every check (``services``: the local services' too); True if none failed."""
        gateway_names = ["resolve", "reach", "tls", "token"]
        probe_supported, probe_skipped = False, OLD_GATEWAY
        try:
            probe_supported = await self._check_gateway()
        except _Skip as skip:
            done = {check.name for check in self.checks}
            for name in gateway_names:
                if name not in done:
                    self._add(name, "skip", f"skipped: {skip.reason}")
            probe_skipped = skip.reason
        for service in self.config.services if services else ():
            await self._check_service(service)
        if probe_supported:
            await self._measure()
        else:
            for name in ("rtt", "upload", "download"):
                self._add(name, "skip", f"skipped: {probe_skipped}")
        return all(check.status != "FAIL" for check in self.checks)

    # --- 1 to 4: the gateway -------------------------------------------------------

    async def _check_gateway(self) -> bool:
        """Resolve, reach, TLS and token; whether the gateway takes probes. Raises _Skip."""
        addresses = await self._check_resolve()
        tcp = await self._check_reach(addresses)
        stream: Stream = tcp
        try:
            stream = await self._check_tls(tcp)
            return await self._check_token(Channel(stream, Side.AGENT))
        finally:
            stream.abort()

    async def _check_resolve(self) -> list[str]:
        host = self.target.address.host
        try:
            addresses = await resolve(self.target.address, self.config.connect_timeout)
        except TransportError as exc:
            hint = "check the host name in --gateway, and this machine's DNS settings"
            self._add("resolve", "FAIL", str(exc), hint)
            raise _Skip("the gateway's name does not resolve") from None
        if addresses == [host]:
            self._add("resolve", "ok", f"{host} is an IP address, nothing to resolve")
        else:
            self._add("resolve", "ok", f"{host} resolves to {', '.join(addresses)}")
        return addresses

    async def _check_reach(self, addresses: list[str]) -> SocketStream:
        port, errors = self.target.address.port, []
        for ip in addresses:
            began = time.monotonic()
            try:
                tcp = await connect(Address(ip, port), self.config.connect_timeout)
            except TransportError as exc:
                errors.append(str(exc))
                continue
            took = time.monotonic() - began
            self._add("reach", "ok", f"{Address(ip, port)} accepts connections ({_ms(took)})")
            return tcp
        hint = (
            "is the gateway running, and listening on this port? a firewall between this "
            "machine and the gateway may drop or refuse the connection"
        )
        self._add("reach", "FAIL", "; ".join(errors), hint)
        raise _Skip("the gateway cannot be reached")

    async def _check_tls(self, tcp: SocketStream) -> Stream:
        config = self.config
        if not config.tls:
            hint = (
                "relayed bytes cross the network in clear; drop --no-tls unless on a trusted path"
            )
            self._add("tls", "ok", "off (--no-tls): the gateway must run with --no-tls too", hint)
            return tcp
        began = time.monotonic()
        try:
            stream = await self._bounded(self._dialer.secure(tcp, "probe"))
        except PeerVerificationError as exc:
            if exc.expected and exc.seen:
                detail = (
                    "the gateway's certificate does not match the pinned fingerprint: "
                    f"expected {exc.expected}, seen {exc.seen}"
                )
                hint = (
                    "if the gateway's identity changed on purpose, pin the fingerprint it "
                    "prints at start (--fingerprint); if not, something else answers in its place"
                )
            else:
                detail = str(exc)
                hint = "pin the gateway's fingerprint (--fingerprint) or give its CA (--ca)"
            self._add("tls", "FAIL", detail, hint)
            raise _Skip("TLS failed") from None
        except CertificateRefusedError as exc:
            self._add("tls", "FAIL", str(exc), "give --cert and --key of a certificate it accepts")
            raise _Skip("TLS failed") from None
        except (TransportError, TimeoutError) as exc:
            detail = str(exc) or "the TLS handshake timed out"
            hint = "does the gateway use TLS? if it runs with --no-tls, so must the agent"
            self._add("tls", "FAIL", detail, hint)
            raise _Skip("TLS failed") from None
        took = _ms(time.monotonic() - began)
        if (target := self.target).fingerprint:
            detail = f"the certificate matches the pinned fingerprint {target.fingerprint}"
        else:
            ca = str(target.ca) if target.ca else "the system's CAs"
            detail = f"the certificate for {target.address.host} is signed by {ca}"
        self._add("tls", "ok", f"{detail} ({took})")
        return stream

    async def _check_token(self, channel: Channel) -> bool:
        """The probe's Hello and a Ping: a Pong means the proof passed. Whether the
        gateway takes probes (else the token is checked with a data channel)."""
        name, what = self.config.name, "token" if self.config.token else "certificate"
        try:
            await self._bounded(self._dialer.introduce(channel, "probe"))
            await channel.send_message(wire.Ping(0))
            answer = await self._bounded(channel.receive())
        except (ConnectionClosed, TransportError):  # at the Hello: a gateway without probes
            answer = await self._token_by_data_channel()
        except (AuthenticationError, ProtocolError, TimeoutError) as exc:
            detail = str(exc) or self._dialer.timed_out()
            self._add("token", "FAIL", detail, "is this the gateway's address, and the right port?")
            raise _Skip("the handshake failed") from None
        if isinstance(answer, wire.Pong):
            self._add("token", "ok", f"the gateway accepts the {what} of agent {name!r}")
            await self._say_bye(channel)
            return True
        assert isinstance(answer, wire.Refused)
        if answer.code == "session":  # an older gateway: the proof passed
            self._add("token", "ok", f"the gateway accepts the {what} of agent {name!r}")
            return False
        if answer.code == "auth":
            hint = (
                "give the gateway's token (its banner prints it; or one whose hash is in its "
                f"[[agents]] for {name!r}); the gateway's log says who tried and why"
            )
            self._add("token", "FAIL", f"the gateway refused the {what}: {answer.reason}", hint)
        else:
            self._add("token", "FAIL", f"the gateway refused the probe: {answer.reason}")
        raise _Skip(f"the gateway refused the {what}")

    async def _token_by_data_channel(self) -> wire.Message:
        """An older gateway's answer to a data channel for no session: Refused("session")
        once the proof passed, Refused("auth") otherwise."""
        channel = await self._bounded(self._dialer.open("data"))
        try:
            return await self._bounded(channel.receive())
        finally:
            channel.abort()

    async def _bounded(self, work: Awaitable[T]) -> T:
        async with asyncio.timeout(self.config.handshake_timeout):
            return await work

    async def _say_bye(self, channel: Channel) -> None:
        try:
            async with asyncio.timeout(BYE_TIMEOUT):
                await channel.send_message(wire.Bye("doctor done"))
        except (TransportError, TimeoutError):
            pass

    # --- 5: the local services -----------------------------------------------------

    async def _check_service(self, service: ServiceConfig) -> None:
        name, local = f"service {service.name}", str(service.local)
        where = "" if service.name == local else f"{local} "  # named after its address
        began = time.monotonic()
        try:
            stream = await connect(service.local, self.config.connect_timeout)
        except TransportError as exc:
            hint = f"is the service running, and listening on {local}?"
            self._add(name, "FAIL", str(exc), hint)
            return
        took = time.monotonic() - began
        stream.close()
        self._add(name, "ok", f"{where}accepts connections ({_ms(took)})")

    # --- 6: the live tunnel --------------------------------------------------------

    async def _measure(self) -> None:
        """Round trips and throughput both ways, on a probe channel of their own."""
        try:
            channel = await self._dialer.open("probe")
        except (TransportError, AuthenticationError, ConnectionClosed, ProtocolError) as exc:
            for name in ("rtt", "upload", "download"):
                self._add(name, "FAIL", f"cannot open a probe channel: {exc}")
            return
        steps: list[tuple[str, Callable[[Channel], Awaitable[str]]]] = [
            ("rtt", self._round_trips),
            ("upload", self._upload),
            ("download", self._download),
        ]
        try:
            for index, (name, step) in enumerate(steps):
                try:
                    self._add(name, "ok", await step(channel))
                except (TransportError, ConnectionClosed, ProtocolError, TimeoutError) as exc:
                    why = str(exc) or "timed out"
                    self._add(name, "FAIL", f"the measurement failed: {why}")
                    for later, _ in steps[index + 1 :]:
                        self._add(later, "skip", f"skipped: the {name} measurement failed")
                    return
            await self._say_bye(channel)
        finally:
            channel.abort()

    async def _round_trips(self, channel: Channel) -> str:
        await channel.send_message(wire.Ping(0))  # its Pong waits for the proof's check
        first = await self._bounded(channel.receive())
        if isinstance(first, wire.Refused):
            raise ConnectionClosed("closed", f"the gateway refused the probe: {first.reason}")
        times = []
        for seq in range(1, TIMED_PINGS + 1):
            began = time.monotonic()
            await channel.send_message(wire.Ping(seq))
            await self._bounded(channel.receive())
            times.append(time.monotonic() - began)
        median = statistics.median(times)
        return (
            f"round trip {_ms(median)} (min {_ms(min(times))}, max {_ms(max(times))}; "
            f"{len(times)} pings to the gateway)"
        )

    async def _upload(self, channel: Channel) -> str:
        """Send DATA frames to the gateway's sink for the measurement's seconds; the
        rate is what it counted, over the time until its count came back."""
        frame = bytearray(wire.HEADER_SIZE + SINK_CHUNK_SIZE)
        wire.pack_data_header(frame, SINK_CHUNK_SIZE)
        view = memoryview(frame)
        await channel.send_message(wire.Measure("sink", self.seconds))
        began = time.monotonic()
        deadline = began + self.seconds
        async with asyncio.timeout(self.seconds + self.config.handshake_timeout):
            while time.monotonic() < deadline:
                await channel.stream.send(view)
            await channel.stream.send(wire.END_FRAME)
            measured = await self._measured(channel)
        return f"{_rate(measured.size, time.monotonic() - began)} to the gateway"

    async def _download(self, channel: Channel) -> str:
        """Count the gateway's DATA frames from its source until its END."""
        await channel.send_message(wire.Measure("source", self.seconds))
        began = time.monotonic()
        size, took = 0, 0.0
        async with asyncio.timeout(self.seconds + self.config.handshake_timeout):
            while True:
                event = await channel.receive_event()
                if isinstance(event, wire.Data):
                    size += len(event.view)
                elif isinstance(event, wire.End):
                    took = time.monotonic() - began
                elif isinstance(event, wire.Measured | wire.Abort):
                    await self._measured(channel, event)
                    break
        return f"{_rate(size, took)} from the gateway"

    async def _measured(self, channel: Channel, event: wire.Event | None = None) -> wire.Measured:
        """The gateway's count of a measurement; its ABORT (a limit) as an error."""
        if event is None:
            event = await channel.receive_event()
        if isinstance(event, wire.Abort):
            raise ConnectionClosed("closed", f"the gateway ended it: {event.reason}")
        assert isinstance(event, wire.Measured)
        return event


async def run(
    config: AgentConfig, seconds: float = DOCTOR_SECONDS, report: Callable[[Check], None] = print
) -> bool:
    """Check ``config`` end to end, each of its gateways in turn (the local services once),
    reporting each check as it ends; True if none failed."""
    passed = True
    for index, target in enumerate(config.gateways):
        passed &= await Doctor(config, seconds, report, target).run(services=index == 0)
    return passed
