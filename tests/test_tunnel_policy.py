"""Many agents on one gateway: per-agent policies, token rotation and hashes,
access rules on service ports, authentication failure delays, and reload.

Real gateways and agents in this process, real sockets on loopback (clients
bind a chosen 127.0.0.x source to stand for distinct addresses), plain and TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

import pytest
from kit.clients import connect, echo_roundtrip, next_event
from kit.logs import LogRecorder
from kit.services import LocalServer
from kit.tokens import OTHER_TOKEN, TOKEN
from kit.tunnels import OpenAgent, OpenGateway
from kit.waiting import wait_until

from tunnelgate import Address, Gateway, credentials
from tunnelgate.config import load_gateway_config
from tunnelgate.errors import AuthenticationError
from tunnelgate.gateway.admission import AUTH_DELAY_FIRST, AUTH_SUSPECT_HANDSHAKES
from tunnelgate.gateway.session import ClientStatistics
from tunnelgate.protocol import wire as p

THIRD_TOKEN = "third-token-for-rotation-tests"


def hashed(token: str, name: str) -> str:
    """The ``token_hash`` line `tunnelgate token --name` prints."""
    return credentials.hash_line(credentials.derive(token.encode(), name).stored_key)


async def exchange_from(source: str, address: Address, payload: bytes = b"hello") -> bytes:
    """Send ``payload`` from ``source`` to an echo service; what came back
    (b"" if the connection was refused: reset or closed before answering).
    A connection left open without an answer fails the test."""
    try:
        async with (
            asyncio.timeout(5),
            connect(address, local_addr=(source, 0)) as (reader, writer),
        ):
            writer.write(payload)
            await writer.drain()
            return await reader.readexactly(len(payload))
    except TimeoutError:  # an OSError too: caught first
        pytest.fail(f"a client from {source} was neither answered nor closed")
    except (OSError, asyncio.IncompleteReadError):
        return b""


@contextlib.asynccontextmanager
async def held_open(source: str, address: Address) -> Any:
    """A client connection from ``source`` proven to be relayed (it echoed),
    kept open for the block."""
    async with connect(address, local_addr=(source, 0)) as (reader, writer):
        writer.write(b"held")
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.readexactly(4) == b"held"
        yield reader, writer


# --- policies ---------------------------------------------------------------


async def test_gateway_without_a_token_uses_the_one_stored_in_its_state_directory(
    open_gateway: OpenGateway, open_agent: OpenAgent, echo_server: LocalServer
) -> None:
    """An embedded Gateway given no token and no agents makes one in its state
    directory at start (as the command does), and accepts an agent holding it."""
    gateway = await open_gateway(token=None)
    assert gateway.stored_token is not None
    assert gateway.stored_token.stat().st_mode & 0o777 == 0o600
    token = gateway.stored_token.read_text(encoding="utf-8").strip()
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"], token=token)
    (service,) = (await agent.wait_ready(10)).values()
    await echo_roundtrip(service.address)


async def test_policy_several_tokens_any_of_them_works(
    open_gateway: OpenGateway, open_agent: OpenAgent, echo_server: LocalServer
) -> None:
    """A policy lists the old and the new token during a rotation (one in clear,
    one as a hash): an agent with either connects; a third token is refused."""
    gateway = await open_gateway(
        token=None,
        agents=[{"name": "site-a", "token": TOKEN, "token_hash": [hashed(OTHER_TOKEN, "site-a")]}],
    )
    for token in (TOKEN, OTHER_TOKEN):
        agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"], token=token)
        (service,) = (await agent.wait_ready(10)).values()
        await echo_roundtrip(service.address)
        await agent.aclose()
    stranger = await open_agent(gateway, expose=[f"0:{echo_server.local}"], token=THIRD_TOKEN)
    with pytest.raises(AuthenticationError, match="does not accept this token"):
        await stranger.wait_ready(10)


async def test_policy_token_hash_is_bound_to_its_agent_name(
    open_gateway: OpenGateway, open_agent: OpenAgent, echo_server: LocalServer
) -> None:
    """A hash made for one agent's name does not let the same token in under another name."""
    line = hashed(TOKEN, "site-a")
    gateway = await open_gateway(
        token=None,
        agents=[{"name": "site-a", "token_hash": line}, {"name": "site-b", "token_hash": line}],
    )
    site_b = await open_agent(gateway, expose=[f"0:{echo_server.local}"], name="site-b")
    with pytest.raises(AuthenticationError):
        await site_b.wait_ready(10)
    site_a = await open_agent(gateway, expose=[f"0:{echo_server.local}"], name="site-a")
    (service,) = (await site_a.wait_ready(10)).values()
    await echo_roundtrip(service.address)


