"""systemd's notification protocol (``sd_notify``) with the stdlib socket, for a
``Type=notify`` unit: ``READY=1`` once the side serves, ``STATUS=`` lines, ``STOPPING=1``
when a stop begins, and ``WATCHDOG=1`` every half of ``WatchdogSec=`` from a task on the
event loop, so that a loop that stops turning stops the pings and systemd restarts the
process.

Without ``$NOTIFY_SOCKET`` every call returns at once: no socket, no task. A failure to
send is logged once at debug and stops nothing (systemd may be gone; the tunnel is not).
An edge module that the CLI wires to a side: it must not import gateway, agent or any
other part of tunnelgate (``logs`` at most), nor anything beyond the stdlib.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Final

logger = logging.getLogger(__name__)

SOCKET_ENV: Final = "NOTIFY_SOCKET"
WATCHDOG_ENV: Final = "WATCHDOG_USEC"
WATCHDOG_PID_ENV: Final = "WATCHDOG_PID"


def notify_address(value: str) -> str | None:
    """The socket address in ``$NOTIFY_SOCKET``: a path, or ``@name`` for an abstract
    socket (Linux); None if it names neither."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two ``WATCHDOG=1`` (half of ``$WATCHDOG_USEC``, as systemd advises);
    None if the watchdog is off or meant for another process (``$WATCHDOG_PID``)."""
    meant_for = environ.get(WATCHDOG_PID_ENV)
    if meant_for is not None and meant_for.strip() != str(pid):
        return None
    try:
        usec = int(environ.get(WATCHDOG_ENV, ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Notifier:
    """Sends notifications to systemd; ``async with`` it around the process's life."""

    def __init__(self, address: str | None, watchdog_interval: float | None = None) -> None:
        self.address = address  # None: not under systemd, every call does nothing
        self.watchdog_interval = watchdog_interval if address is not None else None
        self._socket: socket.socket | None = None
        self._failed = False
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] = os.environ, pid: int | None = None
    ) -> Notifier:
        value = environ.get(SOCKET_ENV, "")
        address = notify_address(value) if value else None
        if value and address is None:
            logger.debug("%s=%r is neither a path nor @name: not notifying", SOCKET_ENV, value)
        return cls(address, watchdog_interval(environ, os.getpid() if pid is None else pid))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    async def __aenter__(self) -> Notifier:
        if self.watchdog_interval is not None:
            self._start(self._ping_watchdog(self.watchdog_interval), "systemd-watchdog")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the watchdog's pings and any wait for readiness; close the socket."""
        tasks = list(self._tasks)  # each leaves the set when done
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def notify(self, *assignments: str) -> None:
        """Send ``KEY=value`` lines in one datagram; never blocks, never raises."""
        if self.address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            if not self._failed:  # systemd gone or its queue full: nothing to do but go on
                self._failed = True
                logger.debug("cannot notify systemd at %r: %s", self.address, exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self, status: str = "stopping") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def ready_after(self, wait: Callable[[], Awaitable[str]]) -> None:
        """Send ``READY=1`` with the status ``wait()`` returns, once it returns; nothing if it
        raises (the side reports its own failure). ``wait`` is not called when disabled."""
        if self.address is not None:
            self._start(self._ready_after(wait), "systemd-ready")

    def _start(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ready_after(self, wait: Callable[[], Awaitable[str]]) -> None:
        try:
            status = await wait()
        except Exception as exc:
            logger.debug("not ready, not telling systemd: %s", exc)
            return
        self.ready(status)

    async def _ping_watchdog(self, interval: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)
