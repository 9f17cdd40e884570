"""Clients of a tunnel's public ports: asyncio connections for the in-process
tests (connect, an echo round trip, reading to the end and telling a reset
from a clean EOF) and blocking sockets for the tests of real processes
(an echo exchange, a client that writes until its connection is reset)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from kit.services import READ_SIZE
from kit.waiting import DEADLINE
from tunnelgate import Address
from tunnelgate.protocol import wire as p

# --- asyncio clients, in the test's own loop ----------------------------------


@contextlib.asynccontextmanager
async def connect(
    address: Address | tuple[str, int], **kwargs: Any
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection, closed on exit whatever happened to it."""
    host, port = (address.host, address.port) if isinstance(address, Address) else address
    reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE, **kwargs)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def next_event(reader: asyncio.StreamReader, decoder: p.FrameDecoder) -> p.Event | None:
    """The next event a raw control-port connection brings, or None when the
    peer closes first."""
    while data := await reader.read(READ_SIZE):
        if events := list(decoder.feed(data)):
            return events[0]
    return None


async def echo_roundtrip(address: Address, payload: bytes = b"ping through the tunnel") -> None:
    """Send ``payload`` to an echo service and check it comes back whole."""
    async with asyncio.timeout(5), connect(address) as (reader, writer):
        writer.write(payload)
        await writer.drain()
        assert await reader.readexactly(len(payload)) == payload


async def read_to_end(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read until the stream ends; return (bytes read, "eof" or "reset")."""
    total = 0
    try:
        while data := await reader.read(READ_SIZE):
            total += len(data)
    except OSError:
        return total, "reset"
    return total, "eof"


@dataclass(frozen=True)
class Payload:
    """A block of bytes to send, and its digest to check what arrived against."""

    data: bytes
    sha256: str

    @classmethod
    def random(cls, size: int) -> Payload:
        data = os.urandom(size)
        return cls(data, hashlib.sha256(data).hexdigest())


def client_hello() -> bytes:
    """The bytes of a real TLS ClientHello."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="tunnelgate")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --- blocking clients, for the tests of real processes ------------------------


def read_until_end(sock: socket.socket, received: bytearray, timeout: float) -> str:
    """Read into ``received`` until the connection ends: "reset", "eof" or "timeout"."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(262144)
        except TimeoutError:
            return "timeout"
        except OSError:
            return "reset"
        if not chunk:
            return "eof"
        received += chunk


def echo_exchange(
    port: int, payload: bytes, timeout: float = DEADLINE, host: str = "127.0.0.1"
) -> tuple[bytes, str]:
    """Send ``payload`` and EOF to an echo through ``host:port``; return what came back
    and how it ended ("eof", "reset", "timeout"). Raises ConnectionRefusedError."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        failed: list[OSError] = []

        def send() -> None:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                failed.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = bytearray()
        how = read_until_end(sock, received, timeout)
        sender.join(timeout)
        if failed and how == "eof":
            how = "reset"
        return bytes(received), how


WRITE_CHUNK = 64 * 1024
WRITE_LIMIT = 16 * 1024 * 1024  # a client that is never stopped gives up here


def send_until_reset(port: int, first: bytes = b"", timeout: float = DEADLINE) -> tuple[bytes, str]:
    """A client that writes ``first``, then zeros, until a write fails (or
    ``WRITE_LIMIT`` bytes went), then reads to the end. Returns what it read and
    how the connection ended: "reset" (a write or the read failed; Linux reports
    an RST to the first call after it, so the read may then see EOF), "eof" (no
    call failed) or "timeout"."""
    chunk = bytes(WRITE_CHUNK)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        write_failed = False
        try:
            sock.sendall(first)
            for _ in range(WRITE_LIMIT // WRITE_CHUNK):
                sock.sendall(chunk)
        except TimeoutError:
            return b"", "timeout"
        except OSError:  # ECONNRESET, or EPIPE once an earlier call took the reset
            write_failed = True
        received = bytearray()
        how = read_until_end(sock, received, timeout)
        return bytes(received), "reset" if write_failed and how == "eof" else how


def send_until_reset_trials(
    port: int, trials: int, first: bytes = b"", at_once: int = 4
) -> Counter[tuple[bytes, str]]:
    """What ``trials`` runs of :func:`send_until_reset` read and how each ended,
    counted; ``at_once`` clients at a time (fewer than a service's listen backlog)."""
    with ThreadPoolExecutor(at_once) as pool:
        return Counter(pool.map(lambda _: send_until_reset(port, first), range(trials)))


def echo_through(host: str, port: int, payload: bytes) -> None:
    """Send ``payload`` through ``host:port`` to an echo; fail unless all of it came back and
    the connection ended cleanly."""
    received, how = echo_exchange(port, payload, host=host)
    assert (received, how) == (payload, "eof"), f"{how} after {len(received)} bytes"


def http_json(url: str) -> tuple[int, Any]:
    """The status and the JSON body of a GET (an HTTP error too)."""
    try:
        with urllib.request.urlopen(url, timeout=DEADLINE) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