async def test_policy_max_services_refuses_the_rest(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    tunnel_log: LogRecorder,
) -> None:
    """An agent may expose at most max_services; the others are refused with the reason."""
    gateway = await open_gateway(
        token=None, agents=[{"name": "site-a", "token": TOKEN, "max_services": 2}]
    )
    agent = await open_agent(
        gateway,
        services=[{"name": f"s{i}", "port": 0, "local": echo_server.local} for i in range(3)],
    )
    services = await agent.wait_ready(10)
    assert sorted(services) == ["s0", "s1"]
    assert tunnel_log.find("service s2 refused: this agent may expose at most 2 services")
    await echo_roundtrip(services["s1"].address)


async def test_policy_max_connections_per_agent(
    open_gateway: OpenGateway, open_agent: OpenAgent, echo_server: LocalServer
) -> None:
    """Beyond its policy's max_connections, an agent's new clients are reset;
    another agent on the same gateway is not affected."""
    gateway = await open_gateway(
        token=None,
        agents=[
            {"name": "site-a", "token": TOKEN, "max_connections": 2},
            {"name": "site-b", "token": OTHER_TOKEN},
        ],
    )
    site_a = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    site_b = await open_agent(
        gateway, expose=[f"0:{echo_server.local}"], name="site-b", token=OTHER_TOKEN
    )
    (a,) = (await site_a.wait_ready(10)).values()
    (b,) = (await site_b.wait_ready(10)).values()
    async with held_open("127.0.0.1", a.address), held_open("127.0.0.1", a.address):
        assert await exchange_from("127.0.0.1", a.address) == b""
        for _ in range(3):
            assert await exchange_from("127.0.0.1", b.address) == b"hello"
    await wait_until(lambda: not open_clients(gateway, site_a.session_id))
    assert await exchange_from("127.0.0.1", a.address) == b"hello"


@pytest.mark.parametrize("mode", ["plain"])
async def test_policy_allow_bind_per_agent(
    open_gateway: OpenGateway, open_agent: OpenAgent, echo_server: LocalServer
) -> None:
    """Each agent may bind only the addresses its policy allows."""
    gateway = await open_gateway(
        token=None,
        agents=[
            {"name": "site-a", "token": TOKEN, "allow_bind": ["127.0.0.2"]},
            {"name": "site-b", "token": OTHER_TOKEN},
        ],
    )
    spec = f"127.0.0.2:0:{echo_server.local}"
    site_a = await open_agent(gateway, expose=[spec])
    (service,) = (await site_a.wait_ready(10)).values()
    assert service.address.host == "127.0.0.2"
    await echo_roundtrip(service.address)
    site_b = await open_agent(gateway, expose=[spec], name="site-b", token=OTHER_TOKEN)
    assert await site_b.wait_ready(10) == {}


# --- access rules on service ports -----------------------------------------


async def test_access_deny_and_allow_name_the_rule(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    tunnel_log: LogRecorder,
) -> None:
    """A client in a deny list, or outside an allow list, is closed at once and
    logged with the rule; the others pass, whatever their order."""
    gateway = await open_gateway(
        token=None,
        access={"deny": ["127.0.0.9"]},
        agents=[
            {
                "name": "site-a",
                "token": TOKEN,
                "services": {"echo": {"allow": ["127.0.0.0/29"], "deny": ["127.0.0.2/32"]}},
            }
        ],
    )
    agent = await open_agent(
        gateway, services=[{"name": "echo", "port": 0, "local": echo_server.local}]
    )
    address = (await agent.wait_ready(10))["echo"].address
    assert await exchange_from("127.0.0.3", address) == b"hello"
    # Refused clients are closed by the gateway, not left open; none reaches the service.
    connections = echo_server.connections
    assert await exchange_from("127.0.0.2", address) == b""
    assert await exchange_from("127.0.0.8", address) == b""
    assert await exchange_from("127.0.0.9", address) == b""
    assert echo_server.connections == connections
    assert await exchange_from("127.0.0.4", address) == b"hello"
    assert "deny 127.0.0.2/32 (agents[site-a].services.echo)" in "".join(
        tunnel_log.find("refused client 127.0.0.2:")
    )
    assert "(agents[site-a].services.echo)" in tunnel_log.find("refused client 127.0.0.8:")[0]
    assert "deny 127.0.0.9/32 (access)" in tunnel_log.find("refused client 127.0.0.9:")[0]


