"""Byte streams between agent and gateway: plain TCP and TLS over sockets.

A :class:`Stream` is a connected socket with ``receive_into`` (0 at EOF),
``send``, ``close`` (FIN) and ``abort`` (RST). :class:`SocketStream` drives
the socket directly; :class:`TLSStream` runs TLS over it through memory BIOs,
so both expose the raw socket for liveness checks and neither copies more
than TLS itself needs. :class:`Channel` adds the protocol's framing.

This is the transport edge: ``OSError`` and ``ssl.SSLError`` become
:class:`~tunnelgate.errors.TransportError` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

from tunnelgate.config import Address, format_address
from tunnelgate.errors import (
    ConnectionClosed,
    PeerVerificationError,
    TransportError,
)
from tunnelgate.protocol import Event, FrameDecoder, Message, encode_message

LISTEN_BACKLOG: Final = 4096
ACCEPT_BATCH: Final = 64  # connections accepted per readiness event
ACCEPT_PAUSE: Final = 0.1  # seconds without accepting after EMFILE and the like
TLS_READ_SIZE: Final = 64 * 1024
CHANNEL_READ_SIZE: Final = 16 * 1024
KEEPALIVE_IDLE: Final = 30  # seconds
KEEPALIVE_INTERVAL: Final = 10
KEEPALIVE_COUNT: Final = 3
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


def describe_os_error(exc: BaseException) -> str:
    """A short human text for a network error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()  # asyncio's own strerror texts vary
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def reset_socket(sock: socket.socket) -> None:
    """Close ``sock`` with an RST, so the peer sees an abnormal end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def tune_socket(sock: socket.socket) -> None:
    """Options every relayed TCP socket gets: no Nagle delay, and keepalive
    probes often enough to keep NAT mappings of idle connections alive and to
    find dead peers in about a minute rather than the kernel's two hours."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def peer_name(sock: socket.socket) -> str:
    """``host:port`` of the peer, or "?" once it is gone."""
    try:
        addr = sock.getpeername()
    except OSError:
        return "?"
    return format_address(addr[0], addr[1])


class Stream(Protocol):
    """A connected byte stream between agent and gateway."""

    sock: socket.socket

    async def receive_into(self, buffer: memoryview) -> int: ...

    async def send(self, data: bytes | memoryview) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class SocketStream:
    """Plain TCP."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    async def receive_into(self, buffer: memoryview) -> int:
        try:
            return await self._loop.sock_recv_into(self.sock, buffer)
        except OSError as exc:
            raise TransportError(describe_os_error(exc)) from None

    async def send(self, data: bytes | memoryview) -> None:
        try:
            await self._loop.sock_sendall(self.sock, data)
        except OSError as exc:
            raise TransportError(describe_os_error(exc)) from None

    def close(self) -> None:
        self.sock.close()

    def abort(self) -> None:
        reset_socket(self.sock)


class TLSStream:
    """TLS 1.3 over a :class:`SocketStream`, through memory BIOs.

    Sends are serialised by a lock because the read side may have TLS records
    of its own to send (key updates); reads happen in one task at a time.
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.sock = sock
        self._raw = SocketStream(sock)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        self._buffer = memoryview(bytearray(TLS_READ_SIZE))
        self._send_lock = asyncio.Lock()
        self._eof = False

    def peer_certificate(self) -> bytes | None:
        return self._tls.getpeercert(binary_form=True)

    async def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise TransportError("connection closed during the TLS handshake") from None
            except ssl.SSLCertVerificationError as exc:
                await self._flush_quietly()
                raise PeerVerificationError(describe_os_error(exc)) from None
            except ssl.SSLError as exc:
                await self._flush_quietly()
                hint = ""
                if exc.reason == "WRONG_VERSION_NUMBER" and not self._tls.server_side:
                    hint = " (does the gateway run with --no-tls? then so must the agent)"
                raise TransportError(
                    f"TLS handshake failed: {describe_os_error(exc)}{hint}"
                ) from None
        await self._flush()

    async def _fill(self) -> bool:
        """Read raw bytes into the TLS object; False at EOF."""
        n = await self._raw.receive_into(self._buffer)
        if n == 0:
            self._incoming.write_eof()
            return False
        self._incoming.write(self._buffer[:n])
        return True

    async def _flush(self) -> None:
        if self._outgoing.pending:
            async with self._send_lock:
                await self._raw.send(self._outgoing.read())

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(TransportError, TimeoutError):
            await asyncio.wait_for(self._flush(), 1.0)

    async def receive_into(self, buffer: memoryview) -> int:
        while True:
            try:
                return self._tls.read(len(buffer), buffer)  # type: ignore[return-value]
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return 0
            except ssl.SSLError as exc:
                if self._eof:
                    return 0  # EOF without close_notify; framing tells if it mattered
                raise TransportError(describe_os_error(exc)) from None
            if self._outgoing.pending:
                await self._flush()
            if not await self._fill():
                self._eof = True

    async def send(self, data: bytes | memoryview) -> None:
        async with self._send_lock:
            try:
                self._tls.write(data)
            except ssl.SSLError as exc:
                raise TransportError(describe_os_error(exc)) from None
            await self._raw.send(self._outgoing.read())

    def close(self) -> None:
        self._raw.close()

    def abort(self) -> None:
        self._raw.abort()


