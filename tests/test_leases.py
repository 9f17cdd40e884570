"""Port leases (``gateway/leases.py``): the pure table, the leases of a gateway of one
process, and a worker's leases claimed from its supervisor over a real process channel
(both ends in this test's loop), as several workers of one gateway use them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tunnelgate.errors import ConfigError, TransportError
from tunnelgate.gateway.leases import (
    MAX_LINE_SIZE,
    LeaseChannel,
    LeaseTable,
    LocalLeases,
    WorkerLeases,
    serve_leases,
)
from tunnelgate.gateway.supervisor import WORKER_ENV, WorkerSetup
from tunnelgate.transport import ProcessChannel

pytestmark = pytest.mark.usefixtures("no_unexpected_errors")

WEB = ("0.0.0.0", 8080)


def test_lease_table_lets_one_agent_share_a_port_and_refuses_the_others() -> None:
    """An agent's sessions on every worker share its port; another agent is told who holds it."""
    table = LeaseTable()
    assert table.claim(WEB, "site-a", 0) is None
    assert table.claim(WEB, "site-a", 1) is None
    assert table.claim(WEB, "site-b", 1) == "site-a"
    assert table.claim(("127.0.0.1", 8080), "site-b", 1) is None  # another bind address
    assert table.held()[WEB] == ("site-a", (0, 1))


def test_lease_table_frees_a_port_when_its_last_holder_releases_it() -> None:
    """Released by every worker that held it, the port is free for another agent."""
    table = LeaseTable()
    table.claim(WEB, "site-a", 0)
    table.claim(WEB, "site-a", 1)
    table.release(WEB, "site-a", 0)
    assert table.claim(WEB, "site-b", 0) == "site-a"
    table.release(WEB, "site-a", 1)
    assert table.claim(WEB, "site-b", 0) is None


def test_lease_table_ignores_releases_of_leases_not_held() -> None:
    """A release by a worker or an agent that does not hold the lease changes nothing."""
    table = LeaseTable()
    table.claim(WEB, "site-a", 0)
    table.release(WEB, "site-b", 0)  # not its lease
    table.release(WEB, "site-a", 1)  # not its claim
    table.release(("0.0.0.0", 9090), "site-a", 0)  # no lease at all
    assert table.held() == {WEB: ("site-a", (0,))}


def test_lease_table_counts_claims_per_holder() -> None:
    """Two claims from one worker need two releases (a takeover overlapping its predecessor)."""
    table = LeaseTable()
    table.claim(WEB, "site-a", 0)
    table.claim(WEB, "site-a", 0)
    table.release(WEB, "site-a", 0)
    assert table.claim(WEB, "site-b", 1) == "site-a"
    table.release(WEB, "site-a", 0)
    assert table.held() == {}


def test_lease_table_forgets_a_worker_that_died_with_its_claims() -> None:
    """A dead worker's leases go with it; those other workers hold too stay."""
    table = LeaseTable()
    table.claim(WEB, "site-a", 0)
    table.claim(WEB, "site-a", 1)
    table.claim(("0.0.0.0", 9090), "site-b", 1)
    assert table.forget(1) == 1
    assert table.held() == {WEB: ("site-a", (0,))}
    assert table.claim(("0.0.0.0", 9090), "site-c", 0) is None


async def test_local_leases_are_the_table_of_one_process() -> None:
    """A gateway of one process leases through the same interface."""
    leases = LocalLeases()
    assert await leases.claim(*WEB, "site-a") is None
    assert await leases.claim(*WEB, "site-b") == "site-a"
    leases.release(*WEB, "site-a")
    assert await leases.claim(*WEB, "site-b") is None


@contextlib.asynccontextmanager
async def supervised(
    table: LeaseTable, worker: int
) -> AsyncIterator[tuple[WorkerLeases, list[int]]]:
    """A worker's leases, served from ``table`` at the other end of a process channel; the
    list collects the workers that said they are ready."""
    ours, theirs = ProcessChannel.pair()
    ready: list[int] = []
    reader, writer = await ours.open_streams(MAX_LINE_SIZE)
    channel = LeaseChannel(reader, writer, worker, lambda: ready.append(worker))
    serving = asyncio.create_task(serve_leases(channel, table))
    worker_reader, worker_writer = await theirs.open_streams(MAX_LINE_SIZE)
    try:
        async with WorkerLeases(worker_reader, worker_writer) as leases:
            yield leases, ready
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


