"""The relay: bytes both ways between a local stream (a client's connection on the
gateway, a service's on the agent) and a started data channel, as DATA frames,
END for a half-close, ABORT for an abnormal end that comes only after every
byte on its way (docs/RELIABILITY.md). Each direction is a pump: not a task but
a state machine run by readiness callbacks, holding nothing while idle, which
stops reading while its destination is full (backpressure). Between plain TCP
streams the payload moves by ``os.splice``, otherwise through one per-thread
buffer; nothing is allocated, logged or awaited per chunk.
It sees streams only: it must not import socket, ssl, gateway, agent, config, cli or logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, TypeGuard

from tunnelgate.channel import Channel
from tunnelgate.errors import ProtocolError, TransportError
from tunnelgate.protocol.wire import (
    END_FRAME,
    HEADER_SIZE,
    MAX_DATA_SIZE,
    Abort,
    Data,
    End,
    Event,
    Finished,
    encode_abort,
    encode_message,
    pack_data_header,
)
from tunnelgate.transport import (
    SPLICE_AVAILABLE,
    WANT_RETRY,
    Pipe,
    SpliceableStream,
    Stream,
    WouldBlock,
    epoll_descriptors,
    poller,
)

CHUNK_SIZE: Final = 256 * 1024  # the copy path's shared buffer
PIPE_SIZE: Final = 1024 * 1024  # asked for; the kernel may grant less
IDLE_PIPES: Final = 32  # empty pipes kept per thread for the next connections
SMALL_READ: Final = 64 * 1024  # splice mode: reads below this are copied, not spliced
HEADER_READ: Final = 16 * 1024  # splice mode: read between frames (small frames arrive whole)
STEPS_PER_WAKEUP: Final = 8  # frames one inbound callback handles before yielding
ABORT_TIMEOUT: Final = 1.0  # for the peer to take an ABORT before the reset
DELIVERY_TIMEOUT: Final = 2.0  # for a local peer to take its last bytes before its reset
DRAIN_SIZE: Final = 16 * 1024


@dataclass
class RelayResult:
    """How one relayed connection went: "normal" or a reason."""

    sent: int = 0  # bytes from the local stream into the tunnel
    received: int = 0  # bytes from the tunnel to the local stream
    how: str = "normal"
    duration: float = 0.0
    path: str = "copy"  # "splice" or "copy"
    channel_kept: bool = False  # ended cleanly and the channel left open for its end handshake

    @property
    def normal(self) -> bool:
        return self.how == "normal"


async def relay(
    local: Stream,
    channel: Channel,
    local_role: str,
    result: RelayResult | None = None,
    *,
    keep_channel: bool = False,
) -> RelayResult:
    """Pump bytes both ways until both directions ended; close both streams, except, with
    ``keep_channel``, a channel that ended cleanly: then ``result.channel_kept`` and the
    caller finishes or closes it. ``local_role`` ("client" or "service") names the local
    peer in reasons. Cancelled (its session ended), it resets both ends at once; a
    ``result`` passed in then holds the counts so far, for the caller's log."""
    started = time.monotonic()
    result = result if result is not None else RelayResult()
    state = _Relay(local, channel, local_role, result, keep_channel)
    try:
        await state.finished
        if state.failure is None:
            local.close()
            if keep_channel and state.leftover is not None:
                channel.give_back(state.leftover)
                state.result.channel_kept = True
            else:
                channel.close()
        else:
            state.result.how = state.failure
            async with asyncio.TaskGroup() as group:
                group.create_task(_end_local(state))
                group.create_task(_end_channel(state, state.failure))
        return state.result
    except BaseException as exc:
        state.stop()  # cancelled or a bug: neither end may look clean
        local.abort()
        channel.abort()
        if state.failure is None:
            cancelled = isinstance(exc, asyncio.CancelledError)
            state.result.how = "reset: its session is over" if cancelled else f"reset: {exc!r}"
        raise
    finally:  # the pipes go back after any last delivery
        state.outbound.release_pipe()
        state.inbound.release_pipe()
        state.result.duration = time.monotonic() - started


