"""Forwarding between the gateways of a fleet (``fleet_listen``), through the real CLI, with a
real Redis and the fleet's own CA (trustme): three gateways on 127.0.0.1, 127.0.0.2 and
127.0.0.3 listen on every leased port, so a client through any of them reaches an agent
connected to any other, its own address intact at the far gateway; a gateway whose fleet
certificate another CA signed, a stranger's bytes and a forged request on the fleet port are
refused and logged, and no client is relayed for them; an agent that moves to another gateway
is reached there; a gateway paused past its lease gives up the port it lost and forwards it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trustme
from kit.clients import echo_through, http_json
from kit.ports import start_listening
from kit.processes import GatewayProc, Launch, Proc, require_tool
from kit.services import tcp_service
from kit.tokens import new_token
from kit.waiting import DEADLINE, wait_for
from test_fleet_cli import exchange, fleet_gateway, lease
from test_groups_cli import named_echo, who_answers

from tunnelgate import credentials

pytestmark = pytest.mark.timeout(120)

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
CLIENT_HOST = "127.0.0.9"  # clients come from here: their address must cross the hop
EXPOSED = r"exposed at gateway port (\d+)"


def fleet_files(tmp_path: Path, ca: trustme.CA, node: str) -> str:
    """The TOML lines of ``node``'s side of forwarding, with a certificate ``ca`` signed."""
    certs = tmp_path / "certs"
    certs.mkdir(exist_ok=True)
    cert = ca.issue_cert(f"{node}.fleet.test")
    cert.cert_chain_pems[0].write_to_path(certs / f"{node}.crt")
    cert.private_key_pem.write_to_path(certs / f"{node}.key")
    if not (certs / "ca.crt").exists():
        FLEET_CA.cert_pem.write_to_path(certs / "ca.crt")
    return (
        f'fleet_ca = "{certs / "ca.crt"}"\nfleet_cert = "{certs / node}.crt"\n'
        f'fleet_key = "{certs / node}.key"\n'
    )


FLEET_CA = trustme.CA()


def forwarding_gateway(
    launch: Launch, tmp_path: Path, node: str, host: str, redis_port: int, token: str,
    admin: bool = False, ca: trustme.CA = FLEET_CA, lease_time: float = 3.0,
) -> Any:  # fmt: skip
    """A gateway of this test's fleet that forwards (and its admin URL, with ``admin``)."""
    extra = f'fleet_listen = "{host}:0"\n' + fleet_files(tmp_path, ca, node)
    gateway, url = fleet_gateway(launch, tmp_path, node, host, redis_port, token, lease_time,
                                 extra)  # fmt: skip
    gateway.proc.wait_line(rf"taking clients forwarded by the fleet's gateways on {host}:\d+")
    return (gateway, url) if admin else gateway


def start_agent(launch: Launch, gateway: GatewayProc, host: str, name: str, local: int,
                token: str, *more: str) -> Proc:  # fmt: skip
    return launch("agent", "--gateway", f"{host}:{gateway.port}", "--no-tls", "--name", name,
                  "--expose", f"0:127.0.0.1:{local}", "--reconnect-max", "1", *more,
                  token=token)  # fmt: skip


def forwarded_agent(
    launch: Launch, tmp_path: Path, redis_port: int, echo_port: int, token: str, prefix: str,
    hosts: tuple[str, ...] = HOSTS[:2],
) -> tuple[list[GatewayProc], Proc, int]:  # fmt: skip
    """Gateways PREFIX0… on ``hosts``, an agent on the first exposing ``echo_port``, and every
    other gateway forwarding its port: the gateways, the agent, the port."""
    gateways = [
        forwarding_gateway(launch, tmp_path, f"{prefix}{i}", host, redis_port, token)
        for i, host in enumerate(hosts)
    ]
    agent = start_agent(launch, gateways[0], hosts[0], "site-a", echo_port, token)
    port = int(agent.wait_line(EXPOSED).group(1))
    for gateway in gateways[1:]:
        gateway.proc.wait_line(rf"forwarding port {port} to the gateway")
    return gateways, agent, port


