"""A fleet of gateways on a real Redis (``--fleet``), through the real CLI: two gateways, on
127.0.0.1 and 127.0.0.2, lease public ports fleet-wide, so an agent on one can never take a port
an agent on the other holds; the fleet's view shows both gateways and the lease; a gateway
killed loses its leases when they expire, and the port is free for another agent; Redis out of
reach cuts no tunnel and refuses new ports with the reason, and when it is back the gateway
announces again what it holds; a gateway paused past its lease finds its port taken and stops
serving it. Each test has a fleet name of its own; waits on log lines and keys, never sleeps."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kit.clients import echo_through, http_json
from kit.ports import start_listening, unassigned_ports
from kit.processes import GatewayProc, Launch, Proc, require_tool, start_gateway
from kit.tokens import new_token
from kit.waiting import DEADLINE, wait_for

pytestmark = pytest.mark.timeout(120)

ADMIN_URL = r"admin listening on (http://127\.0\.0\.1:\d+/)"
OUTAGE = 30.0  # seconds Redis stays away
LEASE = 3.0  # seconds: a dead gateway's leases go quickly (Redis commands: a quarter of it)


def redis_get(port: int, key: str) -> str | None:
    import redis

    with redis.Redis(port=port, socket_timeout=DEADLINE, decode_responses=True) as client:
        value = client.get(key)
    return value if isinstance(value, str) else None


def lease(port: int, fleet: str, public: int) -> str | None:
    """The lease of ``public`` port as "OWNER NODE…" (the nodes that hold it), or None."""
    import redis

    key = f"tunnelgate:{fleet}:port:{public}"
    with redis.Redis(port=port, socket_timeout=DEADLINE, decode_responses=True) as client:
        fields = client.hgetall(key)
    nodes = sorted(name[5:] for name in fields if name.startswith("node:"))
    return " ".join([fields["owner"], *nodes]) if fields else None


def fleet_config(tmp_path: Path, node: str, redis_port: int, lease: float = LEASE,
                 extra: str = "") -> Path:  # fmt: skip
    """The file of gateway ``node`` in this test's fleet (``extra`` at its end)."""
    config = tmp_path / f"{node}.toml"
    config.write_text(
        f'fleet = "redis://127.0.0.1:{redis_port}/0"\nfleet_name = "{tmp_path.name}"\n'
        f'fleet_node = "{node}"\nfleet_lease = {lease}\nadmin = "127.0.0.1:0"\n{extra}'
    )
    return config


def fleet_gateway(
    launch: Launch, tmp_path: Path, node: str, host: str, redis_port: int, token: str | None,
    lease: float = LEASE, extra: str = "",
) -> tuple[GatewayProc, str]:  # fmt: skip
    """A gateway named ``node`` in this test's fleet, with an admin listener; its admin URL."""
    config = fleet_config(tmp_path, node, redis_port, lease, extra)
    gateway = start_gateway(launch, tmp_path / node, "--config", str(config), token=token,
                            tls=False, listen=f"{host}:0")  # fmt: skip
    gateway.proc.wait_line(rf"in fleet {tmp_path.name} as {node}; its registry is up")
    return gateway, gateway.proc.wait_line(ADMIN_URL).group(1)


def start_agent(launch: Launch, gateway: GatewayProc, host: str, name: str, spec: str,
                token: str) -> Proc:  # fmt: skip
    return launch("agent", "--gateway", f"{host}:{gateway.port}", "--no-tls", "--name", name,
                  "--expose", spec, "--reconnect-max", "1", token=token)  # fmt: skip


