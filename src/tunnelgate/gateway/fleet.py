"""A fleet of gateways on Redis (``--fleet redis://…``): fleet-wide port leases, and a registry
of which gateway (a "node") holds which agent. Must not import agent.

Redis is never on a client's path: it is asked when an agent registers a service (a lease) and
on a timer (renewals), never per connection. Keys, under ``tunnelgate:FLEET:``:

- ``port:PORT`` → ``OWNER NODE``, expiring after ``fleet_lease`` seconds unless renewed: the
  agent (or ``group NAME``) that may listen on that port anywhere in the fleet (on any address:
  the fleet's gateways share one public address), and the node that claimed it. A claim
  succeeds when the key is absent or names the same owner (an agent that moved to another node
  takes its ports along), in one Lua script, so two nodes never both get one port for two
  owners.
- ``node:NODE`` → what the node says of itself (JSON), expiring likewise: the fleet's members.
- ``agent:NAME:NODE`` → the services the agent has on that node (JSON), expiring likewise.
- ``actions`` (a pub/sub channel): what one node asks of every node, as JSON; a disconnect
  ``{"action": "disconnect", "agent", "reason", "node"}`` ends the agent's session wherever it
  is, within the time a message takes. A message that does not parse is ignored with a warning.

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from tunnelgate.config import SENTINEL_SCHEME, parse_sentinel_url
from tunnelgate.errors import TransportError
from tunnelgate.gateway.leases import LocalLeases, PortLeases
from tunnelgate.logs import Throttle

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__package__)

PREFIX: Final = "tunnelgate"
REDIS_TIMEOUT: Final = 2.0  # seconds for one Redis command, at most
WARNING_INTERVAL: Final = 30.0  # between warnings while Redis is out of reach
SCAN_COUNT: Final = 500
LISTEN_TIMEOUT: Final = 1.0  # one wait for an action message, below REDIS_TIMEOUT

# KEYS[1]: the port's key. ARGV: owner, node, lease in ms. Grants (returns false) when the key
# is absent or names the same owner; else returns what it holds.
CLAIM: Final = """
local held = redis.call('GET', KEYS[1])
if held then
  local owner = string.match(held, '^(.-) [^ ]*$')
  if owner ~= ARGV[1] then return held end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'PX', ARGV[3])
return false
"""
# KEYS[1]: the port's key. ARGV: owner, node. Deletes the lease if it is still this node's.
RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] .. ' ' .. ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def split_holder(value: str) -> tuple[str, str]:
    """``(owner, node)`` of a port lease's value (an owner may contain spaces: groups)."""
    owner, _, node = value.rpartition(" ")
    return owner, node


