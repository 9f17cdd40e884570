"""A fleet of gateways on Redis (``--fleet redis://…``): fleet-wide port leases, and a registry
of which gateway (a "node") holds which agent. Must not import agent.

Redis is never on a client's path: it is asked when an agent registers a service (a lease) and
on a timer (renewals), never per connection. Keys, under ``tunnelgate:FLEET:``:

- ``port:PORT``, a hash: ``owner`` → the agent (or ``group NAME``) that may listen on that
  port anywhere in the fleet (on any address: the fleet's gateways share one public address),
  and one ``node:NODE`` field per node that serves it → when that node's hold expires (ms, Redis
  time) unless renewed. A claim succeeds when no node holds the port or its owner is the same
  (an agent with sessions on several nodes, or that moved), in one Lua script, so two nodes
  never both get one port for two owners; a node's release removes only its own hold, and the
  lease ends with the last one.
- ``node:NODE`` → what the node says of itself (JSON), expiring after ``fleet_lease`` unless
  renewed: the fleet's members.
- ``agent:NAME NODE`` → the services the agent has on that node (JSON), expiring likewise (a
  space between, which no name has, so that one agent's keys are found exactly).
- ``actions`` (a pub/sub channel): what one node asks of every node, as JSON: a disconnect
  ``{"action": "disconnect", "agent", "reason", "node"}`` ends the agent's session wherever it
  is; a reload ``{"action": "reload", "reason", "node"}`` makes every node read its
  configuration again (a token revoked in the files takes effect on every gateway). A message
  that does not parse is ignored with a warning.

:class:`FleetLeases` wraps the gateway's own leases (one process): a claim is granted here
first, then in Redis. :class:`Fleet` renews everything this node holds every third of the lease
time. A renewal that finds its port held by another owner means this node lost it (it was
paused or cut off longer than the lease): ``on_lost`` stops serving that port. Redis out of reach
never cuts a tunnel: what is open and listening keeps working, the fleet is reported down
(logs, ``/readyz``, metrics), new claims are refused with the reason until it answers again, and
then the node announces again all it holds; a port another owner took meanwhile is given up
(the first holder in Redis wins, as in any claim).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from tunnelgate.address import parse_address
from tunnelgate.config import SENTINEL_SCHEME, parse_sentinel_url
from tunnelgate.errors import ConfigError, ConfigProblem, TransportError
from tunnelgate.gateway.leases import LocalLeases, PortLeases
from tunnelgate.logs import Throttle

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__package__)

PREFIX: Final = "tunnelgate"
MAX_REDIS_TIMEOUT: Final = 2.0  # seconds for one Redis command, at most (a quarter lease)
WARNING_INTERVAL: Final = 30.0  # between warnings while Redis is out of reach
SCAN_COUNT: Final = 500
LISTEN_TIMEOUT: Final = 1.0  # one wait for an action message
HEALTH_CHECK_INTERVAL: Final = 5.0  # an idle connection is pinged first: a dead one is seen
MAX_ACTION_SIZE: Final = 4096  # bytes of an action message; longer ones are not read
RESUBSCRIBE_DELAY: Final = 1.0  # after the actions' subscription failed
RESYNC_INTERVAL: Final = 300.0  # seconds between full reads of the routes (pub/sub keeps them)
RESYNC_BATCH: Final = 1000  # leases read, or renewed, in one round trip
# The fields of each action on the ``actions`` channel, beside "action" and "node".
ACTIONS: Final[dict[str, tuple[str, ...]]] = {
    "disconnect": ("agent", "reason"),
    "reload": ("reason",),
    "lease": ("port", "owner", "link"),
    "release": ("port", "owner"),
    "leave": (),
}

# KEYS: the port's key, the index of leased ports. ARGV: owner, node, lease in ms, the port.
# Drops the holds that expired; grants when no node holds the port (this one included) or the
# owner is the same, and returns "+" if that added this node's hold (a new claim, or one Redis
# lost: the other nodes are told) or false if it renewed it; else returns the owner and a node
# that holds it. A key that is not a hash is not the fleet's: returns "?".
CLAIM: Final = """
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'none' and kind ~= 'hash' then
  return '?'
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local fields = redis.call('HGETALL', KEYS[1])
local owner, holder, mine = nil, nil, false
for i = 1, #fields, 2 do
  local name, value = fields[i], fields[i + 1]
  if name == 'owner' then
    owner = value
  elseif string.sub(name, 1, 5) == 'node:' then
    if (tonumber(value) or 0) <= ms then
      redis.call('HDEL', KEYS[1], name)
    elseif string.sub(name, 6) ~= ARGV[2] then
      holder = string.sub(name, 6)
    else
      mine = true
    end
  end
