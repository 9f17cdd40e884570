"""``tunnelgate demo``: the whole tunnel in one process, on loopback: a small HTTP service, a
gateway with its self-signed TLS identity (in a temporary state directory), and an agent that pins
its fingerprint and exposes the service. It prints what to ``curl`` and runs until stopped.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import tempfile
from pathlib import Path

from tunnelgate.address import Address
from tunnelgate.agent import Agent
from tunnelgate.gateway import Gateway

DEMO_TOKEN_BYTES = 24
PREFERRED_CONTROL_PORT = 8080
PREFERRED_SERVICE_PORT = 3920
PREFERRED_ADMIN_PORT = 9090


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _http_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request on the connection with a short text page."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode("latin-1") if b" " in head else "/"
            peer = writer.get_extra_info("peername")
            body = (
                "Hello from the service behind tunnelgate!\n"
                f"You asked for {path}; the service saw the agent connect from {peer[0]}.\n"
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def run() -> None:
    from tunnelgate.admin.history import FILE_NAME
    from tunnelgate.admin.server import AdminServer  # the demo shows it; others load it on demand
    from tunnelgate.admin.sites import GatewaySite

    token = secrets.token_urlsafe(DEMO_TOKEN_BYTES)
    service = await asyncio.start_server(_http_service, "127.0.0.1", 0)
    service_port = service.sockets[0].getsockname()[1]
    control = PREFERRED_CONTROL_PORT if _free(PREFERRED_CONTROL_PORT) else 0
    public = PREFERRED_SERVICE_PORT if _free(PREFERRED_SERVICE_PORT) else 0
    admin_port = PREFERRED_ADMIN_PORT if _free(PREFERRED_ADMIN_PORT) else 0
    with tempfile.TemporaryDirectory(prefix="tunnelgate-demo-") as state_dir:
        async with (
            service,
            Gateway(listen=f"127.0.0.1:{control}", token=token, state_dir=state_dir) as gateway,
            Agent(
                gateway=str(gateway.address),
                token=token,
                fingerprint=gateway.fingerprint,
                name="demo-site",
                expose=[f"{public}:127.0.0.1:{service_port}"],
            ) as agent,
        ):
            (exposed,) = (await agent.wait_ready(10)).values()
            site = GatewaySite(gateway, history=Path(state_dir) / FILE_NAME)
            admin = AdminServer(site, Address("127.0.0.1", admin_port))
            await admin.start()
            print(
                "\ntunnelgate demo is running (Ctrl-C to stop):\n"
                f"  service  127.0.0.1:{service_port}  (built-in HTTP, private side)\n"
                f"  gateway  {gateway.address}  (TLS, {gateway.fingerprint})\n"
                f"  agent    exposes the service on the gateway at {exposed.address}\n"
                f"  admin    {admin.url}  (the dashboard; metrics and API there too)\n"
                f"\nTry it:\n  curl http://{exposed.address}/\n"
                f"  curl {admin.url}metrics\n  curl {admin.url}api/v1/connections\n",
                flush=True,
            )
            try:
                await agent.run_until_stopped()
            finally:
                await admin.close()
