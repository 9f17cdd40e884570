"""A gateway's link to its fleet (``gateway/fleet.py``) against a real Redis, in-process: leases
are fleet-wide and follow their owner to another node; a renewal that finds its port taken gives
it up; keys that are not the fleet's are ignored with a warning; Redis out of reach refuses new
claims with the reason and says so once; the fleet's settings in the gateway's file."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme
from faultkit import FaultProxy
from kit.ports import refusing_port, start_listening
from kit.processes import Launch, Proc, require_tool
from kit.waiting import DEADLINE, wait_until

from tunnelgate import Address
from tunnelgate import config as c
from tunnelgate.errors import ConfigError, TransportError
from tunnelgate.gateway.fleet import Fleet, Route

pytestmark = pytest.mark.usefixtures("no_unexpected_errors")
TOKEN = "t" * 32


class Node:
    """A fleet member's callbacks, recorded."""

    def __init__(self, url: str, fleet: str, node: str) -> None:
        self.lost: list[tuple[int, str]] = []
        self.states: list[tuple[bool, str]] = []
        self.fleet = Fleet(
            url, fleet, node, 30.0, lambda: {"address": f"{node}:8080", "version": "1",
                                            "agents": ["site-a"]},
            lambda: {"site-a": [{"name": "web", "address": "0.0.0.0:4000"}]},
            lambda port, why: self.lost.append((port, why)),
            lambda up, why: self.states.append((up, why)),
        )  # fmt: skip


def raw(redis_port: int) -> redis.Redis:
    return redis.Redis(port=redis_port, decode_responses=True)


