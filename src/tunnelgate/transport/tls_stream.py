"""TLS 1.3 streams: :class:`TLSStream`, a non-blocking ``ssl.SSLSocket``, so OpenSSL
reads and writes the descriptor and the cipher's copy is the only one. The transport
edge for TLS: ``ssl.SSLError`` becomes TransportError or AuthenticationError here.
It must not import tunnelgate beyond errors, tls and this package.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Final, TypeAlias

from tunnelgate import tls
from tunnelgate.errors import CertificateRefusedError, PeerVerificationError, TransportError
from tunnelgate.transport.stream import WouldBlock, WouldBlockOnWrite
from tunnelgate.transport.tcp import SocketStream, TCPConnection, describe_os_error, transport_error

WANT_RETRY: Final = 0.005  # seconds; TLS wanting the opposite direction (never in TLS 1.3)

TLSContext: TypeAlias = ssl.SSLContext
TLSSession: TypeAlias = ssl.SSLSession  # a ticket that resumes a session on a new connection


def describe_tls_error(exc: OSError) -> str:
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
    why = _CERTIFICATE_ALERTS.get(str(exc.reason))
    if why is None:
        return None
    return CertificateRefusedError(f"the gateway refused this agent's TLS certificate: {why}")


class TLSStream(TCPConnection):
    """TLS 1.3 on the socket of ``transport``, which owns it too: closing or
    resetting either ends the connection. A failed :meth:`handshake` resets it.
    ``send_eof`` is a FIN without close_notify: this side can still read, and
    a peer with a context from :mod:`tunnelgate.tls` reads EOF and can still send."""

    __slots__ = ("_held", "_ssl")

    def __init__(
        self,
        transport: SocketStream,
        context: TLSContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: TLSSession | None = None,
    ) -> None:
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
        super().__init__(self._ssl)
        self._held = tls.held_bytes_check(getattr(self._ssl, "_sslobj", None), context)

    async def handshake(self) -> None:
        try:
            try:
                while True:
                    try:
                        self._ssl.do_handshake()
                        return
                    except ssl.SSLWantReadError:
                        await self.wait_readable()
                    except ssl.SSLWantWriteError:
                        await self.wait_writable()
            except BaseException:
                self.abort()  # whatever went wrong, the peer sees a reset
                raise
        except ssl.SSLCertVerificationError as exc:
            raise PeerVerificationError(describe_tls_error(exc)) from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError):
            raise TransportError("connection closed during the TLS handshake") from None
        except ssl.SSLError as exc:
            if refused := _certificate_refused(exc):
                raise refused from None
            hint = ""
            if exc.reason == "WRONG_VERSION_NUMBER" and not self._ssl.server_side:
                hint = " (does the gateway run with --no-tls? then so must the agent)"
            raise TransportError(f"TLS handshake failed: {describe_tls_error(exc)}{hint}") from None
        except OSError as exc:
            raise transport_error(exc) from None

    @property
    def session(self) -> TLSSession | None:
        """The session's ticket, for resuming it on the next connection."""
        return self._ssl.session

    @property
    def session_reused(self) -> bool:
        return bool(self._ssl.session_reused)

    async def receive_into(self, buffer: memoryview) -> int:
        while True:
            try:
                return self._ssl.recv_into(buffer)  # 0 at EOF, with or without close_notify
            except ssl.SSLWantReadError:
                await self.wait_readable()
            except ssl.SSLWantWriteError:
                await self.wait_writable()
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
                await self.wait_writable()
            except ssl.SSLWantReadError:
                await asyncio.sleep(WANT_RETRY)  # renegotiation only: not in TLS 1.3
            except OSError as exc:
                raise _tls_error(exc) from None

    def is_quiet(self) -> bool:
        """Nothing decrypted, nothing read ahead (where OpenSSL can be asked: a record
        behind the last message, which no readiness event announces), nothing on the
        socket."""
        if self._ssl.pending():
            return False
        held = self._held
        if held is not None and self._ssl._sslobj is not None and held():  # type: ignore[attr-defined]
            return False
        return super().is_quiet()

    def has_unread_bytes(self) -> bool:
        return bool(self._ssl.pending()) or super().has_unread_bytes()

    def peer_certificate(self) -> bytes | None:
        return self._ssl.getpeercert(binary_form=True)

    def tls_version(self) -> str:
        return self._ssl.version() or ""

    def peer_certificate_names(self) -> frozenset[str]:
        verified = self._ssl.getpeercert()  # empty unless verified against a CA
        return frozenset(tls.certificate_names(verified)) if verified else frozenset()

    @property
    def reads_all_ready(self) -> bool:
        """True once OpenSSL holds none of the bytes it read (it reads ahead): only
        where that can be asked (``tls.held_bytes_check``), and while open."""
        held = self._held
        return held is not None and self._ssl._sslobj is not None and not held()  # type: ignore[attr-defined]

    # The relay's calls go to the ``_ssl`` object itself, as ``SSLSocket.recv_into``
    # and ``send`` do once they have checked their arguments: two Python frames
    # fewer per message. Closed (no ``_sslobj``), they go through ``SSLSocket``.

    def try_receive_into(self, buffer: memoryview) -> int:
        try:
            sslobj = self._ssl._sslobj  # type: ignore[attr-defined]
            if sslobj is None:
                return self._ssl.recv_into(buffer)
            n: int = sslobj.read(len(buffer), buffer)
            return n
        except ssl.SSLWantReadError:
            raise WouldBlock from None
        except ssl.SSLWantWriteError:
            raise WouldBlockOnWrite from None
        except ssl.SSLEOFError:  # a FIN without close_notify, as ``suppress_ragged_eofs``
            return 0
        except OSError as exc:
            raise _tls_error(exc) from None

    def try_send(self, data: bytes | memoryview, more: bool = False) -> int:
        try:
            sslobj = self._ssl._sslobj  # type: ignore[attr-defined]
            if sslobj is None:
                return self._ssl.send(data)
            sent: int = sslobj.write(data)
            return sent
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return 0
        except OSError as exc:
            raise _tls_error(exc) from None
