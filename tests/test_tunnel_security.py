"""The whole tunnel against hostile or mistaken peers: bad input on the control
port, wrong tokens, wrong certificates, and ports an agent may not have."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from kit.clients import client_hello, connect, echo_roundtrip, next_event
from kit.logs import LogRecorder
from kit.ports import port_range_spec, unassigned_ports
from kit.services import LocalServer, banner_handler
from kit.tokens import OTHER_TOKEN, TOKEN
from kit.tunnels import OpenAgent, OpenGateway, StartServer, Tunnel
from kit.waiting import LONGER_THAN_ANY_TEST, wait_until

from tunnelgate import Address, credentials
from tunnelgate.errors import (
    AuthenticationError,
    ConfigError,
    PeerVerificationError,
    TunnelgateError,
)
from tunnelgate.protocol import wire as p

pytestmark = pytest.mark.timeout(60)


HANDSHAKE_TIMEOUT = 1.0
CLOSE_DEADLINE = 5.0  # the wait for a bad connection to be closed


# --- bad input on the control port ---------------------------------------------


def insecure_client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


OVERSIZED_HEADER = bytes([p.KIND_MESSAGE, 0xFF, 0xFF, 0xFF])
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: gateway\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n"

# name: (gateway mode, speak TLS to it?, bytes to send or None for silence)
BAD_INPUTS: dict[str, tuple[str, bool, bytes | None]] = {
    "garbage": ("plain", False, b"\xee" + os.urandom(4095)),
    "http_request": ("plain", False, HTTP_REQUEST),
    "tls_client_hello_on_plain": ("plain", False, client_hello()),
    "tls_client_on_plain": ("plain", True, b"hello"),
    "plain_bytes_on_tls": ("tls", False, HTTP_REQUEST),
    "silence_plain": ("plain", False, None),
    "silence_tls": ("tls", False, None),
    "silence_after_tls_handshake": ("tls", True, None),
    "oversized_frame_plain": ("plain", False, OVERSIZED_HEADER),
    "oversized_frame_in_tls": ("tls", True, OVERSIZED_HEADER),
    "unknown_frame_kind": ("plain", False, bytes([0x7F, 0, 0, 1, 0])),
    "data_frame_before_hello": ("plain", False, bytes([p.KIND_DATA, 0, 0, 3]) + b"abc"),
    "message_out_of_order": ("plain", False, p.encode_message(p.Ping(1))),
    "half_frame_then_silence": ("plain", False, bytes([p.KIND_MESSAGE, 0, 0, 100]) + b"x" * 10),
}


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the gateway sends until it closes (EOF or reset)."""
    received = bytearray()
    try:
        while data := await reader.read(65536):
            received += data
    except (OSError, asyncio.IncompleteReadError):
        pass
    return bytes(received)


async def send_and_wait_closed(address: Address, speak_tls: bool, data: bytes | None) -> None:
    """Connect, send ``data`` (if any), and read until the gateway closes."""
    options: dict[str, Any] = {}
    if speak_tls:
        options = {"ssl": insecure_client_context(), "server_hostname": "tunnelgate"}
    try:
        async with connect(address, **options) as (reader, writer):
            if data is not None:
                writer.write(data)
                await writer.drain()
            await read_until_closed(reader)
    except ssl.SSLError:
        pass  # our own TLS gave up on a gateway that does not speak it


@pytest.mark.parametrize(
    ("case", "mode"), [(case, spec[0]) for case, spec in BAD_INPUTS.items()], ids=list(BAD_INPUTS)
)
async def test_control_port_bad_input_closed_tunnel_unharmed(
    case: str,
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
) -> None:
    """Bad input on the control port is closed (silence by the handshake deadline,
    anything else at once); the tunnel keeps working."""
    _, speak_tls, data = BAD_INPUTS[case]
    waits_for_timeout = data is None or case.startswith("half")
    # Where the input itself is the fault, the handshake deadline never comes
    # while the test runs: being closed at all shows the gateway refused the input.
    handshake_timeout = HANDSHAKE_TIMEOUT if waits_for_timeout else LONGER_THAN_ANY_TEST
    gateway = await open_gateway(handshake_timeout=handshake_timeout)
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    (service,) = (await agent.wait_ready(10)).values()
    assert gateway.address is not None

    async with asyncio.timeout(CLOSE_DEADLINE):
        await send_and_wait_closed(gateway.address, speak_tls, data)

    await echo_roundtrip(service.address)
    assert gateway.sessions() == {"site-a": [service.address]}