end
if (holder or mine) and owner ~= ARGV[1] then
  return (owner or '?') .. ' ' .. (holder or ARGV[2])
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'node:' .. ARGV[2], ms + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
if mine then return false end
return '+'
"""
# KEYS: the port's key, the index of leased ports. ARGV: owner, node, the port. Removes this
# node's hold of the owner's lease; the lease ends with the last hold.
RELEASE: Final = """
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then return 0 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'node:' .. ARGV[2])
if redis.call('HLEN', KEYS[1]) <= 1 then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[3])
end
return 1
"""


def _number(text: str) -> int:
    """A count of milliseconds as Redis holds it (ASCII digits), else 0."""
    return int(text) if re.fullmatch(r"[0-9]{1,18}", text) else 0


def _port_number(text: str) -> int | None:
    port = int(text) if re.fullmatch(r"[0-9]{1,5}", text) else 0
    return port if 0 < port < 65536 else None


def valid_link(value: object) -> str:
    """A node's gateway-to-gateway address as announced, if it is one (``host:port``), else
    "" (a node that takes no forwarded client)."""
    if not isinstance(value, str) or not value:
        return ""
    try:
        parse_address(value)
    except ValueError:
        logger.warning("ignoring a gateway-to-gateway address that is not HOST:PORT: %r",
                       value[:100])  # fmt: skip
        return ""
    return value


def split_holder(value: str) -> tuple[str, str]:
    """``(owner, node)`` of what CLAIM returns (an owner may contain spaces: groups)."""
    owner, _, node = value.rpartition(" ")
    return owner, node


@dataclass
class Route:
    """A port leased somewhere in the fleet, as this node knows it (in memory: a client's
    path never asks Redis)."""

    owner: str
    nodes: dict[str, float]  # node → when its hold expires, as reckoned here (monotonic)
    turn: int = 0  # round robin over the nodes that hold it

    def best(self, skip: str, avoid: Callable[[str], bool]) -> list[str]:
        """The nodes to try for a client, in order: not ``skip`` (this node); the ones that
        did not fail lately in turn (an agent on several gateways, a group with members on
        several, share the clients), then the ones ``avoid`` says failed lately."""
        nodes = sorted(n for n in self.nodes if n != skip)
        if not nodes:
            return []
        self.turn += 1
        start = self.turn % len(nodes)
        turned = nodes[start:] + nodes[:start]
        return sorted(turned, key=avoid)  # stable: the turn's order within each kind


@dataclass(frozen=True)
class FleetLease:
    port: int
    owner: str
    nodes: tuple[str, ...]  # the nodes that serve it


@dataclass(frozen=True)
class FleetNode:
    node: str
    address: str  # its control port
    version: str
    agents: tuple[str, ...]


@dataclass(frozen=True)
class FleetView:
    """The fleet as Redis holds it now (for the admin API; read on demand, never cached)."""

    up: bool  # Redis answered
    nodes: tuple[FleetNode, ...]
    leases: tuple[FleetLease, ...]
    error: str = ""


@dataclass
class Fleet:
    """This node's link to the fleet's Redis: its leases and its announcements, renewed."""

    url: str
    name: str  # the fleet's, a key namespace
    node: str  # this gateway's
    lease: float  # seconds a lease lives without renewal
    describe: Callable[[], dict[str, Any]]  # what this node announces of itself
    agents: Callable[[], dict[str, list[dict[str, Any]]]]  # agent → its services, here
    on_lost: Callable[[int, str], None]  # a port another owner took: stop serving it
    on_state: Callable[[bool, str], None]  # Redis answers again (True), or not (False, why)
    on_disconnect: Callable[[str, str], None] = lambda agent, why: None  # asked by another node
    on_reload: Callable[[str], None] = lambda why: None  # asked by another node
    on_routes: Callable[[], None] = lambda: None  # the routes changed
    link: str = ""  # this node's gateway-to-gateway address, announced; "": it takes none
    routes: dict[int, Route] = field(default_factory=dict)  # every port leased in the fleet
    links: dict[str, str] = field(default_factory=dict)  # live node → where it takes links
    held: dict[int, str] = field(default_factory=dict)  # port → owner, in Redis
    up: bool = False  # Redis answered the last command
    down_since: float | None = None  # monotonic; None while up
    error: str = ""  # why it is down
    _redis: Redis | None = None
    _sentinels: list[Redis] = field(default_factory=list)  # with a redis+sentinel:// URL
    _releasing: set[asyncio.Task[None]] = field(default_factory=set)  # awaited by aclose()
    _warnings: Throttle = field(default_factory=lambda: Throttle(WARNING_INTERVAL))
    _listen_warnings: Throttle = field(default_factory=lambda: Throttle(WARNING_INTERVAL))
    _announced: set[str] = field(default_factory=set)  # agents with a key of this node
    _resync_due: float = 0.0  # monotonic: when the leases are read again in full

    @property
    def prefix(self) -> str:
        return f"{PREFIX}:{self.name}:"

    @property
    def timeout(self) -> float:
        """Seconds one Redis command may take: a quarter lease, so that a renewal is late by
        less than a lease whatever Redis does."""
        return min(MAX_REDIS_TIMEOUT, self.lease / 4)

    @property
    def actions(self) -> str:
        """The pub/sub channel of the fleet's actions."""
        return f"{self.prefix}actions"

    def port_key(self, port: int) -> str:
        return f"{self.prefix}port:{port}"

    def _port_keys(self, port: int) -> tuple[str, str]:
        """The keys a lease's scripts touch: the port's, and the index of leased ports."""
        return self.port_key(port), f"{self.prefix}ports"

    async def start(self) -> None:
        """Connect (lazily: the first command does) and announce this node."""
        from redis.asyncio import Redis

        options: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "health_check_interval": HEALTH_CHECK_INTERVAL,
            "decode_responses": True,
            "encoding_errors": "replace",  # bytes in Redis that are not UTF-8 never raise here
        }
        if self.url.startswith(f"{SENTINEL_SCHEME}://"):
            from redis.asyncio.sentinel import Sentinel

            where = parse_sentinel_url(self.url)
            sentinels = [(a.host, a.port) for a in where.sentinels]
            sentinel = Sentinel(sentinels, sentinel_kwargs=dict(options), **options)
            self._sentinels = list(sentinel.sentinels)  # closed with the fleet's link
            self._redis = sentinel.master_for(
                where.service, db=where.db, password=where.password, **options
            )
        else:
            try:
                self._redis = Redis.from_url(self.url, **options)
            except (ValueError, TypeError) as exc:  # an option redis-py does not take
                raise ConfigError([ConfigProblem("fleet", "fleet", str(exc))]) from None
        await self.renew()
        with contextlib.suppress(*_redis_errors()):  # down: read when Redis answers (listen)
            await self.resync()

    async def aclose(self) -> None:
        """Leave the fleet: the releases under way end, then this node's keys and holds go, in
        one round trip."""
        if self._redis is None:
            return
        if self._releasing:
            await asyncio.wait(self._releasing, timeout=self.timeout)
        with contextlib.suppress(*_redis_errors()):
            async with asyncio.timeout(self.timeout):
                async with self._redis.pipeline(transaction=False) as pipe:
                    keys = [f"{self.prefix}node:{self.node}"]
                    keys += [self.agent_key(a) for a in self._announced]
                    pipe.delete(*keys)
                    pipe.srem(f"{self.prefix}nodes", self.node)
                    for port, owner in self.held.items():
                        pipe.eval(RELEASE, 2, *self._port_keys(port), owner, self.node, port)
                    pipe.publish(self.actions, json.dumps({"action": "leave", "node": self.node}))
                    await pipe.execute()
                self.held.clear()
        await self._redis.aclose()
        self._redis = None
        for sentinel in self._sentinels:
            await sentinel.aclose()

    def agent_key(self, agent: str) -> str:
        return f"{self.prefix}agent:{agent} {self.node}"

    async def run(self) -> None:
        """Renew every third of the lease time (counted from each renewal's start), until
        cancelled."""
        loop = asyncio.get_running_loop()
        due = loop.time() + self.lease / 3
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = loop.time() + self.lease / 3
            await self.renew()

    async def listen(self) -> None:
        """Carry out what other nodes ask (the ``actions`` channel), until cancelled;
        subscribed again after Redis comes back."""
        assert self._redis is not None, "start() first"
        while self._redis is not None:  # None: closed (aclose)
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.actions)
                await self.resync()  # what was missed while not subscribed
                while True:  # the connection is pinged when idle (HEALTH_CHECK_INTERVAL)
                    message = await pubsub.get_message(timeout=LISTEN_TIMEOUT)
                    if message is not None:
                        self._act(message.get("data"))
                    if time.monotonic() >= self._resync_due:  # here: never beside a message
                        await self.resync()
            except _redis_errors() as exc:
                self._listen_warnings.warning(
                    logger,
                    time.monotonic(),
                    "the fleet's actions channel failed (%s): subscribing again",
                    exc or type(exc).__name__,
                )
            finally:
                with contextlib.suppress(*_redis_errors()):
                    await pubsub.aclose()
            await asyncio.sleep(RESUBSCRIBE_DELAY)

    def _act(self, data: Any) -> None:
        """An action another node asks or tells; anything else (not JSON, nested deep, too
        long, of another kind, fields of the wrong type) is logged and left."""
        try:
            if not isinstance(data, str) or len(data) > MAX_ACTION_SIZE:
                raise ValueError("not a short string")
            action = json.loads(data)
            kind, node = action["action"], action["node"]
            if kind not in ACTIONS or not isinstance(node, str):
                raise ValueError(kind)
            fields = {key: action[key] for key in ACTIONS[kind]}
            for key, value in fields.items():
                if key == "port":
                    if type(value) is not int or not 0 < value < 65536:
                        raise ValueError(key)
                elif not isinstance(value, str):
                    raise ValueError(key)
        except Exception:  # whatever the bytes: never more than this warning
            shown = str(data)[:200]
            logger.warning("ignoring a message on %s that is not a fleet action: %r", self.actions,
                           shown)  # fmt: skip
            return
        if node == self.node:
            return
        if kind == "reload":
            self.on_reload(f"{fields['reason']} (asked on gateway {node})")
        elif kind == "disconnect":
            self.on_disconnect(fields["agent"], f"{fields['reason']} (asked on gateway {node})")
        elif kind == "lease":
            if link := valid_link(fields["link"]):
                self.links[node] = link
            self._route(fields["port"], fields["owner"], node, time.monotonic() + self.lease)
            self.on_routes()
        elif kind == "release":
            self._unroute(fields["port"], fields["owner"], node)
            self.on_routes()
        else:  # leave: the node stopped
            self.links.pop(node, None)
            self._drop_nodes({node})
            self.on_routes()

    def _route(self, port: int, owner: str, node: str, expires: float) -> None:
        route = self.routes.get(port)
        if route is None or route.owner != owner:  # a new lease (the old one ended)
            route = self.routes[port] = Route(owner, {})
        route.nodes[node] = max(expires, route.nodes.get(node, 0.0))

    def _unroute(self, port: int, owner: str, node: str) -> None:
        """``node`` no longer holds ``owner``'s lease on ``port``."""
        if (route := self.routes.get(port)) is not None and route.owner == owner:
            route.nodes.pop(node, None)
            if not route.nodes:
                del self.routes[port]

    def _drop_nodes(self, nodes: set[str]) -> None:
        """Forget the holds of ``nodes`` (stopped, or gone: their keys expired)."""
        for port, route in list(self.routes.items()):
            for node in nodes & route.nodes.keys():
                del route.nodes[node]
            if not route.nodes:
                del self.routes[port]

    async def reload(self, reason: str) -> None:
        """Ask every other node to read its configuration again. Raises TransportError when
        Redis cannot be reached."""
        message = {"action": "reload", "reason": reason, "node": self.node}
        try:
            await self._call("publish", self.actions, json.dumps(message))
        except _redis_errors() as exc:
            self._down(exc)
            raise TransportError(f"the fleet's registry cannot be reached: {self.error}") from None

    async def disconnect(self, agent: str, reason: str) -> bool:
        """Ask every node to end ``agent``'s session; whether another node holds it now (its
        key in the registry). Raises TransportError when Redis cannot be reached."""
        message = {"action": "disconnect", "agent": agent, "reason": reason, "node": self.node}
        try:
            await self._call("publish", self.actions, json.dumps(message))
            keys = await self._scan(f"{self.prefix}agent:{agent} *")
            elsewhere = [key for key in keys if key != self.agent_key(agent)]
        except _redis_errors() as exc:
            self._down(exc)
            raise TransportError(f"the fleet's registry cannot be reached: {self.error}") from None
        return bool(elsewhere)

    async def renew(self) -> None:
        """Announce this node and its agents, renew every lease it holds (or claim it again,
        after Redis lost it), and give up a port another owner holds now, or whose hold lapsed
        while another node took it; then learn which nodes live, and read every lease again
        when that is due."""
        try:
            ms = int(self.lease * 1000)
            agents = self.agents()
            async with asyncio.timeout(self.timeout):
                async with self._client().pipeline(transaction=False) as pipe:
                    about = {**self.describe(), "link": self.link}
                    pipe.set(f"{self.prefix}node:{self.node}", json.dumps(about), px=ms)
                    pipe.sadd(f"{self.prefix}nodes", self.node)
                    for agent, services in agents.items():
                        pipe.set(self.agent_key(agent), json.dumps(services), px=ms)
                    if gone := self._announced - agents.keys():
                        pipe.delete(*(self.agent_key(agent) for agent in gone))
                    results = await pipe.execute(raise_on_error=False)
            for result in results:  # Redis answered: a key of the wrong type, that key's fault
                if isinstance(result, _response_errors()):
                    logger.warning("announcing this gateway: %s", result)
            self._answered()
            self._announced = set(agents)
            held = list(self.held.items())
            for start in range(0, len(held), RESYNC_BATCH):  # one round trip per batch
                await self._renew_holds(held[start : start + RESYNC_BATCH], ms)
            await self._refresh_nodes()
        except _redis_errors() as exc:
            self._down(exc)
        self.on_routes()  # whatever changed here (a port lost, or free again)

    async def _renew_holds(self, held: list[tuple[int, str]], ms: int) -> None:
        """Renew this node's holds of ``held`` (port, owner), in one pipeline; a port another
        owner took meanwhile (this node's hold lapsed: paused, cut off) is given up
        (``on_lost``)."""
        async with asyncio.timeout(self.timeout * 2):
            async with self._client().pipeline(transaction=False) as pipe:
                for port, owner in held:
                    keys = self._port_keys(port)
                    pipe.eval(CLAIM, 2, *keys, owner, self.node, ms, port)
                results = await pipe.execute(raise_on_error=False)
        for (port, owner), holder in zip(held, results, strict=True):
            if isinstance(holder, Exception):  # Redis answered: this key only
                logger.warning("renewing %s: %s", self.port_key(port), holder)
            elif self.held.get(port) != owner:  # released while renewing: let it go again
                if holder in (None, "+"):
                    keys = self._port_keys(port)
                    await self._call("eval", RELEASE, 2, *keys, owner, self.node, port)
            elif holder == "+":  # Redis had lost it (a restart, a flush): the others learn it
                await self._tell_lease(port, owner)
            elif holder:
                del self.held[port]
                self._unroute(port, owner, self.node)
                other, node = split_holder(holder)
                self._route(port, other, node, time.monotonic() + self.lease)
                why = f"the fleet's lease on port {port} went to {other} on gateway {node}"
                logger.warning("%s: this gateway stops serving it", why)
                self.on_lost(port, why)

    async def _refresh_nodes(self) -> None:
        """Which nodes live (their keys have not expired), and where each takes forwarded
        clients; the holds of the others are forgotten."""
        nodes_key = f"{self.prefix}nodes"
        try:
            names = sorted(await self._call("smembers", nodes_key))
            keys = [f"{self.prefix}node:{name}" for name in names]
            values = await self._call("mget", keys) if keys else []
        except _response_errors() as exc:  # the index is not a set: that key's fault
            logger.warning("ignoring fleet key %s: %s", nodes_key, exc)
            return
        links: dict[str, str] = {}
        for name, value in zip(names, values, strict=True):
            if value is None:
                continue
            try:
                links[name] = valid_link(json.loads(value).get("link", ""))
            except (ValueError, AttributeError, RecursionError):
                logger.warning("ignoring fleet key %snode:%s: not a node's JSON", self.prefix, name)
                links[name] = ""
        if gone := set(names) - links.keys():
            await self._call("srem", nodes_key, *gone)
        dead = {n for route in self.routes.values() for n in route.nodes} - links.keys()
        self.links = links
        if dead - {self.node}:
            logger.info("gateways gone from the fleet: %s", ", ".join(sorted(dead)))
            self._drop_nodes(dead - {self.node})
            self.on_routes()

    async def resync(self) -> None:
        """Read every lease of the fleet again (pub/sub keeps them between reads; a read
        repairs what a message lost). Raises what a Redis command raises."""
        self._resync_due = time.monotonic() + RESYNC_INTERVAL
        index = f"{self.prefix}ports"
        try:
            members = await self._call("smembers", index)
        except _response_errors() as exc:  # the index is not a set: that key's fault
            logger.warning("ignoring fleet key %s: %s", index, exc)
            return
        ports = sorted(port for p in members if (port := _port_number(p)) is not None)
        if len(ports) < len(members):
            logger.warning("ignoring members of fleet key %s that are not ports", index)
        seconds, micros = await self._call("time")
        now_ms, now = int(seconds) * 1000 + int(micros) // 1000, time.monotonic()
        routes: dict[int, Route] = {}
        ended: list[int] = []
        for start in range(0, len(ports), RESYNC_BATCH):
            batch = ports[start : start + RESYNC_BATCH]
            async with asyncio.timeout(self.timeout * 2):
                async with self._client().pipeline(transaction=False) as pipe:
                    for port in batch:
                        pipe.hgetall(self.port_key(port))
                    results = await pipe.execute(raise_on_error=False)
            for port, fields in zip(batch, results, strict=True):
                if not isinstance(fields, dict) or not isinstance(fields.get("owner"), str):
                    if not fields:  # the lease expired: out of the index
                        ended.append(port)
                    continue
                for name, value in fields.items():
                    expires = _number(value) if name.startswith("node:") else 0
                    if expires > now_ms:
                        route = routes.setdefault(port, Route(fields["owner"], {}))
                        route.nodes[name[5:]] = now + (expires - now_ms) / 1000
        if ended:
            await self._call("srem", index, *ended)
        self.routes = routes
        self.on_routes()

    async def claim(self, port: int, owner: str) -> str | None:
        """Lease ``port`` to ``owner`` fleet-wide: None, or who holds it. Raises TransportError
        when Redis cannot be reached."""
        try:
            ms, keys = int(self.lease * 1000), self._port_keys(port)
            holder = await self._call("eval", CLAIM, 2, *keys, owner, self.node, ms, port)
        except _response_errors() as exc:  # Redis answered: not a lease we can take
            logger.warning("claiming %s: %s", self.port_key(port), exc)
            return f"a key of the fleet's registry that is not a lease ({self.port_key(port)})"
        except _redis_errors() as exc:
            self._down(exc)
            raise TransportError(f"the fleet's registry cannot be reached: {self.error}") from None
        if holder == "?":
            logger.warning("claiming port %d: %s is not a lease", port, self.port_key(port))
            return f"a key of the fleet's registry that is not a lease ({self.port_key(port)})"
        if holder and holder != "+":
            other, node = split_holder(holder)
            return f"{other} on gateway {node}"
        self.held[port] = owner
        self._route(port, owner, self.node, time.monotonic() + self.lease)
        await self._tell_lease(port, owner)
        return None

    async def _tell_lease(self, port: int, owner: str) -> None:
        """Tell the other nodes that this one holds ``port`` for ``owner``, and where it takes
        links."""
        await self._tell({"action": "lease", "port": port, "owner": owner, "link": self.link})

    async def _tell(self, action: dict[str, Any]) -> None:
        """Tell the other nodes (best effort: a message lost is repaired by the next read of
        the leases)."""
        try:
            await self._call("publish", self.actions, json.dumps({**action, "node": self.node}))
        except _redis_errors() as exc:
            self._down(exc)

    def release(self, port: int, owner: str, tasks: asyncio.TaskGroup) -> None:
        """Let this node's hold of ``port`` go fleet-wide (in ``tasks``: a release never
        waits; :meth:`aclose` waits for those under way)."""
        if self.held.get(port) != owner:
            return
        releasing = self._release(port, owner)
        try:
            task = tasks.create_task(releasing)
        except RuntimeError:  # the gateway is stopping: aclose() releases what is held
            releasing.close()
            return
        del self.held[port]
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        self._unroute(port, owner, self.node)
        self.on_routes()

    async def _release(self, port: int, owner: str) -> None:
        if self.held.get(port) == owner:  # claimed again meanwhile: this node holds it
            return
        try:
            await self._call("eval", RELEASE, 2, *self._port_keys(port), owner, self.node, port)
        except _redis_errors() as exc:
            self._down(exc)  # the hold expires by itself
            return
        await self._tell({"action": "release", "port": port, "owner": owner})

    async def view(self) -> FleetView:
        """The fleet's nodes and leases, read from Redis now; a key that is not the fleet's
        is logged and left out."""
        not_a_node: tuple[type[BaseException], ...] = (
            *_response_errors(), ValueError, TypeError, AttributeError, RecursionError
        )  # fmt: skip
        try:
            nodes, leases = [], []
            for key in await self._scan(f"{self.prefix}node:*"):
                try:
                    about = json.loads(await self._call("get", key))
                    node = key.removeprefix(f"{self.prefix}node:")
                    agents = tuple(sorted(str(a) for a in about.get("agents", [])))
                    address, version = str(about.get("address", "")), str(about.get("version", ""))
                    nodes.append(FleetNode(node, address, version, agents))
                except not_a_node:
                    logger.warning("ignoring fleet key %s: it does not hold a node's JSON", key)
            for key in await self._scan(f"{self.prefix}port:*"):
                port = key.removeprefix(f"{self.prefix}port:")
                try:
                    fields = await self._call("hgetall", key) if port.isdigit() else {}
                except _response_errors():
                    fields = {}
                owner = fields.get("owner")
                holders = tuple(sorted(k[5:] for k in fields if k.startswith("node:")))
                if not isinstance(owner, str) or not holders:
                    logger.warning("ignoring fleet key %s: not a port lease", key)
                    continue
                leases.append(FleetLease(int(port), owner, holders))
        except _redis_errors() as exc:
            self._down(exc)
            return FleetView(False, (), (), self.error)
        nodes.sort(key=lambda n: n.node)
        leases.sort(key=lambda lease: lease.port)
        return FleetView(True, tuple(nodes), tuple(leases))

    async def _scan(self, pattern: str) -> list[str]:
        """The keys that match ``pattern`` (a SCAN of the whole database: for views and
        actions, never for a client)."""
        assert self._redis is not None
        async with asyncio.timeout(self.timeout * 5):
            return [key async for key in self._redis.scan_iter(match=pattern, count=SCAN_COUNT)]

    def _client(self) -> Redis:
        assert self._redis is not None, "start() first"
        return self._redis

    async def _call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """One Redis command, bounded; marks the fleet up again when it answers."""
        async with asyncio.timeout(self.timeout):
            result = await getattr(self._client(), command)(*args, **kwargs)
        self._answered()
        return result

    def _answered(self) -> None:
        if not self.up:
            self._up()

    def _up(self) -> None:
        was_down = self.down_since is not None
        self.up, self.down_since, self.error = True, None, ""
        if was_down:
            logger.info("the fleet's registry answers again: announcing what this gateway holds")
            self._resync_due = 0.0  # and reading what the others hold
            self.on_state(True, "")

    def _down(self, exc: BaseException) -> None:
        self.error = str(exc) or type(exc).__name__
        if self.up or self.down_since is None:
            self.down_since = time.monotonic()
            self.on_state(False, self.error)
        self.up = False
        self._warnings.warning(
            logger,
            time.monotonic(),
            "the fleet's registry (%s) cannot be reached: %s; open tunnels go on, new ports wait",
            _shown(self.url),
            self.error,
        )