def echo_from(host: str, port: int, payload: bytes) -> str:
    """Send ``payload`` from CLIENT_HOST through ``host:port`` to an echo; fail unless all of
    it came back and the connection ended cleanly; the client's own address."""
    with socket.create_connection((host, port), timeout=DEADLINE,
                                  source_address=(CLIENT_HOST, 0)) as sock:  # fmt: skip
        host, port = sock.getsockname()[:2]
        address = f"{host}:{port}"
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received == payload, f"{len(received)} of {len(payload)} bytes"
    return address


def test_a_client_through_any_gateway_reaches_an_agent_on_any_other(
    launch: Launch, tmp_path: Path, redis_port: int, echo_port: int
) -> None:
    token = new_token()
    gateways, _, port = forwarded_agent(launch, tmp_path, redis_port, echo_port, token, "n", HOSTS)

    for host in HOSTS:
        payload = f"through {host} ".encode() * 20_000
        client = echo_from(host, port, payload)
        # The far gateway logs the client as it came: its own address, not the link's.
        gateways[0].proc.wait_line(rf"closed client={re.escape(client)} up={len(payload)}")
    for gateway in gateways[1:]:
        line = gateway.proc.wait_line(r"forwarded to gateway n0 closed .*\((\w+)\)")
        assert line.group(1) == "closed", line.group(0)
    assert lease(redis_port, tmp_path.name, port) == "site-a n0"


def test_an_agent_that_moves_is_reached_where_it_went(
    launch: Launch, tmp_path: Path, redis_port: int, echo_port: int
) -> None:
    """The agent's gateway stops (SIGKILL); the agent comes back on another: the third gateway
    forwards there, as soon as the move is announced."""
    token = new_token()
    (one, two, three), agent, port = forwarded_agent(
        launch, tmp_path, redis_port, echo_port, token, "m", HOSTS
    )
    echo_from(HOSTS[2], port, b"before the move")

    one.proc.popen.send_signal(signal.SIGKILL)
    one.proc.wait_exit()
    agent.popen.terminate()
    agent.wait_exit()
    moved = launch("agent", "--gateway", f"{HOSTS[1]}:{two.port}", "--no-tls", "--name",
                   "site-a", "--expose", f"{port}:127.0.0.1:{echo_port}", token=token)  # fmt: skip
    moved.wait_line(rf"exposed at gateway port {port}")
    # m0's hold has not expired yet; the third gateway prefers the fresher one.
    echo_from(HOSTS[2], port, b"after the move " * 1000)
    three.proc.wait_line(r"forwarded to gateway m1 closed")
    wait_for(lambda: lease(redis_port, tmp_path.name, port) == "site-a m1", 5 * DEADLINE,
             "m0's hold to expire")  # fmt: skip


