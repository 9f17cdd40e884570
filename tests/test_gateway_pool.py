"""The gateway's pool of idle data channels (``gateway/pool.py``) on its own:
real loopback connections on port 0 stand for the data channels, the control
channel and the clients; the test plays the agent at their far ends."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from kit.logs import LogRecorder, recording
from kit.waiting import wait_until
from streamkit import tcp_pair

from tunnelgate.channel import Channel
from tunnelgate.gateway.pool import ChannelPool
from tunnelgate.logs import ContextLogger, Throttle
from tunnelgate.protocol.session import Side, State
from tunnelgate.protocol.wire import FrameDecoder, PoolRequest
from tunnelgate.transport import SocketStream

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_unexpected_errors")]

MAX_SIZE = 4
WAIT = 5.0  # a client's pending_timeout where no test lets it pass


@dataclass
class Ends:
    """A gateway-side channel and the agent's end of it."""

    channel: Channel
    far: socket.socket
    end: str | None = None

    def ended(self) -> str | None:
        """How the gateway ended this channel, as the agent sees it: "eof",
        "reset", or None while it is open (the kernel reports a reset once)."""
        if self.end is None:
            try:
                self.end = "eof" if not self.far.recv(1, socket.MSG_PEEK) else None
            except BlockingIOError:
                pass
            except ConnectionResetError:
                self.end = "reset"
        return self.end


class Pool:
    """A ChannelPool with its control channel, and everything the test opened."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self._sockets = sockets
        self.log = ContextLogger(logging.getLogger("tunnelgate.test"), session="ab12")
        near, self.control_far = self.pair()
        control = Channel(SocketStream(near), Side.GATEWAY)
        control.conversation.state = State.CONTROL
        self.pool = ChannelPool(control, self.log)
        self.decoder = FrameDecoder()
        self.refusals = Throttle(5.0)

    def pair(self) -> tuple[socket.socket, socket.socket]:
        """The gateway's end of a loopback connection, and the far end."""
        near, far = tcp_pair()
        self._sockets += [near, far]
        return near, far

    def data_channel(self) -> Ends:
        """A pooled data channel, as the gateway holds one after its handshake."""
        near, far = self.pair()
        channel = Channel(SocketStream(near), Side.GATEWAY)
        channel.conversation.state = State.POOLED
        return Ends(channel, far)

    def client(self) -> tuple[socket.socket, socket.socket]:
        """A client connection: the gateway's socket and the client's own."""
        return self.pair()

    async def take(
        self, client: socket.socket, *, max_pending: int = 8, pending_timeout: float = WAIT
    ) -> Channel | str:
        return await self.pool.take(
            SocketStream(client),
            "127.0.0.1:40000",
            self.log,
            max_pending=max_pending,
            pending_timeout=pending_timeout,
            refusals=self.refusals,
        )

    async def requests(self, count: int) -> list[int]:
        """The counts of the next ``count`` PoolRequests on the control channel."""
        loop = asyncio.get_running_loop()
        found: list[int] = []
        async with asyncio.timeout(5):
            while len(found) < count:
                data = await loop.sock_recv(self.control_far, 4096)
                assert data, "the control channel closed"
                for event in self.decoder.feed(data):
                    assert isinstance(event, PoolRequest), event
                    found.append(event.count)
        return found


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


@pytest.fixture
async def pool(sockets: list[socket.socket]) -> Pool:
    """A session's pool, in the test's loop."""
    return Pool(sockets)


@contextlib.asynccontextmanager
async def waiting(pool: Pool, client: socket.socket) -> AsyncIterator[asyncio.Task[Channel | str]]:
    """A client waiting in ``take`` (its request for a channel sent); cancelled
    after the block if still waiting."""
    before = pool.pool.statistics().waiting
    task = asyncio.create_task(pool.take(client))
    await wait_until(lambda: pool.pool.statistics().waiting > before, what="the client to wait")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_pool_new_channel_goes_to_the_waiting_client_first(pool: Pool) -> None:
    """A client that found no idle channel asks the agent for one, and the
    next channel that comes is its, not the pool's."""
    client, _ = pool.client()
    async with waiting(pool, client) as taking:
        assert await pool.requests(1) == [1]
        assert pool.pool.statistics().requested == 1
        arriving = pool.data_channel()
        pool.pool.add(arriving.channel, MAX_SIZE)
        async with asyncio.timeout(5):
            assert await taking is arriving.channel
    stats = pool.pool.statistics()
    assert (stats.idle, stats.waiting, stats.requested) == (0, 0, 0)


