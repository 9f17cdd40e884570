"""Byte streams between agent and gateway: plain TCP and TLS over sockets.

A :class:`Stream` is a connected socket with ``receive_into`` (0 at EOF),
``send``, ``close`` (FIN) and ``abort`` (RST). :class:`SocketStream` drives
a plain socket; :class:`TLSStream` an ``ssl.SSLSocket``, where OpenSSL reads
and writes the descriptor itself. Both expose ``sock``, which the relay drives
directly once a data channel starts. :class:`Channel` adds the framing.

This is the transport edge: ``OSError`` and ``ssl.SSLError`` become
:class:`~tunnelgate.errors.TransportError` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import ipaddress
import os
import select
import socket
import ssl
import struct
import termios
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

from tunnelgate.address import Address, format_address
from tunnelgate.errors import (
    CertificateRefusedError,
    ConnectionClosed,
    PeerVerificationError,
    TransportError,
)
from tunnelgate.protocol import Conversation, Event, FrameDecoder, Message, Side, encode_message

LISTEN_BACKLOG: Final = 4096
ACCEPT_BATCH: Final = 64  # connections accepted per readiness event
ACCEPT_PAUSE: Final = 0.1  # seconds without accepting after EMFILE and the like
ACCEPT_ERROR_INTERVAL: Final = 5.0  # seconds between two logged accept errors of a listener
DISPATCH_BATCH: Final = 256  # readiness events handled per wakeup of a Poller
WANT_RETRY: Final = 0.005  # seconds; TLS wanting the opposite direction (never in TLS 1.3)
CHANNEL_READ_SIZE: Final = 16 * 1024
KEEPALIVE_IDLE: Final = 30  # seconds
KEEPALIVE_INTERVAL: Final = 10
KEEPALIVE_COUNT: Final = 3
DELIVERY_POLL_MIN: Final = 0.001  # seconds; see wait_delivered
DELIVERY_POLL_MAX: Final = 0.05
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_LINGER_DEFAULT: Final = struct.pack("ii", 0, 0)


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


# TLS alerts a gateway sends when it does not accept the agent's certificate.
_CERTIFICATE_ALERTS: Final = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires one (give --cert and --key)",
    "TLSV1_ALERT_UNKNOWN_CA": "its CA (client_ca) did not sign it",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it is not acceptable",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it was revoked",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it is not acceptable",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "its type is not supported",
}


def _certificate_refused(exc: ssl.SSLError) -> CertificateRefusedError | None:
    """The error for a TLS alert that says the peer refused our certificate."""
    why = _CERTIFICATE_ALERTS.get(str(exc.reason))
    if why is None:
        return None
    return CertificateRefusedError(f"the gateway refused this agent's TLS certificate: {why}")


def reset_socket(sock: socket.socket) -> None:
    """Close ``sock`` with an RST, so the peer sees an abnormal end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def reset_unless_closed_cleanly(sock: socket.socket) -> None:
    """Make every close of ``sock`` an RST until :func:`close_cleanly`, even the
    kernel's own when this process dies (SIGKILL, a crash, a forced exit).

    For the relayed client and service sockets: without this, a killed gateway
    or agent would end its clients' connections with a FIN, and a response cut
    off in the middle would look complete.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def close_cleanly(sock: socket.socket) -> None:
    """Close ``sock`` with a FIN (undoing :func:`reset_unless_closed_cleanly`)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_DEFAULT)
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


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Poller:
    """Readiness for our sockets: an epoll set of our own, nested in the loop.

    The relay's pumps and :func:`wait_readable`/:func:`wait_writable` register
    descriptors here, not with the loop: one loop reader (on the epoll
    descriptor) wakes this, and it calls back those whose sockets are ready.
    Errors and hang-ups count as readiness, so the next ``recv``/``send``
    reports them. The loop's own per-descriptor watchers are not used because
    uvloop (libuv) drops a watcher silently when its socket reports an error,
    which would leave a pump (or a TLS read) asleep on a reset connection.
    Registering a descriptor is one ``epoll_ctl`` and nothing else. Without
    epoll, the loop's own readers and writers are used.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.readers: dict[int, Callable[[], None]] = {}
        self.writers: dict[int, Callable[[], None]] = {}
        self.hangups: dict[int, Callable[[], None]] = {}  # peer sent FIN or RST
        self.errors: dict[int, Callable[[], None]] = {}  # an error or a full hang-up only
        self.epoll = select.epoll()
        loop.add_reader(self.epoll.fileno(), self.dispatch)
        weakref.finalize(self, self.epoll.close)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self.readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self.writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self.writers.pop(fd, None) is not None:
            self._update(fd)

    def add_hangup(self, fd: int, callback: Callable[[], None]) -> None:
        self.hangups[fd] = callback
        self._update(fd)

    def remove_hangup(self, fd: int) -> None:
        if self.hangups.pop(fd, None) is not None:
            self._update(fd)

    def add_error_watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call back on an error (such as the peer's RST) or a full hang-up of
        ``fd``, and on nothing else: for a socket nobody reads any more."""
        self.errors[fd] = callback
        self._update(fd)

    def remove_error_watch(self, fd: int) -> None:
        if self.errors.pop(fd, None) is not None:
            self._update(fd)

    def _update(self, fd: int) -> None:
        mask = (
            (select.EPOLLIN if fd in self.readers else 0)
            | (select.EPOLLOUT if fd in self.writers else 0)
            | (select.EPOLLRDHUP if fd in self.hangups else 0)
        )
        watched = mask or fd in self.errors  # epoll reports errors on any registration
        try:
            if watched:
                try:
                    self.epoll.modify(fd, mask)
                except FileNotFoundError:
                    self.epoll.register(fd, mask)
            else:
                self.epoll.unregister(fd)
        except OSError:
            pass  # unregistering a descriptor the kernel dropped already

    def dispatch(self) -> None:
        for fd, events in self.epoll.poll(0, DISPATCH_BATCH):
            if events & _READ_EVENTS and (reader := self.readers.get(fd)) is not None:
                reader()
            if events & _WRITE_EVENTS and (writer := self.writers.get(fd)) is not None:
                writer()
            if events & _HANGUP_EVENTS and (hangup := self.hangups.get(fd)) is not None:
                hangup()
            if events & _ERROR_EVENTS and (error := self.errors.get(fd)) is not None:
                error()


