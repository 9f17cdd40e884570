"""The PROXY protocol: the header itself, then services (ours, then nginx) that
see each client's real address through the tunnel.

First ``header`` and ``parse`` without sockets: exact bytes, round trips, every
prefix, malformed input. Then the tunnel in-process (plain and TLS) with a
small service that parses the header and echoes, its clients bound to chosen
loopback sources (127.0.0.2, 127.0.0.3). Last, nginx behind the real CLI,
skipped when nginx is missing unless ``TUNNELGATE_REQUIRE_TOOLS=1``.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import random
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kit.clients import connect, read_to_end, read_until_end
from kit.logs import LogRecorder
from kit.ports import start_listening
from kit.processes import Launch, Proc, require_tool, start_gateway
from kit.services import READ_SIZE, Handler
from kit.tokens import TOKEN, new_token
from kit.tunnels import OpenAgent, OpenGateway, StartServer
from kit.waiting import DEADLINE, wait_until

from tunnelgate import cli, proxy_protocol
from tunnelgate.errors import LocalProtocolError, RemoteProtocolError, TransportError
from tunnelgate.proxy_protocol import ProxyHeader, header, parse
from tunnelgate.transport import SocketStream

pytestmark = pytest.mark.timeout(60)

SIG = proxy_protocol.V2_SIGNATURE
V2_LOCAL = SIG + b"\x20\x00\x00\x00"
SOURCES = ("127.0.0.2", "127.0.0.3")  # loopback is all of 127.0.0.0/8
PAYLOAD = random.Random(7).randbytes(3 << 20)
WRITE_SIZE = 1 << 20
IPV4_BLOCK = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + b"\x00\x01\x00\x02"  # 10.0.0.1:1 -> 10.0.0.2:2
WORST_V1 = b"PROXY UNKNOWN " + b" ".join([b"ffff:" * 7 + b"ffff"] * 2) + b" 65535 65535\r\n"


# --- header -------------------------------------------------------------------

# fmt: off
HEADERS = [
    (1, "127.0.0.2:5555", "127.0.0.1:80", b"PROXY TCP4 127.0.0.2 127.0.0.1 5555 80\r\n"),
    (1, "[2001:db8::7]:65535", "[2001:db8::1]:443",
     b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 443\r\n"),
    (1, "[::ffff:203.0.113.9]:4000", "[::ffff:192.0.2.1]:443",
     b"PROXY TCP4 203.0.113.9 192.0.2.1 4000 443\r\n"),
    (1, "[::ffff:203.0.113.9]:4000", "192.0.2.1:443",
     b"PROXY TCP4 203.0.113.9 192.0.2.1 4000 443\r\n"),
    (1, "[::ffff:203.0.113.9]:4000", "[2001:db8::1]:443",
     b"PROXY TCP6 ::ffff:cb00:7109 2001:db8::1 4000 443\r\n"),
    (1, "[fe80::1%eth0]:1", "[fe80::2%eth0]:2", b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"),
    (2, "127.0.0.2:5555", "127.0.0.1:80",
     SIG + b"\x21\x11\x00\x0c" + bytes([127, 0, 0, 2, 127, 0, 0, 1]) + b"\x15\xb3\x00\x50"),
    (2, "[::1]:1", "[::2]:2",
     SIG + b"\x21\x21\x00\x24" + bytes(15) + b"\x01" + bytes(15) + b"\x02\x00\x01\x00\x02"),
    (2, "[::ffff:10.0.0.1]:1", "[::ffff:10.0.0.2]:2", SIG + b"\x21\x11\x00\x0c" + IPV4_BLOCK),
]
UNUSABLE = [
    ("127.0.0.2:5555", ""),  # from a gateway older than the server address
    ("", "127.0.0.1:80"), ("127.0.0.2:5555", "[::1]:80"), ("[::1]:5555", "127.0.0.1:80"),
    ("client.example:1", "127.0.0.1:80"), ("127.0.0.2", "127.0.0.1:80"),
    ("127.0.0.2:70000", "127.0.0.1:80"), ("127.0.0.2:080", "127.0.0.1:80"),
    ("::1:80", "[::1]:81"), ("[::1]", "[::1]:81"), ("127.0.0.2:-1", "127.0.0.1:80"),
]
# fmt: on


@pytest.mark.parametrize(("version", "client", "server", "expected"), HEADERS)
def test_header_bytes_follow_the_specification(
    version: int, client: str, server: str, expected: bytes
) -> None:
    """Exactly the specification's bytes; IPv4-mapped addresses become plain IPv4 when
    both addresses are (or map) IPv4, and IPv6 scope ids are left out."""
    assert header(version, client, server) == expected


@pytest.mark.parametrize(("client", "server"), UNUSABLE)
def test_header_without_usable_addresses_says_unknown(client: str, server: str) -> None:
    """A missing, unparsable or mixed-family address gives UNKNOWN (v1) or LOCAL (v2)."""
    assert header(1, client, server) == b"PROXY UNKNOWN\r\n"
    assert header(2, client, server) == V2_LOCAL


def test_header_refuses_an_unknown_version() -> None:
    """Asking for a version that does not exist is a bug of the caller."""
    with pytest.raises(LocalProtocolError, match="version 3"):
        header(3, "127.0.0.2:1", "127.0.0.1:2")


def test_header_longest_fits_the_specification() -> None:
    """The longest headers are within the specification's sizes (107, 232 bytes)."""
    widest = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
    assert len(header(1, widest, widest)) == 104 <= proxy_protocol.V1_MAX_SIZE
    assert len(header(2, widest, widest)) == 52 <= proxy_protocol.MAX_HEADER_SIZE


