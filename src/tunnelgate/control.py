"""What both sides do on a control channel, written once: receive under the
heartbeat deadline (answering pings on the way), and drain — a session that
said or heard goodbye takes no new clients, and ends once its last relayed
connection has ended.

Orchestration shared by the gateway's and the agent's sessions: it must not
import gateway or agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import NoReturn

from tunnelgate.channel import Channel
from tunnelgate.errors import ConnectionClosed, SessionOver, TransportError
from tunnelgate.protocol.wire import Message, Ping, Pong


async def receive_control(
    channel: Channel,
    timeout: float,
    draining: Callable[[], str | None],
    relays: set[asyncio.Task[None]],
) -> Message | str:
    """The next message other than a Ping (which is answered here), within
    ``timeout`` (TimeoutError: the peer is silent). Once the session drains
    (``draining()`` says why), the control channel's end is the normal end:
    the relays run on their own data channels, so wait for them and return
    why the session ended."""
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


async def end_when_drained(relays: set[asyncio.Task[None]], reason: str) -> NoReturn:
    """End the session (inside its task group) once its last relay has ended."""
    await wait_relays(relays)
    raise SessionOver(reason)


async def wait_relays(relays: set[asyncio.Task[None]], timeout: float | None = None) -> int:
    """Wait until the relays' tasks have all ended, for up to ``timeout`` seconds;
    return how many are still running (the graceful drain of either side).

    ``relays`` is live: each task removes itself when done, and a task added
    meanwhile is waited for too.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while relays:
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            break
        await asyncio.wait(set(relays), timeout=remaining)
    return len(relays)
