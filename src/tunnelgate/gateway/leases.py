"""Which agent holds which public port, across every process that opens a gateway's public
ports. Must not import agent.

A port is leased to an agent by name, so that the sessions one agent holds with the workers of
one gateway share it, and no other agent can take it on any worker. A session claims through
:class:`PortLeases` before its listener accepts anybody, and releases when it stops listening:

- :class:`LocalLeases`: a gateway of one process.
- :class:`WorkerLeases`: a worker process, asking its supervisor over the channel the supervisor
  handed it down (one JSON line per message, :func:`serve_leases` at the other end).
- :class:`LeaseTable`: the leases themselves, pure; the supervisor keeps one for its workers, and
  forgets the claims of a worker that dies with it.

A fleet of gateways will lease through the same interface from a shared registry.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Final

import msgspec

from tunnelgate.errors import TransportError
from tunnelgate.protocol.wire import Host, Name, Port

logger = logging.getLogger(__package__)

CLAIM_TIMEOUT: Final = 5.0  # for the supervisor's answer (it answers at once, from memory)
MAX_LINE_SIZE: Final = 4096  # one message on a worker's channel, at most
MAX_PENDING_CLAIMS: Final = 1024  # a worker's claims awaiting their answer, at most

Key = tuple[str, int]  # (bind address as the agent asked for it, port)


class PortLeases(abc.ABC):
    """Public ports leased to agents, by (bind, port)."""

    @abc.abstractmethod
    async def claim(self, bind: str, port: int, agent: str) -> str | None:
        """Lease ``(bind, port)`` to ``agent`` for one more holder in this process: None when
        granted (free, or ``agent``'s already), else the name of the agent that holds it.
        Raises TransportError if the leases cannot be reached."""

    @abc.abstractmethod
    def release(self, bind: str, port: int, agent: str) -> None:
        """One holder of ``agent``'s lease on ``(bind, port)`` in this process let it go."""


@dataclass(frozen=True)
class _Lease:
    agent: str
    holders: Counter[int]  # holder (a worker's index) → claims it holds


class LeaseTable:
    """The leases of one gateway, pure: ``claim`` and ``release`` by holder (a worker), and
    ``forget`` a holder that is gone with everything it held."""

    def __init__(self) -> None:
        self._leases: dict[Key, _Lease] = {}

    def claim(self, key: Key, agent: str, holder: int) -> str | None:
        lease = self._leases.get(key)
        if lease is None:
            lease = self._leases[key] = _Lease(agent, Counter())
        elif lease.agent != agent:
            return lease.agent
        lease.holders[holder] += 1
        return None

    def release(self, key: Key, agent: str, holder: int) -> None:
        lease = self._leases.get(key)
        if lease is None or lease.agent != agent or not lease.holders[holder]:
            return
        lease.holders[holder] -= 1
        if lease.holders[holder] == 0:
            del lease.holders[holder]
        if not lease.holders:
            del self._leases[key]

    def forget(self, holder: int) -> int:
        """``holder`` is gone: its claims go with it. How many leases that freed."""
        freed = 0
        for key, lease in list(self._leases.items()):
            if lease.holders.pop(holder, 0) and not lease.holders:
                del self._leases[key]
                freed += 1
        return freed

    def held(self) -> dict[Key, tuple[str, tuple[int, ...]]]:
        """A snapshot: (bind, port) → the agent and the holders of its lease."""
        return {k: (v.agent, tuple(sorted(v.holders))) for k, v in self._leases.items()}


class LocalLeases(PortLeases):
    """The leases of a gateway of one process: a table with one holder."""

    def __init__(self) -> None:
        self.table = LeaseTable()

    async def claim(self, bind: str, port: int, agent: str) -> str | None:
        return self.table.claim((bind, port), agent, 0)

    def release(self, bind: str, port: int, agent: str) -> None:
        self.table.release((bind, port), agent, 0)


# The messages on a worker's channel to its supervisor, one JSON object a line.


class Ready(msgspec.Struct, tag="ready", frozen=True):
    """Worker to supervisor: it serves (once, after its start)."""


class Claim(msgspec.Struct, tag="claim", frozen=True):
    """Worker to supervisor: lease ``(bind, port)`` to ``agent``; answered by :class:`Claimed`."""

    id: Annotated[int, msgspec.Meta(ge=0)]
    bind: Host
    port: Port
    agent: Name


class Release(msgspec.Struct, tag="release", frozen=True):
    """Worker to supervisor: one of its holders let ``agent``'s lease go (not answered)."""

    bind: Host
    port: Port
    agent: Name


class Claimed(msgspec.Struct, tag="claimed", frozen=True):
    """Supervisor to worker: the answer to the claim ``id``: granted, or who holds it."""

    id: Annotated[int, msgspec.Meta(ge=0)]
    holder: Name | None = None


class Stop(msgspec.Struct, tag="stop", frozen=True):
    """Supervisor to worker: drain and stop. A message, not a signal: a worker may get
    SIGTERM from elsewhere at the same time (systemd signals every process of a service),
    and a second signal would stop it without draining."""


_encoder = msgspec.json.Encoder()
_to_supervisor = msgspec.json.Decoder(Ready | Claim | Release)
_to_worker = msgspec.json.Decoder(Claimed | Stop)


def _line(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message) + b"\n"


class WorkerLeases(PortLeases):
    """A worker's leases, claimed from its supervisor over ``reader``/``writer``. Use it as an
    async context manager (it reads the answers meanwhile); :meth:`wait_stop` returns when the
    supervisor asks the worker to stop, or is gone."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[str | None]] = {}
        self._reading: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._stop: str | None = None  # why the worker must stop
        self._stopping = asyncio.Event()

    async def __aenter__(self) -> WorkerLeases:
        self._reading = asyncio.create_task(self._read(), name="leases")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reading
        self._writer.close()
        self._fail_waiting()

    def ready(self) -> None:
        """Tell the supervisor this worker serves."""
        self._send(Ready())

    async def wait_stop(self) -> str:
        """Why the worker must stop: its supervisor asks it to, or is gone."""
        await self._stopping.wait()
        assert self._stop is not None
        return self._stop

    def _must_stop(self, why: str) -> None:
        if self._stop is None:
            self._stop = why
            self._stopping.set()

    async def claim(self, bind: str, port: int, agent: str) -> str | None:
        if self._closed.is_set():
            raise TransportError("the gateway's supervisor is gone")
        if len(self._waiting) >= MAX_PENDING_CLAIMS:
            raise TransportError("too many port claims awaiting the supervisor")
        claim_id = next(self._ids)
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._waiting[claim_id] = answer
        try:
            self._send(Claim(claim_id, bind, port, agent))
            async with asyncio.timeout(CLAIM_TIMEOUT):
                return await answer
        except TimeoutError:
            raise TransportError("the gateway's supervisor did not answer a port claim") from None
        finally:
            self._waiting.pop(claim_id, None)

    def release(self, bind: str, port: int, agent: str) -> None:
        if not self._closed.is_set():  # else the supervisor forgot this worker's leases
            self._send(Release(bind, port, agent))

    def _send(self, message: msgspec.Struct) -> None:
        self._writer.write(_line(message))  # small, and read at once: no drain

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                answer = _to_worker.decode(line)
                if isinstance(answer, Stop):
                    self._must_stop("the supervisor asks it to stop")
                elif (waiting := self._waiting.get(answer.id)) is not None and not waiting.done():
                    waiting.set_result(answer.holder)
        except (OSError, ValueError) as exc:  # ValueError: undecodable, or a line too long
            logger.error("the channel to the gateway's supervisor failed: %s", exc)
        finally:
            self._closed.set()
            self._must_stop("the supervisor is gone")
            self._fail_waiting()

    def _fail_waiting(self) -> None:
        for waiting in self._waiting.values():
            if not waiting.done():
                waiting.set_exception(TransportError("the gateway's supervisor is gone"))
        self._waiting.clear()


@dataclass
class LeaseChannel:
    """The supervisor's end of one worker's channel."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    worker: int
    on_ready: Callable[[], None] = field(default=lambda: None)

    def stop(self) -> None:
        """Ask the worker to drain and stop."""
        if not self.writer.is_closing():
            self.writer.write(_line(Stop()))


async def serve_leases(channel: LeaseChannel, table: LeaseTable) -> None:
    """Answer one worker's claims from ``table`` until its channel ends. A line the worker
    should never send is a bug: logged, and the channel closed (the worker then stops)."""
    try:
        while line := await channel.reader.readline():
            message = _to_supervisor.decode(line)
            if isinstance(message, Claim):
                holder = table.claim((message.bind, message.port), message.agent, channel.worker)
                channel.writer.write(_line(Claimed(message.id, holder)))
            elif isinstance(message, Release):
                table.release((message.bind, message.port), message.agent, channel.worker)
            else:
                channel.on_ready()
    except ValueError as exc:  # undecodable, or a line too long
        logger.error("worker %d sent an unusable message: %s", channel.worker, exc)
    except OSError:
        pass  # the worker is gone: its exit is what counts, and is logged
    finally:
        channel.writer.close()