class _LoopPoller:
    """The same interface on the event loop's own readers and writers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.add_reader = loop.add_reader
        self.remove_reader = loop.remove_reader
        self.add_writer = loop.add_writer
        self.remove_writer = loop.remove_writer

    # Without epoll a hang-up or an error shows only on the next read or write.
    def add_hangup(self, fd: int, callback: Callable[[], None]) -> None:
        pass

    def remove_hangup(self, fd: int) -> None:
        pass

    def add_error_watch(self, fd: int, callback: Callable[[], None]) -> None:
        pass

    def remove_error_watch(self, fd: int) -> None:
        pass


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller | _LoopPoller] = (
    weakref.WeakKeyDictionary()
)


def epoll_descriptors() -> int:
    """Epoll descriptors kept for the live event loops of this process."""
    return sum(isinstance(each, Poller) for each in _pollers.values())


def poller(loop: asyncio.AbstractEventLoop) -> Poller | _LoopPoller:
    """The readiness set of ``loop``, made on first use."""
    found = _pollers.get(loop)
    if found is None:
        found = _pollers[loop] = Poller(loop) if hasattr(select, "epoll") else _LoopPoller(loop)
    return found


_READ_EVENTS: Final = (
    select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP if hasattr(select, "epoll") else 0
)
_WRITE_EVENTS: Final = (
    select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP if hasattr(select, "epoll") else 0
)
_ERROR_EVENTS: Final = select.EPOLLERR | select.EPOLLHUP if hasattr(select, "epoll") else 0
_HANGUP_EVENTS: Final = (
    select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP if hasattr(select, "epoll") else 0
)


async def wait_readable(sock: socket.socket) -> None:
    """Until ``sock`` is readable (data, EOF or an error is pending)."""
    await _wait(sock, writable=False)


async def wait_writable(sock: socket.socket) -> None:
    """Until ``sock`` can take more bytes (or has an error pending)."""
    await _wait(sock, writable=True)


@contextlib.contextmanager
def peer_closed(sock: socket.socket) -> Iterator[asyncio.Future[None]]:
    """A future that is done once the peer has sent a FIN or an RST on
    ``sock``, whatever bytes are still unread; watched only inside the block
    (never done where there is no epoll).

    The watch ends when the block does, before ``sock`` can be closed: a
    descriptor unregistered later might by then be another socket's.
    """
    loop = asyncio.get_running_loop()
    ready = poller(loop)
    closed: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    ready.add_hangup(fd, functools.partial(_wake, closed))
    try:
        yield closed
    finally:
        ready.remove_hangup(fd)
        closed.cancel()


def was_reset(sock: socket.socket) -> bool:
    """True if ``sock`` has a pending error, such as the peer's RST."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
    except OSError:
        return True


