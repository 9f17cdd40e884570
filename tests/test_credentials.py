"""Credentials: the handshake proof, token hashes, and what a stolen hash cannot do."""

from __future__ import annotations

import typing

import pytest

from tunnelgate import credentials as c
from tunnelgate.protocol import wire as p

TOKEN, NONCE = b"s3cret-token-of-16+", bytes(range(32))


def signed_hello(
    token: bytes = TOKEN,
    nonce: bytes = NONCE,
    role: typing.Literal["control", "data"] = "data",
    agent: str = "a",
    session: str = "s1",
) -> p.Hello:
    proof = c.proof_for(token, nonce, role, agent, session)
    return p.Hello(p.PROTOCOL_VERSION, role, agent, proof, session)


def accepted(hello: p.Hello, token: bytes = TOKEN, agent: str = "a") -> bool:
    stored_key = c.derive(token, agent).stored_key
    return c.check_proof(stored_key, hello.proof, NONCE, hello.role, hello.agent, hello.session)


def test_proof_accepted_for_the_right_token_which_never_crosses_the_wire() -> None:
    hello = signed_hello()
    assert accepted(hello)
    wire = p.encode_message(hello)
    assert TOKEN not in wire
    assert c.derive(TOKEN, "a").client_key not in wire


@pytest.mark.parametrize(
    "hello",
    [
        signed_hello(token=b"wrong-token-of-16+"),
        signed_hello(nonce=bytes(32)),
        signed_hello(role="control"),
        signed_hello(agent="b"),
        signed_hello(session="s2"),
    ],
    ids=["token", "nonce", "role", "agent", "session"],
)
def test_proof_refused_when_made_for_something_else(hello: p.Hello) -> None:
    """A proof made with another token, nonce, role, agent or session is refused."""
    replayed = p.Hello(p.PROTOCOL_VERSION, "data", "a", hello.proof, "s1")
    assert not accepted(replayed)


@pytest.mark.parametrize("proof", [b"", b"x", bytes(31), bytes(33), bytes(64)])
def test_proof_of_wrong_length_refused(proof: bytes) -> None:
    stored_key = c.derive(TOKEN, "a").stored_key
    assert not c.check_proof(stored_key, proof, NONCE, "data", "a", "s1")


def test_stored_key_alone_cannot_make_a_proof() -> None:
    """Whoever steals the gateway's config holds stored keys, not client keys:
    a proof made with the stored key in the client key's place is refused."""
    stored_key = c.derive(TOKEN, "a").stored_key
    forged = c.make_proof(c.Credential(stored_key, stored_key), NONCE, "data", "a", "s1")
    assert not c.check_proof(stored_key, forged, NONCE, "data", "a", "s1")


def test_hash_is_salted_with_the_agent_name() -> None:
    """The same token hashes differently for each agent name."""
    assert c.derive(TOKEN, "a").stored_key != c.derive(TOKEN, "b").stored_key
    assert c.derive(TOKEN, "a") == c.derive(TOKEN, "a")


def test_hash_line_round_trip() -> None:
    stored_key = c.derive(TOKEN, "site-a").stored_key
    line = c.hash_line(stored_key)
    assert line.startswith(c.HASH_PREFIX) and TOKEN.decode() not in line
    assert c.parse_hash_line(line) == stored_key
    assert c.parse_hash_line(f"  {line}\n") == stored_key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected a hash starting with 'tg2:'"),
        ("s3cret-token-of-16+", "expected a hash starting with 'tg2:'"),
        ("tg2:", "cut short or altered"),
        ("tg2:" + "A" * 42, "cut short or altered"),
        ("tg2:" + "A" * 44, "cut short or altered"),
        ("tg2:" + "*" * 43, "cut short or altered"),
    ],
)
def test_hash_line_rejects_anything_else(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        c.parse_hash_line(text)


def test_generate_token_never_looks_like_an_option() -> None:
    """A generated token can follow --token on a command line: it never starts with '-'."""
    tokens = {c.generate_token() for _ in range(2000)}
    assert len(tokens) == 2000
    assert not [t for t in tokens if t.startswith("-")]
    assert all(len(t) >= 43 for t in tokens)