@pytest.mark.parametrize("mode", ["plain"])
async def test_control_port_wrong_version_refused_with_reason(echo_tunnel: Tunnel) -> None:
    """An agent speaking another protocol version is told so, then closed."""
    address = echo_tunnel.gateway.address
    assert address is not None
    hello = p.Hello(p.PROTOCOL_VERSION + 1, "control", "future-agent", b"x" * 32)
    async with asyncio.timeout(5), connect(address) as (reader, writer):
        writer.write(p.encode_message(hello))
        await writer.drain()
        received = await read_until_closed(reader)
    events = list(p.FrameDecoder().feed(received))
    assert isinstance(events[0], p.Challenge)
    assert len(events) == 2
    assert isinstance(events[1], p.Refused)
    assert events[1].code == "version"
    await echo_roundtrip(echo_tunnel.address)


@pytest.mark.parametrize("mode", ["plain"])
async def test_control_port_data_channel_for_unknown_session_closed(
    echo_tunnel: Tunnel,
) -> None:
    """An authenticated data channel for an unknown session is refused and closed."""
    address = echo_tunnel.gateway.address
    assert address is not None
    async with asyncio.timeout(5), connect(address) as (reader, writer):
        decoder = p.FrameDecoder()
        challenge = await next_event(reader, decoder)
        assert isinstance(challenge, p.Challenge)
        session = "deadbeef"
        proof = credentials.proof_for(TOKEN.encode(), challenge.nonce, "data", "site-a", session)
        writer.write(
            p.encode_message(p.Hello(p.PROTOCOL_VERSION, "data", "site-a", proof, session))
        )
        await writer.drain()
        answers = list(decoder.feed(await read_until_closed(reader)))
    assert all(isinstance(m, p.Refused) and m.code == "session" for m in answers), answers
    await echo_roundtrip(echo_tunnel.address)
    assert list(echo_tunnel.gateway.sessions()) == ["site-a"]


async def test_control_port_slow_handshakes_do_not_block_agents(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
) -> None:
    """Fifty stalled handshakes do not delay a real agent's handshake."""
    # They never time out while the test runs: the agent cannot be waiting for them.
    gateway = await open_gateway(handshake_timeout=LONGER_THAN_ANY_TEST)
    assert gateway.address is not None
    sockets = []
    try:
        for _ in range(50):
            sock = socket.create_connection((gateway.address.host, gateway.address.port))
            sockets.append(sock)
        agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
        (service,) = (await agent.wait_ready(10)).values()
        await echo_roundtrip(service.address)
    finally:
        for sock in sockets:
            sock.close()


# --- authentication -----------------------------------------------------------


async def test_auth_wrong_token_fails_and_opens_no_port(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    tunnel_debug_log: LogRecorder,
) -> None:
    """A wrong token is fatal for the agent, opens no port, and no token is ever logged."""
    gateway = await open_gateway()
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"], token=OTHER_TOKEN)
    with pytest.raises(AuthenticationError) as caught:
        await agent.wait_ready(10)
    assert not isinstance(caught.value, PeerVerificationError)
    with pytest.raises(AuthenticationError):
        await agent.run_until_stopped()
    assert gateway.sessions() == {}
    assert tunnel_debug_log.find("authentication failed", level=0)
    for line in tunnel_debug_log.messages(level=0):
        assert TOKEN not in line
        assert OTHER_TOKEN not in line


async def test_auth_per_agent_tokens_bind_names(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
) -> None:
    """With per-agent tokens, an agent must use its own name's token."""
    gateway = await open_gateway(
        token=None,
        agents=[
            {"name": "site-a", "token": TOKEN},
            {"name": "site-b", "token": OTHER_TOKEN},
        ],
    )
    impostor = await open_agent(
        gateway, expose=[f"0:{echo_server.local}"], name="site-a", token=OTHER_TOKEN
    )
    with pytest.raises(AuthenticationError):
        await impostor.wait_ready(10)
    site_b = await open_agent(
        gateway, expose=[f"0:{echo_server.local}"], name="site-b", token=OTHER_TOKEN
    )
    (service,) = (await site_b.wait_ready(10)).values()
    await echo_roundtrip(service.address)
    assert list(gateway.sessions()) == ["site-b"]


