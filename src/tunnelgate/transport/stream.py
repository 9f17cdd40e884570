"""The stream interface: what gateway, agent, channel and relay see of a connection.

Streams in the manner of trio's: ``receive_into`` returns 0 at the end,
``send`` waits for room, ``send_eof`` is idempotent; the second half is what
the relay's readiness-driven pumps need. Every method raises
:class:`~tunnelgate.errors.TransportError`, never ``OSError`` or ``ssl.SSLError``.
Interface only: it must not import socket, ssl, config, channel, gateway,
agent, relay or the protocol's framing.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from typing import ClassVar, Protocol, runtime_checkable

from tunnelgate.errors import TransportError


class WouldBlock(Exception):
    """Nothing to take now: wait until readable. Raised as a class, so the
    relay's read loops pay no Python-level constructor."""

    wants_write: ClassVar[bool] = False


class WouldBlockOnWrite(WouldBlock):
    """The stream must write first (TLS): retry shortly rather than wait for data."""

    wants_write: ClassVar[bool] = True


class Stream(Protocol):
    """A connected byte stream between two peers."""

    async def receive_into(self, buffer: memoryview) -> int:
        """Wait for bytes and put them into ``buffer``; 0 at the end of the stream."""

    async def send(self, data: bytes | memoryview) -> None:
        """Send all of ``data``, waiting while the peer does not take it."""

    def send_eof(self) -> None:
        """End this direction (a FIN); reading goes on. A second call does nothing."""

    def close(self) -> None:
        """End cleanly: the peer reads to its end, then sees EOF."""

    def abort(self) -> None:
        """End with a reset: the peer sees an error, never a clean end."""

    def is_quiet(self) -> bool:
        """True if nothing at all arrived that was not read: no byte, no EOF, no reset."""

    def has_unread_bytes(self) -> bool:
        """True if bytes from the peer wait to be read."""

    def pending_error(self) -> TransportError | None:
        """The error the connection has (such as the peer's reset), if any."""

    def watch_peer_close(self) -> AbstractContextManager[asyncio.Future[None]]:
        """A future done once the peer sent FIN or RST, watched while the block
        runs (never done where the platform cannot tell without reading)."""

    async def wait_delivered(self) -> None:
        """Until the peer has acknowledged every byte sent, or the stream failed."""

    def peer_address(self) -> str:
        """``host:port`` of the peer, or "" once it is gone."""

    def local_address(self) -> str:
        """``host:port`` of this end, or "" once it is gone."""

    def peer_certificate(self) -> bytes | None:
        """The peer's certificate (DER); None without TLS or one."""

    def peer_certificate_names(self) -> frozenset[str]:
        """The names of the peer's certificate if TLS verified it against a CA."""

    @property
    def reads_all_ready(self) -> bool:
        """True if one :meth:`try_receive_into` takes all that is ready (plain
        TCP); False if bytes can stay inside with no readiness event to
        announce them (TLS), so a reader loops until WouldBlock."""

    def fileno(self) -> int:
        """The descriptor whose readiness says when this stream can move bytes."""

    def try_receive_into(self, buffer: memoryview) -> int:
        """Bytes taken into ``buffer`` without waiting; 0 at the end. Raises
        WouldBlock if none yet (WouldBlockOnWrite if it must write first)."""

    def try_send(self, data: bytes | memoryview, more: bool = False) -> int:
        """Bytes of ``data`` taken without waiting (maybe 0); ``more``: more
        follow at once (MSG_MORE). Offer the rest unchanged once writable (TLS needs it)."""

    async def wait_readable(self) -> None:
        """Until a receive can make progress (bytes, EOF or an error)."""

    async def wait_writable(self) -> None:
        """Until a send can make progress (room, or an error)."""


@runtime_checkable
class SpliceableStream(Protocol):
    """A stream whose bytes pass unchanged through a descriptor (plain TCP, not TLS)."""

    def fd_for_splice(self) -> int:
        """The descriptor that carries this stream's bytes as they are."""