def test_a_port_leased_on_one_gateway_is_refused_on_another_until_its_lease_expires(
    launch: Launch, tmp_path: Path, redis_port: int, echo_port: int
) -> None:
    token, fleet = new_token(), tmp_path.name
    one, admin_one = fleet_gateway(launch, tmp_path, "one", "127.0.0.1", redis_port, token)
    two, admin_two = fleet_gateway(launch, tmp_path, "two", "127.0.0.2", redis_port, token)
    port = unassigned_ports(1).start
    spec = f"{port}:127.0.0.1:{echo_port}"

    a = start_agent(launch, one, "127.0.0.1", "site-a", spec, token)
    a.wait_line(rf"exposed at gateway port {port}")
    echo_through("127.0.0.1", port, b"through gateway one")
    assert lease(redis_port, fleet, port) == "site-a one"

    b = start_agent(launch, two, "127.0.0.2", "site-b", spec, token)
    line = b.wait_line(r"ERROR .*not exposed: (.*)").group(1)
    assert line == f"port {port} is held by another agent", line  # not told whose
    two.proc.wait_line(rf"agent=site-b\] port {port} is leased to site-a on gateway one")

    def announced() -> Any:  # site-a on node one, once one renewed since it registered
        code, view = http_json(admin_two + "api/v1/fleet")
        agents = {n["node"]: n["agents"] for n in view.get("nodes", [])}
        return view if code == 200 and agents.get("one") == ["site-a"] else None

    view = wait_for(announced, 5 * DEADLINE, "gateway one to announce site-a")
    assert view["up"] and (view["fleet"], view["node"]) == (fleet, "two")
    assert [n["node"] for n in view["nodes"]] == ["one", "two"]
    assert {"port": port, "owner": "site-a", "nodes": ["one"]} in view["leases"]
    with urllib.request.urlopen(admin_one + "metrics", timeout=DEADLINE) as answer:
        metrics = answer.read().decode()
    assert "tunnelgate_fleet_up 1.0" in metrics and "tunnelgate_fleet_leases 1.0" in metrics

    one.proc.popen.send_signal(signal.SIGKILL)
    one.proc.wait_exit()
    wait_for(lambda: lease(redis_port, fleet, port) is None, 5 * DEADLINE, "the lease to end")
    c = start_agent(launch, two, "127.0.0.2", "site-c", spec, token)
    c.wait_line(rf"exposed at gateway port {port}")
    echo_through("127.0.0.2", port, b"through gateway two, once the lease was free")
    assert lease(redis_port, fleet, port) == "site-c two"


