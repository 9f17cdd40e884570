"""The relay: bytes between a local TCP socket and a started data channel.

On the gateway the local socket is the client's; on the agent it is the
service's. Two pumps run side by side:

* outbound: local socket → ``DATA`` frames → channel; local EOF → ``END``;
* inbound: channel → frames → local socket; ``END`` → ``shutdown(SHUT_WR)``.

A half-close therefore travels end to end while the other direction keeps
flowing. Anything abnormal (a reset, ``ABORT``, a channel that stops without
``END``, a protocol error) resets both the local socket and the channel, so an
abnormal end is never disguised as a clean one. Each pump owns one large
buffer for the relay's life; nothing is allocated or logged per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from tunnelgate.errors import ProtocolError, TransportError
from tunnelgate.protocol import (
    END_FRAME,
    HEADER_SIZE,
    Abort,
    Data,
    End,
    Event,
    encode_abort,
    pack_data_header,
)
from tunnelgate.transport import Channel, describe_os_error, reset_socket

CHUNK_SIZE: Final = 256 * 1024
ABORT_TIMEOUT: Final = 1.0  # for the peer to take an ABORT before the reset
DRAIN_SIZE: Final = 16 * 1024


@dataclass
class RelayResult:
    """How one relayed connection went. ``how`` is "normal" or a reason."""

    sent: int = 0  # bytes from the local socket into the tunnel
    received: int = 0  # bytes from the tunnel to the local socket
    how: str = "normal"
    duration: float = 0.0

    @property
    def normal(self) -> bool:
        return self.how == "normal"


class _Failed(Exception):
    """One pump hit an abnormal end. ``tell_peer`` sends ABORT over the channel."""

    def __init__(self, how: str, tell_peer: bool) -> None:
        super().__init__(how)
        self.how = how
        self.tell_peer = tell_peer


async def relay(local: socket.socket, channel: Channel, local_role: str) -> RelayResult:
    """Pump bytes both ways until both directions ended; close both sockets.

    ``local_role`` ("client" or "service") names the local peer in reasons.
    Cancellation (a session ending) resets both ends.
    """
    loop = asyncio.get_running_loop()
    result = RelayResult()
    started = time.monotonic()

    async def outbound() -> None:
        buffer = bytearray(HEADER_SIZE + CHUNK_SIZE)
        view = memoryview(buffer)
        payload = view[HEADER_SIZE:]
        stream = channel.stream
        while True:
            try:
                n = await loop.sock_recv_into(local, payload)
            except OSError as exc:
                raise _Failed(f"{local_role} {describe_os_error(exc)}", tell_peer=True) from None
            try:
                if n == 0:
                    await stream.send(END_FRAME)
                    return
                pack_data_header(buffer, n)
                await stream.send(view[: HEADER_SIZE + n])
            except TransportError as exc:
                raise _Failed(f"data channel lost: {exc}", tell_peer=False) from None
            result.sent += n

    async def deliver(events: Iterable[Event]) -> bool:
        """Write decoded events to the local socket; True once END arrived."""
        for event in events:
            if isinstance(event, Data):
                try:
                    await loop.sock_sendall(local, event.view)
                except OSError as exc:
                    raise _Failed(
                        f"{local_role} {describe_os_error(exc)}", tell_peer=True
                    ) from None
                result.received += len(event.view)
            elif isinstance(event, End):
                with contextlib.suppress(OSError):
                    local.shutdown(socket.SHUT_WR)
                return True
            elif isinstance(event, Abort):
                raise _Failed(f"aborted by peer: {event.reason or 'no reason'}", tell_peer=False)
            else:
                raise _Failed(f"protocol error: unexpected message {event!r}", tell_peer=False)
        return False

    async def inbound() -> None:
        if await deliver(channel.take_pending()):
            return
        buffer = bytearray(CHUNK_SIZE)
        view = memoryview(buffer)
        stream, decoder = channel.stream, channel.decoder
        while True:
            try:
                n = await stream.receive_into(view)
            except TransportError as exc:
                raise _Failed(f"data channel lost: {exc}", tell_peer=False) from None
            if n == 0:
                raise _Failed("data channel closed without end of stream", tell_peer=False)
            try:
                if await deliver(decoder.feed(view[:n])):
                    return
            except ProtocolError as exc:
                raise _Failed(str(exc), tell_peer=True) from None

    failure: _Failed | None = None
    try:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(outbound())
                group.create_task(inbound())
        except* _Failed as caught:
            failure = caught.exceptions[0]  # type: ignore[assignment]
    except BaseException:
        # Cancelled (the session ended) or a bug: neither end may look clean.
        reset_socket(local)
        channel.abort()
        raise
    finally:
        result.duration = time.monotonic() - started
    if failure is None:
        local.close()
        channel.close()
        return result
    result.how = failure.how
    reset_socket(local)
    if failure.tell_peer:
        await abort_channel(channel, failure.how)
    else:
        channel.abort()
    return result


async def abort_channel(channel: Channel, reason: str) -> None:
    """Tell the peer why the relay ends abnormally, then reset the channel.

    ABORT is followed by a FIN, and the peer's bytes are read and dropped until
    it resets or closes (for at most ``ABORT_TIMEOUT``): closing at once with
    unread bytes would send an RST that can make the peer lose the ABORT.
    """
    with contextlib.suppress(TransportError, TimeoutError, OSError):
        async with asyncio.timeout(ABORT_TIMEOUT):
            await channel.stream.send(encode_abort(reason))
            channel.sock.shutdown(socket.SHUT_WR)
            buffer = memoryview(bytearray(DRAIN_SIZE))
            while await channel.stream.receive_into(buffer):
                pass
    channel.abort()
