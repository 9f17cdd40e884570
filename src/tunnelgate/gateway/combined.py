"""The workers of one gateway (``--workers N``) seen as one gateway. Must not import agent or
admin.

Each worker reports to its supervisor on a channel of its own, beside its leases' (a port claim
is small and urgent; a worker's statistics may be megabytes). :class:`Reporter`, in the worker,
answers the supervisor's requests (its statistics; disconnect an agent; close a connection;
reload) and sends on every event of its event log as it happens. :class:`Workers`, in the
supervisor:

- merges the workers' statistics into one :class:`GatewayStatistics` (:func:`merge`): an agent's
  record sums its sessions' counts on every worker, and its services' counts by name. A worker
  that dies leaves its last counts behind, so that no counter of the gateway ever goes down;
- asks every worker to act, or the one that holds a connection (worker i of N numbers its
  connections i+1, i+1+N, …);
- keeps one event log: an agent is up from its first session on any worker until its last one
  ends, and so is each service; a worker that dies takes what it held down with it.

The admin API and the alerts of a gateway of workers run in the supervisor, on
:class:`~tunnelgate.gateway.supervisor.Supervisor`, as they run on a
:class:`~tunnelgate.gateway.gateway.Gateway` in a gateway of one process: both are a
:class:`~tunnelgate.gateway.gateway.GatewayView`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Annotated, Final, Literal

import msgspec

from tunnelgate.address import Address
from tunnelgate.gateway.gateway import Gateway, GatewayStatistics
from tunnelgate.stats import (
    AgentRecordStatistics,
    Event,
    EventLog,
    HistogramCounts,
    ServiceCounts,
)

logger = logging.getLogger(__package__)

ASK_TIMEOUT: Final = 5.0  # for a worker's answer; a worker that does not answer is left out
MAX_REQUEST_SIZE: Final = 4096  # a line from the supervisor to a worker, at most
MAX_REPORT_SIZE: Final = 256 * 1024 * 1024  # a worker's statistics, with every connection open

Action = Literal["statistics", "disconnect", "close", "reload"]
_UP_DOWN: Final = {"agent_up": True, "agent_down": False, "service_up": True, "service_down": False}


class Request(msgspec.Struct, tag="request", frozen=True):
    """Supervisor to worker: do ``action``; answered by an :class:`Answer` with the same id."""

    id: Annotated[int, msgspec.Meta(ge=0)]
    action: Action
    agent: str = ""  # disconnect's
    conn: int = 0  # close's


class Answer(msgspec.Struct, tag="answer", frozen=True):
    """Worker to supervisor: what came of request ``id``."""

    id: Annotated[int, msgspec.Meta(ge=0)]
    done: bool = False  # disconnect's and close's: there was one to act on
    detail: str = ""  # reload's
    statistics: GatewayStatistics | None = None


class Noted(msgspec.Struct, tag="event", frozen=True):
    """Worker to supervisor: an event of its log, as it was added."""

    event: Event


_encoder = msgspec.json.Encoder()
_to_worker = msgspec.json.Decoder(Request)
_to_supervisor = msgspec.json.Decoder(Answer | Noted)


def _line(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message) + b"\n"


class Reporter:
    """A worker's end: answers its supervisor's requests about ``gateway`` (``reload`` reads
    the configuration again) and sends on the gateway's events. :meth:`run` until the channel
    closes."""

    def __init__(
        self,
        gateway: Gateway,
        reload: Callable[[], Awaitable[str]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.gateway = gateway
        self._reload = reload
        self._reader = reader
        self._writer = writer
        for event in gateway.events.since():  # those of its start, before this channel opened
            self._note(event)
        gateway.events.follow = self._note

    def _note(self, event: Event) -> None:
        if not self._writer.is_closing():
            self._writer.write(_line(Noted(event)))

    async def run(self) -> None:
        """Answer until the supervisor closes the channel; actions run side by side."""
        try:
            async with asyncio.TaskGroup() as group:
                await self._read(group)
        finally:
            self.gateway.events.follow = None
            self._writer.close()

    async def _read(self, group: asyncio.TaskGroup) -> None:
        while True:
            try:
                if not (line := await self._reader.readline()):
                    return
                request = _to_worker.decode(line)
            except ValueError as exc:  # undecodable, or a line too long: a bug, skipped
                logger.error("the supervisor sent an unusable request: %s", exc)
                continue
            except OSError:
                return  # the supervisor is gone: the lease channel says so; the worker stops
            group.create_task(self._answer(request))

    async def _answer(self, request: Request) -> None:
        try:
            answer = await self._act(request)
        except Exception:  # a bug: logged here, at the root of its task; the others go on
            logger.exception("answering the supervisor's %s failed", request.action)
            return
        if not self._writer.is_closing():
            self._writer.write(_line(answer))

    async def _act(self, request: Request) -> Answer:
        gateway = self.gateway
        match request.action:
            case "statistics":
                return Answer(request.id, statistics=gateway.statistics())
            case "disconnect":
                reason = "disconnected from the admin API"
                return Answer(request.id, done=await gateway.disconnect(request.agent, reason))
            case "close":
                return Answer(request.id, done=await gateway.close_connection(request.conn))
            case "reload":
                return Answer(request.id, done=True, detail=await self._reload())


@dataclasses.dataclass(eq=False)
class _Link:
    """The supervisor's end of one worker's report channel."""

    index: int
    writer: asyncio.StreamWriter
    waiting: dict[int, asyncio.Future[Answer]] = dataclasses.field(default_factory=dict)
    up: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)  # (agent, service)
    last: GatewayStatistics | None = None  # its last answer


class Workers:
    """The supervisor's end of every worker's report channel: :meth:`serve` one per worker
    while it runs; :meth:`snapshot` and the actions ask those running."""

    def __init__(self, count: int, tls: bool) -> None:
        self.count = count
        self.tls = tls
        self.address: Address | None = None
        self.started_at = time.time()
        self.events = EventLog()
        self._links: dict[int, _Link] = {}
        self._ids = itertools.count()
        self._retired: GatewayStatistics | None = None  # the last counts of workers now gone
        self._asking: asyncio.Future[GatewayStatistics] | None = None

    async def serve(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Read worker ``index``'s answers and events until its channel ends; then what it
        held goes down, and its counts stay."""
        link = self._links[index] = _Link(index, writer)
        try:
            while line := await reader.readline():
                message = _to_supervisor.decode(line)
                if isinstance(message, Noted):
                    self._note(link, message.event)
                elif (waiting := link.waiting.pop(message.id, None)) and not waiting.done():
                    waiting.set_result(message)
        except ValueError as exc:  # undecodable, or a line too long: a bug
            logger.error("worker %d sent an unusable report: %s", index, exc)
        except OSError:
            pass  # the worker is gone: its exit is what counts, and is logged
        finally:
            del self._links[index]
            writer.close()
            for waiting in link.waiting.values():
                waiting.cancel()
            self._retire(link)

    def _note(self, link: _Link, event: Event) -> None:
        """One event of ``link``'s worker, into the gateway's log: an up or a down only when
        it is the first or the last of every worker's."""
        up = _UP_DOWN.get(event.kind)
        if up is not None:
            key = (event.agent, event.service)
            if up:
                link.up[key] += 1
            elif not link.up[key]:
                return  # a down this worker never reported up
            else:
                link.up[key] -= 1
                if not link.up[key]:
                    del link.up[key]
            if self._holders(key) != (1 if up else 0):
                return
        detail = f"worker {link.index}: {event.detail}" if event.kind == "reload" else event.detail
        self.events.add(event.time, event.kind, event.agent, event.service, detail)

    def _holders(self, key: tuple[str, str]) -> int:
        return sum(link.up[key] for link in self._links.values())

    def _retire(self, link: _Link) -> None:
        """``link``'s worker is gone: down what only it held, and keep its last counts."""
        now, reason = time.time(), f"worker {link.index} stopped"
        for (agent, service), _ in sorted(link.up.items(), key=lambda kv: kv[0][1] == ""):
            if not self._holders((agent, service)):  # services first, then their agent
                kind = "service_down" if service else "agent_down"
                self.events.add(now, kind, agent, service, reason)
        if link.last is not None:
            gone = dataclasses.replace(
                link.last,
                handshakes=0,
                sessions=(),
                agents=tuple(dataclasses.replace(a, up=False) for a in link.last.agents),
            )
            kept = [gone] if self._retired is None else [self._retired, gone]
            self._retired = merge(gone.address, self.tls, self.started_at, kept)

    def _parts(self) -> list[GatewayStatistics]:
        parts = [link.last for link in self._links.values() if link.last is not None]
        return parts if self._retired is None else [*parts, self._retired]

    async def snapshot(self) -> GatewayStatistics:
        """Every running worker's statistics, merged with what the gone ones left (requests
        at the same time share one round of asking)."""
        if self._asking is None:
            self._asking = asyncio.ensure_future(self._gather())
            self._asking.add_done_callback(self._asked)
        return await asyncio.shield(self._asking)

    def _asked(self, _: asyncio.Future[GatewayStatistics]) -> None:
        self._asking = None

    async def _gather(self) -> GatewayStatistics:
        for link, answer in await self._ask_each(list(self._links), "statistics"):
            if answer is not None:  # onto the link it came by: never a restarted worker's
                link.last = answer.statistics
        return merge(self.address, self.tls, self.started_at, self._parts())

    async def disconnect(self, agent: str, reason: str) -> bool:
        """End ``agent``'s session on every worker; False if it had none. (``reason`` is the
        admin API's, which the workers give.)"""
        answers = await self._ask_each(list(self._links), "disconnect", agent=agent)
        return any(answer is not None and answer.done for _, answer in answers)

    async def close_connection(self, conn: int) -> bool:
        """Reset one client connection, on the worker that numbered it."""
        answers = await self._ask_each([(conn - 1) % self.count], "close", conn=conn)
        return any(answer is not None and answer.done for _, answer in answers)

    async def reload(self) -> str:
        """Every worker reads its configuration again: what each said."""
        answers = await self._ask_each(list(self._links), "reload")
        if not answers:
            return "no worker is running"
        said = {
            link.index: "did not answer" if answer is None else answer.detail
            for link, answer in sorted(answers, key=lambda pair: pair[0].index)
        }
        if len(set(said.values())) == 1:
            return next(iter(said.values()))
        return "; ".join(f"worker {index}: {detail}" for index, detail in said.items())

    async def _ask_each(
        self, indexes: Iterable[int], action: Action, agent: str = "", conn: int = 0
    ) -> list[tuple[_Link, Answer | None]]:
        """Ask the running workers among ``indexes``: each one's link (the worker it was, if
        it has restarted since) and its answer, or None if it did not answer."""
        loop = asyncio.get_running_loop()
        asked: list[tuple[_Link, int, asyncio.Future[Answer]]] = []
        for index in indexes:
            if (link := self._links.get(index)) is None or link.writer.is_closing():
                continue
            request = Request(next(self._ids), action, agent, conn)
            if len(line := _line(request)) > MAX_REQUEST_SIZE:  # a name no worker would know
                continue
            link.waiting[request.id] = future = loop.create_future()
            asked.append((link, request.id, future))
            link.writer.write(line)
        if asked:
            await asyncio.wait([future for _, _, future in asked], timeout=ASK_TIMEOUT)
        answers: list[tuple[_Link, Answer | None]] = []
        for link, request_id, future in asked:
            link.waiting.pop(request_id, None)
            if future.done() and not future.cancelled():
                answers.append((link, future.result()))
                continue
            if not future.done():
                future.cancel()
                logger.warning(
                    "worker %d did not answer %s in %g s", link.index, action, ASK_TIMEOUT
                )
            answers.append((link, None))  # (cancelled: it is gone, which its exit says)
        return answers


