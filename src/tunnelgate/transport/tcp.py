"""Plain TCP: :class:`SocketStream`, :func:`connect`, :func:`open_listener`; the
transport edge for sockets (:func:`transport_error`). It must not import tunnelgate
beyond errors, address and this package.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import ipaddress
import os
import socket
import struct
import termios
from collections.abc import Callable
from contextlib import AbstractContextManager
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
DELIVERY_POLL_MIN: Final = 0.001  # seconds; see TCPConnection.wait_delivered
DELIVERY_POLL_MAX: Final = 0.05
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_LINGER_DEFAULT: Final = struct.pack("ii", 0, 0)
_PEEK: Final = socket.MSG_PEEK | socket.MSG_DONTWAIT

_Socket = TypeVar("_Socket", bound=socket.socket)


def describe_os_error(exc: OSError) -> str:
    if exc.errno:
        return os.strerror(exc.errno).lower()  # asyncio's own strerror texts vary
    return exc.strerror.lower() if exc.strerror else str(exc) or type(exc).__name__


def transport_error(exc: OSError) -> TransportError:
    if exc.errno == errno.EPIPE:  # what a write gets when the peer reset a half-closed connection
        exc = ConnectionResetError(errno.ECONNRESET, "connection reset")
    return TransportError(describe_os_error(exc), exc.errno)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _tune(sock: socket.socket, keepalive: bool = True) -> None:
    """No Nagle delay, and keepalive often enough to keep NAT mappings of idle
    connections and to find dead peers in a minute, not the kernel's two hours (not
    on loopback, where the kernel itself resets a dead peer's connections)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not keepalive:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def _address(get_name: Callable[[], Any]) -> str:
    try:
        host, port = get_name()[:2]
    except OSError:
        return ""
    return format_address(host, port)


class TCPConnection:
    """The kernel's side of a TCP connection in non-blocking mode, which this object
    owns: what :class:`SocketStream` and TLSStream share. It calls ``socket.socket``'s
    own ``recv`` and ``shutdown``, which ``ssl.SSLSocket`` overrides."""

    __slots__ = ("_eof_sent", "_loop", "_resets", "_sock")

    def __init__(self, sock: socket.socket, *, resets: bool = False) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._eof_sent = False
        self._resets = resets  # every close is an RST until close() (SO_LINGER 0 is set)

    def send_eof(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            try:
                socket.socket.shutdown(self._sock, socket.SHUT_WR)
            except OSError as exc:
                raise transport_error(exc) from None

    def close(self) -> None:
        if self._resets:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_DEFAULT)
        self._sock.close()

    def abort(self) -> None:
        _reset(self._sock)

    def reset_unless_closed_cleanly(self) -> None:
        """Every close is an RST until :meth:`close`, even the kernel's when this process
        dies: a cut response must not end with a FIN, as if it were whole."""
        if self._resets:  # already (accepted from a listener that resets what it accepts)
            return
        self._resets = True
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)

    def is_quiet(self) -> bool:
        try:  # the raw socket: under TLS any record (even close_notify) counts
            socket.socket.recv(self._sock, 1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False  # EOF (b"") or unexpected bytes

    def has_unread_bytes(self) -> bool:
        try:
            return bool(socket.socket.recv(self._sock, 1, _PEEK))
        except OSError:  # nothing yet, or gone
            return False

    def pending_error(self) -> TransportError | None:
        try:  # SO_ERROR, cleared by reading it
            code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            return transport_error(exc)
        return transport_error(OSError(code, os.strerror(code))) if code else None

    def watch_peer_close(self) -> AbstractContextManager[asyncio.Future[None]]:
        return watch_hangup(self._sock.fileno())

    async def wait_delivered(self) -> None:
        # An RST discards unsent bytes the peer would have read over a direct connection.
        # No event says "all acknowledged": poll the send queue; the caller bounds the wait.
        delay = DELIVERY_POLL_MIN
        while self._unacknowledged() and self.pending_error() is None:
            await asyncio.sleep(delay)
            delay = min(2 * delay, DELIVERY_POLL_MAX)

    def _unacknowledged(self) -> int:
        try:
            answer = fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, bytes(4))
        except OSError:
            return 0
        return int(struct.unpack("i", answer)[0])

    def peer_address(self) -> str:
        return _address(self._sock.getpeername)

    def local_address(self) -> str:
        return _address(self._sock.getsockname)

    def fileno(self) -> int:
        return self._sock.fileno()

    async def wait_readable(self) -> None:
        await wait_readable(self._sock.fileno())

    async def wait_writable(self) -> None:
        await wait_writable(self._sock.fileno())


