"""Plain TCP: :class:`SocketStream`, dialing (:func:`connect`) and listening
(:func:`open_listener`, :class:`Listener`).

This is the transport edge for sockets: ``OSError`` becomes
:class:`~tunnelgate.errors.TransportError` here (:func:`transport_error`) and
in the other modules of this package, nowhere else. Every socket gets the
options of a relayed connection (no Nagle delay, keepalive) when it is dialed
or accepted.

It must not import gateway, agent, relay, channel, logs or the protocol's
framing; from config only ``Address`` and ``format_address``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import termios
from collections.abc import Callable, Iterator
from typing import Any, Final, TypeVar

from tunnelgate.address import Address, format_address
from tunnelgate.errors import TransportError
from tunnelgate.transport.poller import wait_readable, wait_writable, watch_hangup
from tunnelgate.transport.stream import WouldBlock

LISTEN_BACKLOG: Final = 4096
ACCEPT_BATCH: Final = 64  # connections accepted per readiness event
ACCEPT_PAUSE: Final = 0.1  # seconds without accepting after EMFILE and the like
KEEPALIVE_IDLE: Final = 30  # seconds
KEEPALIVE_INTERVAL: Final = 10
KEEPALIVE_COUNT: Final = 3
DELIVERY_POLL_MIN: Final = 0.001  # seconds; see SocketStream.wait_delivered
DELIVERY_POLL_MAX: Final = 0.05
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_LINGER_DEFAULT: Final = struct.pack("ii", 0, 0)
_PEEK: Final = socket.MSG_PEEK | socket.MSG_DONTWAIT

_Socket = TypeVar("_Socket", bound=socket.socket)


def describe_os_error(exc: OSError) -> str:
    """A short human text for a network error."""
    if exc.errno:
        return os.strerror(exc.errno).lower()  # asyncio's own strerror texts vary
    if exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def transport_error(exc: OSError) -> TransportError:
    """The project's error for a failed socket operation.

    A write gets EPIPE rather than ECONNRESET when the peer reset a
    connection whose other direction had ended: the same event, said once.
    """
    if exc.errno == errno.EPIPE:
        exc = ConnectionResetError(errno.ECONNRESET, "connection reset")
    return TransportError(describe_os_error(exc))


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST, so the peer sees an abnormal end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _tune(sock: socket.socket) -> None:
    """Options every relayed TCP socket gets: no Nagle delay, and keepalive
    probes often enough to keep NAT mappings of idle connections alive and to
    find dead peers in about a minute rather than the kernel's two hours."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def _address(name: Any) -> str:
    return format_address(name[0], name[1])


