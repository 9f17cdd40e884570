"""Access control for clients on the gateway's service ports, without I/O.

An :class:`AccessRule` comes from one config table; rules stack (``[access]``,
``[services.NAME]``, ``[agents.access]``, ``[agents.services.NAME]``) and a
connection is admitted only if every rule covering its service lets it
through. A :class:`Gate` holds one rule and the counters of all it covers;
:func:`admit` counts a connection in all of a service's gates or in none, and
:meth:`Gate.release` uncounts it.

* Addresses: an IPv4-mapped IPv6 address or network is its IPv4 form. A list
  of networks is a dict per prefix length, so matching costs one lookup per
  distinct length, however long the list; a refusal names the broadest match.
* Counters count every connection whatever the rule limits, so a reload that
  tightens a limit applies at once to open connections.
* The rate limit is a token bucket per address stored as one float, when it
  is full again (GCRA). Refused attempts take no token: a refused client costs
  nothing more, and charging it would lock out a client that retries too fast.
* Memory: per-client counters go at zero; full buckets are pruned when the
  table doubles, and at most ``MAX_CLIENT_BUCKETS`` survive (those furthest
  from full), so an IPv6 address flood cannot grow it without bound.

Must not import asyncio, socket, ssl, time or logging, nor any tunnelgate
module but ``errors``: time comes in as ``now`` (monotonic seconds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Final, TypeAlias

ClientIP: TypeAlias = IPv4Address | IPv6Address
Network: TypeAlias = IPv4Network | IPv6Network

ACCESS_KEYS: Final = frozenset(
    {
        "allow",
        "deny",
        "max_connections",
        "max_connections_per_client",
        "rate_per_client",
        "burst_per_client",
    }
)

MAX_COUNT: Final = 1 << 20  # the largest connection count or burst a rule may give
MIN_RATE: Final = 1e-3  # the smallest rate_per_client: one connection per 1000 s
MAX_RATE: Final = 1e6  # the largest rate_per_client, in connections per second
BUCKETS_PRUNE_MIN: Final = 1024
MAX_CLIENT_BUCKETS: Final = 65536
# An attempt this early (seconds) counts as on time: absorbs the rounding of
# clock values and sums of 1/rate.
RATE_SLACK: Final = 1e-6

_MAX_SHOWN: Final = 60


@dataclass(frozen=True)
class AccessRule:
    """One table of access settings; zero or empty means no limit of that kind."""

    where: str  # where it is configured: "access", "agents[site-a].services.web", ...
    allow: tuple[Network, ...] = ()  # non-empty: a client in none of them is refused
    deny: tuple[Network, ...] = ()  # a client in any of them is refused, before allow
    max_connections: int = 0
    max_connections_per_client: int = 0
    rate_per_client: float = 0.0  # new connections per second per client address
    burst_per_client: int = 0  # bucket size; 0 with a rate: max(1, ceil(rate))

    @property
    def empty(self) -> bool:
        """Whether the rule lets every connection through: no list, no limit."""
        return not (
            self.allow
            or self.deny
            or self.max_connections
            or self.max_connections_per_client
            or self.rate_per_client
        )


def default_burst(rate_per_client: float) -> int:
    """The bucket size when ``burst_per_client`` is not given: one second's worth."""
    return max(1, math.ceil(rate_per_client))


# --- parsing ----------------------------------------------------------------