async def test_pool_takes_the_newest_idle_channel_without_asking(pool: Pool) -> None:
    """With idle channels pooled, a client gets the newest (the least likely
    to have gone stale) at once, and nothing is asked of the agent."""
    older, newer = pool.data_channel(), pool.data_channel()
    pool.pool.add(older.channel, MAX_SIZE)
    pool.pool.add(newer.channel, MAX_SIZE)
    client, _ = pool.client()
    async with asyncio.timeout(5):
        assert await pool.take(client) is newer.channel
    assert pool.pool.statistics().idle == 1
    assert pool.pool.statistics().requested == 0


async def test_pool_full_closes_the_extra_channels(pool: Pool) -> None:
    """A channel that arrives when no client waits and the pool is full is
    closed (reset); the pooled ones stay open."""
    pooled = [pool.data_channel() for _ in range(MAX_SIZE)]
    extra = pool.data_channel()
    for ends in [*pooled, extra]:
        pool.pool.add(ends.channel, MAX_SIZE)
    assert pool.pool.statistics().idle == MAX_SIZE
    await wait_until(extra.ended, what="the extra channel to be closed")
    assert extra.ended() == "reset"
    assert [ends.ended() for ends in pooled] == [None] * MAX_SIZE


async def test_pool_skips_a_channel_the_agent_closed(pool: Pool) -> None:
    """An idle channel the agent (or the network) closed is discarded, and the
    client gets the next one, without waiting."""
    good, stale = pool.data_channel(), pool.data_channel()
    pool.pool.add(good.channel, MAX_SIZE)
    pool.pool.add(stale.channel, MAX_SIZE)
    stale.far.close()  # a FIN the gateway has not read yet
    client, _ = pool.client()
    async with asyncio.timeout(5):
        assert await pool.take(client) is good.channel
    assert pool.pool.statistics().idle == 0


async def test_pool_release_closes_the_oldest_idle_channels(pool: Pool) -> None:
    """PoolRelease(n) closes n idle channels, oldest first, each with a FIN."""
    channels = [pool.data_channel() for _ in range(3)]
    for ends in channels:
        pool.pool.add(ends.channel, MAX_SIZE)
    pool.pool.release(2)
    await wait_until(lambda: channels[1].ended(), what="two channels to be closed")
    assert [ends.ended() for ends in channels] == ["eof", "eof", None]
    assert pool.pool.statistics().idle == 1
    pool.pool.release(5)  # more than there are: all of them, no error
    assert pool.pool.statistics().idle == 0


async def test_pool_discard_closes_idle_channels_and_turns_waiting_clients_away(
    pool: Pool,
) -> None:
    """When the session ends, idle channels are reset and every waiting client
    is turned away (its wait is cancelled)."""
    idle = pool.data_channel()
    first, _ = pool.client()
    second, _ = pool.client()
    async with waiting(pool, first) as one, waiting(pool, second) as other:
        assert pool.pool.statistics().waiting == 2
        assert await pool.requests(2) == [1, 1]
        pool.pool.discard()
        for taking in (one, other):
            with pytest.raises(asyncio.CancelledError):
                await taking
        pool.pool.add(idle.channel, MAX_SIZE)  # one arriving late is pooled...
        pool.pool.discard()  # ...and reset with the others
    await wait_until(idle.ended, what="the idle channel to be reset")
    assert idle.ended() == "reset"
    stats = pool.pool.statistics()
    assert (stats.idle, stats.waiting) == (0, 0)