# --- parse --------------------------------------------------------------------

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
ipv4 = st.ip_addresses(v=4)
any_ip = st.one_of(
    ipv4, st.ip_addresses(v=6), ipv4.map(lambda a: ipaddress.IPv6Address(f"::ffff:{a}"))
)


def endpoint(address: IP, port: int) -> str:
    """``host:port`` as the gateway writes it."""
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def expected_header(
    version: int, source: IP, destination: IP, ports: tuple[int, int]
) -> ProxyHeader:
    """What the module's address rule promises for these two addresses."""
    source_v4, destination_v4 = (
        a.ipv4_mapped if isinstance(a, ipaddress.IPv6Address) else a for a in (source, destination)
    )
    if source_v4 is not None and destination_v4 is not None:
        return ProxyHeader(
            version, "inet", "stream", str(source_v4), ports[0], str(destination_v4), ports[1]
        )
    if source.version == destination.version == 6:
        return ProxyHeader(
            version, "inet6", "stream", str(source), ports[0], str(destination), ports[1]
        )
    return ProxyHeader(version, "unspec", local=version == 2)


@given(
    st.sampled_from([1, 2]),
    any_ip,
    any_ip,
    st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
    st.binary(max_size=32),
)
def test_parse_reads_back_what_header_wrote(
    version: int, source: IP, destination: IP, ports: tuple[int, int], after: bytes
) -> None:
    """Any two addresses, either version: parse gives back what the address rule
    promises and the header's length, whatever bytes follow it."""
    data = header(version, endpoint(source, ports[0]), endpoint(destination, ports[1]))
    assert parse(data + after) == (expected_header(version, source, destination, ports), len(data))


