"""Agent groups on the gateway: one public port whose clients are spread over the members of a
group, the services of several agents that joined it with its secret. Must not import agent.

A :class:`Group` owns its listener (the first member's join opens it, the last one's leave closes
it) and picks a member for each client, among those that serve (healthy and not draining):
round robin, or the fewest open connections (round robin among the tied). The member then takes
the client as it takes a client of its own services: limits, access rules, its pool, its relay.
A member that leaves (its session ends or drains, or its health check fails) is out before the
next client arrives, so clients after it never meet it. :class:`Groups` holds the groups of one
process, by name. A member proves the group's secret as an agent proves its token
(:func:`proved_key`); the key it proved is kept, so that a reload that removes it ends the
membership (:func:`stored_keys`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from tunnelgate import credentials
from tunnelgate.address import Address
from tunnelgate.config import GroupConfig
from tunnelgate.logs import Throttle
from tunnelgate.transport import Listener, SocketStream, TLSStream

logger = logging.getLogger(__package__)

REFUSAL_INTERVAL: Final = 10.0  # seconds between warnings of clients refused for no member
Handler = Callable[[SocketStream, str], None]  # a listener's: a client and its address


class Member(Protocol):
    """A service of one agent's session in a group."""

    @property
    def agent(self) -> str: ...

    @property
    def serving(self) -> bool:
        """Healthy, and its session takes new clients."""

    @property
    def active(self) -> int:
        """Its clients of this group open now."""

    def admit(self, stream: SocketStream | TLSStream, client: str, server: str) -> bool:
        """Take the client (``server``: the address it reached, if forwarded); False if
        refused (its limits, its access rules)."""


@dataclass(eq=False)
class Group:
    """One group's port and members; :meth:`pick` is pure (no I/O, no clock)."""

    name: str
    balance: str  # one of config.BALANCES
    key: tuple[str, int] = ("", 0)  # (bind as asked for, port): how its port is held, leased
    listener: Listener | None = None  # once its first member opened it
    members: list[Member] = field(default_factory=list)
    refused: int = 0  # clients that found no member serving
    _turn: int = 0
    _accepting: asyncio.Task[None] | None = None
    _refusals: Throttle = field(default_factory=lambda: Throttle(REFUSAL_INTERVAL))

    @property
    def address(self) -> Address:
        assert self.listener is not None, "the group's port is not open yet"
        return self.listener.address

    @property
    def owner(self) -> str:
        """Its name as a port's lease holder: no agent's name has a space."""
        return f"group {self.name}"

    def pick(self) -> Member | None:
        """The member for the next client; None if none serves."""
        ready = [m for m in self.members if m.serving]
        if not ready:
            return None
        if self.balance == "least_connections":
            fewest = min(m.active for m in ready)
            ready = [m for m in ready if m.active == fewest]
        member = ready[self._turn % len(ready)]
        self._turn += 1
        return member

    def start(
        self,
        tasks: asyncio.TaskGroup,
        accept: Callable[[Listener, Handler], Coroutine[Any, Any, None]],
    ) -> None:
        """Accept clients (``accept`` runs the listener's loop), in ``tasks`` (the gateway's),
        until :meth:`close`."""
        assert self.listener is not None
        loop = accept(self.listener, self._handle)
        self._accepting = tasks.create_task(loop, name=f"group {self.name}")

    def _handle(self, stream: SocketStream, client: str) -> None:
        if not self.take(stream, client):
            stream.abort()

    def take(self, stream: SocketStream | TLSStream, client: str, server: str = "") -> bool:
        """The picked member takes the client; one that refuses it (at its limit, or its
        access rules) passes it to the others that serve, in turn. False (counted, logged) if
        none takes it: the caller resets it."""
        if (first := self.pick()) is not None:
            others = [m for m in self.members if m.serving and m is not first]
            for member in (first, *others):
                if member.admit(stream, client, server):
                    return True
        self.refused += 1
        self._refusals.warning(
            logger,
            time.monotonic(),
            "refusing client %s on group %s (port %d): no member serves now, or takes it",
            client,
            self.name,
            self.key[1],
        )
        return False

    def close(self) -> None:
        """Stop accepting and close the port (its last member left), once the accept loop has
        let go of it (never under it: its descriptor may be reused meanwhile)."""
        listener, accepting = self.listener, self._accepting
        if accepting is not None and not accepting.done() and listener is not None:
            accepting.add_done_callback(lambda _: listener.close())
            accepting.cancel()
        elif listener is not None:
            listener.close()


@dataclass
class Groups:
    """The groups of one gateway process, by name; a join that opens a group's port is one at
    a time, so that two first members never open two ports. ``tasks``: the gateway's task group,
    where the groups accept (set while it runs)."""

    by_name: dict[str, Group] = field(default_factory=dict)
    joining: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: asyncio.TaskGroup | None = None


async def proved_key(group: GroupConfig, proof: bytes, nonce: bytes, agent: str) -> bytes | None:
    """The stored key of the group's secret that ``proof`` (a ServiceRequest's) proves, for the
    control channel whose Challenge was ``nonce`` and this agent; None if none. The group's
    clear secrets are derived off the event loop (then cached)."""
    for secret in group.secrets:
        await asyncio.to_thread(credentials.derive, secret, group.name)
    return next(
        (
            key
            for key in stored_keys(group)
            if credentials.check_proof(key, proof, nonce, "group", agent, group.name)
        ),
        None,
    )


def stored_keys(group: GroupConfig) -> list[bytes]:
    """The stored keys of a group's secrets (clear secrets derived: slow the first time)."""
    derived = [credentials.derive(secret, group.name).stored_key for secret in group.secrets]
    return [*group.stored_keys, *derived]