async def test_leases_are_fleet_wide_and_follow_their_owner(redis_port: int) -> None:
    url = f"redis://127.0.0.1:{redis_port}/0"
    one, two = Node(url, "f1", "one").fleet, Node(url, "f1", "two").fleet
    await one.start()
    await two.start()
    try:
        assert await one.claim(4000, "site-a") is None
        assert await two.claim(4000, "site-b") == "site-a on gateway one"
        assert await two.claim(4000, "site-a") is None  # site-a has a session with two as well
        view = await one.view()
        assert view.up and [(n.node, n.agents) for n in view.nodes] == [
            ("one", ("site-a",)), ("two", ("site-a",))]  # fmt: skip
        assert [(lease.port, lease.owner, lease.nodes) for lease in view.leases] == [
            (4000, "site-a", ("one", "two"))]  # fmt: skip

        three = Node(url, "f1", "three").fleet
        await three.start()
        await one.aclose()  # one stops: site-a still holds the port through two
        assert await three.claim(4000, "site-b") == "site-a on gateway two"
        view = await two.view()
        assert [(lease.owner, lease.nodes) for lease in view.leases] == [("site-a", ("two",))]
        await two.aclose()  # the last hold gone: the lease is free
        assert await three.claim(4000, "site-b") is None
        await three.aclose()
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_renewal_that_finds_the_port_taken_gives_it_up(redis_port: int) -> None:
    node = Node(f"redis://127.0.0.1:{redis_port}/0", "f3", "one")
    await node.fleet.start()
    try:
        assert await node.fleet.claim(4100, "site-a") is None
        key = "tunnelgate:f3:port:4100"
        with raw(redis_port) as client:  # it expired, and site-b took it through node two
            seconds, micros = client.time()
            later = str(seconds * 1000 + micros // 1000 + 60_000)
            client.delete(key)
            client.hset(key, mapping={"owner": "site-b", "node:two": later})
        await node.fleet.renew()
        assert node.lost == [(4100, "the fleet's lease on port 4100 went to site-b on gateway two")]
        assert node.fleet.held == {}
        with raw(redis_port) as client:
            assert client.hgetall(key) == {"owner": "site-b", "node:two": later}, "not taken"
    finally:
        await node.fleet.aclose()


async def test_after_redis_lost_its_data_every_node_takes_its_holds_back(
    redis_port: int,
) -> None:
    """Redis flushed (a restart without persistence): the owner's holds on two nodes come back
    at their renewals, whichever renews first; none is taken for a loss, and the other nodes
    are told (a renewal that adds a hold publishes it). One node never holds a port for two
    owners, even through two binds of its own."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    one, two = Node(url, "f9", "one"), Node(url, "f9", "two")
    await one.fleet.start()
    await two.fleet.start()
    listening = asyncio.create_task(two.fleet.listen())
    try:
        assert await one.fleet.claim(4200, "group web") is None
        assert await two.fleet.claim(4200, "group web") is None
        with raw(redis_port) as client:
            client.flushdb()
        await one.fleet.renew()
        await two.fleet.renew()
        assert one.lost == two.lost == [] and one.fleet.held == two.fleet.held == {
            4200: "group web"
        }
        assert lease_nodes(redis_port, "f9", 4200) == ["one", "two"]
        await wait_until(lambda: "one" in two.fleet.routes.get(4200, Route("", {})).nodes,
                         DEADLINE, "one's hold told again")  # fmt: skip
        assert await one.fleet.claim(4200, "site-b") == "group web on gateway two"
        listening.cancel()
        await two.fleet.aclose()
        assert await one.fleet.claim(4200, "site-b") == "group web on gateway one", "its own"
    finally:
        listening.cancel()
        await one.fleet.aclose()
        await two.fleet.aclose()


def lease_nodes(redis_port: int, fleet: str, port: int) -> list[str]:
    with raw(redis_port) as client:
        fields = client.hgetall(f"tunnelgate:{fleet}:port:{port}")
    return sorted(name[5:] for name in fields if name.startswith("node:"))


async def test_indexes_that_are_not_the_fleets_are_ignored_with_a_warning(
    redis_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Members of the ports index that are not ports (not ASCII digits, out of range), an index
    of the wrong type, a node announcing a link that is not HOST:PORT: warnings, and the rest
    of the fleet read as it is."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    one = Node(url, "f11", "one")
    one.fleet.link = "127.0.0.1:7001"
    await one.fleet.start()
    try:
        assert await one.fleet.claim(4400, "site-a") is None
        with raw(redis_port) as client:
            client.sadd("tunnelgate:f11:ports", "\u00b2", "0", "70000", "x", "\u0663")
            client.set("tunnelgate:f11:node:bad", json.dumps({"link": "not an address"}))
            client.sadd("tunnelgate:f11:nodes", "bad")
        two = Node(url, "f11", "two")
        await two.fleet.start()
        assert {p: sorted(r.nodes) for p, r in two.fleet.routes.items()} == {4400: ["one"]}
        assert two.fleet.links == {"one": "127.0.0.1:7001", "bad": "", "two": ""}
        with raw(redis_port) as client:
            client.delete("tunnelgate:f11:ports", "tunnelgate:f11:nodes")
            client.set("tunnelgate:f11:ports", "a string")
            client.set("tunnelgate:f11:nodes", "a string")
        await two.fleet.resync()
        await two.fleet.renew()
        assert two.fleet.up, two.fleet.error
        await two.fleet.aclose()
        logged = caplog.text
        assert "that are not ports" in logged and "not HOST:PORT" in logged
        assert "ignoring fleet key tunnelgate:f11:ports" in logged
    finally:
        await one.fleet.aclose()


async def test_every_node_learns_the_routes_by_pub_sub_and_by_reading_them(
    redis_port: int,
) -> None:
    """Routes live in memory: a claim and a release are told at once (pub/sub), a node that
    stops says so, a late node reads them all, and a node whose key expired is forgotten."""
    url = f"redis://127.0.0.1:{redis_port}/0"
    one, two = Node(url, "f10", "one"), Node(url, "f10", "two")
    one.fleet.link, two.fleet.link = "127.0.0.1:7001", "127.0.0.2:7002"
    await one.fleet.start()
    await two.fleet.start()
    listening = asyncio.create_task(two.fleet.listen())
    try:
        await wait_until(lambda: "one" in two.fleet.links, DEADLINE, "two to see one live")

        def routes(node: Node) -> dict[int, tuple[str, list[str]]]:
            return {p: (r.owner, sorted(r.nodes)) for p, r in node.fleet.routes.items()}

        assert await one.fleet.claim(4300, "site-a") is None
        told = {4300: ("site-a", ["one"])}
        await wait_until(lambda: routes(two) == told, DEADLINE, "the lease told")
        assert two.fleet.links["one"] == "127.0.0.1:7001"

        three = Node(url, "f10", "three")
        await three.fleet.start()  # a late node reads what is leased
        assert routes(three) == {4300: ("site-a", ["one"])}
        assert three.fleet.links == {"one": "127.0.0.1:7001", "two": "127.0.0.2:7002",
                                     "three": ""}  # fmt: skip

        with raw(redis_port) as client:  # one vanishes: its key expired (killed)
            client.delete("tunnelgate:f10:node:one")
        await three.fleet.renew()
        assert routes(three) == {} and "one" not in three.fleet.links
        await three.fleet.aclose()

        async with asyncio.TaskGroup() as tasks:
            one.fleet.release(4300, "site-a", tasks)
        await wait_until(lambda: routes(two) == {}, DEADLINE, "the release told")
        assert await one.fleet.claim(4301, "site-b") is None
        await wait_until(lambda: 4301 in two.fleet.routes, DEADLINE, "the second lease told")
        await one.fleet.aclose()  # a node that stops says so
        await wait_until(lambda: routes(two) == {}, DEADLINE, "the leave told")
    finally:
        listening.cancel()
        await one.fleet.aclose()
        await two.fleet.aclose()


async def test_keys_that_are_not_the_fleets_are_ignored_with_a_warning(
    redis_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    node = Node(f"redis://127.0.0.1:{redis_port}/0", "f4", "one")
    await node.fleet.start()
    try:
        with raw(redis_port) as client:
            client.hset("tunnelgate:f4:node:hash", mapping={"not": "json"})
            client.set("tunnelgate:f4:port:5002", "a string where a lease goes")
            client.set("tunnelgate:f4:port:http", "site-a one")
            client.set("tunnelgate:f4:port:5000", "nobody")
            client.set("tunnelgate:f4:node:old", "{not json")
            client.set("tunnelgate:f4:node:binary", b"\xff\xfe not UTF-8")
            client.set("tunnelgate:f4:port:5001", b"\xff\xfe")
        with caplog.at_level(logging.WARNING, "tunnelgate"):
            view = await node.fleet.view()
        assert view.up and [n.node for n in view.nodes] == ["one"] and view.leases == ()
        warned = " ".join(r.getMessage() for r in caplog.records)
        for key in ("port:http", "port:5000", "node:old", "node:binary", "port:5001", "node:hash"):
            assert f"tunnelgate:f4:{key}" in warned
        refused = await node.fleet.claim(5002, "site-a")
        assert refused is not None and "not a lease" in refused and node.fleet.up
        node.fleet._act("[" * 3000)  # deep enough for a RecursionError in json
        node.fleet._act("[" * 100_000)  # longer than any action
        node.fleet._act('{"action": "reboot", "agent": "a", "reason": "r", "node": "x"}')
        assert node.lost == [] and node.fleet.up
    finally:
        await node.fleet.aclose()


async def test_redis_out_of_reach_refuses_claims_with_the_reason() -> None:
    with refusing_port() as port:
        node = Node(f"redis://127.0.0.1:{port}/0", "f5", "one")
        await node.fleet.start()  # it does not raise: the gateway serves all the same
        assert not node.fleet.up and node.fleet.error
        with pytest.raises(TransportError, match="the fleet's registry cannot be reached"):
            await node.fleet.claim(4200, "site-a")
        await node.fleet.renew()
        assert [up for up, _ in node.states] == [False], "said once, not at every failure"
        view = await node.fleet.view()
        assert not view.up and view.error
        await node.fleet.aclose()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(f'token = "{TOKEN}"\n' + text)
    return path


def test_fleet_settings(tmp_path: Path) -> None:
    text = 'fleet = "rediss://:secret@redis.example:6380/2"\nfleet_name = "eu"\nfleet_lease = 5\n'
    config, _ = c.load_gateway_config(write(tmp_path, text), {})
    assert (config.fleet, config.fleet_name, config.fleet_node, config.fleet_lease) == (
        "rediss://:secret@redis.example:6380/2", "eu", "", 5.0)  # fmt: skip


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ('fleet = "http://redis.example"\n', "fleet", "expected redis://"),
        ('fleet = "redis://redis.example:port"\n', "fleet", "expected redis://"),
        ('fleet = "redis+sentinel://h:26379"\n', "fleet", "expected redis+sentinel://"),
        ('fleet = "redis://r:6379"\nworkers = 2\n', "fleet", "cannot join a fleet yet"),
        ('fleet = "redis://r:6379"\nfleet_lease = 0.5\n', "fleet_lease", "seconds in [1, 3600]"),
        ('fleet = "redis://r:6379"\nfleet_node = "a b"\n', "fleet_node", ""),
    ],
)
def test_fleet_settings_that_do_not_make_sense(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        c.load_gateway_config(write(tmp_path, text), {})
    found: list[Any] = [(p.key, message in p.message) for p in caught.value.problems]
    assert found == [(key, True)], caught.value.problems


def start_redis(launch_command: Launch, tmp_path: Path, *options: str) -> tuple[Proc, int]:
    """A throwaway redis-server with ``options`` on a port of its own (its TLS port, with
    ``--tls-cert-file``)."""
    server = require_tool("redis-server")
    tls = "--tls-cert-file" in options

    def start(port: int) -> Proc:
        ports = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
        return launch_command(server, *ports, "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(tmp_path), *options)  # fmt: skip

    return start_listening(start)


async def test_a_fleet_on_redis_with_tls_and_a_password(
    launch_command: Launch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """rediss:// with the server's CA and a password; a wrong password is reported (the log
    never shows the password)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.cert_chain_pems[0].write_to_path(paths["cert"])
    cert.private_key_pem.write_to_path(paths["key"])
    _, port = start_redis(
        launch_command, tmp_path, "--tls-cert-file", str(paths["cert"]), "--tls-key-file",
        str(paths["key"]), "--tls-ca-cert-file", str(paths["ca"]), "--tls-auth-clients", "no",
        "--requirepass", "s3cret-pass",
    )  # fmt: skip
    query = f"ssl_ca_certs={paths['ca']}"
    node = Node(f"rediss://:s3cret-pass@127.0.0.1:{port}/0?{query}", "f6", "one")
    await node.fleet.start()
    try:
        assert node.fleet.up, node.fleet.error
        assert await node.fleet.claim(4300, "site-a") is None
        assert [lease.port for lease in (await node.fleet.view()).leases] == [4300]
    finally:
        await node.fleet.aclose()

    wrong = Node(f"rediss://:wrong-pass@127.0.0.1:{port}/0?{query}", "f6", "two")
    with caplog.at_level(logging.WARNING, "tunnelgate"):
        await wrong.fleet.start()
    assert not wrong.fleet.up and "password" in wrong.fleet.error.lower(), wrong.fleet.error
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "cannot be reached" in logged and "wrong-pass" not in logged and ":***@" in logged
    await wrong.fleet.aclose()