def test_redis_out_of_reach_cuts_no_tunnel_and_the_gateway_announces_again(
    launch_command: Launch, launch: Launch, tmp_path: Path, echo_port: int
) -> None:
    """Redis killed for 30 s: the open tunnel carries on (a connection opened before keeps its
    bytes, new ones pass), /readyz says degraded, a new port is refused with the reason and
    asked for again; Redis started again on its port: the gateway's lease is back, and the
    port refused meanwhile is exposed without the agent doing anything."""
    server = require_tool("redis-server")

    def start_redis(port: int) -> Proc:
        return launch_command(server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp_path))  # fmt: skip

    redis_proc, redis_port = start_listening(start_redis)
    token, fleet = new_token(), tmp_path.name
    one, admin = fleet_gateway(launch, tmp_path, "one", "127.0.0.1", redis_port, token)
    port = unassigned_ports(1).start
    a = start_agent(launch, one, "127.0.0.1", "site-a", f"{port}:127.0.0.1:{echo_port}", token)
    a.wait_line(rf"exposed at gateway port {port}")
    held = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)  # open throughout
    exchange(held, b"before Redis went away")

    redis_proc.popen.send_signal(signal.SIGKILL)
    redis_proc.wait_exit()
    gone = time.monotonic()
    one.proc.wait_line(r"the fleet's registry \(redis://127\.0\.0\.1:\d+/0\) cannot be reached")
    code, ready = http_json(admin + "readyz")
    assert code == 200 and "fleet's registry cannot be reached" in ready["degraded"], ready
    other = unassigned_ports(1).start
    b = start_agent(launch, one, "127.0.0.1", "site-b", f"{other}:127.0.0.1:{echo_port}", token)
    line = b.wait_line(r"ERROR .*not exposed: (.*)").group(1)
    assert "the fleet's registry cannot be reached" in line and "tries again" in line, line
    rounds = 0
    while time.monotonic() - gone < OUTAGE:  # traffic all along the outage
        echo_through("127.0.0.1", port, f"while Redis is gone {rounds}".encode())
        exchange(held, f"on the connection opened before, {rounds}".encode())
        rounds += 1

    launch_command(server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", str(tmp_path))  # fmt: skip
    one.proc.wait_line(r"the fleet's registry answers again")
    wait_for(lambda: lease(redis_port, fleet, port) == "site-a one", DEADLINE, "the lease back")
    echo_through("127.0.0.1", port, b"after Redis came back")
    exchange(held, b"and the connection opened before Redis went away")
    held.close()
    b.wait_line(rf"exposed at gateway port {other}", timeout=3 * DEADLINE)  # retried: 15 s at most
    echo_through("127.0.0.1", other, b"the port refused while Redis was gone")
    assert lease(redis_port, fleet, other) == "site-b one"
    assert http_json(admin + "readyz") == (200, {"ready": True})


def exchange(sock: socket.socket, payload: bytes) -> None:
    """Send ``payload`` on an open connection to an echo, and read all of it back."""
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, f"the connection ended after {len(received)} bytes"
        received += chunk
    assert received == payload


def test_a_gateway_paused_past_its_lease_stops_serving_the_port_it_lost(
    launch: Launch, tmp_path: Path, redis_port: int, echo_port: int
) -> None:
    token, fleet = new_token(), tmp_path.name
    one, admin_one = fleet_gateway(launch, tmp_path, "one", "127.0.0.1", redis_port, token)
    two, _ = fleet_gateway(launch, tmp_path, "two", "127.0.0.2", redis_port, token)
    port = unassigned_ports(1).start
    spec = f"{port}:127.0.0.1:{echo_port}"
    a = start_agent(launch, one, "127.0.0.1", "site-a", spec, token)
    a.wait_line(rf"exposed at gateway port {port}")

    os.kill(one.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: lease(redis_port, fleet, port) is None, 5 * DEADLINE, "the lease to end")
        b = start_agent(launch, two, "127.0.0.2", "site-b", spec, token)
        b.wait_line(rf"exposed at gateway port {port}")
    finally:
        os.kill(one.pid, signal.SIGCONT)
    one.proc.wait_line(rf"lease on port {port} went to site-b on gateway two: this gateway")
    one.proc.wait_line(r"\[.*agent=site-a.*\] .*: ending the session")
    line = a.wait_line(r"ERROR .*not exposed: (.*)").group(1)
    assert line == f"port {port} is held by another agent", line
    echo_through("127.0.0.2", port, b"the port is site-b's now")
    assert lease(redis_port, fleet, port) == "site-b two"
    code, events = http_json(admin_one + "api/v1/events")
    lost = [e["detail"] for e in events if e["kind"] == "fleet_lost"]
    why = f"the fleet's lease on port {port} went to site-b on gateway two"
    assert code == 200 and lost == [why], events


def test_a_gateway_that_stops_gives_its_leases_back_at_once(
    launch: Launch, tmp_path: Path, redis_port: int, echo_port: int
) -> None:
    """SIGTERM (a rolling restart): the gateway drains, then deletes its keys; the port is free
    in the fleet at once, not after its lease (an hour here)."""
    token, fleet = new_token(), tmp_path.name
    one, _ = fleet_gateway(launch, tmp_path, "one", "127.0.0.1", redis_port, token, lease=3600)
    port = unassigned_ports(1).start
    a = start_agent(launch, one, "127.0.0.1", "site-a", f"{port}:127.0.0.1:{echo_port}", token)
    a.wait_line(rf"exposed at gateway port {port}")
    assert lease(redis_port, fleet, port) == "site-a one"
    assert redis_get(redis_port, f"tunnelgate:{fleet}:node:one") is not None

    one.proc.popen.send_signal(signal.SIGTERM)
    assert one.proc.wait_exit() == 0
    assert lease(redis_port, fleet, port) is None
    assert redis_get(redis_port, f"tunnelgate:{fleet}:node:one") is None
    assert redis_get(redis_port, f"tunnelgate:{fleet}:agent:site-a one") is None


def test_disconnecting_an_agent_on_any_gateway_ends_its_session_where_it_is(
    launch: Launch, tmp_path: Path, redis_port: int, echo_port: int
) -> None:
    """The admin API of gateway two disconnects an agent connected to gateway one (Redis
    pub/sub); an agent no gateway holds is a 404; a message on the channel that is not an
    action is ignored with a warning."""
    token, fleet = new_token(), tmp_path.name
    one, _ = fleet_gateway(launch, tmp_path, "one", "127.0.0.1", redis_port, token)
    _, admin_two = fleet_gateway(launch, tmp_path, "two", "127.0.0.2", redis_port, token)
    port = unassigned_ports(1).start
    a = start_agent(launch, one, "127.0.0.1", "site-a", f"{port}:127.0.0.1:{echo_port}", token)
    a.wait_line(rf"exposed at gateway port {port}")
    key = f"tunnelgate:{fleet}:agent:site-a one"
    wait_for(lambda: redis_get(redis_port, key) is not None, 5 * DEADLINE, "site-a announced")

    import redis

    with redis.Redis(port=redis_port, socket_timeout=DEADLINE) as client:
        client.publish(f"tunnelgate:{fleet}:actions", b"\xff not json")
        client.publish(f"tunnelgate:{fleet}:actions", "[" * 3000)
    one.proc.wait_line(r"ignoring a message on tunnelgate:\S+:actions that is not a fleet action")

    assert post(admin_two + "api/v1/agents/site-a/disconnect") == (
        200, {"disconnected": "site-a"})  # fmt: skip
    one.proc.wait_line(r"agent=site-a\] disconnecting the agent: disconnected from the admin "
                       r"API \(asked on gateway two\)")  # fmt: skip
    a.wait_line(rf"exposed at gateway port {port}", count=2)  # it reconnects
    echo_through("127.0.0.1", port, b"after the fleet-wide disconnect")

    assert post(admin_two + "api/v1/agents/nobody/disconnect")[0] == 404


def post(url: str) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=b"{}", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_reload_asked_on_one_gateway_revokes_a_token_on_every_gateway(
    launch: Launch, tmp_path: Path, redis_port: int, echo_port: int
) -> None:
    """The old token removed from every gateway's file (as a configuration manager does), one
    ``POST /api/v1/fleet/reload`` on gateway two: gateway one reads its file again and ends the
    session of the agent that proved the old token; the agent, refused, exits."""
    old, new = new_token(), new_token()

    def agents(*tokens: str) -> str:
        return f'[[agents]]\nname = "site-a"\ntoken = {json.dumps(list(tokens))}\n'

    one, _ = fleet_gateway(launch, tmp_path, "one", "127.0.0.1", redis_port, None,
                           extra=agents(old, new))  # fmt: skip
    _, admin_two = fleet_gateway(launch, tmp_path, "two", "127.0.0.2", redis_port, None,
                                 extra=agents(old, new))  # fmt: skip
    port = unassigned_ports(1).start
    a = start_agent(launch, one, "127.0.0.1", "site-a", f"{port}:127.0.0.1:{echo_port}", old)
    a.wait_line(rf"exposed at gateway port {port}")

    for node in ("one", "two"):
        fleet_config(tmp_path, node, redis_port, extra=agents(new))
    assert post(admin_two + "api/v1/fleet/reload") == (
        200, {"reloaded": "reloaded", "fleet": "every other gateway asked to reload"})  # fmt: skip
    one.proc.wait_line(r"reloading the configuration: reload asked on the admin API \(asked on "
                       r"gateway two\)")  # fmt: skip
    one.proc.wait_line(r"agent=site-a\].*disconnecting the agent: its token was revoked")
    assert a.wait_exit() == 1, a.describe()
    assert a.lines_matching(r"authentication failed"), a.describe()
