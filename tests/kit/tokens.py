"""Tokens for the tests' gateways and agents: two fixed ones for the in-process
tests (which the log check looks for, since a token must never be logged), and
fresh ones made as ``tunnelgate token`` makes them for the CLI tests."""

from __future__ import annotations

from tunnelgate.credentials import generate_token

TOKEN = "test-token-0123456789abcdef"
OTHER_TOKEN = "another-token-fedcba9876543210"
TOKEN_ENV = "TUNNELGATE_TOKEN"


def new_token() -> str:
    """A fresh strong token for a test's gateway and agents, made as
    ``tunnelgate token`` makes one (so never starting with "-", which a
    command line would take for an option)."""
    return generate_token()
