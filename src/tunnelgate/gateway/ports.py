"""Which session holds which public port (none takes another's), and listeners on a free
port a policy allows. Must not import agent."""

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
        self.holders: dict[tuple[str, int], object] = {}

    def release(self, owner: object) -> None:
        self.holders = {k: held_by for k, held_by in self.holders.items() if held_by is not owner}

    def listen_on_free_port(self, bind: str, policy: AgentPolicy) -> Listener | None:
        """The kernel's pick if the policy allows it, else a random sample of allowed ports."""
        with contextlib.suppress(TransportError):
            listener = open_listener(bind, 0)
            if policy.allows_port(listener.address.port):
                return listener
            listener.close()
        ports = [p for r in policy.allow_ports for p in r]
        for port in random.sample(ports, min(len(ports), FREE_PORT_TRIES)):
            if (bind, port) not in self.holders:
                with contextlib.suppress(TransportError):
                    return open_listener(bind, port)
        return None