def test_links_the_fleet_did_not_sign_are_refused_and_relay_nothing(
    launch: Launch, tmp_path: Path, redis_port: int, echo_port: int
) -> None:
    token = new_token()
    one, admin = forwarding_gateway(launch, tmp_path, "s0", HOSTS[0], redis_port, token, True)
    other_ca = trustme.CA()
    rogue = forwarding_gateway(launch, tmp_path, "s1", HOSTS[1], redis_port, token, ca=other_ca)
    agent = start_agent(launch, one, HOSTS[0], "site-a", echo_port, token)
    port = int(agent.wait_line(EXPOSED).group(1))
    rogue.proc.wait_line(rf"forwarding port {port} to the gateway")
    link = one.proc.wait_line(r"taking clients forwarded .* on (\S+):(\d+)")
    link_address = (link.group(1), int(link.group(2)))

    def refused() -> int:
        code, view = http_json(admin + "api/v1/fleet")
        assert code == 200, view
        return int(view["forwarding"]["refused"])

    # A gateway whose fleet certificate another CA signed: its client is reset, not relayed.
    with socket.create_connection((HOSTS[1], port), timeout=DEADLINE) as sock:
        sock.sendall(b"never relayed")
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
    one.proc.wait_line(r"refused a link from [\d.]+:\d+: .*certificate")
    rogue.proc.wait_line(rf"client \S+ on port {port}: not forwarded: s0 \(")
    wait_for(lambda: refused() == 1, DEADLINE, "the refusal to be counted")

    # A stranger's bytes on the fleet port, without TLS.
    with socket.create_connection(link_address, timeout=DEADLINE) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            while sock.recv(65536):
                pass
    wait_for(lambda: refused() == 2, DEADLINE, "the stranger's link to be refused")

    # A member's certificate, but a forged request: garbage, then a port not served there.
    certs = tmp_path / "certs"
    context = ssl.create_default_context(cafile=certs / "ca.crt")
    context.check_hostname = False
    context.load_cert_chain(certs / "s0.crt", certs / "s0.key")
    for count, (forged, expected) in enumerate((
        (b"TGF0\x00\x01x", "refused a link from .*: not a forwarding request"),
        (b"TGF1" + struct.pack("!H", 3) + b"\xc1\xc1\xc1", ""),
        (forge(port + 1 if port < 65535 else port - 1), "forged.*is not served here"),
        (forge(port, "site-b"), ""),  # the port, but another owner's: never site-a's service
    ), start=3):  # fmt: skip
        with (
            socket.create_connection(link_address, timeout=DEADLINE) as raw,
            context.wrap_socket(raw) as sock,
        ):
            sock.sendall(forged + b"never relayed")
            assert nothing_back(sock) == b""
        if expected:  # the first of each kind (the log is throttled)
            one.proc.wait_line(expected)
        wait_for(lambda count=count: refused() == count, DEADLINE, "the forgery to be refused")
    assert not one.proc.lines_matching(r"closed client="), "no client relayed"
    echo_through(HOSTS[0], port, b"the port itself still serves")
    assert refused() == 6


def nothing_back(sock: socket.socket) -> bytes:
    """What comes back before the connection ends (by a reset, or an EOF)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return received


def forge(port: int, owner: str = "site-a") -> bytes:
    body = msgspec.msgpack.encode(
        {
            "port": port,
            "owner": owner,
            "client": "198.51.100.7:4000",
            "server": "x",
            "node": "forged",
        }
    )
    return b"TGF1" + struct.pack("!H", len(body)) + body


BALANCER = """global
    maxconn 512
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch 1
frontend front
    bind 127.0.0.1:{port}
    default_backend gateways
