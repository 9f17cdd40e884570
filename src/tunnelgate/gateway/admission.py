"""Who may come in, decided without I/O: failed authentications, handshakes under way,
and the access rules a client must pass. Time is passed in. Must not import asyncio,
socket or ssl."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Final

from tunnelgate.access import Gate, Refusal
from tunnelgate.config import AgentPolicy, GatewayConfig
from tunnelgate.logs import Throttle

AUTH_DELAY_FIRST: Final = 0.1  # a failed authentication is answered this late, doubling
AUTH_DELAY_MAX: Final = 10.0  # with each failure from the same address, up to this
AUTH_FORGET: Final = 300.0  # an address's failures are forgotten after this long without one
AUTH_SUSPECT: Final = 3  # failures after which an address gets few handshakes at once:
AUTH_SUSPECT_HANDSHAKES: Final = 4  # this many
AUTH_TRACKED: Final = 65536  # addresses whose failures are remembered (oldest forgotten first)
WARNING_INTERVAL: Final = 5.0  # a warning repeated under abuse is logged once per interval


class AuthFailures:
    """Failed authentications per source address. A success does not clear the count (a
    guesser behind a real agent's NAT would gain from it); time does, after AUTH_FORGET."""

    def __init__(self) -> None:
        self._by_host: dict[str, tuple[int, float]] = {}  # oldest first

    def count(self, host: str, now: float) -> int:
        failures, last = self._by_host.get(host, (0, 0.0))
        return failures if now - last < AUTH_FORGET else 0

    def failed(self, host: str, now: float) -> tuple[int, float]:
        """Count one failure; return the count and the delay to answer it with."""
        failures = self.count(host, now) + 1
        self._by_host.pop(host, None)
        self._by_host[host] = (failures, now)
        if len(self._by_host) > AUTH_TRACKED:
            del self._by_host[next(iter(self._by_host))]
        return failures, min(AUTH_DELAY_MAX, AUTH_DELAY_FIRST * 2 ** (failures - 1))


class Handshakes:
    """Handshakes under way on the control port, in all and per address."""

    def __init__(self, failures: AuthFailures) -> None:
        self.failures = failures
        self.running = 0
        self.by_host: Counter[str] = Counter()

    def refusal(self, host: str, now: float, max_handshakes: int) -> str | None:
        """Why one more handshake from ``host`` may not start now, or None."""
        open_here = self.by_host[host]
        if open_here >= AUTH_SUSPECT_HANDSHAKES and self.failures.count(host, now) >= AUTH_SUSPECT:
            return f"it failed to authenticate repeatedly and has {open_here} handshakes open"
        if self.running >= max_handshakes:
            return f"{self.running} connections are in handshake (max_handshakes)"
        return None

    def begin(self, host: str) -> None:
        self.running += 1
        self.by_host[host] += 1

    def end(self, host: str) -> None:
        self.running -= 1
        self.by_host[host] -= 1
        if not self.by_host[host]:
            del self.by_host[host]


def allowed_binds(config: GatewayConfig, policy: AgentPolicy) -> tuple[str, ...]:
    """The bind addresses an agent under ``policy`` may ask for."""
    return tuple(policy.allow_bind or config.allow_bind or (config.default_bind,))


class ClientGates:
    """One :class:`~tunnelgate.access.Gate` per rule, shared by everything the rule covers."""

    def __init__(self) -> None:
        self._gates: dict[str, Gate] = {}  # by the rule's place in the config
        self._warnings: dict[str, Throttle] = {}

    def gates_for(self, config: GatewayConfig, policy: AgentPolicy, service: str) -> list[Gate]:
        """A client's gates, broadest first; a reloaded rule keeps its gate's counts."""
        agent_rules = (policy.access, policy.service_access.get(service))
        gates = []
        for rule in (config.access, config.service_access.get(service), *agent_rules):
            if rule is not None:
                if (gate := self._gates.get(rule.where)) is None:
                    gate = self._gates[rule.where] = Gate(rule)
                gate.rule = rule
                gates.append(gate)
        return gates

    def warn_refused(
        self,
        log: logging.Logger | logging.LoggerAdapter[Any],
        now: float,
        service: str,
        client: str,
        refusal: Refusal,
    ) -> None:
        """Log a refused client, once per ``WARNING_INTERVAL`` and rule under a flood."""
        throttle = self._warnings.setdefault(str(refusal), Throttle(WARNING_INTERVAL))
        throttle.warning(log, now, "refused client %s on service %s: %s", client, service, refusal)


def host_of(address: str) -> str:
    """The host of a ``host:port`` (IPv6 without its brackets)."""
    return address.rpartition(":")[0].strip("[]")
