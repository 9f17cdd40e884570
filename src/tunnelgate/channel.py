"""A channel: the wire protocol's frames and messages on a stream.

A control channel lives in its :class:`Channel` for the whole session; a
data channel until it starts, when the relay takes over its stream and its
decoder (with the events decoded ahead of need, :meth:`Channel.take_pending`).
Every message received or sent passes through the channel's
:class:`~tunnelgate.protocol.Conversation`, which knows which messages its
state allows.

A channel sees its connection only through the
:class:`~tunnelgate.transport.Stream` interface: it must not import socket or
ssl, nor gateway, agent or relay.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Final

from tunnelgate.errors import ConnectionClosed
from tunnelgate.protocol.session import Conversation, Side
from tunnelgate.protocol.wire import Event, FrameDecoder, Message, encode_message
from tunnelgate.transport import Stream

CHANNEL_READ_SIZE: Final = 16 * 1024


class Channel:
    """A framed stream: a control channel or a data channel, on one side.

    Events decoded ahead of need are queued; a relay taking over a data
    channel first drains :meth:`take_pending`, then keeps using ``decoder``.
    """

    def __init__(self, stream: Stream, side: Side) -> None:
        self.stream = stream
        self.conversation = Conversation(side)
        self.decoder = FrameDecoder()
        self._pending: deque[Event] = deque()
        self._send_lock = asyncio.Lock()

    async def receive(self) -> Message:
        """The next message, if the conversation allows it now: raises
        RemoteProtocolError if not, ConnectionClosed("eof") at end of stream."""
        while not self._pending:
            buffer = memoryview(bytearray(CHANNEL_READ_SIZE))
            n = await self.stream.receive_into(buffer)
            if n == 0:
                raise ConnectionClosed("eof", "closed by the peer")
            for event in self.decoder.feed(buffer[:n]):
                self._pending.append(event)
        return self.conversation.receive(self._pending.popleft())

    def take_pending(self) -> list[Event]:
        events = list(self._pending)
        self._pending.clear()
        return events

    async def send_message(self, message: Message) -> None:
        async with self._send_lock:
            # In the lock: the conversation's order is the order on the wire.
            data = encode_message(self.conversation.send(message))
            await self.stream.send(data)

    def is_idle_and_open(self) -> bool:
        """True if nothing (not even EOF or RST) arrived since the handshake.

        A pooled data channel must be silent until it is started; anything
        else means the agent or a middlebox closed it.
        """
        if self._pending or not self.decoder.at_frame_boundary:
            return False
        return self.stream.is_quiet()

    def close(self) -> None:
        self.stream.close()

    def abort(self) -> None:
        self.stream.abort()