backend gateways
    balance roundrobin
    default-server check inter 100ms fall 1 rise 1
{servers}
"""


def balancer(launch_command: Launch, tmp_path: Path, name: str,
             servers: list[tuple[str, int]]) -> int:  # fmt: skip
    """HAProxy in TCP mode (health checks, redispatch) in front of ``servers``; its port."""
    haproxy = require_tool("haproxy")
    lines = "\n".join(f"    server s{i} {host}:{port}" for i, (host, port) in enumerate(servers))

    def start(port: int) -> Proc:
        config = tmp_path / f"haproxy-{name}-{port}.cfg"
        config.write_text(BALANCER.format(port=port, servers=lines))
        return launch_command(haproxy, "-db", "-f", str(config))

    return start_listening(start)[1]


def test_a_gateway_killed_loses_only_what_it_relayed_and_the_fleet_serves_on(
    launch: Launch, launch_command: Launch, tmp_path: Path, redis_port: int, echo_port: int
) -> None:
    """Three gateways behind HAProxy (agents' control port and clients' ports alike). Agent
    a is on the first or the third (through the balancer), agent b on the second. The gateway
    of a is killed (SIGKILL): of b's open connections, only the one that entered through it
    is lost; a comes back on the other through the balancer, and from then on every new
    client of a through the balancer is served. The bound: a's reconnect (its backoff, 1 s
    here at most, plus the heartbeat or the connect's failure), then one pub/sub message."""
    token = new_token()
    gateways = [
        forwarding_gateway(launch, tmp_path, f"k{i}", host, redis_port, token)
        for i, host in enumerate(HOSTS)
    ]
    control = balancer(launch_command, tmp_path, "control",
                       [(HOSTS[0], gateways[0].port), (HOSTS[2], gateways[2].port)])  # fmt: skip
    a = launch("agent", "--gateway", f"127.0.0.1:{control}", "--no-tls", "--name", "site-a",
               "--expose", f"0:127.0.0.1:{echo_port}", "--reconnect-max", "1",
               token=token)  # fmt: skip
    b = start_agent(launch, gateways[1], HOSTS[1], "site-b", echo_port, token)
    port_a, port_b = (int(agent.wait_line(EXPOSED).group(1)) for agent in (a, b))
    holder = lease(redis_port, tmp_path.name, port_a)
    assert holder in ("site-a k0", "site-a k2"), holder
    doomed = int(holder[-1])
    survivor = 2 - doomed
    for i, gateway in enumerate(gateways):
        if i != doomed:
            gateway.proc.wait_line(rf"forwarding port {port_a} to the gateway")
        if i != 1:
            gateway.proc.wait_line(rf"forwarding port {port_b} to the gateway")
    front_a = balancer(launch_command, tmp_path, "a", [(h, port_a) for h in HOSTS])
    for i in range(6):
        echo_through("127.0.0.1", front_a, f"before the kill {i} ".encode() * 100)

    held = {i: socket.create_connection((host, port_b), timeout=DEADLINE)
            for i, host in enumerate(HOSTS)}  # fmt: skip
    for i, sock in held.items():
        exchange(sock, f"b's client through gateway {i}".encode())

    gateways[doomed].proc.popen.send_signal(signal.SIGKILL)
    gateways[doomed].proc.wait_exit()
    killed = time.monotonic()
    for i, sock in held.items():
        if i == doomed:  # it relayed this one: lost
            assert nothing_back(sock) == b""
        else:
            exchange(sock, f"b's client through gateway {i}, after the kill".encode())
        sock.close()

    a.wait_line(r"exposed at gateway port", count=2, timeout=3 * DEADLINE)
    back = lease(redis_port, tmp_path.name, port_a)

    def served() -> bool:
        try:
            echo_through("127.0.0.1", front_a, b"after the kill")
        except (AssertionError, OSError):
            return False
        return True

    wait_for(served, 3 * DEADLINE, "a client of a to be served again")
    print(f"first client of a served {time.monotonic() - killed:.1f} s after the kill ({back})")
    for i in range(30):  # from then on, every one
        echo_through("127.0.0.1", front_a, f"after the kill {i} ".encode() * 100)
    after = lease(redis_port, tmp_path.name, port_a)
    assert after in (f"site-a k{survivor}", f"site-a k{min(doomed, survivor)} k2"), after


def test_a_gateway_paused_past_its_lease_forwards_the_port_it_lost(
    launch: Launch, tmp_path: Path, redis_port: int, echo_port: int
) -> None:
    """SIGSTOP on the agent's gateway; the agent comes back on another (the same name, the same
    port) and the paused gateway's hold lapses. Resumed, it does not serve the port itself any
    more: it forwards it to the gateway the agent is on."""
    token = new_token()
    (one, two), agent, port = forwarded_agent(launch, tmp_path, redis_port, echo_port, token, "p")
    os.kill(one.pid, signal.SIGSTOP)
    try:
        agent.popen.send_signal(signal.SIGKILL)
        agent.wait_exit()
        moved = launch("agent", "--gateway", f"{HOSTS[1]}:{two.port}", "--no-tls", "--name",
                       "site-a", "--expose", f"{port}:127.0.0.1:{echo_port}",
                       token=token)  # fmt: skip
        moved.wait_line(rf"exposed at gateway port {port}")
        wait_for(lambda: lease(redis_port, tmp_path.name, port) == "site-a p1", 5 * DEADLINE,
                 "the paused gateway's hold to lapse")  # fmt: skip
    finally:
        os.kill(one.pid, signal.SIGCONT)
    one.proc.wait_line(rf"forwarding port {port} to the gateway")
    echo_from(HOSTS[0], port, b"through the gateway that was paused " * 100)
    one.proc.wait_line(r"forwarded to gateway p1 closed .*\(closed\)")
    assert lease(redis_port, tmp_path.name, port) == "site-a p1"


