"""The stream interface: what gateway, agent, channel and relay see of a connection,
in the manner of trio's streams, plus what the relay's readiness-driven pumps need.
Every method raises TransportError, never ``OSError`` or ``ssl.SSLError``.
Interface only: it must not import socket or ssl, nor tunnelgate beyond errors.
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

    async def receive_into(self, buffer: memoryview) -> int: ...  # 0 at the end of the stream
    async def send(self, data: bytes | memoryview) -> None: ...  # all, waiting for room
    def send_eof(self) -> None: ...  # a FIN; reading goes on; a second call does nothing
    def close(self) -> None: ...  # the peer reads to the end, then sees EOF
    def abort(self) -> None: ...  # a reset: the peer sees an error, never a clean end
    def is_quiet(self) -> bool: ...  # nothing at all arrived unread: no byte, no EOF, no reset
    def has_unread_bytes(self) -> bool: ...
    def pending_error(self) -> TransportError | None: ...  # such as the peer's reset
    async def wait_delivered(self) -> None: ...  # until the peer acknowledged all, or an error
    def peer_address(self) -> str: ...  # host:port, or "" once the peer is gone
    def local_address(self) -> str: ...
    def peer_certificate(self) -> bytes | None: ...  # DER, as the peer sent it; None without TLS
    def tls_version(self) -> str: ...  # "TLSv1.3", or "" without TLS
    def peer_certificate_names(self) -> frozenset[str]: ...  # if TLS verified it against a CA

    def watch_peer_close(self) -> AbstractContextManager[asyncio.Future[None]]:
        """A future done once the peer sends FIN or RST inside the block (never without epoll)."""

    # What the relay's readiness-driven pumps use.
    def fileno(self) -> int: ...  # the descriptor whose readiness to wait for
    async def wait_readable(self) -> None: ...  # until a receive makes progress (or EOF, error)
    async def wait_writable(self) -> None: ...  # until a send makes progress (or an error)

    @property
    def reads_all_ready(self) -> bool:
        """Asked after a :meth:`try_receive_into`: False if bytes may have stayed
        inside that no readiness event will announce (TLS reads ahead), so a
        reader reads again, until WouldBlock."""

    def try_receive_into(self, buffer: memoryview) -> int:
        """Like receive_into, without waiting: raises WouldBlock (or WouldBlockOnWrite) if none."""

    def try_send(self, data: bytes | memoryview, more: bool = False) -> int:
        """Bytes of ``data`` taken without waiting (maybe 0); ``more``: more
        follow at once (MSG_MORE). Offer the rest unchanged once writable (TLS needs it)."""


@runtime_checkable
class SpliceableStream(Protocol):
    """A stream whose bytes pass unchanged through a descriptor (plain TCP, not TLS)."""

    def fd_for_splice(self) -> int: ...
