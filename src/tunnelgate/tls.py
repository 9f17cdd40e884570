"""TLS material and contexts: the gateway's self-signed identity, pinning.

On first start a gateway without ``--cert``/``--key`` makes an ECDSA P-256
key and a self-signed certificate in its state directory; agents pin its
SHA-256 fingerprint (``--fingerprint``), trust a CA (``--ca``), or fall back
to the system trust store for a real certificate. Only TLS 1.3 is spoken.
This module builds ``ssl.SSLContext`` objects; it opens no connection.
cryptography is imported only to make a certificate: a running gateway or agent
never loads it.
"""

from __future__ import annotations

import _ssl
import base64
import datetime
import functools
import hashlib
import ipaddress
import os
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from tunnelgate.errors import ConfigError, ConfigProblem, PeerVerificationError

CERT_FILE: Final = "gateway.crt"
KEY_FILE: Final = "gateway.key"
CERT_VALIDITY: Final = datetime.timedelta(days=3650)
_PEM_CERTIFICATE: Final = re.compile(  # what OpenSSL reads as a certificate, "X509 " or not
    rb"-----BEGIN (X509 |)CERTIFICATE-----([A-Za-z0-9+/=\s]*)-----END \1CERTIFICATE-----"
)


def fingerprint_of(der: bytes) -> str:
    """``SHA256:<HEX>`` of a DER certificate, the form agents pin."""
    return "SHA256:" + hashlib.sha256(der).hexdigest().upper()


def certificate_fingerprint(cert_path: Path) -> str:
    """The fingerprint of the first certificate in a PEM file (the one a TLS server
    presents from it)."""
    found = _PEM_CERTIFICATE.search(cert_path.read_bytes())
    try:
        if found is None:
            raise ValueError("no PEM certificate in it")
        der = base64.b64decode(b"".join(found.group(2).split()), validate=True)
    except ValueError as exc:  # binascii.Error too
        problem = f"cannot read the certificate: {exc}"
        raise ConfigError([ConfigProblem(str(cert_path), "cert", problem)]) from None
    return fingerprint_of(der)


