"""TLS material and contexts (``tls.py``): the gateway's self-signed identity,
made once and kept; fingerprints and pinning; the contexts each side speaks
with, tried in real handshakes over a socket pair."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import re
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kit.processes import FINGERPRINT_RE
from kit.waiting import DEADLINE

from tunnelgate import tls
from tunnelgate.errors import ConfigError, PeerVerificationError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def identity(tmp_path: Path) -> tuple[Path, Path]:
    """The gateway's self-signed certificate and key, made in a fresh state directory."""
    cert, key, created = tls.ensure_self_signed(
        tmp_path / "state", ["gateway.example", "192.0.2.1"]
    )
    assert created
    return cert, key


def load(cert: Path) -> x509.Certificate:
    return load_pem(cert.read_bytes())


def load_pem(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


# --- the self-signed identity --------------------------------------------------------


def test_tls_self_signed_identity_is_made_once_then_kept(tmp_path: Path) -> None:
    """The first start makes a key and a certificate in the state directory
    (key readable by its owner only); every later start finds the same ones."""
    state = tmp_path / "state"
    cert, key, created = tls.ensure_self_signed(state, [])
    assert created and cert.parent == key.parent == state
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    before = cert.read_bytes(), key.read_bytes()
    again = tls.ensure_self_signed(state, ["another.example"])
    assert again == (cert, key, False)
    assert (cert.read_bytes(), key.read_bytes()) == before


def test_tls_self_signed_certificate_names_the_gateway_for_ten_years(
    identity: tuple[Path, Path],
) -> None:
    """An ECDSA P-256 end-entity certificate for "tunnelgate" and the gateway's
    host names (IP addresses are not names), valid from now on for ten years."""
    certificate = load(identity[0])
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["tunnelgate", "gateway.example"]
    assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    public_key = certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    now = datetime.datetime.now(datetime.UTC)
    assert certificate.not_valid_before_utc <= now
    assert certificate.not_valid_after_utc - now > datetime.timedelta(days=3640)


def test_tls_fingerprint_is_the_sha256_of_the_certificate(identity: tuple[Path, Path]) -> None:
    """A fingerprint is "SHA256:" and the upper-case hex digest of the DER
    certificate, whether taken from the bytes or from the PEM file."""
    der = load(identity[0]).public_bytes(serialization.Encoding.DER)
    fingerprint = tls.fingerprint_of(der)
    assert fingerprint == "SHA256:" + hashlib.sha256(der).hexdigest().upper()
    assert re.fullmatch(FINGERPRINT_RE, fingerprint)
    assert tls.certificate_fingerprint(identity[0]) == fingerprint


def test_tls_fingerprint_is_of_the_first_certificate_of_a_file(tmp_path: Path) -> None:
    """The fingerprint of a PEM file is its first certificate's, the one a server presents
    from it: after a key, before the rest of the chain, labelled "X509 CERTIFICATE" or not."""
    issued = trustme.CA().issue_cert("gateway.example")
    leaf = load_pem(issued.cert_chain_pems[0].bytes())
    expected = tls.fingerprint_of(leaf.public_bytes(serialization.Encoding.DER))
    combined = tmp_path / "combined.pem"
    combined.write_bytes(issued.private_key_and_cert_chain_pem.bytes())
    assert tls.certificate_fingerprint(combined) == expected
    labelled = tmp_path / "labelled.pem"
    labelled.write_bytes(
        issued.cert_chain_pems[0].bytes().replace(b"CERTIFICATE", b"X509 CERTIFICATE")
    )
    assert tls.certificate_fingerprint(labelled) == expected


@pytest.mark.parametrize(
    "content",
    [b"", b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"],
    ids=["no-certificate", "not-base64"],
)
def test_tls_fingerprint_of_a_file_without_a_certificate_names_it(
    tmp_path: Path, content: bytes
) -> None:
    """A file without a readable certificate is a configuration error naming it."""
    path = tmp_path / "gateway.crt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"gateway\.crt: cert: cannot read the certificate"):
        tls.certificate_fingerprint(path)


def test_tls_check_fingerprint_accepts_only_the_pinned_certificate(
    identity: tuple[Path, Path],
) -> None:
    """The pinned certificate passes; another one, or none, is refused with
    what was expected and what was seen."""
    der = load(identity[0]).public_bytes(serialization.Encoding.DER)
    pinned = tls.fingerprint_of(der)
    tls.check_fingerprint(der, pinned)
    wrong = "SHA256:" + "AB" * 32
    with pytest.raises(PeerVerificationError) as refused:
        tls.check_fingerprint(der, wrong)
    assert (refused.value.expected, refused.value.seen) == (wrong, pinned)
    with pytest.raises(PeerVerificationError, match="sent no certificate"):
        tls.check_fingerprint(None, pinned)


def test_tls_certificate_names_are_common_names_and_dns_alternative_names() -> None:
    """The names a verified certificate is for: its subject's common names and
    its DNS subject alternative names, nothing else."""
    peer = {
        "subject": ((("organizationName", "Example"),), (("commonName", "site-a"),)),
        "subjectAltName": (("DNS", "site-a.example"), ("IP Address", "192.0.2.1")),
    }
    assert tls.certificate_names(peer) == {"site-a", "site-a.example"}
    assert tls.certificate_names({}) == set()


# --- contexts ------------------------------------------------------------------------


def test_tls_contexts_speak_tls13_only(identity: tuple[Path, Path]) -> None:
    """Both sides refuse anything older than TLS 1.3; the gateway hands out one
    session ticket per connection; a pinned agent checks the pin, not a chain."""
    server = tls.server_context(*identity)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server.num_tickets == 1
    assert server.verify_mode == ssl.CERT_NONE  # no client_ca: agents need no certificate
    pinned = tls.client_context(None, tls.certificate_fingerprint(identity[0]))
    assert pinned.minimum_version == ssl.TLSVersion.TLSv1_3
    assert (pinned.check_hostname, pinned.verify_mode) == (False, ssl.CERT_NONE)


def test_tls_client_ca_makes_the_gateway_require_a_certificate(
    identity: tuple[Path, Path], tmp_path: Path
) -> None:
    """With client_ca every agent must present a certificate; an agent with a
    CA of its own (no pin) verifies the chain and the host name."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    assert tls.server_context(*identity, client_ca=ca_file).verify_mode == ssl.CERT_REQUIRED
    chained = tls.client_context(ca_file, "")
    assert (chained.check_hostname, chained.verify_mode) == (True, ssl.CERT_REQUIRED)


def test_tls_unusable_files_are_config_errors_naming_them(
    identity: tuple[Path, Path], tmp_path: Path
) -> None:
    """A certificate, key or CA that cannot be loaded is a configuration error
    that names the file or the flag, not an ssl traceback."""
    cert, key = identity
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=re.escape(str(garbage))):
        tls.server_context(garbage, key)
    with pytest.raises(ConfigError, match="client_ca"):
        tls.server_context(cert, key, client_ca=garbage)
    with pytest.raises(ConfigError, match="--ca"):
        tls.client_context(tmp_path / "missing.pem", "")


# --- handshakes on a socket pair ------------------------------------------------------


@contextlib.contextmanager
def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext
) -> Iterator[tuple[ssl.SSLSocket, list[BaseException]]]:
    """A TLS handshake over a socket pair: the client's socket, and what the
    server side raised (handshaking in a thread of its own)."""
    near, far = socket.socketpair()
    near.settimeout(DEADLINE)
    far.settimeout(DEADLINE)
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            with server.wrap_socket(far, server_side=True) as tls_far:
                tls_far.recv(1)  # until the client closes
        except (OSError, ssl.SSLError) as exc:
            failures.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client.wrap_socket(near, server_hostname="tunnelgate") as tls_near:
            yield tls_near, failures
    finally:
        near.close()
        thread.join(DEADLINE)
        far.close()


def test_tls_pinned_agent_completes_a_handshake_with_its_gateway(
    identity: tuple[Path, Path],
) -> None:
    """An agent pinning the gateway's fingerprint completes a TLS 1.3
    handshake, and the certificate it received is the pinned one."""
    pin = tls.certificate_fingerprint(identity[0])
    with handshake(tls.server_context(*identity), tls.client_context(None, pin)) as (sock, _):
        assert sock.version() == "TLSv1.3"
        tls.check_fingerprint(sock.getpeercert(binary_form=True), pin)


def test_tls_gateway_refuses_an_older_tls_version(identity: tuple[Path, Path]) -> None:
    """A client that speaks at most TLS 1.2 gets no connection."""
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError), handshake(tls.server_context(*identity), old):
        pass


def test_tls_gateway_with_client_ca_refuses_an_agent_without_a_certificate(
    identity: tuple[Path, Path], tmp_path: Path
) -> None:
    """With client_ca, an agent without a certificate fails in the handshake,
    and one with a certificate from that CA gets in."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = tls.server_context(*identity, client_ca=ca_file)
    pin = tls.certificate_fingerprint(identity[0])
    refused_agent = tls.client_context(None, pin)
    # TLS 1.3: the gateway's refusal shows on the agent's first read.
    with handshake(server, refused_agent) as (sock, failures), pytest.raises(ssl.SSLError):
        sock.recv(1)
    assert failures and isinstance(failures[0], ssl.SSLError)

    issued = ca.issue_cert("site-a")
    cert_file, key_file = tmp_path / "agent.crt", tmp_path / "agent.key"
    issued.cert_chain_pems[0].write_to_path(str(cert_file))
    issued.private_key_pem.write_to_path(str(key_file))
    agent = tls.client_context(None, pin, cert_file, key_file)
    with handshake(server, agent) as (sock, failures):
        sock.sendall(b"x")
        assert sock.version() == "TLSv1.3"
    assert not failures
