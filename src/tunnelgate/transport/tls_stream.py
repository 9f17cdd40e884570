"""TLS 1.3 streams: :class:`TLSStream`, on the socket of a :class:`SocketStream`.

The socket is wrapped as a non-blocking ``ssl.SSLSocket``, so OpenSSL reads
and writes the descriptor itself and relayed bytes are copied once each way,
by the cipher. The TCP stream underneath keeps owning the socket: closing,
resetting, FIN and the kernel's view of the connection go through it. The
contexts and certificates come from :mod:`tunnelgate.tls`.

This is the transport edge for TLS: ``ssl.SSLError`` becomes
:class:`~tunnelgate.errors.TransportError` (or, for certificates, an
:class:`~tunnelgate.errors.AuthenticationError`) here and nowhere else.

It must not import config, gateway, agent, relay, channel, logs or the
protocol's framing.
"""

from __future__ import annotations

import asyncio
import ssl
from contextlib import AbstractContextManager
from typing import Final, TypeAlias

from tunnelgate import tls
from tunnelgate.errors import CertificateRefusedError, PeerVerificationError, TransportError
from tunnelgate.transport.stream import WouldBlock, WouldBlockOnWrite
from tunnelgate.transport.tcp import SocketStream, describe_os_error, transport_error

WANT_RETRY: Final = 0.005  # seconds; TLS wanting the opposite direction (never in TLS 1.3)

TLSContext: TypeAlias = ssl.SSLContext
TLSSession: TypeAlias = ssl.SSLSession  # a ticket that resumes a session on a new connection