# --- certificates -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tls"])
async def test_tls_fingerprint_mismatch_names_both(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
) -> None:
    """A pinned fingerprint mismatch is refused, naming the expected and seen ones."""
    gateway = await open_gateway()
    assert gateway.fingerprint is not None
    wrong = "SHA256:" + "AB" * 32
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"], fingerprint=wrong)
    with pytest.raises(PeerVerificationError) as caught:
        await agent.wait_ready(10)
    assert caught.value.expected == wrong
    assert caught.value.seen == gateway.fingerprint
    assert wrong in str(caught.value)
    assert gateway.fingerprint in str(caught.value)
    assert gateway.sessions() == {}


@pytest.mark.parametrize("mode", ["tls"])
async def test_tls_data_channels_resume_the_control_session_and_stay_pinned(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    tunnel_debug_log: LogRecorder,
) -> None:
    """Data channels resume the control channel's TLS session (a fresh key
    exchange, but no certificate signature), and the pin is checked on each."""
    gateway = await open_gateway()
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"], pool_size=2)
    (service,) = (await agent.wait_ready(10)).values()
    for _ in range(3):
        await echo_roundtrip(service.address)
    await wait_until(
        lambda: tunnel_debug_log.find("data channel: TLS session resumed", logging.DEBUG),
        what="a data channel that resumed the session",
    )
    assert not tunnel_debug_log.find("data channel: TLS session new", logging.DEBUG)


@pytest.fixture
def gateway_ca(tmp_path: Path) -> tuple[trustme.CA, dict[str, str]]:
    """A CA, and gateway options with a certificate it issued for "localhost"."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert, key = tmp_path / "gateway.pem", tmp_path / "gateway.key"
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    leaf.private_key_pem.write_to_path(str(key))
    return ca, {"cert": str(cert), "key": str(key)}


def write_ca(ca: trustme.CA, path: Path) -> str:
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.mark.parametrize("mode", ["tls"])
async def test_tls_ca_verified_gateway_accepted(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    gateway_ca: tuple[trustme.CA, dict[str, str]],
    tmp_path: Path,
) -> None:
    """An agent trusting the gateway certificate's CA connects by name and carries bytes."""
    ca, cert_options = gateway_ca
    gateway = await open_gateway(**cert_options)
    assert gateway.address is not None
    agent = await open_agent(
        gateway,
        via=f"localhost:{gateway.address.port}",
        expose=[f"0:{echo_server.local}"],
        fingerprint=None,
        ca=write_ca(ca, tmp_path / "ca.pem"),
    )
    (service,) = (await agent.wait_ready(10)).values()
    await echo_roundtrip(service.address)


@pytest.mark.parametrize("mode", ["tls"])
@pytest.mark.parametrize("mistake", ["other_ca", "wrong_name", "system_store"])
async def test_tls_unverifiable_gateway_refused(
    mistake: str,
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    gateway_ca: tuple[trustme.CA, dict[str, str]],
    tmp_path: Path,
) -> None:
    """A certificate from another CA, for another name, or unknown is refused, fatally."""
    ca, cert_options = gateway_ca
    gateway = await open_gateway(**cert_options)
    assert gateway.address is not None
    host = "127.0.0.1" if mistake == "wrong_name" else "localhost"
    options: dict[str, Any] = {"fingerprint": None}
    if mistake == "other_ca":
        options["ca"] = write_ca(trustme.CA(), tmp_path / "other-ca.pem")
    elif mistake == "wrong_name":
        options["ca"] = write_ca(ca, tmp_path / "ca.pem")
    agent = await open_agent(
        gateway, via=f"{host}:{gateway.address.port}", expose=[f"0:{echo_server.local}"], **options
    )
    with pytest.raises(PeerVerificationError):
        await agent.wait_ready(10)
    assert gateway.sessions() == {}


# --- which ports an agent may have ----------------------------------------------


