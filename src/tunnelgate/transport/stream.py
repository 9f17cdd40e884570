"""The stream interface: what gateway, agent, channel and relay see of a connection.

A :class:`Stream` is a connected, reliable byte stream in both directions,
in the manner of trio's and anyio's streams: ``receive_into`` returns 0 at
the end of the stream, ``send`` waits for room, ``send_eof`` (idempotent)
ends this direction while the other one keeps flowing, ``close`` ends the
stream cleanly and ``abort`` with a reset. Its second half is what the
relay's readiness-driven pumps need: the descriptor whose readiness to wait
for, and a receive and a send that never wait (:class:`WouldBlock`). A
:class:`SpliceableStream` can also hand out a descriptor that carries its
bytes unchanged, so the relay may move them with ``os.splice``.

Every method raises :class:`~tunnelgate.errors.TransportError` when the
network fails, never ``OSError`` or ``ssl.SSLError``: implementations map
them where they call the operating system, and nowhere else.

This module defines the interface only: it must not import socket or ssl,
nor config, channel, gateway, agent, relay or the protocol's framing.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from typing import ClassVar, Protocol, runtime_checkable

from tunnelgate.errors import TransportError


class WouldBlock(Exception):
    """A non-blocking receive found nothing to take now: wait until the
    stream's descriptor is readable, then try again. Raised as a class, so
    that the relay's read loops pay no Python-level constructor."""

    wants_write: ClassVar[bool] = False


class WouldBlockOnWrite(WouldBlock):
    """The stream must first write (TLS, mid key update): its descriptor
    becomes writable soon, so retry shortly rather than wait for data."""

    wants_write: ClassVar[bool] = True


class Stream(Protocol):
    """A connected byte stream between two peers."""

    # --- what orchestration uses --------------------------------------------

    async def receive_into(self, buffer: memoryview) -> int:
        """Wait for bytes and put them into ``buffer``; 0 at the end of the stream."""
        ...

    async def send(self, data: bytes | memoryview) -> None:
        """Send all of ``data``, waiting while the peer does not take it."""
        ...

    def send_eof(self) -> None:
        """End this direction (a FIN); reading goes on. A second call does nothing."""
        ...

    def close(self) -> None:
        """End the stream cleanly: the peer reads to its end, then sees EOF."""
        ...

    def abort(self) -> None:
        """End the stream with a reset: the peer sees an error, never a clean end."""
        ...

    def is_quiet(self) -> bool:
        """True if nothing at all arrived that was not read: no byte, no EOF, no reset."""
        ...

    def has_unread_bytes(self) -> bool:
        """True if bytes from the peer wait to be read."""
        ...

    def pending_error(self) -> TransportError | None:
        """The error the connection has (such as the peer's reset), if any."""
        ...

    def watch_peer_close(self) -> AbstractContextManager[asyncio.Future[None]]:
        """A future done once the peer has ended its direction (FIN) or reset
        the stream, watched while the block runs (never done where the
        platform cannot tell without reading)."""
        ...

    async def wait_delivered(self) -> None:
        """Until the peer has acknowledged every byte sent, or the stream failed."""
        ...

    def peer_address(self) -> str:
        """``host:port`` of the peer, or "" once it is gone."""
        ...

    def local_address(self) -> str:
        """``host:port`` of this end (the one the peer reached), or "" once gone."""
        ...

    def peer_certificate(self) -> bytes | None:
        """The peer's certificate (DER) as it sent it; None without TLS or one."""
        ...

    def peer_certificate_names(self) -> frozenset[str]:
        """The names of the peer's certificate if TLS verified it against a CA."""
        ...

    # --- what the relay's readiness-driven pumps use --------------------------

    @property
    def reads_all_ready(self) -> bool:
        """True if one :meth:`try_receive_into` takes all that is ready (a
        plain socket); False if bytes can stay inside the stream after it
        with no readiness event to announce them (TLS hands out one record
        per call and reads ahead), so a reader loops until WouldBlock."""
        ...

    def fileno(self) -> int:
        """The descriptor whose readiness says when this stream can move bytes."""
        ...

    def try_receive_into(self, buffer: memoryview) -> int:
        """Bytes taken into ``buffer`` without waiting; 0 at the end of the
        stream. Raises WouldBlock if there are none yet (WouldBlockOnWrite
        if the stream must write first)."""
        ...

    def try_send(self, data: bytes | memoryview, more: bool = False) -> int:
        """How many bytes of ``data`` the stream took without waiting (0 if
        none). ``more``: more bytes follow at once, so they may go out
        together (TCP's MSG_MORE). After 0 or a partial send, offer the
        rest, unchanged, once the descriptor is writable (TLS requires it)."""
        ...

    async def wait_readable(self) -> None:
        """Until a receive can make progress (bytes, EOF or an error)."""
        ...

    async def wait_writable(self) -> None:
        """Until a send can make progress (room, or an error)."""
        ...


@runtime_checkable
class SpliceableStream(Protocol):
    """A stream whose bytes pass through a descriptor unchanged (plain TCP,
    not TLS), so that the kernel can move them to and from a pipe."""

    def fd_for_splice(self) -> int:
        """The descriptor that carries this stream's bytes as they are."""
        ...
