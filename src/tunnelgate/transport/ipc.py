"""Channels between the processes of one gateway (a supervisor and its workers): a connected
pair of Unix stream sockets, one end handed down to a child process as a descriptor, each end
read and written as asyncio streams. It must not import tunnelgate beyond errors.
"""

from __future__ import annotations

import asyncio
import socket

from tunnelgate.errors import TransportError


class ProcessChannel:
    """One end of a channel between two processes of this host."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def pair(cls) -> tuple[ProcessChannel, ProcessChannel]:
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise TransportError(f"cannot open a channel to a process: {exc}") from None
        return cls(ours), cls(theirs)

    @classmethod
    def inherited(cls, fd: int) -> ProcessChannel:
        """The end a parent process handed down as descriptor ``fd``."""
        try:
            return cls(socket.socket(fileno=fd))
        except OSError as exc:
            raise TransportError(f"cannot use channel descriptor {fd}: {exc}") from None

    def fileno(self) -> int:
        """The descriptor, to hand down to a child process."""
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    async def open_streams(self, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Streams on this end (they own it from now on); ``limit``: the longest line read."""
        return await asyncio.open_unix_connection(sock=self._sock, limit=limit)