class FleetLeases(PortLeases):
    """A gateway's leases in a fleet: its own (one process), then the fleet's in Redis."""

    def __init__(self, fleet: Fleet, tasks: Callable[[], asyncio.TaskGroup | None]) -> None:
        self.fleet = fleet
        self.local = LocalLeases()
        self._tasks = tasks
        self.on_granted: Callable[[int], Awaitable[None]] | None = None  # before it listens

    async def claim(self, bind: str, port: int, agent: str) -> str | None:
        if (holder := await self.local.claim(bind, port, agent)) is not None:
            return holder
        try:
            holder = await self.fleet.claim(port, agent)
        except BaseException:
            self.local.release(bind, port, agent)
            raise
        if holder is not None:
            self.local.release(bind, port, agent)
        elif self.on_granted is not None:
            await self.on_granted(port)
        return holder

    def release(self, bind: str, port: int, agent: str) -> None:
        self.local.release(bind, port, agent)
        still = any(held == port for _, held in self.local.table.held())
        if not still and (tasks := self._tasks()) is not None:
            self.fleet.release(port, agent, tasks)
        self.fleet.on_routes()  # a port no longer held here may be forwarded now


def _response_errors() -> tuple[type[BaseException], ...]:
    """Redis answered, with an error (a key of another type): that key is at fault, not the
    link."""
    from redis.exceptions import ResponseError

    return (ResponseError,)


def _redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis command that failed raises: Redis said no, or it could not be reached."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


def _shown(url: str) -> str:
    """``url`` without its password (``:PASSWORD@``, or ``password=`` in its query)."""
    url = re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)
    return re.sub(r"//([^/@]*?):[^/@]*@", r"//\1:***@", url, count=1)