@dataclass(frozen=True)
class FleetLease:
    port: int
    owner: str
    node: str


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
    held: dict[int, str] = field(default_factory=dict)  # port → owner, in Redis
    up: bool = False  # Redis answered the last command
    down_since: float | None = None  # monotonic; None while up
    error: str = ""  # why it is down
    _redis: Redis | None = None
    _sentinels: list[Redis] = field(default_factory=list)  # with a redis+sentinel:// URL
    _warnings: Throttle = field(default_factory=lambda: Throttle(WARNING_INTERVAL))
    _announced: set[str] = field(default_factory=set)  # agents with a key of this node

    @property
    def prefix(self) -> str:
        return f"{PREFIX}:{self.name}:"

    @property
    def actions(self) -> str:
        """The pub/sub channel of the fleet's actions."""
        return f"{self.prefix}actions"

    def port_key(self, port: int) -> str:
        return f"{self.prefix}port:{port}"

    async def start(self) -> None:
        """Connect (lazily: the first command does) and announce this node."""
        from redis.asyncio import Redis

        options: dict[str, Any] = {
            "socket_timeout": REDIS_TIMEOUT,
            "socket_connect_timeout": REDIS_TIMEOUT,
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
            self._redis = Redis.from_url(self.url, **options)
        await self.renew()

    async def aclose(self) -> None:
        """Leave the fleet: delete this node's keys (its leases go with it)."""
        if self._redis is None:
            return
        with contextlib.suppress(*_redis_errors()):
            async with asyncio.timeout(REDIS_TIMEOUT):
                for port, owner in list(self.held.items()):
                    await self._call("eval", RELEASE, 1, self.port_key(port), owner, self.node)
                keys = [f"{self.prefix}node:{self.node}"]
                keys += [f"{self.prefix}agent:{a}:{self.node}" for a in self._announced]
                await self._call("delete", *keys)
        await self._redis.aclose()
        self._redis = None
        for sentinel in self._sentinels:
            await sentinel.aclose()

    async def run(self) -> None:
        """Renew every third of the lease time, until cancelled."""
        while True:
            await asyncio.sleep(self.lease / 3)
            await self.renew()

    async def listen(self) -> None:
        """Carry out what other nodes ask (the ``actions`` channel), until cancelled;
        subscribed again after Redis comes back."""
        assert self._redis is not None, "start() first"
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.actions)
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_TIMEOUT)
                    if message is not None:
                        self._act(message.get("data"))
            except _redis_errors() as exc:
                self._down(exc)
            finally:
                with contextlib.suppress(*_redis_errors()):
                    await pubsub.aclose()
            await asyncio.sleep(self.lease / 3)  # the renewals say when Redis is back

    def _act(self, data: Any) -> None:
        try:
            action = json.loads(data)
            kind, agent, reason, node = (
                action["action"], action["agent"], action["reason"], action["node"]
            )  # fmt: skip
            if kind != "disconnect" or not all(isinstance(v, str) for v in (agent, reason, node)):
                raise ValueError(kind)
        except (ValueError, TypeError, KeyError):
            shown = str(data)[:200]
            logger.warning("ignoring a message on %s that is not a fleet action: %r", self.actions,
                           shown)  # fmt: skip
            return
        if node != self.node:
            self.on_disconnect(agent, f"{reason} (asked on gateway {node})")

    async def disconnect(self, agent: str, reason: str) -> bool:
        """Ask every node to end ``agent``'s session; whether another node holds it now (its
        key in the registry). Raises TransportError when Redis cannot be reached."""
        message = {"action": "disconnect", "agent": agent, "reason": reason, "node": self.node}
        try:
            await self._call("publish", self.actions, json.dumps(message))
            elsewhere = [
                key async for key in self._scan(f"{self.prefix}agent:{agent}:*")
                if not key.endswith(f":{self.node}")
            ]  # fmt: skip
        except _redis_errors() as exc:
            self._down(exc)
            raise TransportError(f"the fleet's registry cannot be reached: {self.error}") from None
        return bool(elsewhere)

    async def renew(self) -> None:
        """Announce this node and its agents, and renew every lease it holds (or claim it
        again, after Redis lost it); give up a port another owner holds now."""
        try:
            ms = int(self.lease * 1000)
            node = json.dumps(self.describe())
            await self._call("set", f"{self.prefix}node:{self.node}", node, px=ms)
            agents = self.agents()
            for agent, services in agents.items():
                key = f"{self.prefix}agent:{agent}:{self.node}"
                await self._call("set", key, json.dumps(services), px=ms)
            for gone in self._announced - agents.keys():
                await self._call("delete", f"{self.prefix}agent:{gone}:{self.node}")
            self._announced = set(agents)
            for port, owner in list(self.held.items()):
                holder = await self._call(
                    "eval", CLAIM, 1, self.port_key(port), owner, self.node, ms
                )
                if holder and self.held.get(port) == owner:
                    del self.held[port]
                    other, node = split_holder(holder)
                    why = f"the fleet's lease on port {port} went to {other} on gateway {node}"
                    logger.warning("%s: this gateway stops serving it", why)
                    self.on_lost(port, why)
        except _redis_errors() as exc:
            self._down(exc)

    async def claim(self, port: int, owner: str) -> str | None:
        """Lease ``port`` to ``owner`` fleet-wide: None, or who holds it. Raises TransportError
        when Redis cannot be reached."""
        try:
            ms = int(self.lease * 1000)
            holder = await self._call("eval", CLAIM, 1, self.port_key(port), owner, self.node, ms)
        except _redis_errors() as exc:
            self._down(exc)
            raise TransportError(f"the fleet's registry cannot be reached: {self.error}") from None
        if holder:
            other, node = split_holder(holder)
            return f"{other} on gateway {node}"
        self.held[port] = owner
        return None

    def release(self, port: int, owner: str, tasks: asyncio.TaskGroup) -> None:
        """Let ``port`` go fleet-wide (in ``tasks``: a release never waits)."""
        if self.held.get(port) != owner:
            return
        releasing = self._release(port, owner)
        try:
            tasks.create_task(releasing)
        except RuntimeError:  # the gateway is stopping: aclose() releases what is held
            releasing.close()
            return
        del self.held[port]

    async def _release(self, port: int, owner: str) -> None:
        try:
            await self._call("eval", RELEASE, 1, self.port_key(port), owner, self.node)
        except _redis_errors() as exc:
            self._down(exc)  # it expires by itself

    async def view(self) -> FleetView:
        """The fleet's nodes and leases, read from Redis now."""
        try:
            nodes, leases = [], []
            async for key in self._scan(f"{self.prefix}node:*"):
                text = await self._call("get", key)
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    about = json.loads(text)
                    node = key.removeprefix(f"{self.prefix}node:")
                    agents = tuple(sorted(str(a) for a in about.get("agents", [])))
                    address, version = str(about.get("address", "")), str(about.get("version", ""))
                    nodes.append(FleetNode(node, address, version, agents))
                    continue
                logger.warning("ignoring fleet key %s: it does not hold a node's JSON", key)
            async for key in self._scan(f"{self.prefix}port:*"):
                port = key.removeprefix(f"{self.prefix}port:")
                value = await self._call("get", key)
                if not port.isdigit() or not isinstance(value, str) or " " not in value:
                    logger.warning("ignoring fleet key %s: not a port lease", key)
                    continue
                leases.append(FleetLease(int(port), *split_holder(value)))
        except _redis_errors() as exc:
            self._down(exc)
            return FleetView(False, (), (), self.error)
        nodes.sort(key=lambda n: n.node)
        leases.sort(key=lambda lease: lease.port)
        return FleetView(True, tuple(nodes), tuple(leases))

    async def _scan(self, pattern: str) -> Any:
        assert self._redis is not None
        async with asyncio.timeout(REDIS_TIMEOUT * 5):
            async for key in self._redis.scan_iter(match=pattern, count=SCAN_COUNT):
                yield key

    async def _call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """One Redis command, bounded; marks the fleet up again when it answers."""
        assert self._redis is not None, "start() first"
        async with asyncio.timeout(REDIS_TIMEOUT):
            result = await getattr(self._redis, command)(*args, **kwargs)
        if not self.up:
            self._up()
        return result

    def _up(self) -> None:
        was_down = self.down_since is not None
        self.up, self.down_since, self.error = True, None, ""
        if was_down:
            logger.info("the fleet's registry answers again: announcing what this gateway holds")
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
        return holder

    def release(self, bind: str, port: int, agent: str) -> None:
        self.local.release(bind, port, agent)
        still = any(held == port for _, held in self.local.table.held())
        if not still and (tasks := self._tasks()) is not None:
            self.fleet.release(port, agent, tasks)


def _redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis command that failed raises: Redis said no, or it could not be reached."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


def _shown(url: str) -> str:
    """``url`` without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()