@pytest.mark.usefixtures("ipv6_loopback")
async def test_access_ipv6_rules(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    tunnel_log: LogRecorder,
) -> None:
    """IPv6 clients are matched by IPv6 rules; an IPv4-only allow list keeps them out."""
    gateway = await open_gateway(
        token=None,
        allow_bind=["127.0.0.1", "::1"],
        services={"v6": {"allow": ["::1/128"]}, "v4only": {"allow": ["127.0.0.0/8"]}},
        agents=[{"name": "site-a", "token": TOKEN}],
    )
    agent = await open_agent(
        gateway,
        services=[
            {"name": "v6", "bind": "::1", "port": 0, "local": echo_server.local},
            {"name": "v4only", "bind": "::1", "port": 0, "local": echo_server.local},
        ],
    )
    services = await agent.wait_ready(10)
    assert await exchange_from("::1", services["v6"].address) == b"hello"
    assert await exchange_from("::1", services["v4only"].address) == b""
    assert tunnel_log.find("refused client [::1]:")


async def test_access_max_connections_per_client_and_per_service(
    open_gateway: OpenGateway, open_agent: OpenAgent, echo_server: LocalServer
) -> None:
    """Per client address, at most max_connections_per_client at once; per
    service, at most max_connections. A slot freed is usable again."""
    gateway = await open_gateway(
        token=None,
        agents=[
            {
                "name": "site-a",
                "token": TOKEN,
                "services": {"echo": {"max_connections_per_client": 2, "max_connections": 3}},
            }
        ],
    )
    agent = await open_agent(
        gateway, services=[{"name": "echo", "port": 0, "local": echo_server.local}]
    )
    address = (await agent.wait_ready(10))["echo"].address
    async with contextlib.AsyncExitStack() as held:
        await held.enter_async_context(held_open("127.0.0.2", address))
        second = await held.enter_async_context(held_open("127.0.0.2", address))
        assert await exchange_from("127.0.0.2", address) == b"", "third from one address"
        await held.enter_async_context(held_open("127.0.0.3", address))
        assert await exchange_from("127.0.0.4", address) == b"", "fourth on the service"
        _, writer = second
        writer.close()
        await wait_until(
            lambda: len(open_clients(gateway, agent.session_id)) == 2, what="the closed one to end"
        )
        assert await exchange_from("127.0.0.2", address) == b"hello"


async def test_access_rate_per_client(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    tunnel_log: LogRecorder,
) -> None:
    """New connections per client address are limited to a burst, then to the
    rate; another address has its own budget, and an open connection of the
    limited address keeps flowing."""
    gateway = await open_gateway(
        token=None,
        agents=[
            {
                "name": "site-a",
                "token": TOKEN,
                "access": {"rate_per_client": 0.5, "burst_per_client": 3},
            }
        ],
    )
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    (service,) = (await agent.wait_ready(10)).values()
    async with held_open("127.0.0.2", service.address) as (reader, writer):
        assert [await exchange_from("127.0.0.2", service.address) for _ in range(3)] == [
            b"hello",
            b"hello",
            b"",
        ]
        assert await exchange_from("127.0.0.3", service.address) == b"hello"
        writer.write(b"still here")
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.readexactly(10) == b"still here"
    assert "rate_per_client 0.5/s exceeded (agents[site-a].access)" in "".join(
        tunnel_log.find("refused client 127.0.0.2:")
    )


# --- authentication failures ------------------------------------------------