def describe_tls_error(exc: OSError) -> str:
    """A short human text for a TLS or network error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    return describe_os_error(exc)


def _tls_error(exc: OSError) -> TransportError:
    if isinstance(exc, ssl.SSLError):
        return TransportError(describe_tls_error(exc))
    return transport_error(exc)


# TLS alerts a gateway sends when it does not accept the agent's certificate.
_CERTIFICATE_ALERTS: Final = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires one (give --cert and --key)",
    "TLSV1_ALERT_UNKNOWN_CA": "its CA (client_ca) did not sign it",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it is not acceptable",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it was revoked",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "it is not acceptable",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "its type is not supported",
}


def _certificate_refused(exc: ssl.SSLError) -> CertificateRefusedError | None:
    """The error for a TLS alert that says the peer refused our certificate."""
    why = _CERTIFICATE_ALERTS.get(str(exc.reason))
    if why is None:
        return None
    return CertificateRefusedError(f"the gateway refused this agent's TLS certificate: {why}")


class TLSStream:
    """TLS 1.3 on the socket of ``transport`` (an ``ssl.SSLSocket`` in non-blocking mode).

    Made before the handshake, which :meth:`handshake` then runs; a failed
    handshake resets the connection before raising. Closing or resetting
    this stream or ``transport`` ends the same connection.
    """

    __slots__ = ("_ssl", "_tcp")

    reads_all_ready: Final = False  # one record per recv, and OpenSSL reads ahead

    def __init__(
        self,
        transport: SocketStream,
        context: TLSContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: TLSSession | None = None,
    ) -> None:
        self._tcp = transport
        try:
            self._ssl: ssl.SSLSocket = transport.wrap_socket(
                lambda sock: context.wrap_socket(
                    sock,
                    server_side=server_side,
                    server_hostname=server_hostname,
                    do_handshake_on_connect=False,
                    session=session,
                )
            )
        except OSError as exc:  # the peer is gone already ("not connected")
            transport.abort()  # closed already if the wrapping got that far
            raise TransportError(f"TLS handshake failed: {describe_tls_error(exc)}") from None

    async def handshake(self) -> None:
        try:
            while True:
                try:
                    self._ssl.do_handshake()
                    return
                except ssl.SSLWantReadError:
                    await self._tcp.wait_readable()
                except ssl.SSLWantWriteError:
                    await self._tcp.wait_writable()
        except ssl.SSLCertVerificationError as exc:
            self.abort()
            raise PeerVerificationError(describe_tls_error(exc)) from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError):
            self.abort()
            raise TransportError("connection closed during the TLS handshake") from None
        except ssl.SSLError as exc:
            self.abort()
            if refused := _certificate_refused(exc):
                raise refused from None
            hint = ""
            if exc.reason == "WRONG_VERSION_NUMBER" and not self._ssl.server_side:
                hint = " (does the gateway run with --no-tls? then so must the agent)"
            raise TransportError(f"TLS handshake failed: {describe_tls_error(exc)}{hint}") from None
        except OSError as exc:
            self.abort()
            raise transport_error(exc) from None
        except BaseException:
            self.abort()
            raise

    @property
    def session(self) -> TLSSession | None:
        """The session's ticket, for resuming it on the next connection."""
        return self._ssl.session

    @property
    def session_reused(self) -> bool:
        """True if the handshake resumed the session it was given."""
        return bool(self._ssl.session_reused)

    # --- the stream ---------------------------------------------------------

    async def receive_into(self, buffer: memoryview) -> int:
        while True:
            try:
                return self._ssl.recv_into(buffer)  # 0 at EOF, with or without close_notify
            except ssl.SSLWantReadError:
                await self._tcp.wait_readable()
            except ssl.SSLWantWriteError:
                await self._tcp.wait_writable()
            except ssl.SSLError as exc:  # TLS 1.3: a refused certificate shows on the first read
                raise _certificate_refused(exc) or _tls_error(exc) from None
            except OSError as exc:
                raise transport_error(exc) from None

    async def send(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                # Without partial writes, OpenSSL takes all of it or nothing; a
                # retry after "want write" must pass the same bytes, as here.
                view = view[self._ssl.send(view) :]
            except ssl.SSLWantWriteError:
                await self._tcp.wait_writable()
            except ssl.SSLWantReadError:
                await asyncio.sleep(WANT_RETRY)  # renegotiation only: not in TLS 1.3
            except OSError as exc:
                raise _tls_error(exc) from None

    def send_eof(self) -> None:
        """A FIN without close_notify: this side's TLS session stays usable for
        reading, and a peer whose context comes from :mod:`tunnelgate.tls`
        reads it as EOF and can still send."""
        self._tcp.send_eof()

    def close(self) -> None:
        self._tcp.close()

    def abort(self) -> None:
        self._tcp.abort()

    def is_quiet(self) -> bool:
        return not self._ssl.pending() and self._tcp.is_quiet()

    def has_unread_bytes(self) -> bool:
        return bool(self._ssl.pending()) or self._tcp.has_unread_bytes()

    def pending_error(self) -> TransportError | None:
        return self._tcp.pending_error()

    def watch_peer_close(self) -> AbstractContextManager[asyncio.Future[None]]:
        return self._tcp.watch_peer_close()

    async def wait_delivered(self) -> None:
        await self._tcp.wait_delivered()

    def peer_address(self) -> str:
        return self._tcp.peer_address()

    def local_address(self) -> str:
        return self._tcp.local_address()

    def peer_certificate(self) -> bytes | None:
        return self._ssl.getpeercert(binary_form=True)

    def peer_certificate_names(self) -> frozenset[str]:
        verified = self._ssl.getpeercert()  # empty unless verified against a CA
        return frozenset(tls.certificate_names(verified)) if verified else frozenset()

    # --- readiness, for the relay's pumps -----------------------------------

    def fileno(self) -> int:
        return self._tcp.fileno()

    def try_receive_into(self, buffer: memoryview) -> int:
        try:
            return self._ssl.recv_into(buffer)
        except ssl.SSLWantReadError:
            raise WouldBlock from None
        except ssl.SSLWantWriteError:
            raise WouldBlockOnWrite from None
        except OSError as exc:
            raise _tls_error(exc) from None

    def try_send(self, data: bytes | memoryview, more: bool = False) -> int:
        try:
            return self._ssl.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0
        except OSError as exc:
            raise _tls_error(exc) from None

    async def wait_readable(self) -> None:
        await self._tcp.wait_readable()

    async def wait_writable(self) -> None:
        await self._tcp.wait_writable()
