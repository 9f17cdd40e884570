"""A session's pool of idle data channels, and the clients waiting for one.

The agent keeps data channels open ahead of need; the gateway holds them
here until a client comes. A client takes the newest one (the least likely to
have gone stale), checked to be still open; when none is left it waits, the
agent is asked for more (``PoolRequest``), and a client that leaves while it
waits gives its place up at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from tunnelgate.channel import Channel
from tunnelgate.errors import ConnectionClosed, ProtocolError, TransportError
from tunnelgate.logs import ContextLogger, Throttle, log_closed
from tunnelgate.protocol.wire import Ping, Pong, PoolDiscarded, PoolRequest
from tunnelgate.transport import Stream

POOL_CHECK_AGE: Final = 5.0  # a pooled data channel idle this long is checked before use
POOL_CHECK_TIMEOUT: Final = 1.0  # for the agent's Pong to that check


@dataclass(eq=False)
class _Pooled:
    """An idle data channel, and when it was last known to reach the agent."""

    channel: Channel
    alive_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class PoolStatistics:
    idle: int  # data channels waiting for a client
    waiting: int  # clients waiting for a data channel
    requested: int  # data channels asked of the agent and not yet arrived
    idle_for: tuple[float, ...]  # seconds each idle channel has waited, oldest first


class ChannelPool:
    """Idle data channels of one session (oldest first), and its waiting clients."""

    def __init__(self, control: Channel, log: ContextLogger) -> None:
        self.control = control  # where PoolRequest and PoolDiscarded go
        self.log = log
        self.idle: deque[_Pooled] = deque()
        self.waiters: deque[asyncio.Future[Channel]] = deque()
        self.requested = 0

    def statistics(self) -> PoolStatistics:
        now = time.monotonic()
        idle_for = tuple(now - pooled.alive_at for pooled in self.idle)
        return PoolStatistics(len(self.idle), len(self.waiters), self.requested, idle_for)

    def add(self, channel: Channel, max_size: int) -> None:
        """A new data channel: to the client waiting longest, else to the pool."""
        self.requested = max(0, self.requested - 1)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(channel)
                return
        # No client waits: whatever was asked for and is still on its way is moot
        # (the clients it was for left or timed out); ask afresh when one waits.
        self.requested = 0
        if len(self.idle) >= max_size:
            self.log.debug("pool full (%d); closing an extra data channel", len(self.idle))
            channel.abort()
            return
        self.idle.append(_Pooled(channel))

    def release(self, count: int) -> None:
        """Close up to ``count`` idle channels, as the agent asked (PoolRelease)."""
        for _ in range(min(count, len(self.idle))):
            self.idle.popleft().channel.close()

    def abort_idle(self) -> None:
        while self.idle:
            self.idle.popleft().channel.abort()

    def discard(self) -> None:
        """Close every idle channel and turn every waiting client away."""
        self.abort_idle()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.cancel()

    async def take(
        self,
        stream: Stream,
        client: str,
        log: ContextLogger,
        *,
        max_pending: int,
        pending_timeout: float,
        refusals: Throttle,
    ) -> Channel | None:
        """An open pooled data channel, or one the agent opens within
        ``pending_timeout``; None (logged) if none comes, ``max_pending``
        clients wait already, or the client leaves.

        One closed or reset by the network is seen at once
        (:meth:`Channel.is_idle_and_open`); one idle longer than
        ``POOL_CHECK_AGE`` is first checked with a Ping, because a path that
        went silent (a NAT mapping dropped without a word) looks open. If that
        check fails, the older ones are no better: the pool is discarded and
        the client waits for a fresh channel instead of failing.

        A client that leaves while it waits gives up its place at once, so a
        flood of abandoned connections (or a load balancer's health checks)
        neither fills the queue nor costs the agent a channel each: one that
        resets, or closes without having sent a byte. One that sent bytes and
        then half-closed still wants its answer, and waits on.
        """
        while self.idle:
            pooled = self.idle.pop()
            channel = pooled.channel
            if not channel.is_idle_and_open():
                self.log.debug("discarding a stale pooled data channel")
                channel.abort()
                continue
            if time.monotonic() - pooled.alive_at <= POOL_CHECK_AGE:
                return channel
            if await _answers_ping(channel):
                return channel
            channel.abort()
            self.log.debug(
                "a pooled data channel idle for %.0f s did not answer; discarding %d more",
                time.monotonic() - pooled.alive_at,
                len(self.idle),
            )
            discarded = 1 + len(self.idle)
            self.abort_idle()
            await self.control.send_message(PoolDiscarded(discarded))
        if len(self.waiters) >= max_pending:
            refusals.warning(
                log,
                time.monotonic(),
                "refusing client %s: %d clients already wait for a data channel "
                "(max_pending_clients)",
                client,
                len(self.waiters),
            )
            return None
        waiter: asyncio.Future[Channel] = asyncio.get_running_loop().create_future()
        waited_from = time.monotonic()
        self.waiters.append(waiter)
        missing = len(self.waiters) - self.requested
        if missing > 0:
            self.requested += missing
            await self.control.send_message(PoolRequest(missing))
        try:
            async with asyncio.timeout(pending_timeout):
                taken = await _unless_left(waiter, stream)
            if taken is None:  # its one closing line, as for every client
                duration, end = time.monotonic() - waited_from, "left before a data channel came"
                log_closed(log, client, 0, 0, duration, end, normal=True)
                if waiter.done() and not waiter.cancelled():  # came in the same instant
                    self.idle.append(_Pooled(waiter.result()))
            return taken
        except TimeoutError:
            log.warning(
                "no data channel from the agent for client %s within %g s "
                "(%d clients waiting); closing it",
                client,
                pending_timeout,
                len(self.waiters),
            )
            return None
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)


async def _unless_left(waiter: asyncio.Future[Channel], stream: Stream) -> Channel | None:
    """The channel ``waiter`` gets, or None if the client leaves first: it
    resets ``stream``, or closes it without having sent anything."""
    with stream.watch_peer_close() as closed:
        either: set[asyncio.Future[Any]] = {waiter, closed}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done() and (
            stream.pending_error() is not None or not stream.has_unread_bytes()
        ):
            return None
    return await waiter  # got it, or a half-close after a request: it wants the answer


async def _answers_ping(channel: Channel) -> bool:
    """True if the agent answers a Ping on this pooled channel within POOL_CHECK_TIMEOUT."""
    try:
        async with asyncio.timeout(POOL_CHECK_TIMEOUT):
            await channel.send_message(Ping(0))
            return isinstance(await channel.receive(), Pong)
    except (TimeoutError, TransportError, ProtocolError, ConnectionClosed):
        return False
    except BaseException:
        channel.abort()  # cancelled: the channel is in neither the pool nor a relay
        raise