class SocketStream:
    """A connected TCP socket in non-blocking mode, which this stream owns.

    The socket stays this stream's after :meth:`wrap_socket` (TLS): closing,
    resetting and the kernel's view of the connection (FIN, errors, queues,
    addresses) still go through here; only the bytes go through the wrapper.
    Socket-level calls use ``socket.socket``'s own methods for that reason
    (an ``ssl.SSLSocket`` overrides ``recv`` and ``shutdown``).
    """

    __slots__ = ("_eof_sent", "_loop", "_resets", "_sock")

    reads_all_ready: Final = True  # recv returns all that is ready

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._eof_sent = False
        self._resets = False  # every close is an RST until close()

    # --- the stream ---------------------------------------------------------

    async def receive_into(self, buffer: memoryview) -> int:
        try:
            return await self._loop.sock_recv_into(self._sock, buffer)
        except OSError as exc:
            raise transport_error(exc) from None

    async def send(self, data: bytes | memoryview) -> None:
        try:
            await self._loop.sock_sendall(self._sock, data)
        except OSError as exc:
            raise transport_error(exc) from None

    def send_eof(self) -> None:
        """Send a FIN. Under TLS this leaves the TLS session usable for
        reading (``SSLSocket.shutdown`` would drop it)."""
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            socket.socket.shutdown(self._sock, socket.SHUT_WR)
        except OSError as exc:
            raise transport_error(exc) from None

    def close(self) -> None:
        """Close with a FIN (undoing :meth:`reset_unless_closed_cleanly`)."""
        if self._resets:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_DEFAULT)
        self._sock.close()

    def abort(self) -> None:
        _reset(self._sock)

    def reset_unless_closed_cleanly(self) -> None:
        """Make every close of the socket an RST until :meth:`close`, even the
        kernel's own when this process dies (SIGKILL, a crash, a forced exit).

        For the relayed client and service connections: without this, a killed
        gateway or agent would end its clients' connections with a FIN, and a
        response cut off in the middle would look complete.
        """
        self._resets = True
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)

    def is_quiet(self) -> bool:
        """Nothing arrived: the raw socket is peeked, so under TLS any record
        (even close_notify) counts."""
        try:
            socket.socket.recv(self._sock, 1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # EOF (b"") or unexpected bytes: either way not quiet

    def has_unread_bytes(self) -> bool:
        try:
            return bool(socket.socket.recv(self._sock, 1, _PEEK))
        except OSError:  # nothing yet, or gone
            return False

    def pending_error(self) -> TransportError | None:
        """The socket's pending error (``SO_ERROR``, cleared by reading it)."""
        try:
            code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            return transport_error(exc)
        return transport_error(OSError(code, os.strerror(code))) if code else None

    @contextlib.contextmanager
    def watch_peer_close(self) -> Iterator[asyncio.Future[None]]:
        with watch_hangup(self._sock.fileno()) as closed:
            yield closed

    async def wait_delivered(self) -> None:
        """Until the peer has acknowledged every byte sent, or reset the connection.

        For an abnormal end: an RST discards what the socket has not sent yet,
        and the peer would have read those bytes over a direct connection. No
        readiness event says "all acknowledged", so this polls the send queue,
        with a delay that doubles from ``DELIVERY_POLL_MIN`` to
        ``DELIVERY_POLL_MAX``; the caller bounds the wait. On loopback the
        queue is usually empty at once.
        """
        delay = DELIVERY_POLL_MIN
        while self._unacknowledged() and self.pending_error() is None:
            await asyncio.sleep(delay)
            delay = min(2 * delay, DELIVERY_POLL_MAX)

    def _unacknowledged(self) -> int:
        """Bytes in the send queue: not sent yet, or not acknowledged."""
        try:
            answer = fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, bytes(4))
        except OSError:
            return 0
        count: int = struct.unpack("i", answer)[0]
        return count

    def peer_address(self) -> str:
        try:
            return _address(self._sock.getpeername())
        except OSError:
            return ""

    def local_address(self) -> str:
        try:
            return _address(self._sock.getsockname())
        except OSError:
            return ""

    def peer_certificate(self) -> bytes | None:
        return None

    def peer_certificate_names(self) -> frozenset[str]:
        return frozenset()

    # --- readiness, for the relay's pumps -----------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    def fd_for_splice(self) -> int:
        return self._sock.fileno()

    def try_receive_into(self, buffer: memoryview) -> int:
        try:
            return self._sock.recv_into(buffer)
        except BlockingIOError:
            raise WouldBlock from None
        except OSError as exc:
            raise transport_error(exc) from None

    def try_send(self, data: bytes | memoryview, more: bool = False) -> int:
        try:
            return self._sock.send(data, socket.MSG_MORE if more else 0)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise transport_error(exc) from None

    async def wait_readable(self) -> None:
        await wait_readable(self._sock.fileno())

    async def wait_writable(self) -> None:
        await wait_writable(self._sock.fileno())

    # --- for TLS ------------------------------------------------------------

    def wrap_socket(self, wrap: Callable[[socket.socket], _Socket]) -> _Socket:
        """Hand the socket to ``wrap`` (TLS), which takes it over. This stream
        goes on owning what ``wrap`` returns; the caller moves the bytes."""
        self._sock = wrapped = wrap(self._sock)
        return wrapped


# --- opening connections ----------------------------------------------------


async def connect(address: Address, timeout: float) -> SocketStream:
    """A connected TCP stream to ``address`` (names resolved)."""
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
                    _reset(sock)
                    raise
                _tune(sock)
                return SocketStream(sock)
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


def open_listener(host: str, port: int) -> Listener:
    """A bound, listening TCP socket. Raises TransportError ("cannot listen on …")."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            return Listener(sock)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        where = format_address(host, port)
        raise TransportError(f"cannot listen on {where}: {describe_os_error(exc)}") from None


class Listener:
    """A listening TCP socket; ``address`` is the one it is bound to."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self.address = Address(host, port)

    def close(self) -> None:
        self._sock.close()

    async def accept_forever(
        self,
        handle: Callable[[SocketStream, str], None],
        on_error: Callable[[TransportError], None],
    ) -> None:
        """Pass every connection accepted to ``handle`` until cancelled.

        Accepting happens in a reader callback, never in an awaited
        ``sock_accept``: a cancelled wait could otherwise accept a connection
        and drop it unclosed. ``handle`` receives the connection's stream and
        the peer's ``host:port``, and must not raise. On an error such as
        EMFILE, ``on_error`` gets it and accepting pauses for ``ACCEPT_PAUSE``.
        """
        loop = asyncio.get_running_loop()
        listener = self._sock
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
                    on_error(transport_error(exc))
                    loop.remove_reader(fd)
                    resume = loop.call_later(ACCEPT_PAUSE, loop.add_reader, fd, on_readable)
                    return
                sock.setblocking(False)
                _tune(sock)
                handle(SocketStream(sock), _address(addr))

        loop.add_reader(fd, on_readable)
        try:
            await loop.create_future()  # until cancelled
        finally:
            if resume is not None:
                resume.cancel()
            loop.remove_reader(fd)
