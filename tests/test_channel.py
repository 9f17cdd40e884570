"""Channels: framed messages on a stream, and the liveness check of a pooled one.

Runs on both streams (plain TCP and TLS) of the transport's conformance suite.
"""

from __future__ import annotations

import fcntl
import sys
import termios

import pytest
import streamkit
from kit.waiting import wait_until
from streamkit import Pair

from tunnelgate.channel import Channel
from tunnelgate.errors import ConnectionClosed, LocalProtocolError, RemoteProtocolError
from tunnelgate.protocol.session import Side, State
from tunnelgate.protocol.wire import Ping, Pong, encode_message
from tunnelgate.transport import Stream, TLSStream

TLS_RECORD_OVERHEAD = 22  # TLS 1.3 with AES-GCM: a 5-byte header, the content type, a 16-byte tag

pytestmark = pytest.mark.timeout(30)

pair = streamkit.pair  # every kind of stream


def in_control(*channels: Channel) -> tuple[Channel, ...]:
    """The channels with their sessions running, so that control messages pass."""
    for channel in channels:
        channel.conversation.state = State.CONTROL
    return channels


async def test_channel_refuses_a_message_its_state_does_not_allow(pair: Pair) -> None:
    """A message out of place is the peer's protocol error, and one this side may
    not send yet is refused before it reaches the wire."""
    server, client = pair
    agent_side, gateway_side = Channel(client, Side.AGENT), Channel(server, Side.GATEWAY)
    with pytest.raises(LocalProtocolError, match="cannot send ping while awaiting the challenge"):
        await agent_side.send_message(Ping(1))
    await client.send(encode_message(Ping(1)))
    with pytest.raises(RemoteProtocolError, match="unexpected ping frame while new"):
        await gateway_side.receive()


async def test_channel_carries_messages_and_checks_liveness(pair: Pair) -> None:
    """Framed messages round-trip; a silent channel is idle and open, a closed one is not."""
    server, client = pair
    agent_side, gateway_side = in_control(
        Channel(client, Side.AGENT), Channel(server, Side.GATEWAY)
    )
    await agent_side.send_message(Ping(7))
    assert await gateway_side.receive() == Ping(7)
    assert gateway_side.is_idle_and_open()
    agent_side.close()
    await wait_until(lambda: not gateway_side.is_idle_and_open(), what="the close to be seen")


async def test_channel_with_events_decoded_ahead_is_not_idle(pair: Pair) -> None:
    """Messages that arrived together are queued: the channel is not idle until
    they are taken, and take_pending hands them over in order."""
    server, client = pair
    (gateway_side,) = in_control(Channel(server, Side.GATEWAY))
    await client.send(encode_message(Ping(1)) + encode_message(Pong(2)) + encode_message(Ping(3)))
    assert await gateway_side.receive() == Ping(1)
    assert not gateway_side.is_idle_and_open()
    assert gateway_side.take_pending() == [Pong(2), Ping(3)]
    assert gateway_side.is_idle_and_open()


def unread(stream: Stream) -> int:
    """Bytes in ``stream``'s socket receive queue (encrypted ones, under TLS)."""
    found = fcntl.ioctl(stream.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(found, sys.byteorder)


async def test_channel_with_a_message_behind_the_one_read_is_not_idle(pair: Pair) -> None:
    """A message behind the one just read, sent on its own (a record of its own under
    TLS, which OpenSSL reads ahead with the first, so the socket looks empty): the
    channel is not idle."""
    server, client = pair
    (gateway_side,) = in_control(Channel(server, Side.GATEWAY))
    frame = encode_message(Ping(1))
    overhead = TLS_RECORD_OVERHEAD if isinstance(server, TLSStream) else 0
    await client.send(frame)
    await client.send(encode_message(Ping(2)))
    await wait_until(lambda: unread(server) >= 2 * (len(frame) + overhead), what="both messages")
    assert await gateway_side.receive() == Ping(1)
    assert not gateway_side.is_idle_and_open()
    assert await gateway_side.receive() == Ping(2)
    assert gateway_side.is_idle_and_open()


async def test_channel_half_a_frame_is_not_idle(pair: Pair) -> None:
    """A frame cut in the middle means the channel is in use, not idle."""
    server, client = pair
    (gateway_side,) = in_control(Channel(server, Side.GATEWAY))
    frame = encode_message(Ping(1))
    await client.send(frame + frame[:3])
    assert await gateway_side.receive() == Ping(1)
    assert not gateway_side.is_idle_and_open()


async def test_channel_receive_at_eof_raises_connection_closed(pair: Pair) -> None:
    """A peer that closes ends the channel with ConnectionClosed("eof")."""
    server, client = pair
    client.close()
    with pytest.raises(ConnectionClosed) as caught:
        await Channel(server, Side.GATEWAY).receive()
    assert caught.value.how == "eof"
