"""The echo service of the bench: ``python bench/echo.py [--port N]``.

An asyncio Protocol on uvloop that writes back whatever it reads and closes
when the peer half-closes. It listens on 127.0.0.1 with a large backlog,
raises its own RLIMIT_NOFILE, and prints ``listening on PORT`` once ready.
It holds tens of thousands of connections in one process; per byte it does
one ``write`` per ``read``, so it is never the bottleneck of a tunnel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal
from typing import cast

import uvloop

BACKLOG = 65535


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        pass


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=BACKLOG, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on {bound}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