class SocketStream(TCPConnection):
    """A plain TCP stream on a connected socket."""

    __slots__ = ()

    reads_all_ready: Final = True  # recv returns all that is ready

    # Not the loop's sock_recv_into and sock_sendall: uvloop's register and drop a watcher
    # around every call (some ten system calls where two or four do), and drop one
    # silently when its socket reports an error. The bytes are usually there already.

    async def receive_into(self, buffer: memoryview) -> int:
        while True:
            try:
                return self._sock.recv_into(buffer)
            except BlockingIOError:
                await self.wait_readable()
            except OSError as exc:
                raise transport_error(exc) from None

    async def send(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while True:
            try:
                view = view[self._sock.send(view) :]
            except BlockingIOError:
                pass
            except OSError as exc:
                raise transport_error(exc) from None
            if not view:
                return
            await self.wait_writable()

    def peer_certificate(self) -> bytes | None:
        return None

    def tls_version(self) -> str:
        return ""

    def peer_certificate_names(self) -> frozenset[str]:
        return frozenset()

    fd_for_splice = TCPConnection.fileno  # the bytes pass through it unchanged

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

    def wrap_socket(self, wrap: Callable[[socket.socket], _Socket]) -> _Socket:
        """Hand the socket to ``wrap`` (TLS), which takes it over; closing and
        resetting this stream still end the connection."""
        self._sock = wrapped = wrap(self._sock)
        return wrapped


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
                    await _connect(sock, sockaddr)
                except OSError as exc:
                    sock.close()
                    error = exc
                    continue
                except BaseException:  # cancelled, maybe connected: the peer must see a reset
                    _reset(sock)
                    raise
                _tune(sock, keepalive=not _is_loopback(sockaddr[0]))
                return SocketStream(sock)
            raise error or OSError(errno.EHOSTUNREACH, "no address found")
    except TimeoutError:
        raise TransportError(
            f"cannot connect to {address}: timed out after {timeout:g} s", errno.ETIMEDOUT
        ) from None
    except socket.gaierror as exc:  # the name does not resolve: no host to reach
        why = (exc.strerror or str(exc)).lower()
        raise TransportError(f"cannot connect to {address}: {why}", errno.EHOSTUNREACH) from None
    except OSError as exc:
        why = describe_os_error(exc)
        raise TransportError(f"cannot connect to {address}: {why}", exc.errno) from None


@functools.lru_cache(maxsize=1024)
def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


async def _connect(sock: socket.socket, sockaddr: tuple[Any, ...]) -> None:
    """Connect a non-blocking socket: the loop's ``sock_connect`` without its resolving
    and bookkeeping, which cost more than the connect itself on loopback."""
    code = sock.connect_ex(sockaddr)
    if code in (errno.EINPROGRESS, errno.EINTR):  # EINTR: the connect goes on all the same
        await wait_writable(sock.fileno())
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        raise OSError(code, os.strerror(code))


async def resolve(address: Address, timeout: float) -> list[str]:
    """The IP addresses ``address``'s host name resolves to, in the order a connect
    tries them, without repeats (an IP literal: itself)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = _numeric_address(address) or await loop.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM
            )
    except TimeoutError:
        why = f"timed out after {timeout:g} s"
        raise TransportError(f"cannot resolve {address.host}: {why}", errno.ETIMEDOUT) from None
    except socket.gaierror as exc:
        why = (exc.strerror or str(exc)).lower()
        raise TransportError(f"cannot resolve {address.host}: {why}", errno.EHOSTUNREACH) from None
    except OSError as exc:
        why = describe_os_error(exc)
        raise TransportError(f"cannot resolve {address.host}: {why}", exc.errno) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]


def _numeric_address(address: Address) -> tuple[_AddrInfo, ...]:
    """``getaddrinfo``'s answer for an IP literal, without the resolver's thread; () for
    a name."""
    return _numeric(address.host, address.port)


@functools.lru_cache(maxsize=1024)  # an agent dials the same few services again and again
def _numeric(host: str, port: int) -> tuple[_AddrInfo, ...]:
    if "%" in host:  # an IPv6 scope needs the resolver
        return ()
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ()
    if ip.version == 4:
        return ((socket.AF_INET, socket.SOCK_STREAM, 0, "", (str(ip), port)),)
    return ((socket.AF_INET6, socket.SOCK_STREAM, 0, "", (str(ip), port, 0, 0)),)


def open_listener(
    host: str, port: int, *, reuse_port: bool = False, reset_accepted: bool = False
) -> Listener:
    """A bound, listening TCP socket. With ``reuse_port`` (``SO_REUSEPORT``), other
    processes of this user may listen on the same address too, and the kernel spreads
    new connections over all of them (a gateway's workers share public ports so). With
    ``reset_accepted``, every connection it accepts starts as after
    :meth:`TCPConnection.reset_unless_closed_cleanly`: SO_LINGER 0, set before ``listen``
    so that no connection the kernel completes is without it, and inherited, which saves a
    system call per client."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            _tune(sock)  # accepted connections inherit the options: no syscalls per client
            if reset_accepted:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            return Listener(sock, resets=reset_accepted)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        where = format_address(host, port)
        raise TransportError(f"cannot listen on {where}: {describe_os_error(exc)}") from None


def inherited_listener(fd: int) -> Listener:
    """The listening TCP socket a parent process handed down as descriptor ``fd``."""
    try:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return Listener(sock)
    except OSError as exc:
        why = describe_os_error(exc)
        raise TransportError(f"cannot use listening descriptor {fd}: {why}") from None


class Listener:
    """A listening TCP socket; ``address`` is the one it is bound to."""

    def __init__(self, sock: socket.socket, *, resets: bool = False) -> None:
        self._sock = sock
        self.address = Address(*sock.getsockname()[:2])
        self._resets = resets  # its accepted connections inherit SO_LINGER 0

    def close(self) -> None:
        self._sock.close()

    def fileno(self) -> int:
        """The descriptor, to hand down to a child process (which may accept on it too)."""
        return self._sock.fileno()

    async def accept_forever(
        self,
        handle: Callable[[SocketStream, str], None],
        on_error: Callable[[TransportError], None],
    ) -> None:
        """Pass each connection (stream, peer) to ``handle`` (which must not raise) until
        cancelled; on an error (EMFILE) tell ``on_error`` and pause. In a reader
        callback: a cancelled ``sock_accept`` could accept and drop a connection."""
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
                handle(SocketStream(sock, resets=self._resets), format_address(addr[0], addr[1]))

        loop.add_reader(fd, on_readable)
        try:
            await loop.create_future()  # until cancelled
        finally:
            if resume is not None:
                resume.cancel()
            loop.remove_reader(fd)