def ensure_self_signed(state_dir: Path, hostnames: list[str]) -> tuple[Path, Path, bool]:
    """Return (cert, key, created): the stored identity, made on first use."""
    cert_path, key_path = state_dir / CERT_FILE, state_dir / KEY_FILE
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path, False
    # Here only: loading cryptography costs about 9 MiB of memory that nothing else needs.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunnelgate gateway")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName("tunnelgate")]
    alt_names += [x509.DNSName(h) for h in hostnames if h and not _is_ip(h)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path, True


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _load(source: str, key: str, what: str, load: Callable[..., None], *args: Path) -> None:
    """``load(*args)``, or a ConfigError that names what could not be loaded, and where."""
    try:
        load(*args)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([ConfigProblem(source, key, f"cannot load {what}: {exc}")]) from None


def _load_identity(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    _load(str(cert), "cert/key", "certificate and key", context.load_cert_chain, cert, key)


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The gateway's context: TLS 1.3 only, one session ticket per connection.

    With ``client_ca``, every agent must present a certificate signed by it
    (mutual TLS): a connection without one fails in the TLS handshake.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    _load_identity(context, cert, key)
    if client_ca is not None:
        _load(str(client_ca), "client_ca", "the CA", context.load_verify_locations, client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    # One ticket per connection: the agent resumes its data channels with the
    # control channel's session (still a fresh ECDHE exchange, but no
    # certificate signature or chain), which halves a data channel's handshake.
    context.num_tickets = 1
    _accept_fin_as_end(context)
    tune_reads(context)
    return context


def admin_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The admin listener's HTTPS context: TLS 1.2 or later, for browsers and scrapers."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(context, cert, key)
    return context


def client_context(
    ca: Path | None,
    fingerprint: str,
    cert: Path | None = None,
    key: Path | None = None,
) -> ssl.SSLContext:
    """The agent's context. With a fingerprint, the chain is not checked: the
    pin is, by :func:`check_fingerprint` right after the handshake. ``cert``
    and ``key`` are the agent's own, for a gateway that asks for one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None and key is not None:
        _load_identity(context, cert, key)
    if fingerprint:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca is not None:
        _load("command line", "--ca", str(ca), context.load_verify_locations, ca)
    else:
        context.load_default_certs()
    _accept_fin_as_end(context)
    tune_reads(context)
    return context


def fleet_contexts(ca: Path, cert: Path, key: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The gateway-to-gateway link's contexts, (server, client): TLS 1.3, each side presents
    its fleet certificate and accepts only one signed by the fleet's own CA. A fleet CA signs
    fleet members alone, so any certificate it signed is a member: names are not checked (a
    member is dialed at the address it announced in the registry)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        _load(str(cert), "fleet_cert/fleet_key", "the fleet certificate and key",
              context.load_cert_chain, cert, key)  # fmt: skip
        _load(str(ca), "fleet_ca", "the fleet's CA", context.load_verify_locations, ca)
        context.verify_mode = ssl.CERT_REQUIRED
        _accept_fin_as_end(context)
        tune_reads(context)
    client.check_hostname = False  # verify_mode stays CERT_REQUIRED: the chain is checked
    server.num_tickets = 1  # a link resumes the last one: no certificate sent or checked again
    return server, client


def _accept_fin_as_end(context: ssl.SSLContext) -> None:
    """Take a peer's TCP FIN without close_notify as the end of its direction
    only: a TLS stream's ``send_eof`` sends one, and the other direction must
    keep flowing. Without this, OpenSSL 3 fails every later write after such
    an EOF. Reads already returned 0 there (``suppress_ragged_eofs``); the
    framing's END tells a complete stream from a cut one."""
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)


# OpenSSL settings Python's ssl module does not expose (constants from ssl.h).
_SSL_CTRL_MODE: Final = 33
_SSL_CTRL_SET_READ_AHEAD: Final = 41
_SSL_MODE_RELEASE_BUFFERS: Final = 0x10
READ_BUFFER_SIZE: Final = 64 * 1024


def tune_reads(context: ssl.SSLContext) -> bool:
    """Let OpenSSL read several TLS records per ``recv`` (read-ahead into a
    64 KiB buffer) instead of two ``recv`` calls per 16 KiB record, and free
    its buffers while a connection is idle. Returns whether it applied.

    The ``ssl`` module has no API for these, so they are set through the
    OpenSSL that ``_ssl`` is linked with, on the ``SSL_CTX`` that CPython keeps
    right after the object header. The pointer is checked first (its options
    must match the context's); if anything differs, nothing is changed and
    TLS works as before, only with more system calls.
    """
    import ctypes  # only where TLS is used

    try:
        lib = ctypes.CDLL(_ssl.__file__)
        ctrl = lib.SSL_CTX_ctrl
        ctrl.restype, ctrl.argtypes = (
            ctypes.c_long,
            [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p],
        )
        get_options = lib.SSL_CTX_get_options
        get_options.restype, get_options.argtypes = ctypes.c_uint64, [ctypes.c_void_p]
        set_read_len = lib.SSL_CTX_set_default_read_buffer_len
        set_read_len.restype, set_read_len.argtypes = None, [ctypes.c_void_p, ctypes.c_size_t]
        pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
        if pointer is None or get_options(pointer) != context.options:
            return False
    except (AttributeError, OSError, TypeError, ValueError):
        return False
    ctrl(pointer, _SSL_CTRL_MODE, _SSL_MODE_RELEASE_BUFFERS, None)
    ctrl(pointer, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    set_read_len(pointer, READ_BUFFER_SIZE)
    return True


def held_bytes_check(ssl_object: object, context: ssl.SSLContext) -> Callable[[], int] | None:
    """``SSL_has_pending`` for one connection: nonzero while OpenSSL holds bytes it
    has read from the socket (records read ahead, or the rest of one) that no
    readiness event will announce. The ``ssl`` module's ``pending()`` counts only
    a record already decrypted. ``ssl_object`` is an ``SSLSocket``'s ``_sslobj``,
    whose ``SSL *`` CPython keeps after the object header and the socket's weak
    reference, followed by its context: the check is made only if that context
    is ``ssl_object``'s and the ``SSL *`` belongs to ``context``'s ``SSL_CTX``;
    otherwise None, and a reader reads until it finds nothing, as without it.
    The check is valid while ``ssl_object`` lives."""
    import ctypes  # loaded by tune_reads already, where TLS is used

    functions = _pending_functions()
    if functions is None or type(ssl_object) is not _ssl._SSLSocket:  # type: ignore[attr-defined]
        return None
    has_pending, ssl_ctx_of = functions
    word = ctypes.sizeof(ctypes.c_void_p)
    fields = id(ssl_object) + object.__basicsize__ + word
    pointer = ctypes.c_void_p.from_address(fields).value
    beside = ctypes.c_void_p.from_address(fields + word).value
    ssl_ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if pointer is None or beside != id(context) or ssl_ctx_of(pointer) != ssl_ctx:
        return None
    return functools.partial(has_pending, pointer)


@functools.cache
def _pending_functions() -> tuple[Callable[[int], int], Callable[[int], int | None]] | None:
    """``SSL_has_pending`` and ``SSL_get_SSL_CTX`` of the OpenSSL ``_ssl`` links, once;
    called holding the GIL (``PyDLL``): they only read a field, and the relay asks after
    every TLS read."""
    import ctypes

    try:
        lib = ctypes.PyDLL(_ssl.__file__)
        has_pending = lib.SSL_has_pending
        has_pending.restype, has_pending.argtypes = ctypes.c_int, [ctypes.c_void_p]
        ssl_ctx_of = lib.SSL_get_SSL_CTX
        ssl_ctx_of.restype, ssl_ctx_of.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    except (AttributeError, OSError):
        return None
    return has_pending, ssl_ctx_of


def certificate_names(peer: dict[str, Any]) -> set[str]:
    """The names a verified certificate (``SSLSocket.getpeercert()``) is for:
    its subject's common names and its DNS subject alternative names."""
    names = {value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"}
    names.update(value for kind, value in peer.get("subjectAltName", ()) if kind == "DNS")
    return names


def check_fingerprint(der: bytes | None, expected: str) -> None:
    """Raise PeerVerificationError unless the peer's certificate is the pinned one."""
    if der is None:
        raise PeerVerificationError("the gateway sent no certificate", expected=expected)
    seen = fingerprint_of(der)
    if seen != expected:
        raise PeerVerificationError(
            "certificate fingerprint mismatch; refusing to talk to this gateway",
            expected=expected,
            seen=seen,
        )