# fmt: off
VALID = [
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, "unspec")),
    (b"PROXY UNKNOWN 1.2.3.4 \xff anything\r\n", ProxyHeader(1, "unspec")),  # ignored
    (WORST_V1, ProxyHeader(1, "unspec")),
    (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
     ProxyHeader(1, "inet", "stream", "0.0.0.0", 0, "255.255.255.255", 65535)),
    (b"PROXY TCP6 2001:DB8:0:0:0:0:0:7 ::1 1 2\r\n",
     ProxyHeader(1, "inet6", "stream", "2001:db8::7", 1, "::1", 2)),
    (SIG + b"\x20\x11\x00\x0c" + IPV4_BLOCK, ProxyHeader(2, "unspec", local=True)),
    (SIG + b"\x21\x00\x00\x05" + b"12345", ProxyHeader(2, "unspec")),
    (SIG + b"\x21\x12\x00\x0c" + IPV4_BLOCK,
     ProxyHeader(2, "inet", "dgram", "10.0.0.1", 1, "10.0.0.2", 2)),
    (SIG + b"\x21\x11\x00\x13" + IPV4_BLOCK + b"\x04\x00\x00" + b"\xe0\x00\x01X",
     ProxyHeader(2, "inet", "stream", "10.0.0.1", 1, "10.0.0.2", 2,
                 tlvs=((4, b""), (0xE0, b"X")))),
    (SIG + b"\x21\x31\x00\xd8" + b"/run/a.sock".ljust(108, b"\0") + b"/b\0c".ljust(108, b"\0"),
     ProxyHeader(2, "unix", "stream", "/run/a.sock", 0, "/b", 0)),
]
MALFORMED = [
    (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
    (b"\r\n\r\n\x00\r\nQUIX", "not a PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),
    (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "CRLF"),
    (b"PROXY " + b"x" * 101, "without CRLF in 107 bytes"),
    (WORST_V1[:-2] + b"0\r\n", "without CRLF in 107 bytes"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "expected TCP4 or TCP6"),
    (b"PROXY UNKNOWNX\r\n", "2 fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "5 fields"),
    (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "7 fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "7 fields"),
    (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "not IPv4"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "not IPv4"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not IPv6"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not IPv6"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port '01'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "port '65536'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", r"port '\+1'"),
    (b"PROXY TCP4 1.2.3.\xc3\xa9 5.6.7.8 1 2\r\n", "not ASCII"),
    (SIG + b"\x11", "version and command 0x11"),
    (SIG + b"\x22", "version and command 0x22"),
    (SIG + b"\x21\x41", "family and protocol 0x41"),
    (SIG + b"\x21\x13", "family and protocol 0x13"),
    (SIG + b"\x21\x11\x00\x0b", "length 11 is too short for inet"),
    (SIG + b"\x21\x21\x00\x23", "length 35 is too short for inet6"),
    (SIG + b"\x21\x31\x00\xd7", "length 215 is too short for unix"),
    (SIG + b"\x21\x11\x00\x0e" + IPV4_BLOCK + b"\x01\x00", "TLV cut short"),
    (SIG + b"\x21\x11\x00\x10" + IPV4_BLOCK + b"\x01\x00\x02\x00", "TLV longer"),
]
# fmt: on


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_parse_accepts_what_the_specification_allows(data: bytes, expected: ProxyHeader) -> None:
    """UNKNOWN lines (their rest ignored), the longest v1 line, LOCAL with addresses to
    skip, UNSPEC, UDP, TLVs and UNIX paths are all read, with their exact length."""
    assert parse(data + b"GET /") == (expected, len(data))


@pytest.mark.parametrize("data", [d for _, _, _, d in HEADERS] + [d for d, _ in VALID], ids=repr)
def test_parse_waits_for_the_whole_header(data: bytes) -> None:
    """Every proper prefix of a valid header asks for more bytes, never fails."""
    for end in range(len(data)):
        assert parse(data[:end]) is None, data[:end]
    assert parse(data) is not None


@pytest.mark.parametrize(("data", "message"), MALFORMED, ids=repr)
def test_parse_rejects_malformed_headers_at_once(data: bytes, message: str) -> None:
    """Bytes that cannot start a valid header fail as soon as they arrive, with the reason."""
    with pytest.raises(RemoteProtocolError, match=message):
        parse(data)


def test_parse_enforces_the_v1_line_limit() -> None:
    """A v1 line may take 107 bytes with its CRLF, and no more."""
    assert len(WORST_V1) == proxy_protocol.V1_MAX_SIZE
    assert parse(WORST_V1[:-1]) is None
    with pytest.raises(RemoteProtocolError, match="107"):
        parse(WORST_V1[:-2] + b" \r\n")


@given(
    st.sampled_from([b"", SIG, SIG + b"\x21\x11", SIG + b"\x21\x21", b"PROXY ", b"PROXY TCP4 "]),
    st.binary(max_size=300),
)
def test_parse_any_bytes_gives_a_header_more_or_a_protocol_error(start: bytes, rest: bytes) -> None:
    """Whatever arrives, parse returns a header that is a prefix of it, asks for more,
    or raises RemoteProtocolError: nothing else escapes."""
    data = start + rest
    try:
        parsed = parse(data)
    except RemoteProtocolError:
        return
    if parsed is not None:
        _, size = parsed
        assert 0 < size <= len(data)
        assert parse(data[:size]) == parsed


# --- configuration at the command line ---------------------------------------


def test_cli_rejects_a_bad_proxy_protocol_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """``--proxy-protocol v3`` is a configuration error naming the flag (exit code 2)."""
    argv = ["agent", "--gateway", "127.0.0.1:1", "--token", TOKEN, "--expose", "0:127.0.0.1:1"]
    assert cli.main([*argv, "--proxy-protocol", "v3"]) == cli.EXIT_CONFIG
    assert "command line: --proxy-protocol: expected" in capsys.readouterr().err


# --- through the tunnel, in-process -------------------------------------------


@dataclass(frozen=True)
class Seen:
    """What a service received on one connection."""

    header: ProxyHeader | None
    size: int
    sha256: str


def recording_echo(seen: asyncio.Queue[Seen | Exception], *, with_header: bool) -> Handler:
    """A service that reads a PROXY header first (when told to), then echoes the rest,
    and reports what it got; a failure is reported too, to fail the test."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            found = None
            buffer = b""
            if with_header:
                while (parsed := parse(buffer)) is None:
                    chunk = await reader.read(READ_SIZE)
                    assert chunk, f"the connection ended before a whole header: {buffer!r}"
                    buffer += chunk
                found, size = parsed
                buffer = buffer[size:]
            digest, total = hashlib.sha256(), 0
            while True:
                if buffer:
                    digest.update(buffer)
                    total += len(buffer)
                    writer.write(buffer)
                    await writer.drain()
                buffer = await reader.read(READ_SIZE)
                if not buffer:
                    break
            writer.write_eof()
            seen.put_nowait(Seen(found, total, digest.hexdigest()))
        except Exception as exc:  # reported to the test, which fails with it
            seen.put_nowait(exc)

    return handle


async def next_seen(seen: asyncio.Queue[Seen | Exception]) -> Seen:
    async with asyncio.timeout(10):
        item = await seen.get()
    if isinstance(item, Exception):
        raise item
    return item


async def exchange(host: str, port: int, source: str) -> tuple[int, tuple[int, str]]:
    """Send PAYLOAD from ``source`` and read the echo to its end, both at once:
    (the client's port, (bytes echoed, their sha256))."""
    async with (
        asyncio.timeout(30),
        connect((host, port), local_addr=(source, 0)) as (
            reader,
            writer,
        ),
    ):
        client_port = writer.get_extra_info("sockname")[1]

        async def send() -> None:
            for offset in range(0, len(PAYLOAD), WRITE_SIZE):
                writer.write(PAYLOAD[offset : offset + WRITE_SIZE])
                await writer.drain()
            writer.write_eof()

        async def receive() -> tuple[int, str]:
            digest, total = hashlib.sha256(), 0
            while data := await reader.read(READ_SIZE):
                digest.update(data)
                total += len(data)
            return total, digest.hexdigest()

        async with asyncio.TaskGroup() as group:
            group.create_task(send())
            received = group.create_task(receive())
    return client_port, received.result()


SENT = (len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest())


def no_tracebacks(log: LogRecorder) -> None:
    broken = [log.format(r) for r in log.records if r.exc_info]
    assert not broken, "\n".join(broken)


async def wait_closing_lines(log: LogRecorder, client: str) -> list[str]:
    """The gateway's and the agent's closing lines for ``client``."""
    return list(
        await wait_until(
            lambda: len(lines := log.find(f"closed client={client} ")) == 2 and lines,
            what=f"the gateway's and the agent's closing lines for {client}",
        )
    )


@pytest.mark.parametrize("version", [1, 2])
async def test_service_sees_the_client_address_then_exactly_its_bytes(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    start_server: StartServer,
    tunnel_debug_log: LogRecorder,
    version: int,
) -> None:
    """A service with proxy_protocol gets a header naming the client's source address and
    port and the service's public port, then exactly the client's bytes (3 MiB each way,
    sha256); the header is not in the relay's byte counts."""
    seen: asyncio.Queue[Seen | Exception] = asyncio.Queue()
    server = await start_server(recording_echo(seen, with_header=True))
    gateway = await open_gateway()
    service = {"name": "web", "local": server.local, "proxy_protocol": f"v{version}"}
    agent = await open_agent(gateway, services=[service])
    public = (await agent.wait_ready(10))["web"].address
    for source in SOURCES:
        client_port, echoed = await exchange(public.host, public.port, source)
        assert echoed == SENT
        got = await next_seen(seen)
        assert got.header == ProxyHeader(
            version, "inet", "stream", source, client_port, public.host, public.port
        )
        assert (got.size, got.sha256) == SENT
        for line in await wait_closing_lines(tunnel_debug_log, f"{source}:{client_port}"):
            assert f" up={len(PAYLOAD)} down={len(PAYLOAD)} " in line, line
    sent = tunnel_debug_log.find(f"PROXY protocol v{version} header sent", logging.DEBUG)
    assert len(sent) == len(SOURCES), sent
    no_tracebacks(tunnel_debug_log)


async def test_service_without_proxy_protocol_gets_no_header(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    start_server: StartServer,
    tunnel_debug_log: LogRecorder,
) -> None:
    """The agent-wide proxy_protocol covers services without their own setting, and a
    service set to "none" gets the client's bytes alone, from the first byte."""
    with_header: asyncio.Queue[Seen | Exception] = asyncio.Queue()
    without: asyncio.Queue[Seen | Exception] = asyncio.Queue()
    aware = await start_server(recording_echo(with_header, with_header=True))
    plain = await start_server(recording_echo(without, with_header=False))
    gateway = await open_gateway()
    services = [
        {"name": "aware", "local": aware.local},
        {"name": "plain", "local": plain.local, "proxy_protocol": "none"},
    ]
    agent = await open_agent(gateway, services=services, proxy_protocol="v2")
    exposed = await agent.wait_ready(10)
    plain_public = exposed["plain"].address
    _, echoed = await exchange(plain_public.host, plain_public.port, SOURCES[0])
    assert echoed == SENT
    got = await next_seen(without)
    assert (got.header, got.size, got.sha256) == (None, *SENT)
    aware_public = exposed["aware"].address
    client_port, echoed = await exchange(aware_public.host, aware_public.port, SOURCES[1])
    assert echoed == SENT
    header_seen = (await next_seen(with_header)).header
    assert header_seen is not None and header_seen.version == 2
    assert (header_seen.source, header_seen.source_port) == (SOURCES[1], client_port)
    no_tracebacks(tunnel_debug_log)


@pytest.mark.parametrize("failure", ["reset", "stall"])
async def test_header_not_sent_ends_the_client_connection_with_a_reset(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    start_server: StartServer,
    tunnel_debug_log: LogRecorder,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    """When the header cannot be sent (an error, or no room within connect_timeout), the
    client is reset like after a failed connect, and the agent says why."""
    seen: asyncio.Queue[Seen | Exception] = asyncio.Queue()
    server = await start_server(recording_echo(seen, with_header=True))

    send = SocketStream.send

    async def failing_to_service(self: SocketStream, data: bytes | memoryview) -> None:
        if not self.peer_address().endswith(f":{server.port}"):
            return await send(self, data)  # the agent's own channels
        if failure == "reset":
            raise TransportError("connection reset by peer")
        await asyncio.Event().wait()  # a send that never completes

    monkeypatch.setattr(SocketStream, "send", failing_to_service)
    gateway = await open_gateway()
    agent = await open_agent(
        gateway, expose=[f"0:{server.local}"], proxy_protocol="v1", connect_timeout=0.2
    )
    public = next(iter((await agent.wait_ready(10)).values())).address
    async with asyncio.timeout(10), connect(public) as (reader, writer):
        writer.write(b"hello")
        assert await read_to_end(reader) == (0, "reset")
    why = "connection reset by peer" if failure == "reset" else "timed out after 0.2 s"
    reason = f"cannot send the PROXY protocol header to {server.local}: {why}"
    assert tunnel_debug_log.find(reason, logging.WARNING)
    async with asyncio.timeout(10):
        assert isinstance(await seen.get(), ConnectionResetError)  # the service's socket: reset
    no_tracebacks(tunnel_debug_log)


@pytest.fixture
def mapped_loopback(ipv6_loopback: None) -> None:
    """IPv4 clients reach an IPv6 socket bound to ::ffff:127.0.0.1 (not with bindv6only=1)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(("::ffff:127.0.0.1", 0))
    except OSError:
        pytest.skip("no IPv4-mapped IPv6 loopback")
    with open("/proc/sys/net/ipv6/bindv6only", encoding="ascii") as fh:
        if fh.read().strip() != "0":
            pytest.skip("net.ipv6.bindv6only is set: no IPv4 clients on IPv6 listeners")


@pytest.mark.usefixtures("ipv6_loopback")
@pytest.mark.parametrize("version", [1, 2])
async def test_ipv6_client_gets_a_tcp6_header(
    open_gateway: OpenGateway, open_agent: OpenAgent, start_server: StartServer, version: int
) -> None:
    """A service port on ::1 and a client from ::1: the header is TCP6 / AF_INET6."""
    seen: asyncio.Queue[Seen | Exception] = asyncio.Queue()
    server = await start_server(recording_echo(seen, with_header=True))
    gateway = await open_gateway(listen="[::1]:0")
    agent = await open_agent(gateway, expose=[f"0:{server.local}"], proxy_protocol=f"v{version}")
    public = next(iter((await agent.wait_ready(10)).values())).address
    assert public.host == "::1"
    client_port, echoed = await exchange("::1", public.port, "::1")
    assert echoed == SENT
    got = await next_seen(seen)
    assert got.header == ProxyHeader(
        version, "inet6", "stream", "::1", client_port, "::1", public.port
    )


@pytest.mark.usefixtures("mapped_loopback")
@pytest.mark.parametrize("version", [1, 2])
async def test_ipv4_client_of_an_ipv6_listener_gets_a_tcp4_header(
    open_gateway: OpenGateway, open_agent: OpenAgent, start_server: StartServer, version: int
) -> None:
    """A gateway listening on IPv6 sees an IPv4 client as ::ffff:a.b.c.d; the service
    still gets TCP4 / AF_INET with the plain IPv4 addresses."""
    seen: asyncio.Queue[Seen | Exception] = asyncio.Queue()
    server = await start_server(recording_echo(seen, with_header=True))
    gateway = await open_gateway(bind_host="[::ffff:127.0.0.1]")
    agent = await open_agent(gateway, expose=[f"0:{server.local}"], proxy_protocol=f"v{version}")
    public = next(iter((await agent.wait_ready(10)).values())).address
    assert public.host == "::ffff:127.0.0.1"
    client_port, echoed = await exchange("127.0.0.1", public.port, SOURCES[0])
    assert echoed == SENT
    got = await next_seen(seen)
    assert got.header == ProxyHeader(
        version, "inet", "stream", SOURCES[0], client_port, "127.0.0.1", public.port
    )


# --- nginx behind the real CLI ------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process off;
pid {root}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    default_type text/plain;
{temp_paths}
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{ return 200 "$proxy_protocol_addr $proxy_protocol_port\\n"; }}
    }}
}}
"""


@pytest.fixture
def nginx_port(launch_command: Launch, tmp_path: Path) -> int:
    """nginx, as this user, answering every request with the PROXY header's address."""
    nginx = require_tool("nginx")
    root = tmp_path / "nginx"
    root.mkdir()
    built = subprocess.run(
        [nginx, "-V"], capture_output=True, text=True, timeout=DEADLINE, check=False
    ).stderr
    temp_paths = [f"    client_body_temp_path {root}/body;"]
    for module in ("proxy", "fastcgi", "uwsgi", "scgi"):  # each only if built in
        if f"--without-http_{module}_module" not in built:
            temp_paths.append(f"    {module}_temp_path {root}/{module};")
    conf = root / "nginx.conf"

    def start(port: int) -> Proc:
        conf.write_text(
            NGINX_CONF.format(root=root, port=port, temp_paths="\n".join(temp_paths)),
            encoding="utf-8",
        )
        return launch_command(nginx, "-p", f"{root}/", "-e", "stderr", "-c", str(conf))

    _, port = start_listening(start)
    return port


def curl_from(source: str, port: int) -> tuple[str, int]:
    """GET / with curl from ``source``: nginx's answer, and curl's own port."""
    result = subprocess.run(
        [
            require_tool("curl"), "-sS", "--max-time", str(DEADLINE), "--interface", source,
            "-w", "%{local_port}", f"http://127.0.0.1:{port}/",
        ],
        capture_output=True, text=True, timeout=DEADLINE + 5, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result
    body, _, client_port = result.stdout.rpartition("\n")
    return body, int(client_port)


def get_from(source: str, port: int) -> tuple[str, int]:
    """GET / from a socket bound to ``source``: nginx's answer, and the socket's port."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0)
    ) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(b"GET / HTTP/1.0\r\nHost: tunnel\r\n\r\n")
        received = bytearray()
        assert read_until_end(sock, received, DEADLINE) == "eof"
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), received
    return body.decode().rstrip("\n"), client_port


@pytest.mark.parametrize(
    ("version", "configured_by", "client"),
    [("v1", "flag", curl_from), ("v2", "flag", curl_from), ("v2", "toml", get_from),
     ("v1", "toml", get_from)],
    ids=["v1-flag-curl", "v2-flag-curl", "v2-toml-socket", "v1-toml-socket"],
)  # fmt: skip
def test_nginx_sees_the_real_client_address(
    launch: Launch,
    nginx_port: int,
    tmp_path: Path,
    version: str,
    configured_by: str,
    client: Callable[[str, int], tuple[str, int]],
) -> None:
    """nginx behind ``tunnelgate agent`` (``--proxy-protocol`` or a [[services]] table)
    reports each client's own source address and port as $proxy_protocol_addr/port."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token)
    assert gateway.fingerprint is not None
    settings = ["--gateway", f"127.0.0.1:{gateway.port}", "--fingerprint", gateway.fingerprint]
    if configured_by == "flag":
        agent = launch(
            "agent", *settings, "--expose", f"0:127.0.0.1:{nginx_port}",
            "--proxy-protocol", version, token=token,
        )  # fmt: skip
    else:
        config = tmp_path / "agent.toml"
        config.write_text(
            f'[[services]]\nname = "nginx"\nlocal = "127.0.0.1:{nginx_port}"\n'
            f'proxy_protocol = "{version}"\n',
            encoding="utf-8",
        )
        agent = launch("agent", *settings, "--config", str(config), token=token)
    public_port = int(agent.wait_line(r"exposed at gateway port (\d+)").group(1))
    for source in SOURCES:
        answer, client_port = client(source, public_port)
        assert answer == f"{source} {client_port}"
