"""Kernel pipes that move bytes between descriptors with ``os.splice``, so
that the bytes never enter Python: the relay's fast path between two
:class:`~tunnelgate.transport.stream.SpliceableStream` (plain TCP).

Like the streams, a :class:`Pipe` raises
:class:`~tunnelgate.transport.stream.WouldBlock` when a descriptor is not
ready and :class:`~tunnelgate.errors.TransportError` when one failed.

It must not import config, gateway, agent, relay, channel or the protocol's
framing.
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
    """A pipe in non-blocking mode; ``count`` bytes are in it now, and one
    fill takes at most ``size``."""

    __slots__ = ("count", "read_fd", "size", "write_fd")

    def __init__(self, size: int, max_fill: int) -> None:
        """``size`` is asked of the kernel, which may grant less; ``max_fill``
        bounds ``size`` further."""
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # over /proc/sys/fs/pipe-max-size
            fcntl.fcntl(self.write_fd, fcntl.F_SETPIPE_SZ, size)
        self.size = min(fcntl.fcntl(self.write_fd, fcntl.F_GETPIPE_SZ), max_fill)
        self.count = 0

    def fill_from(self, fd: int, limit: int) -> int:
        """Move up to ``limit`` bytes from ``fd`` into the pipe; 0 at EOF.
        Raises WouldBlock if ``fd`` has none yet."""
        try:
            moved = os.splice(fd, self.write_fd, limit, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            raise WouldBlock from None
        except OSError as exc:
            raise transport_error(exc) from None
        self.count += moved
        return moved

    def drain_into(self, fd: int) -> int:
        """Move what ``fd`` takes of the pipe's bytes into it. Raises
        WouldBlock if it takes none now."""
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
