"""Local services for a tunnel to expose, always on loopback port 0: an asyncio
server running a handler per connection (echo, a banner), and threaded ones
for the tests of real processes (echo, and a service that answers an error
and resets, as Redis does on a protocol error)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import threading
from collections.abc import Awaitable, Callable, Iterator

from kit.waiting import DEADLINE
from tunnelgate import Address

READ_SIZE = 1 << 20

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class LocalServer:
    """An asyncio TCP server on loopback running ``handler`` per connection.

    Handler errors from the network (resets, broken pipes, early EOF) end the
    connection quietly; every connection is closed when the server stops.
    """

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.host = host
        self.requested_port = port
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)

    @property
    def local(self) -> str:
        """The ``LOCAL_HOST:LOCAL_PORT`` part of an ``--expose`` spec."""
        return str(self.address)

    async def __aenter__(self) -> LocalServer:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.requested_port, backlog=1024, limit=READ_SIZE
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        except RuntimeError:
            # uvloop raises RuntimeError ("the handler is closed"), not
            # OSError, on a write to a transport already closed by a reset.
            if not writer.is_closing():
                raise
        except asyncio.CancelledError:
            # Stopped by __aexit__. Returning normally matters on Python 3.11,
            # whose stream callback calls task.exception() on a cancelled task.
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo everything; half-close after the peer did."""
    while data := await reader.read(READ_SIZE):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


def banner_handler(banner: bytes) -> Handler:
    """Send ``banner`` and close."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        await writer.drain()

    return handle


# --- threaded services, outside the test's event loop -------------------------


@contextlib.contextmanager
def tcp_service(handler: type[socketserver.BaseRequestHandler]) -> Iterator[int]:
    """A threaded TCP server on loopback port 0 in this process; yields its port."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(DEADLINE)


class EchoHandler(socketserver.BaseRequestHandler):
    """A threaded service that echoes until the peer ends, for the tests of
    real processes (``socketserver``, so the test's own loop is not involved)."""

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(262144):
                self.request.sendall(data)


ERROR_REPLY = b"-ERR Protocol error: unexpected input\r\n"


class ErrorThenCloseHandler(socketserver.BaseRequestHandler):
    """A service refusing its client's input, as Redis does on a protocol error:
    it reads 16 bytes, answers one error line and closes while more input
    waits unread, so that its kernel ends the connection with an RST."""

    def handle(self) -> None:
        sock = self.request
        sock.settimeout(DEADLINE)
        with contextlib.suppress(OSError):
            received = 0
            while received < 16 and (chunk := sock.recv(16 - received)):
                received += len(chunk)
            sock.recv(1, socket.MSG_PEEK)  # more input is there, and it stays unread
            sock.sendall(ERROR_REPLY)
        sock.close()
