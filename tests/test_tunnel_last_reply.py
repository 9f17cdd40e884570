"""The last bytes before a reset get through the tunnel, then the reset: a
service's error reply before the RST of its close on unread input, a client's
final message before its RST, and a service's answer, FIN and RST, in order.
Each check runs over direct TCP too, which shows what the kernel delivers."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import socket
import struct
import termios
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from kit.clients import read_until_end, send_until_reset_trials
from kit.services import ERROR_REPLY, ErrorThenCloseHandler, tcp_service
from kit.tunnels import OpenAgent, OpenGateway
from kit.waiting import DEADLINE

from tunnelgate import relay

pytestmark = pytest.mark.timeout(60)

TRIALS = 100
LARGE_TRIALS = 50
LARGE_DIRECT_TRIALS = 10  # direct TCP needs the slow reader to make room: slower
ORDER_TRIALS = 50
SMALL_MESSAGE = 100
LARGE_MESSAGE = 1 << 20
SLOW_READ = 16 * 1024  # a slow service reads this much, then pauses
SLOW_PAUSE = 0.001
GREETING = b"+READY say your last words\r\n"
ANSWER = b"+OK here is the answer, and then goodbye\r\n"
ACK = b"got it"
NO_HEARTBEAT_SOON = {"heartbeat_interval": 60.0, "heartbeat_timeout": 120.0}
_LINGER_RESET = struct.pack("ii", 1, 0)


async def expose(
    open_gateway: OpenGateway, open_agent: OpenAgent, port: int, **options: float
) -> int:
    """A gateway and an agent exposing 127.0.0.1:``port``; the public port."""
    gateway = await open_gateway(**options)
    agent = await open_agent(gateway, expose=[f"0:127.0.0.1:{port}"])
    (service,) = (await agent.wait_ready(10)).values()
    return service.address.port


@contextlib.contextmanager
def listener() -> Iterator[socket.socket]:
    """A listening socket on loopback port 0, for a service that accepts one
    connection per trial (such trials run one after another)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.settimeout(DEADLINE)
        yield sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


# --- the service answers an error and closes on unread input --------------------


async def test_direct_tcp_client_reads_the_error_reply_then_the_reset() -> None:
    """Over direct TCP a client still writing gets the service's error line, then the reset."""
    with tcp_service(ErrorThenCloseHandler) as port:
        outcomes = await asyncio.to_thread(send_until_reset_trials, port, TRIALS)
    assert outcomes == {(ERROR_REPLY, "reset"): TRIALS}


async def test_service_error_reply_before_its_reset_reaches_the_client(
    open_gateway: OpenGateway, open_agent: OpenAgent
) -> None:
    """A service that answers an error and closes on unread input: the client still
    writing reads the error line, then the reset, as over direct TCP."""
    with tcp_service(ErrorThenCloseHandler) as port:
        public_port = await expose(open_gateway, open_agent, port)
        outcomes = await asyncio.to_thread(send_until_reset_trials, public_port, TRIALS)
    assert outcomes == {(ERROR_REPLY, "reset"): TRIALS}


# --- the client sends a final message and resets ---------------------------------


def unacknowledged(sock: socket.socket) -> int:
    """Bytes in ``sock``'s send queue that its peer has not acknowledged (SIOCOUTQ)."""
    queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", queued)[0])


def send_then_reset(port: int, message: bytes, gone: threading.Event) -> None:
    """Read the service's ``GREETING`` (so the connection is through), send
    ``message``, and once the peer has acknowledged every byte, reset."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
            greeting = bytearray()
            while len(greeting) < len(GREETING) and (chunk := sock.recv(len(GREETING))):
                greeting += chunk
            assert greeting == GREETING
            sock.sendall(message)
            deadline = time.monotonic() + DEADLINE
            while unacknowledged(sock):
                assert time.monotonic() < deadline, "the message was never acknowledged"
                time.sleep(0.001)  # polling interval under a deadline
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    finally:
        gone.set()


def read_until_gone(service: socket.socket, gone: threading.Event, slow: bool) -> tuple[bytes, str]:
    """Accept one connection, send ``GREETING`` and read to the end: what was read
    and how it ended. ``slow``: ``SLOW_READ`` bytes at a time, pausing between
    reads, until the client has reset."""
    try:
        conn, _ = service.accept()
    except TimeoutError:
        return b"", "no connection"
    with conn:
        received = bytearray()
        conn.settimeout(DEADLINE)
        conn.sendall(GREETING)
        while slow and not gone.is_set():
            try:
                chunk = conn.recv(SLOW_READ)
            except TimeoutError:
                return bytes(received), "timeout"
            except OSError:
                return bytes(received), "reset"
            if not chunk:
                return bytes(received), "eof"
            received += chunk
            gone.wait(SLOW_PAUSE)
        how = read_until_end(conn, received, DEADLINE)
        return bytes(received), how


async def final_message_trials(
    service: socket.socket, port: int, size: int, trials: int
) -> Counter[tuple[str, str]]:
    """Clients, one after another, each sending ``size`` random bytes and
    resetting: how many bytes of its message the service read (all: "whole
    message") and how its end looked, counted."""
    outcomes: Counter[tuple[str, str]] = Counter()
    for _ in range(trials):
        message = os.urandom(size)
        gone = threading.Event()
        (received, how), _ = await asyncio.gather(
            asyncio.to_thread(read_until_gone, service, gone, slow=size > SMALL_MESSAGE),
            asyncio.to_thread(send_then_reset, port, message, gone),
        )
        what = "whole message" if received == message else f"{len(received)} of {size} bytes"
        outcomes[(what, how)] += 1
    return outcomes


def sizes(large_trials: int) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        ("size", "trials"),
        [(SMALL_MESSAGE, TRIALS), (LARGE_MESSAGE, large_trials)],
        ids=["small", "1MiB-slow-reader"],
    )


