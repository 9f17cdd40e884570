"""Readiness of descriptors: an epoll set per event loop, nested in the loop.

The relay's pumps register callbacks here for the descriptors of their
streams, and the streams wait here (:func:`wait_readable`,
:func:`wait_writable`, :func:`watch_hangup`) when an operation would block.

This module knows descriptors only: it must not import anything from
tunnelgate (no streams, no errors, no config, no protocol).
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


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Poller:
    """Readiness for our descriptors: an epoll set of our own, nested in the loop.

    The relay's pumps and :func:`wait_readable`/:func:`wait_writable` register
    descriptors here, not with the loop: one loop reader (on the epoll
    descriptor) wakes this, and it calls back those whose descriptors are ready.
    Errors and hang-ups count as readiness, so the next ``recv``/``send``
    reports them. The loop's own per-descriptor watchers are not used because
    uvloop (libuv) drops a watcher silently when its socket reports an error,
    which would leave a pump (or a TLS read) asleep on a reset connection.
    Registering a descriptor is one ``epoll_ctl`` and nothing else. Without
    epoll, the loop's own readers and writers are used.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.readers: dict[int, Callable[[], None]] = {}
        self.writers: dict[int, Callable[[], None]] = {}
        self.hangups: dict[int, Callable[[], None]] = {}  # peer sent FIN or RST
        self.errors: dict[int, Callable[[], None]] = {}  # an error or a full hang-up only
        self.epoll = select.epoll()
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
        """Call back on an error (such as the peer's RST) or a full hang-up of
        ``fd``, and on nothing else: for a socket nobody reads any more."""
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
        watched = mask or fd in self.errors  # epoll reports errors on any registration
        try:
            if watched:
                try:
                    self.epoll.modify(fd, mask)
                except FileNotFoundError:
                    self.epoll.register(fd, mask)
            else:
                self.epoll.unregister(fd)
        except OSError:
            pass  # unregistering a descriptor the kernel dropped already

    def dispatch(self) -> None:
        for fd, events in self.epoll.poll(0, DISPATCH_BATCH):
            if events & _READ_EVENTS and (reader := self.readers.get(fd)) is not None:
                reader()
            if events & _WRITE_EVENTS and (writer := self.writers.get(fd)) is not None:
                writer()
            if events & _HANGUP_EVENTS and (hangup := self.hangups.get(fd)) is not None:
                hangup()
            if events & _ERROR_EVENTS and (error := self.errors.get(fd)) is not None:
                error()


class _LoopPoller:
    """The same interface on the event loop's own readers and writers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.add_reader = loop.add_reader
        self.remove_reader = loop.remove_reader
        self.add_writer = loop.add_writer
        self.remove_writer = loop.remove_writer

    # Without epoll a hang-up or an error shows only on the next read or write.
    def add_hangup(self, fd: int, callback: Callable[[], None]) -> None:
        pass

    def remove_hangup(self, fd: int) -> None:
        pass

    def add_error_watch(self, fd: int, callback: Callable[[], None]) -> None:
        pass

    def remove_error_watch(self, fd: int) -> None:
        pass


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller | _LoopPoller] = (
    weakref.WeakKeyDictionary()
)


def epoll_descriptors() -> int:
    """Epoll descriptors kept for the live event loops of this process."""
    return sum(isinstance(each, Poller) for each in _pollers.values())


def poller(loop: asyncio.AbstractEventLoop) -> Poller | _LoopPoller:
    """The readiness set of ``loop``, made on first use."""
    found = _pollers.get(loop)
    if found is None:
        found = _pollers[loop] = Poller(loop) if hasattr(select, "epoll") else _LoopPoller(loop)
    return found


_READ_EVENTS: Final = (
    select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP if hasattr(select, "epoll") else 0
)
_WRITE_EVENTS: Final = (
    select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP if hasattr(select, "epoll") else 0
)
_ERROR_EVENTS: Final = select.EPOLLERR | select.EPOLLHUP if hasattr(select, "epoll") else 0
_HANGUP_EVENTS: Final = (
    select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP if hasattr(select, "epoll") else 0
)


async def wait_readable(fd: int) -> None:
    """Until ``fd`` is readable (data, EOF or an error is pending)."""
    await _wait(fd, writable=False)


async def wait_writable(fd: int) -> None:
    """Until ``fd`` can take more bytes (or has an error pending)."""
    await _wait(fd, writable=True)


async def _wait(fd: int, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    ready = poller(loop)
    waiter: asyncio.Future[None] = loop.create_future()
    add, remove = (
        (ready.add_writer, ready.remove_writer)
        if writable
        else (ready.add_reader, ready.remove_reader)
    )
    add(fd, functools.partial(_wake, waiter))
    try:
        await waiter
    finally:
        remove(fd)


@contextlib.contextmanager
def watch_hangup(fd: int) -> Iterator[asyncio.Future[None]]:
    """A future that is done once the peer has sent a FIN or an RST on
    ``fd``, whatever bytes are still unread; watched only inside the block
    (never done where there is no epoll).

    The watch ends when the block does, before ``fd`` can be closed: a
    descriptor unregistered later might by then be another socket's.
    """
    loop = asyncio.get_running_loop()
    ready = poller(loop)
    closed: asyncio.Future[None] = loop.create_future()
    ready.add_hangup(fd, functools.partial(_wake, closed))
    try:
        yield closed
    finally:
        ready.remove_hangup(fd)
        closed.cancel()
