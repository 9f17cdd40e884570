"""A gateway's link to its fleet (``gateway/fleet.py``) against a real Redis, in-process: leases
are fleet-wide and follow their owner to another node; a renewal that finds its port taken gives
it up; keys that are not the fleet's are ignored with a warning; Redis out of reach refuses new
claims with the reason and says so once; the fleet's settings in the gateway's file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import redis
from kit.ports import refusing_port

from tunnelgate import config as c
from tunnelgate.errors import ConfigError, TransportError
from tunnelgate.gateway.fleet import Fleet

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
        assert await two.claim(4000, "site-a") is None  # the agent reconnected to node two
        view = await one.view()
        assert view.up and [(n.node, n.agents) for n in view.nodes] == [
            ("one", ("site-a",)), ("two", ("site-a",))]  # fmt: skip
        assert [(lease.port, lease.owner, lease.node) for lease in view.leases] == [
            (4000, "site-a", "two")]  # fmt: skip
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_renewal_that_finds_the_port_taken_gives_it_up(redis_port: int) -> None:
    node = Node(f"redis://127.0.0.1:{redis_port}/0", "f3", "one")
    await node.fleet.start()
    try:
        assert await node.fleet.claim(4100, "site-a") is None
        with raw(redis_port) as client:
            client.set("tunnelgate:f3:port:4100", "site-b two")  # it expired; site-b took it
        await node.fleet.renew()
        assert node.lost == [(4100, "the fleet's lease on port 4100 went to site-b on gateway two")]
        assert node.fleet.held == {}
        with raw(redis_port) as client:
            assert client.get("tunnelgate:f3:port:4100") == "site-b two", "never taken back"
    finally:
        await node.fleet.aclose()


async def test_keys_that_are_not_the_fleets_are_ignored_with_a_warning(
    redis_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    node = Node(f"redis://127.0.0.1:{redis_port}/0", "f4", "one")
    await node.fleet.start()
    try:
        with raw(redis_port) as client:
            client.set("tunnelgate:f4:port:http", "site-a one")
            client.set("tunnelgate:f4:port:5000", "nobody")
            client.set("tunnelgate:f4:node:old", "{not json")
            client.set("tunnelgate:f4:node:binary", b"\xff\xfe not UTF-8")
            client.set("tunnelgate:f4:port:5001", b"\xff\xfe")
        with caplog.at_level(logging.WARNING, "tunnelgate"):
            view = await node.fleet.view()
        assert view.up and [n.node for n in view.nodes] == ["one"] and view.leases == ()
        warned = " ".join(r.getMessage() for r in caplog.records)
        for key in ("port:http", "port:5000", "node:old", "node:binary", "port:5001"):
            assert f"tunnelgate:f4:{key}" in warned
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