@sizes(LARGE_DIRECT_TRIALS)
async def test_direct_tcp_service_reads_the_final_message_then_the_reset(
    size: int, trials: int
) -> None:
    """Over direct TCP a service reads a client's whole last message, then its reset."""
    with listener() as service:
        outcomes = await final_message_trials(service, port_of(service), size, trials)
    assert outcomes == {("whole message", "reset"): trials}


@sizes(LARGE_TRIALS)
async def test_client_final_message_before_its_reset_reaches_the_service(
    open_gateway: OpenGateway, open_agent: OpenAgent, size: int, trials: int
) -> None:
    """A client that sends a last message and resets: the service reads all of it,
    even slowly, then the reset, as over direct TCP."""
    with listener() as service:
        public_port = await expose(open_gateway, open_agent, port_of(service))
        outcomes = await final_message_trials(service, public_port, size, trials)
    assert outcomes == {("whole message", "reset"): trials}


# --- the service answers, half-closes, then resets --------------------------------


def answer_then_reset(service: socket.socket) -> bytes:
    """Accept one connection: send ``ANSWER`` and a FIN, read the client's ``ACK``
    (sent once it saw the end), then reset; returns what it read."""
    try:
        conn, _ = service.accept()
    except TimeoutError:
        return b"(no connection)"
    with conn:
        conn.settimeout(DEADLINE)
        received = bytearray()
        with contextlib.suppress(OSError):
            conn.sendall(ANSWER)
            conn.shutdown(socket.SHUT_WR)
            while len(received) < len(ACK) and (chunk := conn.recv(len(ACK) - len(received))):
                received += chunk
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    return bytes(received)


def read_answer_end_then_reset(port: int) -> tuple[bytes, str, str]:
    """Read to the end, send ``ACK``, then wait for the reset: returns what was
    read, how the read ended, and what came after the ``ACK``."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        received = bytearray()
        how = read_until_end(sock, received, DEADLINE)
        if how != "eof":
            return bytes(received), how, "-"
        try:
            sock.sendall(ACK)
        except OSError as exc:
            return bytes(received), how, f"{exc!r} on sending the ack"
        # A read at EOF returns EOF again, never the error behind it: wait for
        # the error (or the full hang-up that comes with it), then send.
        hangup = select.poll()
        hangup.register(sock, select.POLLERR | select.POLLHUP)
        if not hangup.poll(DEADLINE * 1000):
            return bytes(received), how, "no reset"
        try:
            sock.send(b"?")
        except (ConnectionResetError, BrokenPipeError):
            # Linux reports an RST that came after the peer's FIN as EPIPE.
            return bytes(received), how, "reset"
        except OSError as exc:
            return bytes(received), how, repr(exc)
        return bytes(received), how, "no error"


ANSWER_EOF_RESET = (ANSWER, "eof", "reset", ACK)


async def answer_trials(
    service: socket.socket, port: int
) -> Counter[tuple[bytes, str, str, bytes]]:
    """Clients, one after another, each against a service that answers,
    half-closes and resets: (what the client read, how its read ended, what
    came after its ACK, what the service read), counted. Stops at the first
    trial that went otherwise."""
    outcomes: Counter[tuple[bytes, str, str, bytes]] = Counter()
    for _ in range(ORDER_TRIALS):
        acked, (received, how, after) = await asyncio.gather(
            asyncio.to_thread(answer_then_reset, service),
            asyncio.to_thread(read_answer_end_then_reset, port),
        )
        outcomes[(received, how, after, acked)] += 1
        if (received, how, after, acked) != ANSWER_EOF_RESET:
            break
    return outcomes


async def test_direct_tcp_client_sees_answer_end_then_reset() -> None:
    """Over direct TCP a client reads the answer, then EOF, then the service's reset."""
    with listener() as service:
        outcomes = await answer_trials(service, port_of(service))
    assert outcomes == {ANSWER_EOF_RESET: ORDER_TRIALS}


async def test_service_answer_end_then_reset_reach_the_client_in_order(
    open_gateway: OpenGateway, open_agent: OpenAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service that answers, half-closes, then resets: the client reads the answer,
    then EOF, then gets the reset, as over direct TCP. Neither a heartbeat nor the
    agent giving up on its ABORT being read brings that reset: both are far off."""
    # The agent, having sent ABORT, waits up to ABORT_TIMEOUT for the gateway to
    # read it before resetting the channel, which would reset the client too:
    # made endless, only the gateway reading that ABORT after END resets the client.
    monkeypatch.setattr(relay, "ABORT_TIMEOUT", 3600.0)
    with listener() as service:
        public_port = await expose(open_gateway, open_agent, port_of(service), **NO_HEARTBEAT_SOON)
        outcomes = await answer_trials(service, public_port)
    assert outcomes == {ANSWER_EOF_RESET: ORDER_TRIALS}
