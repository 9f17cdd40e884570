"""A channel: the wire protocol's frames and messages on a stream, each checked by
its :class:`~tunnelgate.protocol.session.Conversation`. A data channel lives in it until
the relay takes over its stream and decoder. It sees a Stream only: it must not
import socket or ssl, nor gateway, agent or relay.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final

from tunnelgate.errors import ConnectionClosed
from tunnelgate.protocol.session import Conversation, Side, State
from tunnelgate.protocol.wire import Event, Finished, FrameDecoder, Message, encode_message
from tunnelgate.transport import Stream

CHANNEL_READ_SIZE: Final = 16 * 1024


class Channel:
    """A framed stream, control or data, on one side."""

    def __init__(self, stream: Stream, side: Side) -> None:
        self.stream = stream
        self.conversation = Conversation(side)
        self.decoder = FrameDecoder()
        self._pending: deque[Event] = deque()  # decoded ahead of need
        self._send_lock = asyncio.Lock()
        self.nonce = b""  # the gateway's Challenge on it (agent side), once received

    async def receive(self) -> Message:
        """The next message, if the conversation allows it (else RemoteProtocolError);
        ConnectionClosed("eof") at the end of the stream."""
        return await self.receive_event()  # type: ignore[return-value]  # the tables say

    async def receive_event(self) -> Event:
        """The next message or relay frame, if the conversation allows it: :meth:`receive`
        for the states whose tables list frames (a probe's measurement)."""
        while not self._pending:
            buffer = memoryview(bytearray(CHANNEL_READ_SIZE))
            n = await self.stream.receive_into(buffer)
            if n == 0:
                raise ConnectionClosed("eof", "closed by the peer")
            self._pending.extend(self.decoder.feed(buffer[:n]))
        return self.conversation.receive(self._pending.popleft())

    def take_pending(self) -> list[Event]:
        """The events decoded ahead of need, for a relay taking over the channel."""
        events, self._pending = list(self._pending), deque()
        return events

    def give_back(self, events: list[Event]) -> None:
        """Events a relay that ended cleanly decoded behind its END (the peer's Finished)."""
        self._pending.extendleft(reversed(events))

    async def finish(self, conn: int) -> None:
        """The end handshake after ``conn``'s relay ended cleanly: Finished each way, after which
        the channel is pooled again. Raises RemoteProtocolError if the peer sends anything else
        (its relay failed after all: an ABORT), TransportError or ConnectionClosed; the caller
        bounds the wait."""
        if self.conversation.state is not State.FINISHING:  # the relay's END may have carried it
            await self.send_message(Finished(conn))
        if self.conversation.state is not State.POOLED:
            await self.receive()  # the conversation lets only the peer's Finished(conn) through

    async def send_message(self, message: Message, then: bytes | memoryview = b"") -> None:
        """Send ``message``, and ``then`` (relay frames: a Start's first DATA) in the same write."""
        async with self._send_lock:  # the conversation's order is the order on the wire
            frame = encode_message(self.conversation.send(message))
            await self.stream.send(frame + then if then else frame)

    def is_idle_and_open(self) -> bool:
        """True if nothing (not even EOF or RST) arrived since the handshake: a
        pooled data channel is silent until started, or the agent closed it."""
        if self._pending or not self.decoder.at_frame_boundary:
            return False
        return self.stream.is_quiet()

    def close(self) -> None:
        self.stream.close()

    def abort(self) -> None:
        self.stream.abort()
