"""The health check of a grouped service, as the agent runs it on an interval: a TCP connect
(the default), or an HTTP GET that must answer an expected status. Each check is bounded by a
timeout and reports why it failed, in words for the logs and the gateway's. The GET is a status
line read after a request line: a few lines of stdlib, no HTTP library loaded in the agent."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

from tunnelgate.address import format_address
from tunnelgate.config import ServiceConfig

MAX_STATUS_LINE: Final = 1024  # bytes of the answer's first line looked at, at most


async def check(service: ServiceConfig, timeout: float) -> str | None:
    """None if ``service`` passes its check now, else why not."""
    local = service.local
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(local.host, local.port)
            try:
                if service.health_check == "http":
                    return await _get(reader, writer, service)
                return None
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return f"{local} did not answer within {timeout:g} s"
    except OSError as exc:
        return f"cannot connect to {local}: {exc.strerror or exc}"


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, service: ServiceConfig
) -> str | None:
    path, host = service.health_path, format_address(service.local.host, service.local.port)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tunnelgate health check\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(request.encode())
    await writer.drain()
    try:
        line = (await reader.readline())[:MAX_STATUS_LINE]
    except ValueError:  # no end of line within the reader's limit
        return f"GET {path}: the answer's first line is too long"
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        shown = line[:80].decode("latin-1").strip() or "nothing"
        return f"GET {path}: not an HTTP answer ({shown!r})"
    if (status := int(parts[1])) != service.health_status:
        return f"GET {path} answered {status}, expected {service.health_status}"
    return None
