"""Forwarding between the gateways of a fleet (``fleet_listen``): every gateway listens on every
port leased in the fleet, and a client that arrives where the port's agent is not is carried to
a gateway that has it. Must not import agent.

The way out: a :class:`Forwarder` opens a listener (on the gateway's default bind) for each port
the fleet's routes (``Fleet.routes``, in memory) say another node holds and this one does not;
a client there gets a link of its own to the freshest node that holds the port: TCP, TLS 1.3
with both sides showing a certificate signed by the fleet's CA, then one request naming the
port, the client's address and the address it reached, then the bytes both ways as they are.
A node that cannot be reached is tried last for a lease's time; a client no node takes is
reset.

The way in: on ``fleet_listen``, a link whose certificate the fleet's CA did not sign fails in
its handshake; a request that does not parse, or names a port no session or group of this
gateway serves, is refused and logged. Else the client is handed to the session (or group) as
if it had arrived on the port here: its own address for the access rules, the logs and the
PROXY protocol, and the address it reached for the service's Start.

A link carries one client and ends with it: a clean end is a FIN each way, an abnormal one a
reset, after what was read has been delivered (the service's last reply before its reset is
not lost on the extra hop).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Final

import msgspec

from tunnelgate import tls
from tunnelgate.address import Address, parse_address
from tunnelgate.config import GatewayConfig
from tunnelgate.errors import (
    AuthenticationError,
    ProtocolError,
    RemoteProtocolError,
    TransportError,
)
from tunnelgate.gateway.admission import WARNING_INTERVAL
from tunnelgate.gateway.fleet import Fleet
from tunnelgate.gateway.groups import Group
from tunnelgate.gateway.session import GatewaySession, Shared, accept, spawn
from tunnelgate.logs import Throttle
from tunnelgate.transport import (
    Listener,
    SocketStream,
    Stream,
    TLSSession,
    TLSStream,
    connect,
    open_listener,
    wait_error,
)

logger = logging.getLogger(__package__)

MAGIC: Final = b"TGF1"  # a link's first bytes, then the request's length (2 bytes) and itself
ACCEPTED: Final = b"\x00"  # the answer to a request whose port is served (else a reset)
MAX_REQUEST: Final = 1024  # bytes of a request, at most
LINK_TIMEOUT: Final = 3.0  # seconds for a link's connect, TLS handshake, request and answer
RETRY_BIND: Final = 0.5  # seconds before a forwarding listener is tried again (port in use)
DELIVERY_TIMEOUT: Final = 10.0  # for the bytes read before a reset to reach the other end
COPY_SIZE: Final = 64 * 1024  # one read's buffer, per direction of a forwarded client


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a link carries before the client's bytes (the sizes of a Start's fields, which
    carries them on)."""

    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]  # the public port the client reached
    owner: Annotated[str, msgspec.Meta(max_length=255)]  # its lease's, as the route says
    client: Annotated[str, msgspec.Meta(max_length=64)]  # its host:port, as first seen
    server: Annotated[str, msgspec.Meta(max_length=64)]  # the address it reached there
    node: Annotated[str, msgspec.Meta(max_length=255)]  # the gateway that forwards it


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Request)


def encode_request(request: Request) -> bytes:
    body = _encoder.encode(request)
    return MAGIC + struct.pack("!H", len(body)) + body


HEAD_SIZE: Final = len(MAGIC) + 2


def request_size(head: bytes) -> int:
    """The size of the request that follows ``head`` (HEAD_SIZE bytes). Raises
    RemoteProtocolError."""
    if head[: len(MAGIC)] != MAGIC or len(head) != HEAD_SIZE:
        raise RemoteProtocolError("not a forwarding request")
    (size,) = struct.unpack("!H", head[len(MAGIC) :])
    if size > MAX_REQUEST:
        raise RemoteProtocolError(f"a forwarding request of {size} bytes")
    return int(size)


def decode_request(body: bytes) -> Request:
    """Raises RemoteProtocolError."""
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:  # ValidationError too
        raise RemoteProtocolError(f"a forwarding request that does not parse: {exc}") from None


async def read_request(stream: Stream) -> Request:
    """The request at the start of a link, read exactly (the client's bytes that follow stay
    in the stream). Raises RemoteProtocolError, TransportError."""
    size = request_size(await _read_exactly(stream, HEAD_SIZE))
    return decode_request(await _read_exactly(stream, size))


async def _read_exactly(stream: Stream, size: int) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = await stream.receive_into(view[got:])
        if n == 0:
            raise TransportError("the link ended early")
        got += n
    return bytes(buffer)


