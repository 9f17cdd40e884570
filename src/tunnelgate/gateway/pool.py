"""A session's idle data channels, opened ahead of need, and the clients waiting for one:
a client takes the newest (the least likely to have gone stale), checked to be still
open; when none is left it waits and the agent is asked for more. Must not import agent."""

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
    channel: Channel
    alive_at: float = field(default_factory=time.monotonic)  # last known to reach the agent


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
        self.closed = False  # the session ended: no channel joins any more

    def statistics(self) -> PoolStatistics:
        now = time.monotonic()
        idle_for = tuple(now - pooled.alive_at for pooled in self.idle)
        return PoolStatistics(len(self.idle), len(self.waiters), self.requested, idle_for)

    def add(self, channel: Channel, max_size: int, *, reused: bool = False) -> None:
        """A data channel, new or ``reused`` (it finished with a client, Finished each way):
        to the client waiting longest, else to the pool; closed if it is closed or full."""
        if self.closed:
            _turn_away(channel, reused)
            return
        if not reused:
            self.requested = max(0, self.requested - 1)
        while self.waiters:
            if not (waiter := self.waiters.popleft()).done():
                waiter.set_result(channel)
                return
        if not reused:  # no client waits: what is still on its way was for clients that left
            self.requested = 0
        if len(self.idle) >= max_size:
            self.log.debug("pool full (%d); closing an extra data channel", len(self.idle))
            _turn_away(channel, reused)
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
        self.closed = True
        self.abort_idle()
        while self.waiters:
            if not (waiter := self.waiters.popleft()).done():
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
    ) -> Channel | str:
        """An open data channel, pooled or opened within ``pending_timeout``; else why not
        (logged): "pool_timeout", "limit" (``max_pending`` clients wait) or "left"."""
        while self.idle:
            pooled = self.idle.pop()
            channel = pooled.channel
            if not channel.is_idle_and_open():  # closed or reset by the network
                self.log.debug("discarding a stale pooled data channel")
                channel.abort()
                continue
            # A path gone silent (a NAT mapping dropped) looks open: ping one idle long.
            if time.monotonic() - pooled.alive_at <= POOL_CHECK_AGE or await _answers_ping(channel):
                return channel
            channel.abort()
            self.log.debug(
                "a pooled data channel idle for %.0f s did not answer; discarding %d more",
                time.monotonic() - pooled.alive_at,
                len(self.idle),
            )
            # The older ones are no better: the client waits for a fresh one instead.
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
            return "limit"
        waiter: asyncio.Future[Channel] = asyncio.get_running_loop().create_future()
        waited_from = time.monotonic()
        self.waiters.append(waiter)
        if (missing := len(self.waiters) - self.requested) > 0:
            self.requested += missing
            await self.control.send_message(PoolRequest(missing))
        taken: Channel | None = None
        try:
            async with asyncio.timeout(pending_timeout):
                taken = await _unless_left(waiter, stream)
            if taken is None:  # its one closing line, as for every client
                duration, end = time.monotonic() - waited_from, "left before a data channel came"
                log_closed(log, client, 0, 0, duration, end, normal=True)
                return "left"
            return taken
        except TimeoutError:
            log.warning(
                "no data channel from the agent for client %s within %g s "
                "(%d clients waiting); closing it",
                client,
                pending_timeout,
                len(self.waiters),
            )
            return "pool_timeout"
        finally:
            if not waiter.done():
                waiter.cancel()
            elif not waiter.cancelled() and taken is None:  # came as the client left, or timed out
                self._keep(waiter.result())
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)

    def _keep(self, channel: Channel) -> None:
        """A channel given to a client that did not take it: idle again, unless the pool is
        closed (the session ended meanwhile)."""
        if self.closed:
            channel.abort()
        else:
            self.idle.append(_Pooled(channel))


def _turn_away(channel: Channel, reused: bool) -> None:
    """Close a channel the pool does not take: a reused one gently (the agent may still be
    finishing its last connection's end), a new one at once."""
    if reused:
        channel.close()
    else:
        channel.abort()


async def _unless_left(waiter: asyncio.Future[Channel], stream: Stream) -> Channel | None:
    """The channel ``waiter`` gets, or None if the client resets or closes without a byte
    sent (a health check); one that sent bytes and half-closed still wants its answer."""
    with stream.watch_peer_close() as closed:
        either: set[asyncio.Future[Any]] = {waiter, closed}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done() and (
            stream.pending_error() is not None or not stream.has_unread_bytes()
        ):
            return None
    return await waiter


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
