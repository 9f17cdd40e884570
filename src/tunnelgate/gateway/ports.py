"""The gateway's public ports: which session holds which (bind address,
port), and listeners on a port a policy allows.

An agent cannot take a port another agent holds; a session that ends or
drains releases its ports at once, so the agent (or a successor with its
name) can take them again.
"""

from __future__ import annotations

import contextlib
import random
from typing import Final

from tunnelgate.config import AgentPolicy
from tunnelgate.errors import TransportError
from tunnelgate.transport import Listener, open_listener

FREE_PORT_TRIES: Final = 64  # allowed ports tried for a service asking for any port


class Ports:
    """Holders of public ports, by (bind address as asked for, port)."""

    def __init__(self) -> None:
        self._holders: dict[tuple[str, int], object] = {}

    def holder(self, bind: str, port: int) -> object | None:
        return self._holders.get((bind, port))

    def claim(self, bind: str, port: int, owner: object) -> None:
        self._holders[(bind, port)] = owner

    def release(self, owner: object) -> None:
        """Free every port ``owner`` holds."""
        for key in [k for k, held_by in self._holders.items() if held_by is owner]:
            del self._holders[key]

    def listen_on_free_port(self, bind: str, policy: AgentPolicy) -> Listener | None:
        """A listener on a free port the policy allows: the kernel's pick if it
        is allowed, else a random sample of the allowed ports."""
        with contextlib.suppress(TransportError):
            listener = open_listener(bind, 0)
            if policy.allows_port(listener.address.port):
                return listener
            listener.close()
        ports = [p for r in policy.allow_ports for p in r] if policy.allow_ports else []
        for port in random.sample(ports, min(len(ports), FREE_PORT_TRIES)):
            if (bind, port) in self._holders:
                continue
            with contextlib.suppress(TransportError):
                return open_listener(bind, port)
        return None