async def test_policy_port_taken_refused_other_service_works(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    tunnel_log: LogRecorder,
) -> None:
    """A service whose port another process holds is refused; the other one works."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        gateway = await open_gateway()
        agent = await open_agent(
            gateway,
            services=[
                {"name": "taken", "port": port, "local": echo_server.local},
                {"name": "free", "port": 0, "local": echo_server.local},
            ],
        )
        services = await agent.wait_ready(10)
        assert set(services) == {"free"}
        assert tunnel_log.find("service taken not exposed")
        await echo_roundtrip(services["free"].address)
        assert gateway.sessions() == {"site-a": [services["free"].address]}


async def test_policy_port_not_allowed_refused_other_service_works(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    tunnel_log: LogRecorder,
) -> None:
    """A service asking for a port outside allow_ports is refused; the other one works."""
    allowed = unassigned_ports(100)
    gateway = await open_gateway(allow_ports=port_range_spec(allowed))
    agent = await open_agent(
        gateway,
        services=[
            {"name": "denied", "port": allowed.stop, "local": echo_server.local},
            {"name": "allowed", "port": 0, "local": echo_server.local},
        ],
    )
    services = await agent.wait_ready(10)
    assert set(services) == {"allowed"}
    assert services["allowed"].address.port in allowed
    assert [m for m in tunnel_log.find("service denied not exposed") if "not allowed" in m]
    await echo_roundtrip(services["allowed"].address)


async def test_policy_port_zero_gets_allowed_port(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
) -> None:
    """With allow_ports restricted, a service asking for any port gets an allowed one."""
    allowed = unassigned_ports(100)  # never the kernel's pick: the gateway picks itself
    gateway = await open_gateway(allow_ports=port_range_spec(allowed))
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    (service,) = (await agent.wait_ready(10)).values()
    assert service.address.port in allowed
    await echo_roundtrip(service.address)


async def test_policy_bind_address_not_allowed_refused(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    tunnel_log: LogRecorder,
) -> None:
    """A service asking to bind a disallowed address is refused; the other one works."""
    gateway = await open_gateway()
    agent = await open_agent(
        gateway,
        services=[
            {"name": "everywhere", "bind": "0.0.0.0", "port": 0, "local": echo_server.local},
            {"name": "loopback", "port": 0, "local": echo_server.local},
        ],
    )
    services = await agent.wait_ready(10)
    assert set(services) == {"loopback"}
    assert [m for m in tunnel_log.find("service everywhere not exposed") if "bind" in m]
    await echo_roundtrip(services["loopback"].address)


async def test_policy_port_of_another_agent_refused(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    start_server: StartServer,
    tunnel_log: LogRecorder,
) -> None:
    """An agent cannot take a port another agent holds, nor learn who holds it;
    the holder keeps serving it."""
    first_service = await start_server(banner_handler(b"first"))
    second_service = await start_server(banner_handler(b"second"))
    gateway = await open_gateway()
    first = await open_agent(gateway, name="site-a", expose=[f"0:{first_service.local}"])
    (held,) = (await first.wait_ready(10)).values()
    port = held.address.port
    second = await open_agent(
        gateway,
        name="site-b",
        services=[
            {"name": "stolen", "port": port, "local": second_service.local},
            {"name": "own", "port": 0, "local": second_service.local},
        ],
    )
    services = await second.wait_ready(10)
    assert set(services) == {"own"}
    (refusal,) = tunnel_log.find("service stolen not exposed")
    assert f"port {port} is held by another agent" in refusal
    assert "site-a" not in refusal, "an agent does not learn the names of others"
    async with asyncio.timeout(5), connect(Address("127.0.0.1", port)) as (reader, _):
        assert await reader.read() == b"first"
    async with asyncio.timeout(5), connect(services["own"].address) as (reader, _):
        assert await reader.read() == b"second"
    await wait_until(lambda: set(gateway.sessions()) == {"site-a", "site-b"})


async def test_policy_per_agent_allowed_ports(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
) -> None:
    """Each agent may bind only the ports its own policy allows."""
    ports = unassigned_ports(200)
    ports_a, ports_b = ports[:100], ports[100:]
    gateway = await open_gateway(
        token=None,
        agents=[
            {"name": "site-a", "token": TOKEN, "allow_ports": [port_range_spec(ports_a)]},
            {"name": "site-b", "token": OTHER_TOKEN, "allow_ports": [port_range_spec(ports_b)]},
        ],
    )
    site_a = await open_agent(
        gateway,
        name="site-a",
        services=[
            {"name": "own", "port": 0, "local": echo_server.local},
            {"name": "other", "port": ports_b.start, "local": echo_server.local},
        ],
    )
    services = await site_a.wait_ready(10)
    assert set(services) == {"own"}
    assert services["own"].address.port in ports_a
    await echo_roundtrip(services["own"].address)


@pytest.mark.parametrize("mode", ["plain"])
async def test_agent_too_many_services_fails_fast(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
) -> None:
    """An agent with more services than the protocol carries fails fast, not forever."""
    gateway = await open_gateway()
    expose = [f"0:127.0.0.1:{port}" for port in range(20000, 20300)]
    try:
        agent = await open_agent(gateway, expose=expose)
    except ConfigError:
        return
    with pytest.raises(TunnelgateError):
        await agent.wait_ready(2)