async def test_a_fleet_through_redis_sentinel(launch_command: Launch, tmp_path: Path) -> None:
    """redis+sentinel://: the Sentinel names the master, where the leases go."""
    _, master = start_redis(launch_command, tmp_path)
    server = require_tool("redis-server")

    def start_sentinel(port: int) -> Proc:
        config = tmp_path / f"sentinel-{port}.conf"
        config.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                          f"sentinel monitor tg 127.0.0.1 {master} 1\n")  # fmt: skip
        return launch_command(server, str(config), "--sentinel")

    _, sentinel = start_listening(start_sentinel)
    node = Node(f"redis+sentinel://127.0.0.1:{sentinel}/tg/0", "f7", "one")
    await node.fleet.start()
    try:
        assert node.fleet.up, node.fleet.error
        assert await node.fleet.claim(4400, "site-a") is None
        with raw(master) as client:
            assert client.hget("tunnelgate:f7:port:4400", "owner") == "site-a"
    finally:
        await node.fleet.aclose()


async def test_the_fault_kit_between_a_gateway_and_redis(
    redis_port: int, start_proxy: Callable[..., Awaitable[FaultProxy]]
) -> None:
    """Latency within the bound keeps the fleet up; a black hole marks it down (claims refused
    with the reason, what it holds kept) until the path is restored, and the next renewal
    puts its lease back; a reset is recovered from by the next command."""
    proxy = await start_proxy(Address("127.0.0.1", redis_port))
    node = Node(f"redis://{proxy.address}/0", "f8", "one")
    node.fleet.lease = 2.0  # commands bounded by 0.5 s
    await node.fleet.start()
    try:
        assert await node.fleet.claim(4500, "site-a") is None
        proxy.delay(0.05)
        await node.fleet.renew()
        assert node.fleet.up, node.fleet.error

        proxy.blackhole()
        await node.fleet.renew()
        assert not node.fleet.up and node.states == [(False, node.fleet.error)]
        with pytest.raises(TransportError, match="cannot be reached"):
            await node.fleet.claim(4501, "site-b")
        assert node.fleet.held == {4500: "site-a"}, "what it holds is kept"
        with raw(redis_port) as client:
            client.delete("tunnelgate:f8:port:4500")  # Redis lost it meanwhile (a restart)

        proxy.heal()
        await node.fleet.renew()
        assert node.fleet.up and [up for up, _ in node.states] == [False, True]
        with raw(redis_port) as client:
            assert client.hget("tunnelgate:f8:port:4500", "owner") == "site-a", "announced"

        await proxy.reset()
        await node.fleet.renew()  # the reset connection is replaced
        await node.fleet.renew()
        assert node.fleet.up, node.fleet.error
        assert await node.fleet.claim(4502, "site-a") is None
    finally:
        await node.fleet.aclose()
