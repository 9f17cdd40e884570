"""Which session of this process holds which public port (none takes another's), and
listeners on a free port a policy allows. Must not import agent."""

from __future__ import annotations

import contextlib
import random
from typing import Final

from tunnelgate.config import AgentPolicy
from tunnelgate.errors import TransportError
from tunnelgate.transport import Listener, open_listener

FREE_PORT_TRIES: Final = 64  # allowed ports tried for a service asking for any port


class Ports:
    """Holders of public ports in this process, by (bind address as asked for, port). With
    ``reuse_port``, listeners share their address with other processes (``SO_REUSEPORT``):
    the workers of one gateway, whose leases say which agent may listen there."""

    def __init__(self, reuse_port: bool = False) -> None:
        self.holders: dict[tuple[str, int], object] = {}
        self.reuse_port = reuse_port

    def release(self, owner: object) -> list[tuple[str, int]]:
        """Free every port ``owner`` holds; which they were."""
        freed = [k for k, held_by in self.holders.items() if held_by is owner]
        for key in freed:
            del self.holders[key]
        return freed

    def open(self, bind: str, port: int) -> Listener:
        """A service's listener: a client's connection resets unless it ends cleanly."""
        return open_listener(bind, port, reuse_port=self.reuse_port, reset_accepted=True)

    def listen_on_free_port(self, bind: str, policy: AgentPolicy) -> Listener | None:
        """The kernel's pick if the policy allows it, else a random sample of allowed ports."""
        with contextlib.suppress(TransportError):
            listener = self.open(bind, 0)
            if policy.allows_port(listener.address.port):
                return listener
            listener.close()
        ports = [p for r in policy.allow_ports for p in r]
        for port in random.sample(ports, min(len(ports), FREE_PORT_TRIES)):
            if (bind, port) not in self.holders:
                with contextlib.suppress(TransportError):
                    return self.open(bind, port)
        return None