def parse_access_rule(table: object, where: str) -> tuple[AccessRule, list[tuple[str, str]]]:
    """The rule in one config table, and its problems as (key path, message).

    Unknown keys, wrong types (a bool is not a number) and bad values are all
    problems. With problems, the rule holds what could be read and leaves out
    the rest, so that every problem of a file can be reported at once; it is
    not meant to be used.
    """
    problems: list[tuple[str, str]] = []
    if not isinstance(table, dict):
        problems.append((where, f"expected a table, got {_shown(table)}"))
        return AccessRule(where), problems
    for key in table:
        if key not in ACCESS_KEYS:
            problems.append((f"{where}.{key}", "unknown key"))
    allow = _network_list(table, "allow", where, problems)
    deny = _network_list(table, "deny", where, problems)
    max_connections = _count(table, "max_connections", where, problems)
    per_client = _count(table, "max_connections_per_client", where, problems)
    rate = _rate(table, "rate_per_client", where, problems)
    burst = _count(table, "burst_per_client", where, problems)
    if "burst_per_client" in table and "rate_per_client" not in table:
        problems.append((f"{where}.burst_per_client", "has no effect without rate_per_client"))
    if not rate:
        burst = 0
    elif not burst:
        burst = default_burst(rate)
    rule = AccessRule(where, allow, deny, max_connections, per_client, rate, burst)
    return rule, problems


def _shown(value: object) -> str:
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return f"{type(value).__name__} {text}"


def _network_list(
    table: dict[object, object], key: str, where: str, problems: list[tuple[str, str]]
) -> tuple[Network, ...]:
    if key not in table:
        return ()
    value = table[key]
    path = f"{where}.{key}"
    if not isinstance(value, list):
        problems.append(
            (path, f'expected a list of networks like ["10.0.0.0/8"], got {_shown(value)}')
        )
        return ()
    if not value and key == "allow":
        problems.append((path, "empty: it would admit every address; leave allow out for that"))
        return ()
    networks: list[Network] = []
    for index, item in enumerate(value):
        try:
            networks.append(parse_network(item))
        except ValueError as exc:
            problems.append((f"{path}[{index}]", str(exc)))
    return tuple(networks)


def parse_network(text: object) -> Network:
    """A network from ``"10.0.0.0/8"``, ``"2001:db8::/32"`` or a bare address.

    A bare address is one host (/32 or /128). Host bits set after the prefix
    (``10.0.0.1/8``) are refused as a likely typo. An IPv4-mapped IPv6 network
    becomes the IPv4 network it maps, since client addresses are normalised
    the same way. Raises ``ValueError`` with a message for the user.
    """
    if not isinstance(text, str):
        raise ValueError(f'expected a network as a string like "10.0.0.0/8", got {_shown(text)}')
    stripped = text.strip()
    try:
        network = ip_network(stripped)
    except ValueError:
        try:
            loose = ip_network(stripped, strict=False)
        except ValueError:
            raise ValueError(
                "expected an IPv4 or IPv6 network like '10.0.0.0/8' or '2001:db8::/32',"
                f" or an address, got {text!r}"
            ) from None
        host = stripped.partition("/")[0]
        raise ValueError(
            f"{text!r} has host bits set: write '{loose}' for the network,"
            f" or '{host}' for the one address"
        ) from None
    return _normal_network(network)


def _count(
    table: dict[object, object], key: str, where: str, problems: list[tuple[str, str]]
) -> int:
    if key not in table:
        return 0
    value = table[key]
    if not isinstance(value, int) or isinstance(value, bool):
        problems.append((f"{where}.{key}", f"expected an integer >= 1, got {_shown(value)}"))
        return 0
    if not 1 <= value <= MAX_COUNT:
        bound = "expected an integer >= 1" if value < 1 else f"expected at most {MAX_COUNT}"
        problems.append((f"{where}.{key}", f"{bound}, got {value}"))
        return 0
    return value


def _rate(
    table: dict[object, object], key: str, where: str, problems: list[tuple[str, str]]
) -> float:
    if key not in table:
        return 0.0
    value = table[key]
    expected = "expected a number of connections per second > 0"
    if not isinstance(value, int | float) or isinstance(value, bool):
        problems.append((f"{where}.{key}", f"{expected}, got {_shown(value)}"))
        return 0.0
    rate = float(value)
    if not (rate > 0 and math.isfinite(rate)):
        problems.append((f"{where}.{key}", f"{expected}, got {value}"))
        return 0.0
    if not MIN_RATE <= rate <= MAX_RATE:
        bounds = f"in [{MIN_RATE:g}, {MAX_RATE:g}]"
        problems.append((f"{where}.{key}", f"expected a number {bounds}, got {value}"))
        return 0.0
    return rate