async def test_pool_statistics_count_idle_waiting_and_requested(pool: Pool) -> None:
    """statistics() is a snapshot: idle channels (and how long each has
    waited, oldest first), waiting clients, channels asked for."""
    first, second = pool.data_channel(), pool.data_channel()
    pool.pool.add(first.channel, MAX_SIZE)
    pool.pool.add(second.channel, MAX_SIZE)
    stats = pool.pool.statistics()
    assert (stats.idle, stats.waiting, stats.requested) == (2, 0, 0)
    assert len(stats.idle_for) == 2 and stats.idle_for[0] >= stats.idle_for[1] >= 0
    with pytest.raises(AttributeError):
        stats.idle = 5  # type: ignore[misc]  # frozen
    clients = [pool.client()[0] for _ in range(5)]
    async with contextlib.AsyncExitStack() as stack:
        for client in clients:  # two take the idle ones; three wait
            taking = asyncio.create_task(pool.take(client))
            stack.push_async_callback(cancel, taking)
        await wait_until(lambda: pool.pool.statistics().waiting == 3, what="three waiting")
        stats = pool.pool.statistics()
        assert (stats.idle, stats.waiting, stats.requested) == (0, 3, 3)
        assert sum(await pool.requests(3)) == 3


def has_bytes(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


async def cancel(task: asyncio.Task[Channel | str]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_pool_refuses_a_client_beyond_max_pending(pool: Pool) -> None:
    """With max_pending clients waiting already, the next one is refused at
    once ("limit") with a warning, and asks the agent for nothing."""
    first, _ = pool.client()
    async with waiting(pool, first):
        assert await pool.requests(1) == [1]
        second, _ = pool.client()
        with recording("tunnelgate", logging.WARNING) as log:
            assert await pool.take(second, max_pending=1) == "limit"
        assert log.find("refusing client 127.0.0.1:40000: 1 clients already wait")
        assert pool.pool.statistics().requested == 1


async def test_pool_client_waits_no_longer_than_pending_timeout(pool: Pool) -> None:
    """A client for which no channel comes gets "pool_timeout" after pending_timeout,
    with a warning, and leaves no place in the queue behind."""
    client, _ = pool.client()
    with recording("tunnelgate", logging.WARNING) as log:
        async with asyncio.timeout(5):
            assert await pool.take(client, pending_timeout=0.05) == "pool_timeout"
    assert log.find("no data channel from the agent for client 127.0.0.1:40000 within 0.05 s")
    assert pool.pool.statistics().waiting == 0


@pytest.mark.parametrize("leaves", ["reset", "close"])
async def test_pool_client_that_leaves_while_waiting_gives_its_place_up(
    pool: Pool, leaves: str, tunnel_log: LogRecorder
) -> None:
    """A waiting client that resets, or closes without a byte sent, is given
    up at once ("left", one closing line); the channel that comes then is pooled."""
    client, own = pool.client()
    async with waiting(pool, client) as taking:
        if leaves == "reset":
            own.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        own.close()
        async with asyncio.timeout(5):
            assert await taking == "left"
    assert tunnel_log.find("closed client=127.0.0.1:40000 up=0 down=0")
    assert tunnel_log.find("end=left before a data channel came")
    assert pool.pool.statistics().waiting == 0
    arriving = pool.data_channel()
    pool.pool.add(arriving.channel, MAX_SIZE)
    assert pool.pool.statistics().idle == 1


async def test_pool_client_that_half_closes_after_its_request_keeps_waiting(
    pool: Pool,
) -> None:
    """A client that sent its request and then half-closed still wants the
    answer: it keeps its place and gets the next channel."""
    client, own = pool.client()
    async with waiting(pool, client) as taking:
        own.send(b"GET / HTTP/1.0\r\n\r\n")
        own.shutdown(socket.SHUT_WR)
        await wait_until(lambda: has_bytes(client), what="the request to arrive")
        arriving = pool.data_channel()
        pool.pool.add(arriving.channel, MAX_SIZE)
        async with asyncio.timeout(5):
            assert await taking is arriving.channel