def test_a_group_across_the_fleet_serves_on_while_its_members_are_killed_one_by_one(
    launch: Launch, tmp_path: Path, redis_port: int, secret_file: Path
) -> None:
    """Group web has members on two gateways (the port leased to the group, held by both);
    clients through the third are spread over both gateways' members. The members are killed
    one by one: once a member's gateway has seen it leave, no client fails, until the last."""
    token = new_token()
    stored = credentials.hash_line(credentials.derive(secret_file.read_text().encode(),
                                                      "web").stored_key)  # fmt: skip
    group = f'[[groups]]\nname = "web"\nsecret_hash = "{stored}"\n'
    gateways = []
    for i, host in enumerate(HOSTS):
        extra = f'fleet_listen = "{host}:0"\n' + fleet_files(tmp_path, FLEET_CA, f"g{i}") + group
        gateway, _ = fleet_gateway(launch, tmp_path, f"g{i}", host, redis_port, token, 3.0,
                                   extra)  # fmt: skip
        gateways.append(gateway)
    with contextlib.ExitStack() as services:
        members: dict[str, Proc] = {}
        port = 0
        for name, gateway, host in (("a", 0, HOSTS[0]), ("b", 0, HOSTS[0]), ("c", 1, HOSTS[1])):
            local = services.enter_context(tcp_service(named_echo(name)))
            members[name] = launch(
                "agent", "--gateway", f"{host}:{gateways[gateway].port}", "--no-tls", "--name",
                name, "--expose", f"{port}:127.0.0.1:{local}", "--group", "web",
                "--group-secret-file", str(secret_file), token=token,
            )  # fmt: skip
            port = int(members[name].wait_line(EXPOSED).group(1))
        gateways[2].proc.wait_line(rf"forwarding port {port} to the gateway")
        assert lease(redis_port, tmp_path.name, port) == "group web g0 g1"

        def answers(count: int) -> Counter[str]:
            return Counter(who_answers(port, f"client {i}".encode(), HOSTS[2])
                           for i in range(count))  # fmt: skip

        assert set(answers(12)) == {"a", "b", "c"}, "spread over both gateways' members"
        for name, gateway, left, serving in (("a", 0, 1, {"b", "c"}), ("c", 1, 0, {"b"})):
            members[name].popen.send_signal(signal.SIGKILL)
            members[name].wait_exit()
            gateways[gateway].proc.wait_line(rf"left group web \({left} member\(s\) left\)")
            if not left:  # g1's last member gone: the release reaches g2
                wait_for(lambda: lease(redis_port, tmp_path.name, port) == "group web g0",
                         DEADLINE, "g1 to release the group's port")  # fmt: skip
            assert set(answers(12)) == serving, f"after {name} left"
        assert not gateways[2].proc.lines_matching(r"not forwarded"), gateways[2].proc.describe()


def test_a_gateway_that_stops_lets_the_clients_it_forwards_finish(
    launch: Launch, tmp_path: Path, redis_port: int, echo_port: int
) -> None:
    """SIGTERM on a gateway that forwards a client: it forwards no new one, the open one goes
    on to its end (the drain), then the gateway exits 0; the gateway of the agent serves on."""
    token = new_token()
    (_, two), _, port = forwarded_agent(launch, tmp_path, redis_port, echo_port, token, "d")
    held = socket.create_connection((HOSTS[1], port), timeout=DEADLINE)
    exchange(held, b"forwarded by the gateway about to stop")

    two.proc.popen.send_signal(signal.SIGTERM)
    two.proc.wait_line(r"draining: waiting up to .* for 1 client connection\(s\)")
    with pytest.raises(ConnectionRefusedError):  # no new client there
        socket.create_connection((HOSTS[1], port), timeout=DEADLINE).close()
    exchange(held, b"while it drains")
    held.shutdown(socket.SHUT_WR)
    assert held.recv(1) == b"", "a clean end"
    held.close()
    two.proc.wait_line(r"drained: every client connection finished")
    assert two.proc.wait_exit() == 0
    echo_from(HOSTS[0], port, b"the agent's gateway serves on")
