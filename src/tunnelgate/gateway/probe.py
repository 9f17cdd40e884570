"""A probe channel on the gateway: what ``tunnelgate doctor`` measures the tunnel against.

An agent's probe is authenticated like a control channel (the Hello's role is "probe"),
then joins no session: a running agent of the same name is left alone. On it the gateway
answers Pings (round trips), counts what the agent sends until END (a sink), and sends
for a while itself (a source), answering each measurement with ``Measured``. It is
bounded so that a token holder cannot turn it into a load generator: one probe per agent
name at a time, ``PROBE_TIMEOUT`` for its whole life, ``MAX_PROBE_PINGS`` round trips,
each direction measured once, for at most ``MAX_MEASURE_SECONDS`` and ``MAX_MEASURE_SIZE``
bytes. One line is logged per probe. Must not import agent.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Final

from tunnelgate.channel import Channel
from tunnelgate.errors import ConnectionClosed, ProtocolError, RemoteProtocolError, TransportError
from tunnelgate.logs import ContextLogger
from tunnelgate.protocol import wire

PROBE_TIMEOUT: Final = 2 * wire.MAX_MEASURE_SECONDS + 10.0  # the whole life of a probe channel
MAX_PROBE_PINGS: Final = 32
MAX_MEASURE_SIZE: Final = 16 << 30  # bytes, each way: more than 10 s of 10 Gbit/s
SOURCE_CHUNK_SIZE: Final = 64 * 1024  # payload of each DATA frame the source sends
ABORT_TIMEOUT: Final = 1.0  # for telling the agent which limit it reached


@dataclass
class _Tally:
    pings: int = 0
    measured: dict[str, tuple[int, float]] = field(default_factory=dict)  # mode → bytes, s

    def describe(self) -> str:
        parts = [f"{self.pings} ping(s)"]
        for mode, verb in (("sink", "received"), ("source", "sent")):
            if (done := self.measured.get(mode)) is not None:
                parts.append(f"{verb} {done[0]} bytes in {done[1]:.2f} s")
        return ", ".join(parts)


class _LimitReached(Exception):
    """The agent went past one of the probe's bounds."""


async def serve_probe(channel: Channel, peer: str, log: ContextLogger) -> None:
    """Serve one authenticated probe channel to its end, and log one line about it.
    Root of the probe's work: every error ends here; the channel is closed after."""
    channel.conversation.accept_probe()
    tally = _Tally()
    started = time.monotonic()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            await _serve(channel, tally)
    except TimeoutError:
        ended = f"timed out after {PROBE_TIMEOUT:g} s"
    except _LimitReached as exc:
        ended = f"probe limit reached: {exc}"
        await _abort(channel, ended)
    except (ProtocolError, TransportError, ConnectionClosed) as exc:
        ended = str(exc)
    except BaseException:  # cancelled (the gateway stops): the agent sees a reset
        channel.abort()
        raise
    else:
        took = time.monotonic() - started
        log.info("probe from %s (%.1f s): %s", peer, took, tally.describe())
        channel.close()
        return
    log.warning("probe from %s ended: %s (%s)", peer, ended, tally.describe())
    channel.abort()


async def _serve(channel: Channel, tally: _Tally) -> None:
    while True:
        message = await channel.receive()
        if isinstance(message, wire.Ping):
            tally.pings += 1
            if tally.pings > MAX_PROBE_PINGS:
                raise _LimitReached(f"more than {MAX_PROBE_PINGS} pings")
            await channel.send_message(wire.Pong(message.seq))
        elif isinstance(message, wire.Measure):
            if message.mode in tally.measured:
                raise _LimitReached(f"a second {message.mode} measurement")
            began = time.monotonic()
            if message.mode == "sink":
                size = await _sink(channel)
            else:
                size = await _source(channel, message.seconds)
            seconds = time.monotonic() - began
            tally.measured[message.mode] = (size, seconds)
            await channel.send_message(wire.Measured(size, seconds))
        elif isinstance(message, wire.Bye):
            return
        else:  # the session core lets nothing else through
            raise RemoteProtocolError(f"unexpected {type(message).__name__} on a probe")


async def _sink(channel: Channel) -> int:
    """Count the agent's DATA bytes until its END."""
    size = 0
    while True:
        event = await channel.receive_event()
        if isinstance(event, wire.Data):
            size += len(event.view)
            if size > MAX_MEASURE_SIZE:
                raise _LimitReached(f"more than {MAX_MEASURE_SIZE} bytes")
        elif isinstance(event, wire.End):
            return size


async def _source(channel: Channel, seconds: float) -> int:
    """Send DATA frames for ``seconds`` (or ``MAX_MEASURE_SIZE`` bytes), then END."""
    frame = bytearray(wire.HEADER_SIZE + SOURCE_CHUNK_SIZE)
    wire.pack_data_header(frame, SOURCE_CHUNK_SIZE)
    loop = asyncio.get_running_loop()
    deadline, size = loop.time() + seconds, 0
    while loop.time() < deadline and size < MAX_MEASURE_SIZE:
        await channel.stream.send(memoryview(frame))
        size += SOURCE_CHUNK_SIZE
    await channel.stream.send(wire.END_FRAME)
    return size


async def _abort(channel: Channel, reason: str) -> None:
    try:
        async with asyncio.timeout(ABORT_TIMEOUT):
            await channel.stream.send(wire.encode_abort(reason))
    except (TransportError, TimeoutError):
        pass
