"""Readiness of descriptors: an epoll set per event loop, nested in the loop, for
the relay's pumps and for streams waiting on an operation that would block.
It knows descriptors only: it must not import anything from tunnelgate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import select
import weakref
from collections.abc import Callable, Iterator
from typing import Final

DISPATCH_BATCH: Final = 256  # readiness events handled per wakeup of a Poller
if hasattr(select, "epoll"):  # errors and hang-ups count as readiness: the next call reports them
    _READABLE_ONLY: Final = select.EPOLLIN  # by far the most frequent event: only a reader to call
    _ERROR_EVENTS: Final = select.EPOLLERR | select.EPOLLHUP
    _READ_EVENTS: Final = select.EPOLLIN | _ERROR_EVENTS
    _WRITE_EVENTS: Final = select.EPOLLOUT | _ERROR_EVENTS
    _HANGUP_EVENTS: Final = select.EPOLLRDHUP | _ERROR_EVENTS


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Poller:
    """Our own epoll set, woken by one loop reader. Not the loop's watchers: uvloop
    drops one silently when its socket reports an error, which would leave a pump
    (or a TLS read) asleep on a reset connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.readers: dict[int, Callable[[], None]] = {}
        self.writers: dict[int, Callable[[], None]] = {}
        self.hangups: dict[int, Callable[[], None]] = {}  # peer sent FIN or RST
        self.errors: dict[int, Callable[[], None]] = {}  # an error or a full hang-up only
        # In the set, as far as we know: a hint that saves the failing call of a guess (a
        # closed descriptor leaves the set by itself, and its number comes back).
        self.registered: set[int] = set()
        self.epoll = select.epoll()
        self._poll = self.epoll.poll
        loop.add_reader(self.epoll.fileno(), self.dispatch)
        weakref.finalize(self, self.epoll.close)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self.readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self.writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self.writers.pop(fd, None) is not None:
            self._update(fd)

    def add_hangup(self, fd: int, callback: Callable[[], None]) -> None:
        self.hangups[fd] = callback
        self._update(fd)

    def remove_hangup(self, fd: int) -> None:
        if self.hangups.pop(fd, None) is not None:
            self._update(fd)

    def add_error_watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call back on an error (an RST) or a full hang-up only: for a socket nobody reads."""
        self.errors[fd] = callback
        self._update(fd)

    def remove_error_watch(self, fd: int) -> None:
        if self.errors.pop(fd, None) is not None:
            self._update(fd)

    def _update(self, fd: int) -> None:
        mask = (
            (select.EPOLLIN if fd in self.readers else 0)
            | (select.EPOLLOUT if fd in self.writers else 0)
            | (select.EPOLLRDHUP if fd in self.hangups else 0)
        )
        try:
            if mask or fd in self.errors:  # epoll reports errors on any registration
                if fd in self.registered:
                    try:
                        self.epoll.modify(fd, mask)
                    except FileNotFoundError:  # closed and its number reused meanwhile
                        self.epoll.register(fd, mask)
                else:
                    self.registered.add(fd)
                    try:
                        self.epoll.register(fd, mask)
                    except FileExistsError:
                        self.epoll.modify(fd, mask)
            else:
                self.registered.discard(fd)
                self.epoll.unregister(fd)
        except OSError:
            pass  # unregistering a descriptor the kernel dropped already

    def dispatch(self) -> None:
        readers = self.readers
        for fd, events in self._poll(0, DISPATCH_BATCH):
            if events & _READ_EVENTS and (reader := readers.get(fd)) is not None:
                reader()
            if events == _READABLE_ONLY:
                continue  # no writer, hang-up or error callback can be due
            if events & _WRITE_EVENTS and (writer := self.writers.get(fd)) is not None:
                writer()
            if events & _HANGUP_EVENTS and (hangup := self.hangups.get(fd)) is not None:
                hangup()
            if events & _ERROR_EVENTS and (error := self.errors.get(fd)) is not None:
                error()


class _LoopPoller:
    """Without epoll, the loop's own readers and writers; errors show on the next call."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.add_reader, self.remove_reader = loop.add_reader, loop.remove_reader
        self.add_writer, self.remove_writer = loop.add_writer, loop.remove_writer
        self.add_hangup = self.add_error_watch = lambda fd, callback: None
        self.remove_hangup = self.remove_error_watch = lambda fd: None


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller | _LoopPoller] = (
    weakref.WeakKeyDictionary()
)


def epoll_descriptors() -> int:
    """Epoll descriptors kept for the live event loops of this process."""
    return sum(isinstance(each, Poller) for each in _pollers.values())


def poller(loop: asyncio.AbstractEventLoop) -> Poller | _LoopPoller:
    """The readiness set of ``loop``, made on first use."""
    if (found := _pollers.get(loop)) is None:
        found = _pollers[loop] = Poller(loop) if hasattr(select, "epoll") else _LoopPoller(loop)
    return found


# The calls that start and stop a wait: on readability, writability, or an error.
_READ: Final = ("add_reader", "remove_reader")
_WRITE: Final = ("add_writer", "remove_writer")
_ERROR: Final = ("add_error_watch", "remove_error_watch")


async def wait_error(fd: int) -> None:
    """Until an error (an RST) or a full hang-up on ``fd``, a socket nobody reads meanwhile
    (never without epoll)."""
    await _wait(fd, _ERROR)


async def wait_readable(fd: int) -> None:
    await _wait(fd, _READ)


async def wait_writable(fd: int) -> None:
    await _wait(fd, _WRITE)


async def _wait(fd: int, calls: tuple[str, str]) -> None:
    loop = asyncio.get_running_loop()
    ready = poller(loop)
    waiter: asyncio.Future[None] = loop.create_future()
    add, remove = getattr(ready, calls[0]), getattr(ready, calls[1])
    add(fd, functools.partial(_wake, waiter))
    try:
        await waiter
    finally:
        remove(fd)


@contextlib.contextmanager
def watch_hangup(fd: int) -> Iterator[asyncio.Future[None]]:
    """A future done once the peer sent FIN or RST on ``fd`` (never without epoll),
    watched until the block ends: before ``fd`` is closed and its number reused."""
    loop = asyncio.get_running_loop()
    ready = poller(loop)
    closed: asyncio.Future[None] = loop.create_future()
    ready.add_hangup(fd, functools.partial(_wake, closed))
    try:
        yield closed
    finally:
        ready.remove_hangup(fd)
        closed.cancel()