async def test_worker_leases_are_claimed_from_the_supervisor() -> None:
    """Two workers lease from one table: one agent shares a port, another is refused; the
    table sees who holds what, and a worker's readiness."""
    table = LeaseTable()
    async with supervised(table, 0) as (first, ready), supervised(table, 1) as (second, _):
        first.ready()
        assert await first.claim(*WEB, "site-a") is None
        assert await second.claim(*WEB, "site-a") is None
        assert await second.claim("0.0.0.0", 9090, "site-b") is None
        assert await first.claim("0.0.0.0", 9090, "site-c") == "site-b"
        assert table.held() == {WEB: ("site-a", (0, 1)), ("0.0.0.0", 9090): ("site-b", (1,))}
        assert ready == [0]
        second.release("0.0.0.0", 9090, "site-b")
        # The release is not answered; a claim after it on the same channel sees it done.
        assert await second.claim("0.0.0.0", 9091, "site-b") is None
        assert ("0.0.0.0", 9090) not in table.held()


async def test_worker_leases_fail_once_the_supervisor_is_gone() -> None:
    """Claims fail with a TransportError, and the worker hears that its supervisor went."""
    ours, theirs = ProcessChannel.pair()
    reader, writer = await theirs.open_streams(MAX_LINE_SIZE)
    async with WorkerLeases(reader, writer) as leases:
        ours.close()
        async with asyncio.timeout(10):
            assert await leases.wait_stop() == "the supervisor is gone"
        with pytest.raises(TransportError, match="supervisor is gone"):
            await leases.claim(*WEB, "site-a")
        leases.release(*WEB, "site-a")  # nothing to tell: no error either


async def test_worker_is_told_to_stop_on_its_channel() -> None:
    """The supervisor's stop reaches the worker as a message; claims still work meanwhile."""
    ours, theirs = ProcessChannel.pair()
    reader, writer = await ours.open_streams(MAX_LINE_SIZE)
    channel = LeaseChannel(reader, writer, 0)
    serving = asyncio.create_task(serve_leases(channel, LeaseTable()))
    worker_reader, worker_writer = await theirs.open_streams(MAX_LINE_SIZE)
    async with WorkerLeases(worker_reader, worker_writer) as leases:
        channel.stop()
        async with asyncio.timeout(10):
            assert await leases.wait_stop() == "the supervisor asks it to stop"
        assert await leases.claim(*WEB, "site-a") is None  # draining sessions still release
    async with asyncio.timeout(10):
        await serving


@pytest.mark.errors_logged_on_purpose("a worker's unusable line is logged as a bug")
async def test_supervisor_closes_the_channel_of_a_worker_that_sends_garbage() -> None:
    """A line that is no message ends that worker's channel (the worker then stops)."""
    ours, theirs = ProcessChannel.pair()
    reader, writer = await ours.open_streams(MAX_LINE_SIZE)
    worker_reader, worker_writer = await theirs.open_streams(MAX_LINE_SIZE)
    serving = asyncio.create_task(serve_leases(LeaseChannel(reader, writer, 0), LeaseTable()))
    worker_writer.write(b'{"type": "claim", "id": -1}\n')
    async with asyncio.timeout(10):
        await serving
        assert await worker_reader.read() == b""
    worker_writer.close()


def test_worker_setup_round_trips_through_the_environment() -> None:
    """What the supervisor writes, the worker reads back; without it, a process is no worker."""
    setup = WorkerSetup(1, 3, 4, 5, 6, ("127.0.0.1:4001", "127.0.0.1:4002"))
    assert WorkerSetup.from_environment({WORKER_ENV: setup.encode()}) == setup
    assert WorkerSetup.from_environment({}) is None


@pytest.mark.parametrize(
    "value",
    ["", "not json", '{"index": 0}', '{"index": 2, "control": 3, "own": 4, "channel": 5, '
     '"addresses": ["127.0.0.1:1", "127.0.0.1:2"]}'],
)  # fmt: skip
def test_worker_setup_refuses_what_no_supervisor_wrote(value: str) -> None:
    """A stray or broken variable is a configuration error naming it, not a crash."""
    with pytest.raises(ConfigError, match=WORKER_ENV):
        WorkerSetup.from_environment({WORKER_ENV: value})