# --- addresses --------------------------------------------------------------


def client_ip(host: str) -> ClientIP | None:
    """The client address in a host string (``"10.0.0.1"``, ``"::1"``), normalised.

    ``::ffff:10.0.0.1`` becomes ``10.0.0.1``. None if ``host`` is no address.
    """
    try:
        ip = ip_address(host)
    except ValueError:
        return None
    return _normal(ip)


def _normal(ip: ClientIP) -> ClientIP:
    if isinstance(ip, IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return mapped
    return ip


def _normal_network(network: Network) -> Network:
    if (
        isinstance(network, IPv6Network)
        and network.prefixlen >= 96
        and network.network_address.ipv4_mapped is not None
    ):
        return IPv4Network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
    return network


class _Networks:
    """A list of networks for matching: per version, per prefix length, a dict."""

    __slots__ = ("_v4", "_v6", "size")

    def __init__(self, networks: tuple[Network, ...]) -> None:
        by_length: dict[tuple[int, int], dict[int, Network]] = {}
        for raw in networks:
            network = _normal_network(raw)
            bits = network.max_prefixlen
            shift = bits - network.prefixlen
            group = by_length.setdefault((bits, network.prefixlen), {})
            group.setdefault(int(network.network_address) >> shift, network)
        # Ascending prefix length: the first match is the broadest network.
        ordered = sorted(by_length.items())
        self._v4 = tuple((32 - n, group) for (bits, n), group in ordered if bits == 32)
        self._v6 = tuple((128 - n, group) for (bits, n), group in ordered if bits == 128)
        self.size = len(networks)

    def match(self, ip: ClientIP) -> Network | None:
        """The broadest network holding ``ip`` (normalised), or None."""
        number = int(ip)
        for shift, group in self._v4 if isinstance(ip, IPv4Address) else self._v6:
            network = group.get(number >> shift)
            if network is not None:
                return network
        return None


# --- gates ------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """Why a client connection was refused, and by the rule configured where."""

    where: str
    reason: str  # "deny 10.0.0.0/8", "not in allow", "max_connections 100 reached", ...

    def __str__(self) -> str:
        return f"{self.reason} ({self.where})"


@dataclass(frozen=True)
class GateStatistics:
    """A snapshot of a gate's counters."""

    connections: int  # open connections counted
    clients: int  # distinct client addresses among them
    buckets: int  # rate buckets held: not yet full, or full and not yet pruned


class Gate:
    """One rule and its counters, shared by every service the rule covers.

    The rule can be replaced (a config reload) while the counters go on, so
    connections admitted under the old rule are still released correctly.
    Rate buckets start over (full) when the rate or the burst changes.
    """

    __slots__ = (
        "_allow",
        "_buckets",
        "_clients",
        "_connections",
        "_deny",
        "_empty",
        "_interval",
        "_max_reason",
        "_per_client_reason",
        "_prune_at",
        "_rate_reason",
        "_rule",
        "_span",
        "_tolerance",
    )

    def __init__(self, rule: AccessRule) -> None:
        self._connections = 0
        self._clients: dict[ClientIP, int] = {}
        self._buckets: dict[ClientIP, float] = {}  # address -> when its bucket is full again
        self._prune_at = BUCKETS_PRUNE_MIN
        self._interval = 0.0
        self._span = 0.0
        self._tolerance = 0.0
        self.rule = rule

    @property
    def rule(self) -> AccessRule:
        return self._rule

    @rule.setter
    def rule(self, rule: AccessRule) -> None:
        self._rule = rule
        self._empty = rule.empty
        self._allow = _Networks(rule.allow)
        self._deny = _Networks(rule.deny)
        self._max_reason = f"max_connections {rule.max_connections} reached"
        self._per_client_reason = (
            f"max_connections_per_client {rule.max_connections_per_client} reached"
        )
        rate = rule.rate_per_client
        self._rate_reason = f"rate_per_client {_number(rate)}/s exceeded"
        interval = span = 0.0
        if rate > 0:
            burst = rule.burst_per_client or default_burst(rate)
            interval = 1.0 / rate
            # A bucket at most `span` seconds from full holds at least one token.
            span = (burst - 1) * interval
        if (interval, span) != (self._interval, self._span):
            self._buckets = {}
            self._prune_at = BUCKETS_PRUNE_MIN
        self._interval, self._span = interval, span
        self._tolerance = span + RATE_SLACK

    def check(self, ip: ClientIP, now: float) -> str | None:
        """The reason this gate would refuse a connection from ``ip``, changing nothing."""
        return self._check(_normal(ip), now)

    def acquire(self, ip: ClientIP, now: float) -> None:
        """Count an admitted connection from ``ip``, and take a rate token."""
        self._acquire(_normal(ip), now)

    def release(self, ip: ClientIP) -> None:
        """A counted connection from ``ip`` ended; an address not counted is ignored."""
        ip = _normal(ip)
        count = self._clients.get(ip)
        if count is None:
            return
        if count == 1:
            del self._clients[ip]
        else:
            self._clients[ip] = count - 1
        self._connections -= 1

    def statistics(self) -> GateStatistics:
        """A snapshot of the counters."""
        return GateStatistics(self._connections, len(self._clients), len(self._buckets))

    def _check(self, ip: ClientIP, now: float) -> str | None:
        if self._empty:
            return None
        if self._deny.size:
            network = self._deny.match(ip)
            if network is not None:
                return f"deny {network}"
        if self._allow.size and self._allow.match(ip) is None:
            return "not in allow"
        rule = self._rule
        if rule.max_connections and self._connections >= rule.max_connections:
            return self._max_reason
        limit = rule.max_connections_per_client
        if limit and self._clients.get(ip, 0) >= limit:
            return self._per_client_reason
        if self._interval:
            full_at = self._buckets.get(ip)
            if full_at is not None and full_at - now > self._tolerance:
                return self._rate_reason
        return None

    def _acquire(self, ip: ClientIP, now: float) -> None:
        self._connections += 1
        self._clients[ip] = self._clients.get(ip, 0) + 1
        if not self._interval:
            return
        buckets = self._buckets
        full_at = buckets.get(ip)
        if full_at is None:
            if len(buckets) >= self._prune_at:
                self._prune(now)
            buckets = self._buckets
            full_at = now
        # A bucket holds no fewer than zero tokens; clamping also keeps what
        # RATE_SLACK let through from adding up over many connections.
        full_at = min(max(full_at, now), now + self._span)
        buckets[ip] = full_at + self._interval

    def _prune(self, now: float) -> None:
        kept = {ip: full_at for ip, full_at in self._buckets.items() if full_at > now}
        room = MAX_CLIENT_BUCKETS // 2
        if len(kept) > room:
            furthest = sorted(kept.items(), key=lambda item: item[1])[-room:]
            kept = dict(furthest)
        self._buckets = kept
        self._prune_at = min(MAX_CLIENT_BUCKETS, max(BUCKETS_PRUNE_MIN, 2 * len(kept)))


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def admit(gates: Sequence[Gate], ip: ClientIP, now: float) -> Refusal | None:
    """Check ``ip`` against every gate, in order; if none refuses, acquire in all.

    All or nothing: a refusal leaves every gate unchanged. Each gate should
    appear once. The caller releases an admitted connection in the same gates
    when it ends.
    """
    ip = _normal(ip)
    for gate in gates:
        reason = gate._check(ip, now)
        if reason is not None:
            return Refusal(gate._rule.where, reason)
    for gate in gates:
        gate._acquire(ip, now)
    return None
