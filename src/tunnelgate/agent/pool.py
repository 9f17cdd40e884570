"""The agent's pool of data channels: how many to keep open (:class:`Demand`, pure), and the
tasks that open them, wait in the pool and serve the client each is started for
(:class:`DataChannels`). The target is ``pool_size`` idle channels, or more when clients come
faster: the rate of Starts on fresh channels (over ``DEMAND_WINDOW``) times the time a channel
takes to open, times ``DEMAND_HEADROOM``; channels the gateway asked for come on top. A channel
reused after a clean end comes back after its client, so its Starts count as activity (no surplus
is released while clients come) but not for the rate.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from tunnelgate.channel import Channel
from tunnelgate.errors import ConnectionClosed, ProtocolError, TransportError
from tunnelgate.logs import ContextLogger
from tunnelgate.protocol.wire import Ping, Pong, PoolRelease, Refused, Start

OPEN_RETRY_DELAY: Final = 1.0  # pause after a data channel failed to open
MAX_EXTRA_CHANNELS: Final = 1024
DEMAND_WINDOW: Final = 1.0  # seconds over which the rate of new clients is averaged
DEMAND_HEADROOM: Final = 2.0  # idle channels kept per channel in use while one opens


@dataclass(frozen=True)
class PoolStatistics:
    idle: int  # open data channels waiting for a Start
    opening: int
    serving: int  # data channels carrying a client
    target: int  # idle channels wanted now


class Demand:
    """How many data channels to keep open; pure, time passed in."""

    def __init__(self, pool_size: int, limit: int, now: float) -> None:
        self.pool_size = pool_size
        self.limit = limit  # the gateway's max_pool_size
        self.idle = 0
        self.opening = 0
        self.extra = 0  # asked for by the gateway
        self.rate = 0.0  # Starts on fresh channels per second, decaying
        self.rate_at = now
        self.active_at = now  # the last Start, on any channel
        self.open_time = 0.0  # seconds to open a channel, averaged
        self.releasing = 0  # idle channels the gateway was asked to close
        self.lost = 0  # idle channels the gateway discarded (a dead path): not ready

    @property
    def ready(self) -> int:
        """Idle channels that should still reach the gateway."""
        return max(0, self.idle - self.lost)

    def rate_now(self, now: float) -> float:
        """Starts per second, decayed since the last one."""
        return self.rate * math.exp((self.rate_at - now) / DEMAND_WINDOW)

    def started(self, now: float, fresh: bool = True) -> None:
        """Count one client. Only one on a ``fresh`` channel (its first) counts for the
        rate: a reused channel comes back after its client, so clients on reused channels
        consume none (with reuse, the rate is how fast clients outgrow the channels)."""
        self.active_at = now
        if fresh:
            self.rate = self.rate_now(now) + 1 / DEMAND_WINDOW
            self.rate_at = now

    def opened(self, seconds: float) -> None:
        """A channel opened in ``seconds``; it is idle now."""
        self.open_time += (seconds - self.open_time) / 4
        self.extra = max(0, self.extra - 1)
        self.idle += 1

    def target(self, now: float) -> int:
        demand = round(self.rate_now(now) * self.open_time * DEMAND_HEADROOM)  # 0 once faded
        return min(self.limit, max(self.pool_size, demand) + self.extra)

    def to_open(self, now: float) -> int:
        return max(0, self.target(now) - self.ready - self.opening)

    def surplus(self, now: float) -> int:
        """Idle channels to release, once demand stayed below them for a while."""
        surplus = self.ready - self.releasing - self.target(now)
        return surplus if surplus > 0 and self.active_at < now - DEMAND_WINDOW else 0

    def request(self, count: int) -> None:
        self.extra = min(MAX_EXTRA_CHANNELS, self.extra + count)

    def discarded(self, count: int) -> None:
        """The gateway closed ``count`` pooled channels whose path went silent. Which of ours
        cannot be told: count that many idle ones as lost until channels end unused."""
        self.lost = min(self.idle, self.lost + count)

    def settled(self) -> None:
        """Demand stayed flat for a window: the gateway closes only channels still idle on its
        side, so count afresh; channels it asked for are moot too (no client waits)."""
        self.releasing = 0
        self.extra = 0


@dataclass(kw_only=True, eq=False)
class DataChannels:
    """The tasks of a session's data channels: open, wait in the pool, serve a Start's client."""

    demand: Demand
    group: asyncio.TaskGroup
    control: Channel
    open_channel: Callable[[], Awaitable[Channel]]
    # Carry a Start's client; True if the channel ended cleanly and awaits its end handshake.
    serve: Callable[[Channel, Start, bool], Awaitable[bool]]
    log: ContextLogger
    reuse: bool = False  # the gateway takes data channels back after a clean end
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # One future per client being carried, done when it ends (the session's set): not the
    # channel's task, which outlives its client when the channel is reused.
    serving: set[asyncio.Future[None]]
    stopped: bool = False  # draining: open no more channels

    def statistics(self) -> PoolStatistics:
        demand, serving = self.demand, len(self.serving)
        return PoolStatistics(demand.idle, demand.opening, serving, demand.target(time.monotonic()))

    def stop(self) -> None:
        self.stopped = True
        self.changed.set()

    def request(self, count: int) -> None:
        self.demand.request(count)
        self.changed.set()

    def discarded(self, count: int) -> None:
        self.demand.discarded(count)
        self.log.info("the gateway found %d pooled data channel(s) dead; opening new ones", count)
        self.changed.set()

    async def run(self) -> None:
        """Open channels up to the target; release the surplus once demand stays below it."""
        demand = self.demand
        while not self.stopped:
            for _ in range(demand.to_open(time.monotonic())):
                demand.opening += 1
                self.group.create_task(self._channel())
            if surplus := demand.surplus(time.monotonic()):
                demand.releasing += surplus
                await self.control.send_message(PoolRelease(surplus))
            above = demand.ready > demand.pool_size  # then look again as the rate decays
            try:
                async with asyncio.timeout(DEMAND_WINDOW if above else None):
                    await self.changed.wait()
            except TimeoutError:
                demand.settled()
            self.changed.clear()

    async def _channel(self) -> None:
        """Root of one data channel's task: open, wait in the pool, serve a client; again
        after each clean end when the gateway reuses channels."""
        demand = self.demand
        began = time.monotonic()
        try:
            channel = await self.open_channel()
        except (TransportError, ProtocolError, ConnectionClosed) as exc:
            self.log.warning("cannot open a data channel: %s", exc)
            await asyncio.sleep(OPEN_RETRY_DELAY)  # no retry storm against a failing gateway
            return
        finally:
            demand.opening -= 1
            self.changed.set()  # may have left a surplus to release, or a channel to open
        demand.opened(time.monotonic() - began)
        fresh = True
        while await self._serve_one(channel, fresh):
            fresh = False
            if self.stopped:  # draining: the gateway takes no client on it now
                channel.close()
                return
            demand.idle += 1
            self.changed.set()

    async def _serve_one(self, channel: Channel, fresh: bool) -> bool:
        """Wait in the pool for a Start and serve its client; True if the channel is pooled
        again (Finished each way), else it is closed."""
        demand = self.demand
        try:
            start = await self._wait_for_start(channel, fresh)
        finally:
            demand.idle -= 1
            self.changed.set()  # the target may have grown (with a start), or a channel is gone
        if start is None or start == "pause":
            if start == "pause":  # no retry storm against a gateway refusing channels
                await asyncio.sleep(OPEN_RETRY_DELAY)
            return False
        demand.started(time.monotonic(), fresh)
        served: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.serving.add(served)
        try:
            if not await self.serve(channel, start, self.reuse):
                return False
        except (TransportError, ProtocolError, ConnectionClosed) as exc:
            self.log.warning("conn %d: %s", start.conn, exc)
            channel.abort()
            return False
        except Exception:
            self.log.exception("unexpected error serving conn %d", start.conn)
            channel.abort()
            return False
        finally:
            self.serving.discard(served)
            served.set_result(None)
        if self.stopped:  # draining: the gateway, which cannot know yet, might start it again
            channel.close()
            return False
        try:  # no timer: the gateway's Finished waits for its client to take the last bytes
            await channel.finish(start.conn)
        except (TransportError, ProtocolError, ConnectionClosed) as exc:
            self.log.debug("conn %d: data channel not reused: %s", start.conn, exc)
            channel.close()
            return False
        except BaseException:
            channel.abort()
            raise
        return True

    async def _wait_for_start(
        self, channel: Channel, fresh: bool
    ) -> Start | Literal["pause"] | None:
        """The Start that puts a pooled channel to use; None if it ended unused, "pause" if
        the gateway ended a fresh one unexpectedly (the caller pauses: no retry storm against a
        gateway refusing channels). A reused one the gateway closes was turned away (its pool
        was full or its session ending): neither a release nor a loss, and no reason to pause."""
        demand = self.demand
        try:
            # The gateway checks a channel that has been idle a while with a Ping.
            while isinstance(message := await channel.receive(), Ping):
                await channel.send_message(Pong(message.seq))
        except (TransportError, ProtocolError, ConnectionClosed) as exc:
            channel.abort()
            if not fresh and isinstance(exc, ConnectionClosed):
                return None
            if demand.releasing and isinstance(exc, ConnectionClosed):
                demand.releasing -= 1  # closed as asked with PoolRelease (a clean close)
            elif demand.lost:
                demand.lost -= 1  # one the gateway discarded: its path comes back with a reset
            else:
                self.log.debug("pooled data channel ended unused: %s", exc)
                return "pause"
            return None
        except BaseException:
            channel.abort()
            raise
        if isinstance(message, Start):
            return message
        channel.abort()
        if isinstance(message, Refused):
            self.log.warning("data channel refused by the gateway: %s", message.reason)
            return "pause"
        return None