async def _end_local(state: _Relay) -> None:
    """Reset the local stream, after giving a peer still there what was on its way."""
    try:
        if state.local_alive:
            async with asyncio.timeout(DELIVERY_TIMEOUT):
                await state.inbound.deliver_pending()
                await state.local.wait_delivered()
    except TimeoutError:
        pass
    finally:
        state.local.abort()


async def _end_channel(state: _Relay, how: str) -> None:
    """Abort the channel: with an ABORT behind the frame under way if the peer should learn why."""
    if not state.tell_peer:
        state.channel.abort()
        return
    try:
        async with asyncio.timeout(ABORT_TIMEOUT):
            await state.outbound.deliver_pending()
    except (TimeoutError, TransportError):
        state.channel.abort()
        return
    await abort_channel(state.channel, how)


async def abort_channel(channel: Channel, reason: str) -> None:
    """Tell the peer why the relay ends abnormally, then reset the channel.
    ABORT, FIN, then the peer's bytes are dropped until it closes: closing with
    unread bytes would send an RST that can make the peer lose the ABORT."""
    try:
        with contextlib.suppress(TransportError, TimeoutError):
            async with asyncio.timeout(ABORT_TIMEOUT):
                await channel.stream.send(encode_abort(reason))
                channel.stream.send_eof()
                buffer = memoryview(bytearray(DRAIN_SIZE))
                while await channel.stream.receive_into(buffer):
                    pass
    finally:  # cancelled meanwhile (the session ended) too
        channel.abort()


class _Scratch(threading.local):
    """What the pumps of one thread share; a pump keeps nothing here across callbacks."""

    def __init__(self) -> None:
        self.buffer = bytearray(HEADER_SIZE + CHUNK_SIZE)
        self.view = memoryview(self.buffer)
        self.payload = self.view[HEADER_SIZE:]
        self.small_payload = self.view[HEADER_SIZE : HEADER_SIZE + SMALL_READ]
        self.between_frames = self.view[:HEADER_READ]
        self.pipes: list[Pipe] = []

    def take_pipe(self) -> Pipe:  # one fill of a pipe is one DATA frame's payload
        return self.pipes.pop() if self.pipes else Pipe(PIPE_SIZE, MAX_DATA_SIZE)

    def give_pipe(self, pipe: Pipe) -> None:
        if pipe.count == 0 and len(self.pipes) < IDLE_PIPES:
            self.pipes.append(pipe)
        else:
            pipe.close()


_scratch = _Scratch()


def cached_fds() -> int:
    """Descriptors kept between connections: idle pipes, one epoll set per live loop."""
    return 2 * len(_scratch.pipes) + epoll_descriptors()


