"""What both sides do on a control channel: receive under the heartbeat deadline
(answering pings), and drain (after goodbye, end once the last relay has ended).
Orchestration shared by both sides' sessions: it must not import gateway or agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import NoReturn

from tunnelgate.channel import Channel
from tunnelgate.errors import ConnectionClosed, SessionOver, TransportError
from tunnelgate.protocol.wire import Message, Ping, Pong


async def receive_control(
    channel: Channel,
    timeout: float,
    draining: Callable[[], str | None],
    relays: AbstractSet[asyncio.Future[None]],
) -> Message | str:
    """The next message but Pings (answered here), within ``timeout``. Once draining
    (``draining()`` says why), the channel's end is normal: wait for the relays."""
    while True:
        try:
            async with asyncio.timeout(timeout):
                message = await channel.receive()
        except (ConnectionClosed, TransportError) as exc:
            goodbye = draining()
            if goodbye is None:
                raise
            await wait_relays(relays)
            return f"{goodbye}; then {exc}"
        if not isinstance(message, Ping):
            return message
        await channel.send_message(Pong(message.seq))


async def end_when_drained(relays: AbstractSet[asyncio.Future[None]], reason: str) -> NoReturn:
    """End the session (inside its task group) once its last relay has ended."""
    await wait_relays(relays)
    raise SessionOver(reason)


async def wait_relays(
    relays: AbstractSet[asyncio.Future[None]], timeout: float | None = None
) -> int:
    """Until the relays (a live set of their tasks or futures: each leaves it when done)
    have ended, for up to ``timeout``; how many still run."""
    loop = asyncio.get_running_loop()
    end = None if timeout is None else loop.time() + timeout
    while relays and (end is None or end > loop.time()):
        await asyncio.wait(set(relays), timeout=None if end is None else end - loop.time())
    return len(relays)
