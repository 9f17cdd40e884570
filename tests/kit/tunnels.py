"""Gateways and agents in the test's own event loop: the options the fixtures
give them (loopback, port 0, the test's token, plain TCP or TLS by ``mode``),
what a ready tunnel is, and the types of the fixtures that open them, for the
tests' signatures."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faultkit import FaultProxy

from kit.services import LocalServer
from kit.tokens import TOKEN
from tunnelgate import Address, Agent, ExposedService, Gateway

MODES = ["plain", "tls"]


def gateway_defaults(mode: str, state_dir: Path) -> dict[str, Any]:
    """A gateway's options in a test: control port 0 on loopback, the test token."""
    return {
        "listen": "127.0.0.1:0",
        "token": TOKEN,
        "tls": mode == "tls",
        "state_dir": str(state_dir),
    }


def agent_tls_options(mode: str, gateway: Gateway) -> dict[str, Any]:
    """An agent's TLS options for ``gateway``: its fingerprint pinned, or no TLS."""
    if mode == "tls":
        assert gateway.fingerprint
        return {"fingerprint": gateway.fingerprint}
    return {"tls": False}


@dataclass
class Tunnel:
    """A gateway, an agent and the services it exposes."""

    gateway: Gateway
    agent: Agent
    services: dict[str, ExposedService]

    @property
    def address(self) -> Address:
        """The public address of the (first) service."""
        return next(iter(self.services.values())).address


# Types of the factory fixtures in conftest.py, for the tests' signatures.
OpenGateway = Callable[..., Awaitable[Gateway]]
OpenAgent = Callable[..., Awaitable[Agent]]
OpenTunnel = Callable[..., Awaitable[Tunnel]]
StartServer = Callable[..., Awaitable[LocalServer]]
StartProxy = Callable[..., Awaitable[FaultProxy]]
