"""The workers of one gateway seen as one (``gateway/combined.py``): statistics merged, pure;
and the supervisor's end of real report channels (both ends in this test's loop), which keeps
one event log for the gateway and the counts of a worker that is gone. The CLI tests in
test_workers_cli.py show the same through a real supervisor's admin API."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import pytest
from kit.waiting import DEADLINE, wait_until

from tunnelgate.address import Address
from tunnelgate.gateway.combined import (
    MAX_REPORT_SIZE,
    MAX_REQUEST_SIZE,
    Answer,
    Noted,
    Request,
    Workers,
    merge,
)
from tunnelgate.gateway.gateway import GatewayStatistics
from tunnelgate.stats import AgentRecordStatistics, Event, HistogramCounts, ServiceCounts
from tunnelgate.transport import ProcessChannel

pytestmark = pytest.mark.usefixtures("no_unexpected_errors")

ADDRESS = Address("127.0.0.1", 8080)
BOUNDS = (0.1, 1.0)


def counts(connections: int, up: int, setup: tuple[int, int, int]) -> ServiceCounts:
    histogram = HistogramCounts(BOUNDS, setup, 0.01 * sum(setup))
    return ServiceCounts(connections, (("limit", 1),), up, 2 * up, histogram, histogram)


def record(
    connected_at: float, up: bool, address: str, service: ServiceCounts
) -> AgentRecordStatistics:
    return AgentRecordStatistics(
        "site-a", up, address, connected_at, connected_at + 1, 1, (("goodbye", 1),),
        0.001 * connected_at, "tunnelgate 0.1.0", "TLSv1.3", "", (("web", service),), 3, 2,
    )  # fmt: skip


def statistics(*agents: AgentRecordStatistics, failures: int = 0) -> GatewayStatistics:
    return GatewayStatistics(ADDRESS, True, 1, (), agents, (("token", failures),), (), 0.0)


def test_merge_sums_an_agents_counts_over_the_workers_and_keeps_its_latest_session() -> None:
    first = record(10.0, True, "10.0.0.1:1000", counts(3, 100, (1, 2, 0)))
    latest = record(20.0, True, "10.0.0.2:2000", counts(4, 50, (0, 3, 1)))
    merged = merge(ADDRESS, True, 5.0, [statistics(first, failures=1), statistics(latest)])
    [agent] = merged.agents
    assert (agent.up, agent.address, agent.connected_at, agent.last_seen) == (
        True, "10.0.0.2:2000", 20.0, 21.0,
    )  # fmt: skip
    assert agent.heartbeat_rtt == latest.heartbeat_rtt
    assert (agent.connects, agent.disconnects) == (2, (("goodbye", 2),))
    assert (agent.data_channels, agent.channel_reuses) == (6, 4)
    [(name, web)] = agent.services
    assert name == "web"
    assert (web.connections, web.up, web.down, web.errors) == (7, 150, 300, (("limit", 2),))
    assert web.setup.counts == (1, 5, 1) and web.setup.sum == pytest.approx(0.07)
    assert (merged.handshakes, merged.auth_failures, merged.started_at) == (2, (("token", 1),), 5.0)


def test_merge_of_one_worker_is_its_statistics() -> None:
    alone = statistics(record(10.0, False, "10.0.0.1:1000", counts(1, 1, (1, 0, 0))))
    assert merge(ADDRESS, True, 0.0, [alone]) == alone


def test_statistics_cross_the_channel_unchanged() -> None:
    """msgspec encodes and decodes the dataclasses of a worker's statistics as they are."""
    sent = statistics(record(10.0, True, "10.0.0.1:1000", counts(3, 100, (1, 2, 0))))
    line = msgspec.json.encode(Answer(7, statistics=sent))
    assert msgspec.json.decode(line, type=Answer).statistics == sent