class Channel:
    """A framed stream: a control channel or a data channel.

    Events decoded ahead of need are queued; a relay taking over a data
    channel first drains :meth:`take_pending`, then keeps using ``decoder``.
    """

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self._pending: deque[Event] = deque()
        self._send_lock = asyncio.Lock()

    @property
    def sock(self) -> socket.socket:
        return self.stream.sock

    async def receive(self) -> Event:
        """The next event. Raises ConnectionClosed("eof") at end of stream."""
        while not self._pending:
            buffer = memoryview(bytearray(CHANNEL_READ_SIZE))
            n = await self.stream.receive_into(buffer)
            if n == 0:
                raise ConnectionClosed("eof", "closed by the peer")
            for event in self.decoder.feed(buffer[:n]):
                self._pending.append(event)
        return self._pending.popleft()

    def take_pending(self) -> list[Event]:
        events = list(self._pending)
        self._pending.clear()
        return events

    async def send_message(self, message: Message) -> None:
        data = encode_message(message)
        async with self._send_lock:
            await self.stream.send(data)

    def is_idle_and_open(self) -> bool:
        """True if nothing (not even EOF or RST) arrived since the handshake.

        A pooled data channel must be silent until it is started; anything
        else means the agent or a middlebox closed it.
        """
        if self._pending or not self.decoder.at_frame_boundary:
            return False
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        del data  # EOF (b"") or unexpected bytes: either way not usable
        return False

    def close(self) -> None:
        self.stream.close()

    def abort(self) -> None:
        self.stream.abort()


# --- opening connections ----------------------------------------------------


async def connect(address: Address, timeout: float) -> socket.socket:
    """A connected, non-blocking TCP socket to ``address`` (names resolved)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
            error: OSError | None = None
            for family, kind, proto, _, sockaddr in infos:
                sock = socket.socket(family, kind, proto)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, sockaddr)
                except OSError as exc:
                    sock.close()
                    error = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                tune_socket(sock)
                return sock
            raise error or OSError(errno.EHOSTUNREACH, "no address found")
    except TimeoutError:
        raise TransportError(
            f"cannot connect to {address}: timed out after {timeout:g} s"
        ) from None
    except OSError as exc:
        raise TransportError(f"cannot connect to {address}: {describe_os_error(exc)}") from None


def open_listener(host: str, port: int) -> socket.socket:
    """A bound, listening, non-blocking socket. Raises OSError."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def accept_forever(
    listener: socket.socket,
    handle: Callable[[socket.socket, str], None],
    on_error: Callable[[OSError], None],
) -> None:
    """Pass every connection accepted on ``listener`` to ``handle`` until cancelled.

    Accepting happens in a reader callback, never in an awaited ``sock_accept``:
    a cancelled wait could otherwise accept a connection and drop it unclosed.
    ``handle`` receives the non-blocking socket and the peer's ``host:port``,
    and must not raise. On errors such as EMFILE, accepting pauses briefly.
    """
    loop = asyncio.get_running_loop()
    fd = listener.fileno()
    resume: asyncio.TimerHandle | None = None

    def on_readable() -> None:
        nonlocal resume
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                on_error(exc)
                loop.remove_reader(fd)
                resume = loop.call_later(ACCEPT_PAUSE, loop.add_reader, fd, on_readable)
                return
            sock.setblocking(False)
            handle(sock, format_address(addr[0], addr[1]))

    loop.add_reader(fd, on_readable)
    try:
        await loop.create_future()  # until cancelled
    finally:
        if resume is not None:
            resume.cancel()
        loop.remove_reader(fd)


def bound_address(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return Address(host, port)