@dataclass
class ForwardingTotals:
    """Clients carried between gateways, counted since start."""

    out: int = 0  # forwarded from here to another gateway
    into: int = 0  # taken here from another gateway
    failed: int = 0  # forwarded by no gateway: reset
    refused: int = 0  # links refused here (certificate, request, no such port)


@dataclass
class Forwarder:
    """This gateway's side of forwarding: its listeners for ports held elsewhere, and its
    gateway-to-gateway port."""

    config: Callable[[], GatewayConfig]  # the gateway's, as reloaded
    fleet: Fleet
    shared: Shared
    tasks: Callable[[], asyncio.TaskGroup | None]  # the gateway's, where clients and links run
    totals: ForwardingTotals = field(default_factory=ForwardingTotals)
    link: Listener | None = None  # the gateway-to-gateway port, once started
    clients: set[asyncio.Task[None]] = field(default_factory=set)  # forwarded from here, open
    _listeners: dict[int, tuple[Listener, asyncio.Task[None]]] = field(default_factory=dict)
    _failed: dict[str, float] = field(default_factory=dict)  # node → when it last failed
    _warnings: Throttle = field(default_factory=lambda: Throttle(WARNING_INTERVAL))
    _refusals: dict[str, Throttle] = field(default_factory=dict)  # one per kind of refusal
    _stopped: bool = False  # draining: it forwards no new client
    _scheduled: bool = False  # a reconcile is coming
    _closing: dict[int, asyncio.Task[None]] = field(default_factory=dict)  # listeners closing
    _tickets: dict[str, TLSSession] = field(default_factory=dict)  # by link address: resumption

    def __post_init__(self) -> None:
        config = self.config()
        assert config.fleet_ca and config.fleet_cert and config.fleet_key, "checked by config"
        self._server, self._client = tls.fleet_contexts(
            config.fleet_ca, config.fleet_cert, config.fleet_key
        )

    def start(self) -> str:
        """Open the gateway-to-gateway port; the address the other gateways dial."""
        config = self.config()
        assert config.fleet_listen is not None
        self.link = open_listener(config.fleet_listen.host, config.fleet_listen.port)
        bound = self.link.address
        advertise = config.fleet_advertise or bound
        return str(Address(advertise.host, advertise.port or bound.port))

    def serve(self, tasks: asyncio.TaskGroup) -> None:
        """Take links from the other gateways, in ``tasks``, until it ends."""
        assert self.link is not None

        def handle(stream: SocketStream, peer: str) -> None:
            spawn(tasks, stream, self._take(stream, peer))

        tasks.create_task(accept(self.link, handle, logger, "the fleet port"), name="fleet port")

    def stop_forwarding(self) -> None:
        """No new client here for another gateway (a drain): the open ones go on."""
        for port in list(self._listeners):
            self.yield_port(port)
        self._stopped = True

    def close(self) -> None:
        self.stop_forwarding()
        if self.link is not None:
            self.link.close()

    # The way out.

    def schedule(self) -> None:
        """:meth:`reconcile` soon, once for any number of changes until then."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.reconcile)

    def reconcile(self) -> None:
        """Listen on every port another node holds and this one does not; stop listening on
        the others. A port still in use here (a listener closing) is tried again soon."""
        self._scheduled = False
        held_here = {port for _, port in self.shared.ports.holders}
        wanted = {
            port
            for port, route in self.fleet.routes.items()
            if self.fleet.node not in route.nodes and route.nodes and port not in held_here
        }
        for port in set(self._listeners) - wanted:
            self.yield_port(port)
        if (tasks := self.tasks()) is None or self._stopped:
            return
        bind, again = self.config().default_bind, False
        for port in wanted - set(self._listeners) - set(self._closing):
            try:
                listener = open_listener(bind, port, reset_accepted=True)
            except TransportError as exc:
                self._warnings.warning(
                    logger, time.monotonic(), "cannot forward port %d here yet: %s", port, exc
                )
                again = True
                continue

            def handle(stream: SocketStream, client: str, port: int = port) -> None:
                if (task := spawn(tasks, stream, self._forward(stream, client, port))) is not None:
                    self.clients.add(task)
                    task.add_done_callback(self.clients.discard)

            try:
                accepting = tasks.create_task(accept(listener, handle, logger, f"port {port}"))
            except RuntimeError:  # the gateway's task group is ending
                listener.close()
                return
            self._listeners[port] = (listener, accepting)
            logger.info("forwarding port %d to the gateway(s) that hold it", port)
        if again or self._closing:  # tried again once what closes is closed, or soon
            asyncio.get_running_loop().call_later(RETRY_BIND, self.schedule)

    def yield_port(self, port: int) -> asyncio.Task[None] | None:
        """Stop listening on ``port`` (no node holds it now, or a session here takes it: it
        may open its own listener once the task returned is done)."""
        if (entry := self._listeners.pop(port, None)) is None:
            return None
        listener, accepting = entry

        def closed(_: object) -> None:  # never under its accept loop
            listener.close()
            if self._closing.get(port) is accepting:
                del self._closing[port]

        self._closing[port] = accepting
        accepting.add_done_callback(closed)
        accepting.cancel()
        logger.info("no longer forwarding port %d", port)
        return accepting

    async def take_port(self, port: int) -> None:
        """A session of this gateway takes ``port``: its listener here closes first (or the
        one closing already)."""
        self.yield_port(port)
        if (closing := self._closing.get(port)) is not None:
            await asyncio.wait({closing})

    async def _forward(self, stream: SocketStream, client: str, port: int) -> None:
        """Root of one forwarded client's task: a link to a node that holds the port, then the
        bytes both ways. Never raises (but CancelledError): the gateway's task group runs it."""
        try:
            await self._forward_client(stream, client, port)
        except Exception:
            logger.exception("unexpected error forwarding client %s on port %d", client, port)
            stream.abort()

    async def _forward_client(self, stream: SocketStream, client: str, port: int) -> None:
        started = time.monotonic()
        route = self.fleet.routes.get(port)
        nodes = route.best(self.fleet.node, self._failed_lately) if route is not None else []
        owner = route.owner if route is not None else ""
        request = Request(port, owner, client, stream.local_address(), self.fleet.node)
        link: TLSStream | None = None
        tried: list[str] = []
        for node in nodes:
            if not (address := self.fleet.links.get(node)):
                continue
            try:
                link = await self._dial(address, request)
                break
            except (TransportError, AuthenticationError, TimeoutError, ValueError) as exc:
                self._failed[node] = time.monotonic()
                tried.append(f"{node} ({str(exc) or 'no answer in time'})")
        if link is None:
            self.totals.failed += 1
            why = "; ".join(tried) or "no gateway of the fleet holds it now"
            self._warnings.warning(
                logger, time.monotonic(), "client %s on port %d: not forwarded: %s", client,
                port, why,
            )  # fmt: skip
            stream.abort()
            return
        self.totals.out += 1
        stream.reset_unless_closed_cleanly()
        up, down, how = await join(stream, link)
        logger.info(
            "client %s on port %d forwarded to gateway %s closed after %.1f s: %d bytes up, "
            "%d down (%s)", client, port, node, time.monotonic() - started, up, down, how,
        )  # fmt: skip

    def _failed_lately(self, node: str) -> bool:
        failed = self._failed.get(node)
        return failed is not None and time.monotonic() - failed < self.fleet.lease

    async def _dial(self, address: str, request: Request) -> TLSStream:
        """A link to the gateway at ``address``, its request sent. Raises TransportError,
        TimeoutError."""
        async with asyncio.timeout(LINK_TIMEOUT):
            stream = await connect(parse_address(address), LINK_TIMEOUT)
            ticket = self._tickets.get(address)  # resumed: no certificate sent or checked again
            link = TLSStream(stream, self._client, server_side=False, session=ticket)
            await link.handshake()  # resets the connection if it fails
            # This process dying must look like a reset at the far end, never a clean end.
            link.reset_unless_closed_cleanly()
            try:
                await link.send(encode_request(request))
                if await _read_exactly(link, len(ACCEPTED)) != ACCEPTED:
                    raise TransportError("not a fleet gateway's answer")
            except BaseException:
                link.abort()
                self._tickets.pop(address, None)
                raise
            if (ticket := link.session) is not None:  # its ticket came before the answer
                self._tickets[address] = ticket
            return link

    # The way in.

    async def _take(self, stream: SocketStream, peer: str) -> None:
        """Root of a link's task on the gateway-to-gateway port, until its client is handed to
        a session. Never raises (but CancelledError): the gateway's task group runs it."""
        try:
            await self._take_link(stream, peer)
        except Exception:
            logger.exception("unexpected error taking a link from %s", peer)
            stream.abort()

    async def _take_link(self, stream: SocketStream, peer: str) -> None:
        """Refused and logged unless a fleet member asks for a port served here."""
        link: TLSStream | None = None
        try:
            async with asyncio.timeout(LINK_TIMEOUT):
                link = TLSStream(stream, self._server, server_side=True)
                await link.handshake()
                request = await read_request(link)
        except (TransportError, AuthenticationError, ProtocolError, TimeoutError) as exc:
            (link or stream).abort()
            why = exc.reason if isinstance(exc, AuthenticationError) else str(exc)
            kind = "request" if isinstance(exc, ProtocolError) else "handshake"
            self._refuse(kind, f"refused a link from {peer}: {why or 'no request in time'}")
            return
        holders = self.shared.ports.holders.items()
        holder = next((h for (_, port), h in holders if port == request.port), None)
        take = self._taker(holder, request.port, request.owner)
        if take is None:  # no answer: the other gateway tries another that holds the port
            link.abort()
            self._refuse(
                "port",
                f"refused client {request.client} forwarded by gateway {request.node} "
                f"({peer}): port {request.port} is not served here for {request.owner}",
            )
            return
        try:
            await link.send(ACCEPTED)
        except TransportError:
            link.abort()
            return
        if take(link, request.client, request.server):
            self.totals.into += 1
        else:  # its limits or access rules: reset, as it would be on the port here
            link.abort()

    def _taker(
        self, holder: object, port: int, owner: str
    ) -> Callable[[TLSStream, str, str], bool] | None:
        """What takes a client of ``port`` here, as if it had arrived on it (the session's
        service, or the group); None if nothing here serves it now for ``owner`` (none,
        another owner, or draining: the other gateway tries the next that holds the port)."""
        if isinstance(holder, Group):
            serving = holder.owner == owner and any(m.serving for m in holder.members)
            return holder.take if serving else None
        if not isinstance(holder, GatewaySession) or holder.agent != owner:
            return None
        if holder.running and holder.goodbye is None:
            for service in holder.services.values():
                if service.group is None and service.address.port == port:
                    return functools.partial(holder.take_client, service)
        return None

    def forwarded_ports(self) -> list[int]:
        """The ports this gateway forwards now (held by others)."""
        return sorted(self._listeners)

    def _refuse(self, kind: str, why: str) -> None:
        """Count a link refused here, and log it (throttled, each ``kind`` on its own)."""
        self.totals.refused += 1
        throttle = self._refusals.setdefault(kind, Throttle(WARNING_INTERVAL))
        throttle.warning(logger, time.monotonic(), "%s", why)