class FakeWorker:
    """The worker's end of a real report channel, written and read by the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._ids = iter(range(1, 1_000_000))

    def note(self, kind: str, agent: str = "site-a", service: str = "") -> None:
        event = Event(next(self._ids), 1.0, kind, agent, service, "why")
        self.writer.write(msgspec.json.encode(Noted(event)) + b"\n")

    async def request(self) -> Request:
        return msgspec.json.decode(await self.reader.readline(), type=Request)

    def answer(self, answer: Answer) -> None:
        self.writer.write(msgspec.json.encode(answer) + b"\n")


@contextlib.asynccontextmanager
async def connected(workers: Workers, count: int) -> AsyncIterator[list[FakeWorker]]:
    ends, tasks = [], []
    for index in range(count):
        ours, theirs = ProcessChannel.pair()
        reader, writer = await ours.open_streams(MAX_REPORT_SIZE)
        ends.append(FakeWorker(*await theirs.open_streams(MAX_REQUEST_SIZE)))
        tasks.append(asyncio.create_task(workers.serve(index, reader, writer)))
    try:
        yield ends
    finally:
        for end in ends:
            end.writer.close()
        await asyncio.wait(tasks, timeout=DEADLINE)


def kinds(workers: Workers) -> list[tuple[str, str]]:
    return [(e.kind, e.service) for e in workers.events.since()]


async def test_an_agent_is_up_from_its_first_session_on_any_worker_to_its_last() -> None:
    workers = Workers(2, tls=True)
    async with connected(workers, 2) as (zero, one):
        for end in (zero, one):
            end.note("agent_up")
            end.note("service_up", service="web")
        zero.note("auth_failure", agent="intruder")
        await wait_until(lambda: len(kinds(workers)) == 3, DEADLINE, "three events")
        assert kinds(workers) == [("agent_up", ""), ("service_up", "web"), ("auth_failure", "")]
        zero.note("service_down", service="web")
        zero.note("agent_down")
        zero.note("agent_down")  # never up twice on worker 0: not counted
        one.note("reload")
        await wait_until(lambda: len(kinds(workers)) == 4, DEADLINE, "the reload")
        assert kinds(workers)[-1] == ("reload", "")
        assert workers.events.since()[-1].detail == "worker 1: why"
        one.note("service_down", service="web")
        one.note("agent_down")
        await wait_until(lambda: len(kinds(workers)) == 6, DEADLINE, "both down")
        assert kinds(workers)[-2:] == [("service_down", "web"), ("agent_down", "")]


async def test_a_worker_that_goes_takes_down_what_only_it_held_and_leaves_its_counts() -> None:
    workers = Workers(2, tls=True)
    async with connected(workers, 2) as (zero, one):
        zero.note("agent_up")
        zero.note("service_up", service="web")
        one.note("agent_up", agent="site-b")
        gathering = asyncio.ensure_future(workers.snapshot())
        for end, connections in ((zero, 3), (one, 4)):
            request = await end.request()
            assert request.action == "statistics"
            agent = record(1.0, True, "10.0.0.1:1000", counts(connections, 10, (1, 0, 0)))
            end.answer(Answer(request.id, statistics=statistics(agent)))
        before = await gathering
        assert dict(before.agents[0].services)["web"].connections == 7
        zero.writer.close()  # worker 0 is gone
        await wait_until(lambda: len(kinds(workers)) == 5, DEADLINE, "worker 0's downs")
        downs = [(e.kind, e.agent, e.service, e.detail) for e in workers.events.since()[-2:]]
        assert downs == [
            ("service_down", "site-a", "web", "worker 0 stopped"),
            ("agent_down", "site-a", "", "worker 0 stopped"),
        ]
        gathering = asyncio.ensure_future(workers.snapshot())
        request = await one.request()
        agent = record(1.0, True, "10.0.0.1:1000", counts(5, 10, (1, 0, 0)))
        one.answer(Answer(request.id, statistics=statistics(agent)))
        after = await gathering
        [web] = [c for name, c in after.agents[0].services if name == "web"]
        assert web.connections == 3 + 5  # worker 0's last counts stay
        assert after.agents[0].up  # on worker 1