class _Relay:
    """One relayed connection: its two pumps and how it ended."""

    def __init__(
        self,
        local: Stream,
        channel: Channel,
        local_role: str,
        result: RelayResult,
        keep_channel: bool = False,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.keep_channel = keep_channel
        self.poller = poller(self.loop)
        self.local = local
        self.channel = channel
        self.role = local_role
        self.result = result
        self.failure: str | None = None  # how it ended abnormally
        self.tell_peer = False  # then: the channel works, so an ABORT says why
        self.local_alive = False  # then: the local peer first gets what was on its way
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self._running = 2
        self._watched: int | None = None  # a finished pump's source, watched for a reset
        # A write that failed towards one side: the relay fails once the other
        # direction has read what that side still held.
        self.local_error: TransportError | None = None
        self.channel_error: TransportError | None = None
        self._give_up: asyncio.TimerHandle | None = None
        # What was decoded behind the peer's END when the relay ended (its Finished); None if
        # what followed was malformed: the channel cannot be reused then.
        self.leftover: list[Event] | None = []
        self.outbound: _CopyOut
        self.inbound: _Inbound
        splice = SPLICE_AVAILABLE and os.environ.get("TUNNELGATE_NO_SPLICE", "") in ("", "0")
        remote = channel.stream
        if splice and _spliceable(local) and _spliceable(remote):
            local_fd, channel_fd = local.fd_for_splice(), remote.fd_for_splice()
            self.result.path = "splice"
            self.outbound = _SpliceOut(self, local_fd, channel_fd)
            self.inbound = _SpliceIn(self, channel_fd, local_fd)
        else:
            self.result.path = "copy"
            self.outbound, self.inbound = _CopyOut(self), _CopyIn(self)
        self.outbound.want_read()
        if not local.reads_all_ready:  # a TLS local stream (a link between gateways) may
            self.loop.call_soon(self.outbound.on_readable)  # hold bytes read ahead already
        self.inbound.start_with(channel.take_pending())

    def pump_done(self, pump: _Pump) -> None:
        """``pump``'s direction ended cleanly (END sent, or END received)."""
        self._running -= 1
        if self._running == 0:
            self.stop()
            if not self.finished.done():
                self.finished.set_result(None)
        elif pump is self.outbound:
            # Nobody reads the local stream now, but its reset (a client that half-closed,
            # then gave up) must end the relay at once. Inbound reads on after END anyway.
            self.watch_for_reset(pump)

    def watch_for_reset(self, pump: _Pump) -> None:
        self._watched = pump.src_fd
        self.poller.add_error_watch(pump.src_fd, functools.partial(self._reset_seen, pump))

    def _reset_seen(self, pump: _Pump) -> None:
        exc = pump.src.pending_error()
        self.stop_watching()  # level-triggered: a full hang-up would wake us again
        if exc is None:
            return  # both directions shut cleanly: the other pump finishes by itself
        (self.local_failed if pump.src is self.local else self.channel_failed)(exc)

    def left_over(self, first: Event, rest: Iterator[Event]) -> None:
        """The relay ended with ``first`` and ``rest`` decoded and not relayed."""
        try:
            self.leftover = [first, *rest]
        except ProtocolError:
            self.leftover = None

    def end_frame(self) -> bytes:
        """END for the outbound direction; when the relay ends cleanly with it (the inbound
        one has ended) and the channel is kept, this side's Finished rides behind it."""
        if not self.keep_channel or self._running != 1 or not self.inbound.ended:
            return END_FRAME
        conn = self.channel.conversation.conn
        assert conn is not None
        return END_FRAME + encode_message(self.channel.conversation.send(Finished(conn)))

    def stop_watching(self) -> None:
        if self._watched is not None:
            self.poller.remove_error_watch(self._watched)
            self._watched = None

    def fail(self, how: str, *, tell_peer: bool, local_alive: bool) -> None:
        if self.finished.done():
            return
        self.failure, self.tell_peer, self.local_alive = how, tell_peer, local_alive
        self.stop()
        self.finished.set_result(None)

    def local_failed(self, exc: TransportError) -> None:
        """The local stream broke, and all it held has been read."""
        how = f"{self.role} {(self.local_error or exc).reason}"
        self.fail(how, tell_peer=True, local_alive=False)

    def local_write_failed(self, exc: TransportError) -> None:
        """Its peer reset the local stream: what that still holds (the peer's
        last bytes) goes to the channel first; the relay fails at its end."""
        self.inbound.stop()
        self.local_error = exc
        self._fail_after(self.outbound, self.local_failed, exc)

    def channel_failed(self, exc: TransportError) -> None:
        """The channel broke, and all it held has been read."""
        how = f"data channel lost: {(self.channel_error or exc).reason}"
        self.fail(how, tell_peer=False, local_alive=True)

    def channel_write_failed(self, exc: TransportError) -> None:
        """As :meth:`local_write_failed`, the other way (an ABORT may say why)."""
        self.outbound.stop()
        self.channel_error = exc
        self._fail_after(self.inbound, self.channel_failed, exc)

    def _fail_after(
        self, reader: _Pump, failed: Callable[[TransportError], None], exc: TransportError
    ) -> None:
        """``failed(exc)`` once ``reader`` has read its side to the end, or after
        ``DELIVERY_TIMEOUT`` if that side's peer does not take the bytes."""
        if reader.stopped:
            failed(exc)
        elif self._give_up is None:
            self._give_up = self.loop.call_later(DELIVERY_TIMEOUT, failed, exc)

    def stop(self) -> None:
        self.stop_watching()
        if self._give_up is not None:
            self._give_up.cancel()
        self.outbound.stop()
        self.inbound.stop()


class _Pump:
    """One direction: read ``src`` when readable, write ``dst`` at once, and
    wait for ``dst`` to be writable only when it could not take everything."""

    def __init__(self, relay: _Relay, src: Stream, dst: Stream) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.poller = relay.poller
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.reading = False  # our reader is registered on src
        self.writing = False  # our writer is registered on dst
        self.stopped = False
        self.pipe: Pipe | None = None

    on_readable: Callable[[], None]  # each kind of pump defines both
    on_writable: Callable[[], None]

    def want_read(self) -> None:  # after each message: as cheap as can be when nothing changes
        if self.writing:
            self.stop_writing()
        if not self.reading:
            self.poller.add_reader(self.src_fd, self.on_readable)
            self.reading = True

    def want_write(self) -> None:
        if self.reading:
            self.stop_reading()
        if not self.writing:
            self.poller.add_writer(self.dst_fd, self.on_writable)
            self.writing = True

    def stop_reading(self) -> None:
        if self.reading:
            self.poller.remove_reader(self.src_fd)
            self.reading = False

    def stop_writing(self) -> None:
        if self.writing:
            self.poller.remove_writer(self.dst_fd)
            self.writing = False

    def retry_later(self) -> None:
        """TLS wants the direction another pump waits on (never in TLS 1.3)."""
        self.stop_reading()
        self.loop.call_later(WANT_RETRY, self.on_readable)

    def finish(self) -> None:
        self.stop()
        self.relay.pump_done(self)

    def stop(self) -> None:  # no more callbacks; the pipe stays for a last delivery
        if self.stopped:
            return
        self.stopped = True
        self.stop_reading()
        self.stop_writing()

    def release_pipe(self) -> None:
        if self.pipe is not None:
            _scratch.give_pipe(self.pipe)
            self.pipe = None


_SPLICEABLE: dict[type, bool] = {}  # per class: isinstance of a Protocol costs microseconds


def _spliceable(stream: Stream) -> TypeGuard[SpliceableStream]:
    kind = type(stream)
    if (answer := _SPLICEABLE.get(kind)) is None:
        answer = _SPLICEABLE[kind] = isinstance(stream, SpliceableStream)
    return answer


async def _write_all(stream: Stream, data: bytes) -> int:
    """Write ``data`` outside the pumps (a last delivery); the bytes taken before an error."""
    view = memoryview(data)
    while view:
        try:
            sent = stream.try_send(view)
        except TransportError:
            break
        view = view[sent:]
        if not sent:
            await stream.wait_writable()
    return len(data) - len(view)


async def _splice_all(pipe: Pipe, fd: int, stream: Stream) -> int:
    """Move what ``pipe`` holds into ``fd``, the splice descriptor of ``stream``."""
    moved = 0
    while pipe.count:
        try:
            moved += pipe.drain_into(fd)
        except WouldBlock:
            await stream.wait_writable()
        except TransportError:
            break
    return moved


class _CopyOut(_Pump):
    """Outbound, local stream → DATA frames → channel: reads into the shared buffer
    behind a header slot, and sends each chunk as one frame."""

    def __init__(self, relay: _Relay) -> None:
        super().__init__(relay, relay.local, relay.channel.stream)
        self.eof = False
        self.backlog: memoryview | None = None  # what the channel has not taken yet
        self.backlog_payload = 0

    def local_ended(self) -> bool:
        """At the local stream's EOF: True if END should follow, False if its
        peer had reset it (a write failed) and the relay fails instead."""
        if self.relay.local_error is not None:
            self.relay.local_failed(self.relay.local_error)
            return False
        self.eof = True
        return True

    def on_readable(self) -> None:
        if not self.stopped:
            self.copy(_scratch.payload)

    def copy(self, into: memoryview) -> int:
        """Read into ``into`` (behind the header slot) and send one frame, or END
        at EOF; the bytes read, or -1 if none could be."""
        try:
            n = self.src.try_receive_into(into)
        except WouldBlock:
            return -1
        except TransportError as exc:
            self.relay.local_failed(exc)
            return -1
        if n == 0:
            if self.local_ended():
                self.send(memoryview(self.relay.end_frame()), 0)
        else:
            pack_data_header(_scratch.buffer, n)
            self.send(_scratch.view[: HEADER_SIZE + n], n)
        return n

    def send(self, frame: memoryview, payload: int) -> None:
        try:
            sent = self.dst.try_send(frame)
        except TransportError as exc:
            return self.relay.channel_write_failed(exc)
        if sent == len(frame):
            return self.sent(payload)
        # TLS takes all or nothing and must be offered the same bytes again.
        self.backlog = memoryview(bytes(frame[sent:]))
        self.backlog_payload = payload
        self.want_write()

    def on_writable(self) -> None:
        if self.stopped or self.backlog is None:
            return
        frame, self.backlog = self.backlog, None
        self.send(frame, self.backlog_payload)

    def sent(self, payload: int) -> None:
        self.relay.result.sent += payload
        if self.eof:
            self.finish()
        else:
            self.want_read()
            if not self.src.reads_all_ready:  # TLS read ahead: no readiness event announces it
                self.loop.call_soon(self.on_readable)

    async def deliver_pending(self) -> None:
        """Finish the frame under way to the channel (before an ABORT). Raises TransportError."""
        if self.backlog is not None:
            frame, self.backlog = self.backlog, None
            await self.relay.channel.stream.send(frame)  # the same bytes again, as TLS needs
            self.relay.result.sent += self.backlog_payload


class _SpliceOut(_CopyOut):
    """Copies while reads are small; after one fills ``SMALL_READ``, splices the local
    stream into a pipe (up to a frame), sends the header with MSG_MORE, then the
    pipe; a smaller splice switches back (one ``recv``, one ``send`` per message)."""

    def __init__(self, relay: _Relay, local_fd: int, channel_fd: int) -> None:
        super().__init__(relay)
        self.splice_src = local_fd
        self.splice_dst = channel_fd
        self.header = bytearray(HEADER_SIZE)
        self.head = memoryview(self.header)[:0]  # header bytes not yet sent
        self.payload = 0
        self.bulk = False

    def on_readable(self) -> None:
        if self.stopped:
            return
        if not self.bulk:
            self.bulk = self.copy(_scratch.small_payload) == SMALL_READ
            return
        pipe = self.pipe = _scratch.take_pipe()
        try:
            n = pipe.fill_from(self.splice_src, pipe.size)
        except WouldBlock:
            self.release_pipe()
            return
        except TransportError as exc:
            self.release_pipe()
            return self.relay.local_failed(exc)
        self.bulk = n >= SMALL_READ
        if n == 0:
            self.release_pipe()
            if self.local_ended():
                self.send(memoryview(self.relay.end_frame()), 0)
            return
        pack_data_header(self.header, n)
        self.head = memoryview(self.header)
        self.payload = n
        self.flush()

    def on_writable(self) -> None:
        if self.backlog is not None:
            super().on_writable()
        elif not self.stopped:
            self.flush()

    def flush(self) -> None:
        pipe = self.pipe
        try:
            while self.head:
                sent = self.dst.try_send(self.head, more=pipe is not None)
                if not sent:
                    return self.want_write()
                self.head = self.head[sent:]
            while pipe is not None and pipe.count:
                pipe.drain_into(self.splice_dst)
        except WouldBlock:
            return self.want_write()
        except TransportError as exc:
            return self.relay.channel_write_failed(exc)
        self.release_pipe()
        self.relay.result.sent += self.payload
        if self.eof:
            self.finish()
        else:
            self.want_read()

    async def deliver_pending(self) -> None:
        await super().deliver_pending()
        if not self.head and (self.pipe is None or not self.pipe.count):
            return
        head, self.head = bytes(self.head), memoryview(self.header)[:0]
        if len(head) != await _write_all(self.dst, head):
            raise TransportError("data channel lost before the end of a frame")
        if self.pipe is not None and self.pipe.count:
            await _splice_all(self.pipe, self.splice_dst, self.dst)
            if self.pipe.count:
                raise TransportError("data channel lost before the end of a frame")
        self.relay.result.sent += self.payload


class _Inbound(_Pump):
    """Inbound, channel → frames → local stream: what the local stream cannot take
    yet waits, copied, in ``backlog`` with the events behind it. After END it reads
    on, for an ABORT."""

    def __init__(self, relay: _Relay) -> None:
        super().__init__(relay, relay.channel.stream, relay.local)
        self.decoder = relay.channel.decoder
        self.backlog: deque[bytes | Event] = deque()
        self.ended = False  # END received; the local stream is half-closed

    def start_with(self, pending: list[Event]) -> None:
        if self.deliver(pending):
            self.want_read()
            self.loop.call_soon(self.on_readable)  # TLS may hold decrypted bytes already

    def deliver(self, events: Iterable[Event]) -> bool:
        """Hand events to the local stream; False if it blocked or it ended."""
        backlog = self.backlog
        pending = iter(events)
        try:
            for event in pending:
                if self.stopped:
                    self.relay.left_over(event, pending)
                    return False
                if backlog:
                    backlog.append(bytes(event.view) if isinstance(event, Data) else event)
                elif isinstance(event, Data) and not self.ended:
                    self.write_keeping_rest(event.view)
                else:
                    self.handle(event)
        except ProtocolError as exc:
            self.relay.fail(str(exc), tell_peer=True, local_alive=True)
            return False
        return self.runs_on()

    def take(self, view: memoryview, n: int) -> bool:  # the n bytes read into view
        if not self.backlog and not self.ended and self.decoder.whole_data_frame(view[:n]):
            self.write_keeping_rest(view[HEADER_SIZE:n])
            return self.runs_on()
        return self.deliver(self.decoder.feed(view[:n]))

    def runs_on(self) -> bool:
        """After delivering: False if the pump ended or waits to write its backlog."""
        if self.stopped:
            return False
        if self.backlog:
            self.want_write()
            return False
        return True

    def write_keeping_rest(self, data: memoryview) -> None:
        sent = self.write(data)
        if 0 <= sent < len(data):
            self.backlog.append(bytes(data[sent:]))

    def write(self, data: memoryview | bytes) -> int:
        """Send what the local stream takes now; -1 if it failed."""
        try:
            sent = self.dst.try_send(data)
        except TransportError as exc:
            self.relay.local_write_failed(exc)
            return -1
        self.relay.result.received += sent
        return sent

    def handle(self, event: Event) -> None:
        if isinstance(event, Abort):
            how = f"aborted by peer: {event.reason or 'no reason'}"
            self.relay.fail(how, tell_peer=False, local_alive=True)
        elif isinstance(event, End) and not self.ended:
            self.ended = True
            with contextlib.suppress(TransportError):
                self.dst.send_eof()
            self.relay.pump_done(self)
        else:
            what = "data" if isinstance(event, Data) else repr(event)
            after = " after end of stream" if self.ended else ""
            how = f"protocol error: unexpected {what}{after}"
            self.relay.fail(how, tell_peer=True, local_alive=True)

    def drain_backlog(self) -> bool:
        """Write the backlog out; True when it is empty and the pump runs on."""
        backlog = self.backlog
        while backlog:
            item = backlog[0]
            if isinstance(item, bytes):
                sent = self.write(item)
                if sent < 0:
                    return False
                if sent < len(item):
                    backlog[0] = item[sent:]
                    return False
                backlog.popleft()
            else:
                backlog.popleft()
                self.handle(item)
                if self.stopped:
                    if backlog:  # behind the END that ended the relay (the peer's Finished)
                        rest = (Data(memoryview(i)) if isinstance(i, bytes) else i for i in backlog)
                        self.relay.left_over(next(rest), rest)
                    return False
        return True

    def channel_ended(self) -> None:  # EOF on the channel
        relay = self.relay
        if relay.channel_error is not None:
            relay.channel_failed(relay.channel_error)
        elif not self.ended:
            how = "data channel closed without end of stream"
            relay.fail(how, tell_peer=False, local_alive=True)
        else:
            # The peer closed after its END while our direction still runs: our
            # next write tells whether it is gone; until then, watch for a reset.
            self.stop()
            relay.watch_for_reset(self)

    async def deliver_pending(self) -> None:
        """Write the bytes held for the local stream (before its reset), up to an event."""
        while self.backlog and isinstance(item := self.backlog[0], bytes):
            sent = await _write_all(self.dst, item)
            self.relay.result.received += sent
            if sent < len(item):
                return
            self.backlog.popleft()


class _CopyIn(_Inbound):
    """Reads as much as is ready into the shared buffer and decodes it."""

    def on_readable(self) -> None:
        if self.stopped or self.writing:
            return
        self.want_read()  # again, after a retry_later
        view = _scratch.view
        stream = self.src
        n = 0
        eof = False
        try:
            while n < CHUNK_SIZE:
                got = stream.try_receive_into(view[n:CHUNK_SIZE])
                if got == 0:
                    eof = True
                    break
                n += got
                # Stop when nothing more is ready: plain recv returns all of it, and TLS
                # holds no record back. After several TLS reads that brought much, its
                # read-ahead buffer may have been the limit: read on, until WouldBlock.
                if stream.reads_all_ready and (n == got or n < HEADER_READ):
                    break
        except WouldBlock as exc:
            if exc.wants_write:
                self.retry_later()
        except TransportError as exc:
            if n and not self.take(view, n):
                return
            return self.relay.channel_failed(exc)
        if n and not self.take(view, n):
            return
        if eof:
            return self.channel_ended()
        if n >= CHUNK_SIZE:  # TLS may hold read-ahead records no readiness event announces
            self.loop.call_soon(self.on_readable)

    def on_writable(self) -> None:
        if self.stopped:
            return
        if self.drain_backlog():
            self.want_read()
            self.loop.call_soon(self.on_readable)


class _SpliceIn(_Inbound):
    """Between frames, reads up to ``HEADER_READ`` (small frames arrive whole) and
    delivers it by copy; the rest of a DATA frame is spliced through a pipe."""

    def __init__(self, relay: _Relay, channel_fd: int, local_fd: int) -> None:
        super().__init__(relay)
        self.splice_src = channel_fd
        self.splice_dst = local_fd

    def on_readable(self) -> None:
        if self.stopped or self.writing:
            return
        decoder = self.decoder
        for _ in range(STEPS_PER_WAKEUP):
            remaining = decoder.data_remaining
            if remaining == 0 or self.ended:
                view = _scratch.between_frames
                try:
                    n = self.src.try_receive_into(view)
                except WouldBlock:
                    return
                except TransportError as exc:
                    return self.relay.channel_failed(exc)
                if n == 0:
                    return self.channel_ended()
                if not self.take(view, n):
                    return
                if n < HEADER_READ and decoder.data_remaining == 0:
                    return  # drained: the next readiness event brings more
                continue
            pipe = self.pipe = self.pipe or _scratch.take_pipe()
            try:
                n = pipe.fill_from(self.splice_src, min(remaining, pipe.size))
            except WouldBlock:
                return
            except TransportError as exc:
                return self.relay.channel_failed(exc)
            if n == 0:
                return self.channel_ended()
            decoder.skip_data(n)
            if not self.drain_pipe():
                return

    def drain_pipe(self) -> bool:
        """Splice the pipe into the local stream; False if that must wait."""
        pipe = self.pipe
        assert pipe is not None
        try:
            while pipe.count:
                self.relay.result.received += pipe.drain_into(self.splice_dst)
        except WouldBlock:
            self.want_write()
            return False
        except TransportError as exc:
            self.relay.local_write_failed(exc)
            return False
        self.release_pipe()
        return True

    def on_writable(self) -> None:
        if self.stopped:
            return
        if self.pipe is not None and not self.drain_pipe():
            return
        if self.drain_backlog():
            self.want_read()
            self.loop.call_soon(self.on_readable)

    async def deliver_pending(self) -> None:
        if self.pipe is not None and self.pipe.count:
            self.relay.result.received += await _splice_all(self.pipe, self.splice_dst, self.dst)
            if self.pipe.count:
                return
        await super().deliver_pending()