async def failed_hello(address: Address, source: str) -> tuple[float, p.Event | None]:
    """One control-channel handshake with a wrong proof, plain TCP, from
    ``source``; how long the answer took, and the answer (None: closed)."""
    async with (
        asyncio.timeout(30),
        connect(address, local_addr=(source, 0)) as (reader, writer),
    ):
        decoder = p.FrameDecoder()
        challenge = await next_event(reader, decoder)
        assert isinstance(challenge, p.Challenge)
        proof = credentials.proof_for(b"a-wrong-token-0123", challenge.nonce, "control", "x", "")
        writer.write(p.encode_message(p.Hello(p.PROTOCOL_VERSION, "control", "x", proof)))
        await writer.drain()
        started = time.monotonic()
        try:
            answer = await next_event(reader, decoder)
        except (OSError, p.ProtocolError):
            answer = None
        return time.monotonic() - started, answer


@pytest.mark.parametrize("mode", ["plain"])
async def test_auth_failures_answered_later_and_later_per_source(
    open_gateway: OpenGateway, open_agent: OpenAgent, echo_server: LocalServer
) -> None:
    """Each failed authentication from one address is answered after a
    doubling delay; an agent from another address is not slowed down."""
    gateway = await open_gateway()
    assert gateway.address is not None
    delays = []
    for _ in range(4):
        delay, answer = await failed_hello(gateway.address, "127.0.0.5")
        assert isinstance(answer, p.Refused) and answer.code == "auth", answer
        delays.append(delay)
    expected = [AUTH_DELAY_FIRST * 2**i for i in range(4)]  # 0.1, 0.2, 0.4, 0.8 s
    assert all(d >= e * 0.95 for d, e in zip(delays, expected, strict=True)), delays
    # The fifth failure from 127.0.0.5 is answered after 1.6 s; meanwhile an
    # agent from 127.0.0.1 gets in, and first.
    fifth = asyncio.create_task(failed_hello(gateway.address, "127.0.0.5"))
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    (service,) = (await agent.wait_ready(10)).values()
    assert not fifth.done(), "the agent waited as long as the failing address"
    _, answer = await fifth
    assert isinstance(answer, p.Refused) and answer.code == "auth", answer
    await echo_roundtrip(service.address)


@pytest.mark.parametrize("mode", ["plain"])
async def test_auth_repeated_failures_limit_parallel_handshakes(
    open_gateway: OpenGateway, tunnel_log: LogRecorder
) -> None:
    """After repeated failures, an address gets only a few handshakes at once:
    guessing in parallel is not a way around the delays."""
    gateway = await open_gateway()
    assert gateway.address is not None
    await asyncio.gather(*(failed_hello(gateway.address, "127.0.0.6") for _ in range(3)))
    held, challenged = [], 0
    try:
        for _ in range(12):
            try:
                reader, writer = await asyncio.open_connection(
                    gateway.address.host, gateway.address.port, local_addr=("127.0.0.6", 0)
                )
                held.append(writer)
                async with asyncio.timeout(5):
                    challenged += await reader.read(1) == bytes([p.KIND_MESSAGE])
            except OSError:
                pass  # reset at once
        assert challenged == AUTH_SUSPECT_HANDSHAKES
        assert tunnel_log.find("failed to authenticate repeatedly")
        assert await exchange_hello_from_elsewhere(gateway.address)
    finally:
        for writer in held:
            writer.close()


async def exchange_hello_from_elsewhere(address: Address) -> bool:
    """Another address still gets its Challenge at once."""
    async with asyncio.timeout(5), connect(address, local_addr=("127.0.0.7", 0)) as (reader, _):
        return await reader.read(1) == bytes([p.KIND_MESSAGE])


# --- reload -------------------------------------------------------------------