async def join(client: Stream, link: Stream) -> tuple[int, int, str]:
    """The bytes both ways between a client and its link, until both ends are done: bytes up,
    bytes down, and how it ended. A half-close goes across as one, and the side that sent it is
    watched for a reset meanwhile; an error on either side resets both, once what was read from
    it has reached the other end."""
    counts, how = [0, 0], "closed"
    up = asyncio.ensure_future(_copy(client, link, counts, 0))
    down = asyncio.ensure_future(_copy(link, client, counts, 1))
    running: set[asyncio.Future[None]] = {up, down}
    watching: set[asyncio.Future[None]] = set()
    started = [up, down]  # every task of it, whose outcome is read in the end
    try:
        try:
            while running:
                done, _ = await asyncio.wait(running | watching, return_when=FIRST_COMPLETED)
                for task in done:
                    running.discard(task)
                    watching.discard(task)
                    task.result()  # raises what ended its direction abnormally
                    if task in (up, down) and running:  # its source sent its FIN: a reset
                        ended = client if task is up else link  # from it ends the join now
                        watching.add(watch := asyncio.ensure_future(_reset_of(ended)))
                        started.append(watch)
        except (TransportError, AuthenticationError) as exc:
            how = f"reset: {exc}"
        finally:
            for task in running | watching:
                task.cancel()
            if running | watching:
                await asyncio.wait(running | watching)
            for task in started:  # each one's error read: none is left unretrieved
                if not task.cancelled():
                    task.exception()
    except BaseException:
        client.abort()
        link.abort()
        raise
    if how == "closed":
        client.close()
        link.close()
        return counts[0], counts[1], how
    try:
        for stream in (link, client):
            with contextlib.suppress(TransportError, TimeoutError):
                async with asyncio.timeout(DELIVERY_TIMEOUT):
                    await stream.wait_delivered()
    finally:  # cancelled meanwhile (the gateway stops): reset all the same
        client.abort()
        link.abort()
    return counts[0], counts[1], how


async def _reset_of(stream: Stream) -> None:
    """Raises the reset of ``stream``, which nobody reads now, when it comes; returns on a
    full hang-up without one."""
    await wait_error(stream.fileno())
    if (error := stream.pending_error()) is not None:
        raise error


async def _copy(source: Stream, sink: Stream, counts: list[int], index: int) -> None:
    buffer = memoryview(bytearray(COPY_SIZE))
    while n := await source.receive_into(buffer):
        await sink.send(buffer[:n])
        counts[index] += n
    sink.send_eof()