async def wait_delivered(sock: socket.socket) -> None:
    """Until the peer has acknowledged every byte sent on ``sock``, or reset it.

    For an abnormal end: an RST discards what the socket has not sent yet, and
    the peer would have read those bytes over a direct connection. No readiness
    event says "all acknowledged", so this polls the send queue, with a delay
    that doubles from ``DELIVERY_POLL_MIN`` to ``DELIVERY_POLL_MAX``; the
    caller bounds the wait. On loopback the queue is usually empty at once.
    """
    delay = DELIVERY_POLL_MIN
    while _unacknowledged(sock) and not was_reset(sock):
        await asyncio.sleep(delay)
        delay = min(2 * delay, DELIVERY_POLL_MAX)


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes in ``sock``'s send queue: not sent yet, or not acknowledged."""
    try:
        answer = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
    except OSError:
        return 0
    count: int = struct.unpack("i", answer)[0]
    return count


async def _wait(sock: socket.socket, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = poller(loop)
    waiter: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    add, remove = (
        (ready.add_writer, ready.remove_writer)
        if writable
        else (ready.add_reader, ready.remove_reader)
    )
    add(fd, functools.partial(_wake, waiter))
    try:
        await waiter
    finally:
        remove(fd)


def shutdown_write(sock: socket.socket) -> None:
    """Send a FIN. On a TLS socket this leaves the TLS session usable for
    reading (``SSLSocket.shutdown`` would drop it)."""
    socket.socket.shutdown(sock, socket.SHUT_WR)


class Stream(Protocol):
    """A connected byte stream between agent and gateway."""

    @property
    def sock(self) -> socket.socket: ...

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
    """TLS 1.3 on the socket itself (an ``ssl.SSLSocket`` in non-blocking mode).

    OpenSSL reads and writes the file descriptor directly, so relayed bytes
    are copied once each way by the cipher and nowhere else. The stream takes
    the socket over: ``sock`` is the ``SSLSocket`` and the one passed in is
    detached, so its owner must close the stream (or its ``sock``) instead.
    A failed handshake resets the connection before raising.
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        try:
            self.sock: ssl.SSLSocket = context.wrap_socket(
                sock,
                server_side=server_side,
                server_hostname=server_hostname,
                do_handshake_on_connect=False,
                session=session,
            )
        except OSError as exc:  # the peer is gone already ("not connected")
            reset_socket(sock)  # closed already if the wrapping got that far
            raise TransportError(f"TLS handshake failed: {describe_os_error(exc)}") from None

    def peer_certificate(self) -> bytes | None:
        return self.sock.getpeercert(binary_form=True)

    async def handshake(self) -> None:
        try:
            while True:
                try:
                    self.sock.do_handshake()
                    return
                except ssl.SSLWantReadError:
                    await wait_readable(self.sock)
                except ssl.SSLWantWriteError:
                    await wait_writable(self.sock)
        except ssl.SSLCertVerificationError as exc:
            self.abort()
            raise PeerVerificationError(describe_os_error(exc)) from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError):
            self.abort()
            raise TransportError("connection closed during the TLS handshake") from None
        except ssl.SSLError as exc:
            self.abort()
            if refused := _certificate_refused(exc):
                raise refused from None
            hint = ""
            if exc.reason == "WRONG_VERSION_NUMBER" and not self.sock.server_side:
                hint = " (does the gateway run with --no-tls? then so must the agent)"
            raise TransportError(f"TLS handshake failed: {describe_os_error(exc)}{hint}") from None
        except OSError as exc:
            self.abort()
            raise TransportError(describe_os_error(exc)) from None
        except BaseException:
            self.abort()
            raise

    async def receive_into(self, buffer: memoryview) -> int:
        while True:
            try:
                return self.sock.recv_into(buffer)  # 0 at EOF, with or without close_notify
            except ssl.SSLWantReadError:
                await wait_readable(self.sock)
            except ssl.SSLWantWriteError:
                await wait_writable(self.sock)
            except ssl.SSLError as exc:  # TLS 1.3: a refused certificate shows on the first read
                raise _certificate_refused(exc) or TransportError(describe_os_error(exc)) from None
            except OSError as exc:
                raise TransportError(describe_os_error(exc)) from None

    async def send(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                # Without partial writes, OpenSSL takes all of it or nothing; a
                # retry after "want write" must pass the same bytes, as here.
                view = view[self.sock.send(view) :]
            except ssl.SSLWantWriteError:
                await wait_writable(self.sock)
            except ssl.SSLWantReadError:
                await asyncio.sleep(WANT_RETRY)  # renegotiation only: not in TLS 1.3
            except OSError as exc:
                raise TransportError(describe_os_error(exc)) from None

    def close(self) -> None:
        self.sock.close()

    def abort(self) -> None:
        reset_socket(self.sock)


class Channel:
    """A framed stream: a control channel or a data channel, on one side.

    Every message received or sent passes through the channel's
    :class:`~tunnelgate.protocol.Conversation`, which knows which messages its
    state allows. Events decoded ahead of need are queued; a relay taking
    over a started data channel first drains :meth:`take_pending`, then keeps
    using ``decoder``.
    """

    def __init__(self, stream: Stream, side: Side) -> None:
        self.stream = stream
        self.conversation = Conversation(side)
        self.decoder = FrameDecoder()
        self._pending: deque[Event] = deque()
        self._send_lock = asyncio.Lock()

    @property
    def sock(self) -> socket.socket:
        return self.stream.sock

    async def receive(self) -> Message:
        """The next message, if the conversation allows it now: raises
        RemoteProtocolError if not, ConnectionClosed("eof") at end of stream."""
        while not self._pending:
            buffer = memoryview(bytearray(CHANNEL_READ_SIZE))
            n = await self.stream.receive_into(buffer)
            if n == 0:
                raise ConnectionClosed("eof", "closed by the peer")
            for event in self.decoder.feed(buffer[:n]):
                self._pending.append(event)
        return self.conversation.receive(self._pending.popleft())

    def take_pending(self) -> list[Event]:
        events = list(self._pending)
        self._pending.clear()
        return events

    async def send_message(self, message: Message) -> None:
        async with self._send_lock:
            # In the lock: the conversation's order is the order on the wire.
            data = encode_message(self.conversation.send(message))
            await self.stream.send(data)

    def is_idle_and_open(self) -> bool:
        """True if nothing (not even EOF or RST) arrived since the handshake.

        A pooled data channel must be silent until it is started; anything
        else means the agent or a middlebox closed it.
        """
        if self._pending or not self.decoder.at_frame_boundary:
            return False
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return False
        try:
            # The raw socket, under TLS too: any record (even close_notify) counts.
            data = socket.socket.recv(self.sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
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
            infos = _numeric_address(address) or await loop.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM
            )
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
                    # Cancelled, maybe after the kernel connected: the peer must
                    # see a reset, not a clean connection with nothing in it.
                    reset_socket(sock)
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


_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


def _numeric_address(address: Address) -> list[_AddrInfo] | None:
    """``getaddrinfo``'s answer for an IP literal, without the resolver's
    thread (each new data channel and each service connection dials one)."""
    if "%" in address.host:  # an IPv6 scope needs the resolver
        return None
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        return None
    if ip.version == 4:
        return [(socket.AF_INET, socket.SOCK_STREAM, 0, "", (str(ip), address.port))]
    return [(socket.AF_INET6, socket.SOCK_STREAM, 0, "", (str(ip), address.port, 0, 0))]


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
    on_error: Callable[[OSError, int], None],
) -> None:
    """Pass every connection accepted on ``listener`` to ``handle`` until cancelled.

    Accepting happens in a reader callback, never in an awaited ``sock_accept``:
    a cancelled wait could otherwise accept a connection and drop it unclosed.
    ``handle`` receives the non-blocking socket and the peer's ``host:port``,
    and must not raise. On errors such as EMFILE, accepting pauses briefly
    (``ACCEPT_PAUSE``), and ``on_error(exc, repeats)`` is called at most once
    per ``ACCEPT_ERROR_INTERVAL``, with the number of errors not reported since.
    """
    loop = asyncio.get_running_loop()
    fd = listener.fileno()
    resume: asyncio.TimerHandle | None = None
    reported_at = -ACCEPT_ERROR_INTERVAL
    repeats = 0

    def on_readable() -> None:
        nonlocal resume, reported_at, repeats
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if loop.time() - reported_at >= ACCEPT_ERROR_INTERVAL:
                    on_error(exc, repeats)
                    reported_at, repeats = loop.time(), 0
                else:
                    repeats += 1
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
