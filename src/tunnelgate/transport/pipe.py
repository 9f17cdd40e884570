"""Kernel pipes for ``os.splice``, the relay's path between two plain TCP streams
(bytes never enter Python). It must not import tunnelgate beyond errors and this package.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Final

from tunnelgate.transport.stream import WouldBlock
from tunnelgate.transport.tcp import transport_error

SPLICE_AVAILABLE: Final = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


class Pipe:
    """A non-blocking pipe holding ``count`` bytes; one fill takes at most ``size``
    (what the kernel granted of ``size``, bounded by ``max_fill``)."""

    __slots__ = ("count", "read_fd", "size", "write_fd")

    def __init__(self, size: int, max_fill: int) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # over /proc/sys/fs/pipe-max-size
            fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, size)
        self.size = min(fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ), max_fill)
        self.count = 0

    def fill_from(self, fd: int, limit: int) -> int:
        """Move up to ``limit`` bytes from ``fd`` into the pipe; 0 at EOF."""
        try:
            moved = os.splice(fd, self.write_fd, limit, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            raise WouldBlock from None
        except OSError as exc:
            raise transport_error(exc) from None
        self.count += moved
        return moved

    def drain_into(self, fd: int) -> int:
        """Move what ``fd`` takes of the pipe's bytes into it."""
        try:
            moved = os.splice(self.read_fd, fd, self.count, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            raise WouldBlock from None
        except OSError as exc:
            raise transport_error(exc) from None
        self.count -= moved
        return moved

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)