async def test_reload_keeps_untouched_sessions_and_disconnects_removed_and_revoked(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    mode: str,
    state_dir: Any,
) -> None:
    """On reload: an agent whose policy did not change keeps its session and
    its open connection; a removed agent and one whose token was revoked are
    disconnected (and refused when they come back); a new access rule applies
    to new connections only."""
    agents = [
        {"name": "site-a", "token": TOKEN},
        {"name": "site-b", "token": OTHER_TOKEN},
        {"name": "site-c", "token": THIRD_TOKEN},
    ]
    options: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "tls": mode == "tls",
        "state_dir": str(state_dir),
        "agents": agents,
    }
    gateway = await open_gateway(token=None, agents=agents)
    opened = {}
    for name, token in (("site-a", TOKEN), ("site-b", OTHER_TOKEN), ("site-c", THIRD_TOKEN)):
        agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"], name=name, token=token)
        (service,) = (await agent.wait_ready(10)).values()
        opened[name] = (agent, service.address)
    site_a, address_a = opened["site-a"]
    session_a = site_a.session_id
    async with held_open("127.0.0.2", address_a) as (reader, writer):
        new_options = {
            **options,
            "agents": [
                {"name": "site-a", "token": TOKEN, "access": {"deny": ["127.0.0.2"]}},
                {"name": "site-c", "token": "a-brand-new-token-for-c"},
            ],
        }
        new_config, _ = load_gateway_config(None, new_options)
        await gateway.reload(new_config)
        await wait_until(lambda: sorted(gateway.sessions()) == ["site-a"], what="two disconnects")
        assert site_a.session_id == session_a
        writer.write(b"after reload")
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.readexactly(12) == b"after reload"
        assert await exchange_from("127.0.0.2", address_a) == b""
        assert await exchange_from("127.0.0.3", address_a) == b"hello"
    for name in ("site-b", "site-c"):
        with pytest.raises(AuthenticationError):
            await opened[name][0].wait_ready(10)
    assert sorted(gateway.sessions()) == ["site-a"]


async def test_reload_policy_that_no_longer_allows_a_port_reconnects_the_agent(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    mode: str,
    state_dir: Any,
) -> None:
    """An agent whose new policy no longer allows a port it holds is disconnected;
    it reconnects and registers what the new policy allows."""
    gateway = await open_gateway(token=None, agents=[{"name": "site-a", "token": TOKEN}])
    agent = await open_agent(
        gateway,
        services=[
            {"name": "a", "port": 0, "local": echo_server.local},
            {"name": "b", "port": 0, "local": echo_server.local},
        ],
    )
    services = await agent.wait_ready(10)
    assert sorted(services) == ["a", "b"]
    port_a = services["a"].address.port  # each service asks for its own port again
    first_session = agent.session_id
    old = gateway.config
    await gateway.reload(
        dataclasses.replace(
            old,
            agents=(dataclasses.replace(old.agents[0], allow_ports=(range(port_a, port_a + 1),)),),
        )
    )
    await wait_until(
        lambda: (
            agent.session_id not in (None, first_session)
            and [a.port for a in gateway.sessions().get("site-a", [])] == [port_a]
        ),
        timeout=10,
        what="the agent to come back with service a only",
    )
    await echo_roundtrip(Address("127.0.0.1", port_a))


@pytest.mark.parametrize("mode", ["plain"])
async def test_auth_failure_delay_stays_within_the_handshake_deadline(
    open_gateway: OpenGateway,
) -> None:
    """However many failures an address has, its refusal comes before the
    handshake deadline: an agent with a wrong token is told, and stops."""
    gateway = await open_gateway(handshake_timeout=1.0)
    assert gateway.address is not None
    for _ in range(6):  # unclamped, the 5th and 6th would wait 1.6 s and 3.2 s
        # Past the deadline the gateway would close the connection unanswered.
        delay, answer = await failed_hello(gateway.address, "127.0.0.8")
        assert isinstance(answer, p.Refused) and answer.code == "auth", (delay, answer)


@pytest.mark.parametrize("mode", ["tls"])
async def test_reload_keeps_tls_sessions_resuming(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    tunnel_debug_log: LogRecorder,
) -> None:
    """A reload that does not touch client_ca keeps the TLS context, so the
    agent's new data channels still resume its session."""
    gateway = await open_gateway(reuse_data_channels=False)  # a new channel for every client
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"], pool_size=1)
    (service,) = (await agent.wait_ready(10)).values()
    await gateway.reload(gateway.config)
    before = len(tunnel_debug_log.find("data channel: TLS session", logging.DEBUG))
    for _ in range(3):  # each client takes a pooled channel; a new one replaces it
        await echo_roundtrip(service.address)
    await wait_until(
        lambda: (
            len(tunnel_debug_log.find("data channel: TLS session", logging.DEBUG)) >= before + 3
        ),
        what="new data channels after the reload",
    )
    after = tunnel_debug_log.find("data channel: TLS session", logging.DEBUG)[before:]
    assert all(line.endswith("resumed") for line in after), after


def open_clients(gateway: Gateway, session_id: str | None) -> tuple[ClientStatistics, ...]:
    """The client connections the gateway carries for one session."""
    (session,) = [s for s in gateway.statistics().sessions if s.id == session_id]
    return session.clients