def merge(
    address: Address | None, tls: bool, started_at: float, parts: Sequence[GatewayStatistics]
) -> GatewayStatistics:
    """The statistics of one gateway from its workers': sessions side by side, each agent's
    record and each of its services' counts summed."""
    by_name: dict[str, list[AgentRecordStatistics]] = {}
    for record in itertools.chain.from_iterable(part.agents for part in parts):
        by_name.setdefault(record.name, []).append(record)
    return GatewayStatistics(
        address,
        tls,
        sum(part.handshakes for part in parts),
        tuple(itertools.chain.from_iterable(part.sessions for part in parts)),
        tuple(_merge_agent(records) for records in by_name.values()),
        _sum_pairs(part.auth_failures for part in parts),
        _sum_pairs(part.tls_failures for part in parts),
        started_at,
    )


def _sum_pairs(
    counts: Iterable[tuple[tuple[str, int], ...]],
) -> tuple[tuple[str, int], ...]:
    """(label, count) pairs summed by label, in the order the labels first come."""
    total: dict[str, int] = {}
    for pairs in counts:
        for label, count in pairs:
            total[label] = total.get(label, 0) + count
    return tuple(total.items())


def _merge_agent(records: list[AgentRecordStatistics]) -> AgentRecordStatistics:
    if len(records) == 1:
        return records[0]
    latest = max(records, key=lambda r: r.connected_at)  # its last session, on any worker
    live = [r for r in records if r.up]
    services: dict[str, list[ServiceCounts]] = {}
    for record in records:
        for name, counts in record.services:
            services.setdefault(name, []).append(counts)
    return AgentRecordStatistics(
        latest.name,
        bool(live),
        latest.address,
        latest.connected_at,
        max(r.last_seen for r in records),
        sum(r.connects for r in records),
        _sum_pairs(r.disconnects for r in records),
        max(live, key=lambda r: r.connected_at).heartbeat_rtt if live else None,
        latest.software,
        latest.tls,
        latest.certificate,
        tuple((name, _merge_counts(counts)) for name, counts in services.items()),
        sum(r.data_channels for r in records),
        sum(r.channel_reuses for r in records),
    )


def _merge_counts(counts: list[ServiceCounts]) -> ServiceCounts:
    if len(counts) == 1:
        return counts[0]
    return ServiceCounts(
        sum(c.connections for c in counts),
        _sum_pairs(c.errors for c in counts),
        sum(c.up for c in counts),
        sum(c.down for c in counts),
        _merge_histograms([c.setup for c in counts]),
        _merge_histograms([c.duration for c in counts]),
    )


def _merge_histograms(histograms: list[HistogramCounts]) -> HistogramCounts:
    return HistogramCounts(
        histograms[0].bounds,
        tuple(map(sum, zip(*(h.counts for h in histograms), strict=True))),
        sum(h.sum for h in histograms),
    )
