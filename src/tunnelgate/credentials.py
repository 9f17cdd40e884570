"""Agent credentials: tokens, their stored hashes, and the handshake proof.

SCRAM (RFC 5802) over scrypt, salted with the agent's name (the gateway's
Challenge comes before it knows who connects, so a random salt would cost a
round trip)::

    salted     = scrypt(token, salt = SALT_CONTEXT ‖ agent name)    slow, once per process
    client_key = HMAC-SHA256(salted, "client key")
    stored_key = SHA-256(client_key)                                what the gateway may keep
    signature  = HMAC-SHA256(stored_key, AUTH_CONTEXT ‖ nonce ‖ role ‖ agent ‖ session)
    proof      = client_key XOR signature                           sent in Hello

The token never crosses the wire, and a stolen ``stored_key`` cannot make a
proof (docs/SECURITY.md). Pure functions, no I/O or clock; :func:`derive` is
deliberately slow (about 40 ms of CPU): callers cache it, off the event loop.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Final

SALT_CONTEXT: Final = b"tunnelgate token salt v2\x00"
AUTH_CONTEXT: Final = b"tunnelgate proof v2\x00"
HASH_PREFIX: Final = "tg2:"  # a stored key, base64url: "tg2:<43 characters>"
SCRYPT_N: Final = 1 << 14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
KEY_SIZE: Final = 32
DERIVE_CACHE: Final = 1024  # (token, name) pairs kept derived


@dataclass(frozen=True)
class Credential:
    """What an agent derives from its token for one name: both keys."""

    client_key: bytes = field(repr=False)
    stored_key: bytes = field(repr=False)


@functools.lru_cache(maxsize=DERIVE_CACHE)
def derive(token: bytes, agent: str) -> Credential:
    """The keys of ``token`` for the agent named ``agent`` (slow; cached)."""
    salted = hashlib.scrypt(
        token,
        salt=SALT_CONTEXT + agent.encode(),
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=64 << 20,
        dklen=KEY_SIZE,
    )
    client_key = hmac.digest(salted, b"client key", "sha256")
    return Credential(client_key, hashlib.sha256(client_key).digest())


def generate_token() -> str:
    """A new random token (256 bits, URL-safe), never starting with "-", which
    command lines would take for an option."""
    while (token := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return token


def hash_line(stored_key: bytes) -> str:
    """How a stored key is written in the gateway's config (``token_hash``)."""
    return HASH_PREFIX + base64.urlsafe_b64encode(stored_key).decode().rstrip("=")


def parse_hash_line(text: str) -> bytes:
    """The stored key of a ``token_hash`` value; ValueError if it is not one."""
    text = text.strip()
    if not text.startswith(HASH_PREFIX):
        raise ValueError(
            f"expected a hash starting with {HASH_PREFIX!r}, as `tunnelgate token` prints it"
        )
    body = text[len(HASH_PREFIX) :]
    try:
        key = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        key = b""
    if len(key) != KEY_SIZE or hash_line(key) != text:
        raise ValueError("not a valid token hash (it is cut short or altered)")
    return key


def _signature(stored_key: bytes, nonce: bytes, role: str, agent: str, session: str) -> bytes:
    message = b"\x00".join((nonce, role.encode(), agent.encode(), session.encode()))
    return hmac.digest(stored_key, AUTH_CONTEXT + message, "sha256")


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a) ^ int.from_bytes(b)).to_bytes(KEY_SIZE)


def make_proof(credential: Credential, nonce: bytes, role: str, agent: str, session: str) -> bytes:
    """The Hello's proof for this connection."""
    return _xor(
        credential.client_key, _signature(credential.stored_key, nonce, role, agent, session)
    )


def proof_for(token: bytes, nonce: bytes, role: str, agent: str, session: str) -> bytes:
    """:func:`make_proof` straight from a token (for tools and tests)."""
    return make_proof(derive(token, agent), nonce, role, agent, session)


def check_proof(
    stored_key: bytes, proof: bytes, nonce: bytes, role: str, agent: str, session: str
) -> bool:
    """True if ``proof`` was made with the client key behind ``stored_key``.

    Constant-time in the secret values: the comparison is ``hmac.compare_digest``.
    """
    if len(proof) != KEY_SIZE:
        return False
    client_key = _xor(proof, _signature(stored_key, nonce, role, agent, session))
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key)
