"""Access control without sockets or clocks: rules parsed, connections admitted or refused."""

from __future__ import annotations

import math
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnelgate import access as a
from tunnelgate.access import AccessRule, Gate, GateStatistics, Refusal, admit, client_ip

W = "agents[site-a].services.web"
EMPTY = GateStatistics(0, 0, 0)


def ip(text: str) -> a.ClientIP:
    return ip_address(text)


def rule(**table: Any) -> AccessRule:
    parsed, problems = a.parse_access_rule(table, W)
    assert problems == []
    return parsed


def gate(**table: Any) -> Gate:
    return Gate(rule(**table))


def problems_of(table: object, where: str = W) -> list[tuple[str, str]]:
    return a.parse_access_rule(table, where)[1]


# --- parsing ----------------------------------------------------------------


def test_parse_access_rule_reads_every_key() -> None:
    """Every key of a table ends up in the rule, networks parsed."""
    parsed, problems = a.parse_access_rule(
        {
            "allow": ["10.0.0.0/8", "2001:db8::/32"],
            "deny": ["10.9.0.0/16"],
            "max_connections": 100,
            "max_connections_per_client": 10,
            "rate_per_client": 5,
            "burst_per_client": 20,
        },
        "access",
    )
    assert problems == []
    assert parsed == AccessRule(
        "access",
        allow=(IPv4Network("10.0.0.0/8"), IPv6Network("2001:db8::/32")),
        deny=(IPv4Network("10.9.0.0/16"),),
        max_connections=100,
        max_connections_per_client=10,
        rate_per_client=5.0,
        burst_per_client=20,
    )
    assert isinstance(parsed.rate_per_client, float)
    assert not parsed.empty


def test_parse_access_rule_empty_table_limits_nothing() -> None:
    """An empty table is a rule that lets everything through."""
    parsed, problems = a.parse_access_rule({}, "services.web")
    assert problems == []
    assert parsed == AccessRule("services.web")
    assert parsed.empty
    assert rule(deny=[]).empty


def test_parse_access_rule_bare_addresses_are_single_hosts() -> None:
    """A bare address is a /32 or a /128; surrounding spaces are ignored."""
    parsed = rule(allow=["192.0.2.7", "2001:db8::1", " 198.51.100.0/24 "])
    assert parsed.allow == (
        IPv4Network("192.0.2.7/32"),
        IPv6Network("2001:db8::1/128"),
        IPv4Network("198.51.100.0/24"),
    )


def test_parse_access_rule_mapped_networks_become_ipv4() -> None:
    """A rule written for IPv4-mapped addresses is kept as the IPv4 network it means."""
    parsed = rule(deny=["::ffff:10.0.0.0/104", "::ffff:192.0.2.1", "::ffff:0:0/96"])
    assert parsed.deny == (
        IPv4Network("10.0.0.0/8"),
        IPv4Network("192.0.2.1/32"),
        IPv4Network("0.0.0.0/0"),
    )


@pytest.mark.parametrize(
    ("rate", "burst"), [(5, 5), (2.5, 3), (0.2, 1), (1, 1), (100.0, 100), (0.001, 1)]
)
def test_parse_access_rule_burst_defaults_to_one_second_of_rate(rate: float, burst: int) -> None:
    """Without burst_per_client, a client may open one second's worth at once (at least 1)."""
    assert rule(rate_per_client=rate).burst_per_client == burst


# fmt: off
BAD_VALUES: list[tuple[dict[str, Any], str, str]] = [
    ({"allow": "10.0.0.0/8"}, "allow",
     "expected a list of networks like [\"10.0.0.0/8\"], got str '10.0.0.0/8'"),
    ({"deny": {"a": 1}}, "deny",
     "expected a list of networks like [\"10.0.0.0/8\"], got dict {'a': 1}"),
    ({"allow": []}, "allow", "empty: it would admit every address; leave allow out for that"),
    ({"allow": ["10.0.0.0/8", "10.0.0.1/8"]}, "allow[1]",
     "'10.0.0.1/8' has host bits set: write '10.0.0.0/8' for the network,"
     " or '10.0.0.1' for the one address"),
    ({"deny": ["2001:db8::1/32"]}, "deny[0]",
     "'2001:db8::1/32' has host bits set: write '2001:db8::/32' for the network,"
     " or '2001:db8::1' for the one address"),
    ({"deny": ["10.0.0.0/33"]}, "deny[0]",
     "expected an IPv4 or IPv6 network like '10.0.0.0/8' or '2001:db8::/32', or an address,"
     " got '10.0.0.0/33'"),
    ({"allow": ["example.com"]}, "allow[0]",
     "expected an IPv4 or IPv6 network like '10.0.0.0/8' or '2001:db8::/32', or an address,"
     " got 'example.com'"),
    ({"allow": ["10.0.0.0/8", "::1", ""]}, "allow[2]",
     "expected an IPv4 or IPv6 network like '10.0.0.0/8' or '2001:db8::/32', or an address,"
     " got ''"),
    ({"deny": [167772160]}, "deny[0]",
     'expected a network as a string like "10.0.0.0/8", got int 167772160'),
    ({"deny": [["10.0.0.0/8"]]}, "deny[0]",
     "expected a network as a string like \"10.0.0.0/8\", got list ['10.0.0.0/8']"),
    ({"max_connections": 0}, "max_connections", "expected an integer >= 1, got 0"),
    ({"max_connections": -5}, "max_connections", "expected an integer >= 1, got -5"),
    ({"max_connections": 2.0}, "max_connections", "expected an integer >= 1, got float 2.0"),
    ({"max_connections": "100"}, "max_connections", "expected an integer >= 1, got str '100'"),
    ({"max_connections_per_client": 0}, "max_connections_per_client",
     "expected an integer >= 1, got 0"),
    ({"max_connections_per_client": 1.5}, "max_connections_per_client",
     "expected an integer >= 1, got float 1.5"),
    ({"rate_per_client": 0}, "rate_per_client",
     "expected a number of connections per second > 0, got 0"),
    ({"rate_per_client": -1.5}, "rate_per_client",
     "expected a number of connections per second > 0, got -1.5"),
    ({"rate_per_client": math.inf}, "rate_per_client",
     "expected a number of connections per second > 0, got inf"),
    ({"rate_per_client": math.nan}, "rate_per_client",
     "expected a number of connections per second > 0, got nan"),
    ({"rate_per_client": "5/s"}, "rate_per_client",
     "expected a number of connections per second > 0, got str '5/s'"),
    ({"rate_per_client": 5, "burst_per_client": 0}, "burst_per_client",
     "expected an integer >= 1, got 0"),
    ({"rate_per_client": 5, "burst_per_client": 10**400}, "burst_per_client",
     f"expected at most 1048576, got {10**400}"),
    ({"max_connections": 2**21}, "max_connections", "expected at most 1048576, got 2097152"),
    ({"rate_per_client": 1e300}, "rate_per_client",
     "expected a number in [0.001, 1e+06], got 1e+300"),
    ({"rate_per_client": 1e-320}, "rate_per_client",
     "expected a number in [0.001, 1e+06], got 1e-320"),
    ({"rate_per_client": 5, "burst_per_client": 2.5}, "burst_per_client",
     "expected an integer >= 1, got float 2.5"),
    ({"burst_per_client": 10}, "burst_per_client", "has no effect without rate_per_client"),
    ({"max_conections": 10}, "max_conections", "unknown key"),
]
# fmt: on


@pytest.mark.parametrize(("table", "key", "message"), BAD_VALUES)
def test_parse_access_rule_reports_bad_values_with_key_path(
    table: dict[str, Any], key: str, message: str
) -> None:
    """Each bad value is one problem, at its key path, saying what was expected."""
    assert problems_of(table) == [(f"{W}.{key}", message)]


EXPECTED_NUMBER = {
    "max_connections": "an integer >= 1",
    "max_connections_per_client": "an integer >= 1",
    "rate_per_client": "a number of connections per second > 0",
    "burst_per_client": "an integer >= 1",
}


@pytest.mark.parametrize("key", sorted(EXPECTED_NUMBER))
@pytest.mark.parametrize("value", [True, False])
def test_parse_access_rule_rejects_bools_as_numbers(key: str, value: bool) -> None:
    """true is not 1: a bool given for a number is a problem."""
    table: dict[str, Any] = {key: value}
    if key == "burst_per_client":
        table["rate_per_client"] = 1
    assert problems_of(table) == [
        (f"{W}.{key}", f"expected {EXPECTED_NUMBER[key]}, got bool {value}")
    ]


def test_parse_access_rule_rejects_a_table_that_is_not_one() -> None:
    """[access] written as a list or a string is reported at the table's own path."""
    assert problems_of(["10.0.0.0/8"], "access") == [
        ("access", "expected a table, got list ['10.0.0.0/8']")
    ]
    parsed, problems = a.parse_access_rule("x" * 200, "services.web")
    assert parsed == AccessRule("services.web")
    assert problems == [("services.web", f"expected a table, got str '{'x' * 56}...")]


def test_parse_access_rule_reports_every_problem_and_keeps_the_rest() -> None:
    """All problems come at once, in table order; the good values are still read."""
    parsed, problems = a.parse_access_rule(
        {
            "allow": ["10.0.0.0/8", "bad", "192.0.2.1/24", "2001:db8::/32"],
            "deny": ["192.0.2.0/24"],
            "max_connections": True,
            "max_connections_per_client": 3,
            "colour": "blue",
            "rate_per_client": -1,
            "burst_per_client": 4,
        },
        "agents[site-a].access",
    )
    assert [key for key, _ in problems] == [
        "agents[site-a].access.colour",
        "agents[site-a].access.allow[1]",
        "agents[site-a].access.allow[2]",
        "agents[site-a].access.max_connections",
        "agents[site-a].access.rate_per_client",
    ]
    assert parsed == AccessRule(
        "agents[site-a].access",
        allow=(IPv4Network("10.0.0.0/8"), IPv6Network("2001:db8::/32")),
        deny=(IPv4Network("192.0.2.0/24"),),
        max_connections_per_client=3,
    )


def test_access_keys_are_the_documented_ones() -> None:
    """The keys a rule table may hold."""
    assert {
        "allow",
        "deny",
        "max_connections",
        "max_connections_per_client",
        "rate_per_client",
        "burst_per_client",
    } == a.ACCESS_KEYS


toml_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["10.0.0.0/8", "::1", "10.0.0.1/8", "::ffff:1.2.3.4", "0.0.0.0/0"])
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@given(
    st.dictionaries(
        st.sampled_from([*sorted(a.ACCESS_KEYS), "other"]) | st.text(max_size=8), toml_values
    )
    | toml_values
)
def test_parse_access_rule_never_raises(table: Any) -> None:
    """Whatever the file holds, parsing returns a rule and problems under the table's path."""
    parsed, problems = a.parse_access_rule(table, "access")
    assert isinstance(parsed, AccessRule)
    assert all(key == "access" or key.startswith("access.") for key, _ in problems)
    if not problems:
        Gate(parsed).check(ip("10.0.0.1"), 0.0)


# --- addresses --------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("10.0.0.1", IPv4Address("10.0.0.1")),
        ("::1", IPv6Address("::1")),
        ("2001:db8::5", IPv6Address("2001:db8::5")),
        ("::ffff:10.0.0.1", IPv4Address("10.0.0.1")),
        ("::ffff:a00:1", IPv4Address("10.0.0.1")),
        ("::a00:1", IPv6Address("::a00:1")),  # IPv4-compatible, not mapped: stays IPv6
        ("fe80::1%eth0", IPv6Address("fe80::1%eth0")),
    ],
)
def test_client_ip_parses_and_normalises(host: str, expected: a.ClientIP) -> None:
    """Host strings become addresses; IPv4-mapped IPv6 ones become IPv4."""
    assert client_ip(host) == expected


@pytest.mark.parametrize("host", ["", "example.com", "10.0.0.256", "[::1]", "10.0.0.0/8", "::g"])
def test_client_ip_returns_none_for_what_is_no_address(host: str) -> None:
    """Anything but a plain address is None, never an exception."""
    assert client_ip(host) is None


def test_refusal_names_reason_and_rule() -> None:
    """A refusal reads as its reason, then where the rule is configured."""
    refusal = Refusal("agents[site-a].services.web", "deny 10.0.0.0/8")
    assert str(refusal) == "deny 10.0.0.0/8 (agents[site-a].services.web)"


# --- allow and deny ---------------------------------------------------------


def test_gate_deny_is_checked_before_allow() -> None:
    """A client in both deny and allow is refused; one in neither is not in allow."""
    g = gate(allow=["10.0.0.0/8", "2001:db8::/32"], deny=["10.1.0.0/16", "2001:db8:bad::/48"])
    assert g.check(ip("10.1.2.3"), 0.0) == "deny 10.1.0.0/16"
    assert g.check(ip("10.2.0.1"), 0.0) is None
    assert g.check(ip("11.0.0.1"), 0.0) == "not in allow"
    assert g.check(ip("2001:db8:bad::1"), 0.0) == "deny 2001:db8:bad::/48"
    assert g.check(ip("2001:db8:600d::1"), 0.0) is None
    assert g.check(ip("2001:db9::1"), 0.0) == "not in allow"


def test_gate_deny_names_the_broadest_network() -> None:
    """When several denied networks hold the client, the refusal names the broadest."""
    g = gate(deny=["10.1.2.3", "10.1.0.0/16", "10.0.0.0/8"])
    assert g.check(ip("10.1.2.3"), 0.0) == "deny 10.0.0.0/8"


def test_gate_matches_mapped_clients_against_ipv4_rules() -> None:
    """A gateway on :: sees IPv4 clients as ::ffff:a.b.c.d; IPv4 rules still apply to them."""
    g = gate(allow=["192.0.2.0/24"], deny=["192.0.2.66"])
    assert g.check(ip("::ffff:192.0.2.1"), 0.0) is None
    assert g.check(ip("::ffff:192.0.2.66"), 0.0) == "deny 192.0.2.66/32"
    assert g.check(ip("::ffff:198.51.100.1"), 0.0) == "not in allow"
    mapped = client_ip("::ffff:192.0.2.66")
    assert mapped is not None
    assert g.check(mapped, 0.0) == "deny 192.0.2.66/32"


def test_gate_ipv4_networks_never_match_ipv6_clients() -> None:
    """0.0.0.0/0 is every IPv4 client and no IPv6 one, and ::/0 the reverse."""
    v4 = gate(deny=["0.0.0.0/0"])
    assert v4.check(ip("::a00:1"), 0.0) is None
    assert v4.check(ip("::1"), 0.0) is None
    assert v4.check(ip("10.0.0.1"), 0.0) == "deny 0.0.0.0/0"
    v6 = gate(deny=["::/0"])
    assert v6.check(ip("::ffff:10.0.0.1"), 0.0) is None
    assert v6.check(ip("10.0.0.1"), 0.0) is None
    assert v6.check(ip("::1"), 0.0) == "deny ::/0"
    only_v6 = gate(allow=["::/0"])
    assert only_v6.check(ip("10.0.0.1"), 0.0) == "not in allow"


def test_gate_matches_long_lists() -> None:
    """A list of thousands of networks matches like a short one."""
    nets = [f"10.{i >> 8}.{i & 255}.0/24" for i in range(0, 5000, 2)]
    g = gate(deny=[*nets, "2001:db8::/64"], allow=["10.0.0.0/8", "2001:db8::/32"])
    assert g.check(ip("10.0.0.1"), 0.0) == "deny 10.0.0.0/24"
    assert g.check(ip("10.0.1.1"), 0.0) is None
    assert g.check(ip("10.19.134.9"), 0.0) == "deny 10.19.134.0/24"
    assert g.check(ip("10.19.135.9"), 0.0) is None
    assert g.check(ip("2001:db8::77"), 0.0) == "deny 2001:db8::/64"
    assert g.check(ip("2001:db8:1::77"), 0.0) is None


def test_gate_built_from_a_hand_made_rule_normalises_mapped_networks() -> None:
    """A rule built in code with mapped networks matches like its IPv4 form."""
    g = Gate(AccessRule("x", deny=(ip_network("::ffff:10.0.0.0/104"),)))
    assert g.check(ip("10.1.1.1"), 0.0) == "deny 10.0.0.0/8"


# --- limits -----------------------------------------------------------------


def test_gate_empty_rule_admits_and_still_counts() -> None:
    """A rule without lists or limits refuses nothing, yet counts for a later reload."""
    g = Gate(AccessRule("access"))
    for _ in range(3):
        assert admit([g], ip("10.0.0.1"), 0.0) is None
    assert g.statistics() == GateStatistics(3, 1, 0)


def test_gate_max_connections_caps_all_clients_together() -> None:
    """The Nth+1 concurrent connection is refused, whoever opens it; a release makes room."""
    g = gate(max_connections=2)
    assert admit([g], ip("10.0.0.1"), 0.0) is None
    assert admit([g], ip("10.0.0.2"), 0.0) is None
    assert admit([g], ip("10.0.0.3"), 0.0) == Refusal(W, "max_connections 2 reached")
    g.release(ip("10.0.0.1"))
    assert admit([g], ip("10.0.0.3"), 0.0) is None
    assert g.statistics() == GateStatistics(2, 2, 0)


def test_gate_max_connections_per_client_caps_each_address() -> None:
    """One address may hold so many connections; another address is not affected."""
    g = gate(max_connections_per_client=2)
    client, other = ip("2001:db8::1"), ip("2001:db8::2")
    assert admit([g], client, 0.0) is None
    assert admit([g], client, 0.0) is None
    refusal = admit([g], client, 0.0)
    assert refusal == Refusal(W, "max_connections_per_client 2 reached")
    assert str(refusal) == f"max_connections_per_client 2 reached ({W})"
    assert admit([g], other, 0.0) is None
    g.release(client)
    assert admit([g], client, 0.0) is None


def test_gate_mapped_and_plain_forms_are_one_client() -> None:
    """10.0.0.1 and ::ffff:10.0.0.1 share one per-client count."""
    g = gate(max_connections_per_client=1)
    assert admit([g], ip("::ffff:10.0.0.1"), 0.0) is None
    assert admit([g], ip("10.0.0.1"), 0.0) == Refusal(W, "max_connections_per_client 1 reached")
    g.release(ip("10.0.0.1"))
    assert g.statistics() == EMPTY


def test_gate_rate_per_client_refills_over_time() -> None:
    """burst_per_client at once, then one more per 1/rate seconds, never more than burst."""
    g = gate(rate_per_client=2, burst_per_client=3)
    client = ip("10.0.0.1")
    for _ in range(3):
        assert admit([g], client, 100.0) is None
    assert admit([g], client, 100.0) == Refusal(W, "rate_per_client 2/s exceeded")
    assert admit([g], client, 100.49) is not None
    assert admit([g], client, 100.5) is None
    assert admit([g], client, 100.5) is not None
    assert admit([g], client, 101.0) is None
    assert admit([g], ip("10.0.0.2"), 101.0) is None  # another client has its own bucket
    # Long idle: a full bucket again, and no more than full.
    admitted = sum(admit([g], client, 1000.0) is None for _ in range(10))
    assert admitted == 3


def test_gate_rate_below_one_per_second() -> None:
    """rate_per_client 0.5 with the default burst: one connection, then one every 2 s."""
    g = gate(rate_per_client=0.5)
    client = ip("192.0.2.1")
    assert admit([g], client, 0.0) is None
    assert admit([g], client, 1.999) == Refusal(W, "rate_per_client 0.5/s exceeded")
    assert admit([g], client, 2.0) is None
    assert admit([g], client, 2.0) is not None


@pytest.mark.parametrize("start", [0.0, 1e4, 1e9])
@pytest.mark.parametrize("burst", [1, 3])
def test_gate_rate_counts_exactly_over_many_periods(start: float, burst: int) -> None:
    """Rounding never costs a client its token: 1/rate apart is always allowed."""
    g = gate(rate_per_client=10, burst_per_client=burst)
    client = ip("192.0.2.1")
    for _ in range(burst - 1):
        assert admit([g], client, start) is None
    for step in range(10_000):
        now = start + step / 10
        assert admit([g], client, now) is None, now
        assert admit([g], client, now) is not None
        g.release(client)


def test_gate_refused_attempts_take_no_token() -> None:
    """A client hammering while limited gets its next token on time, not later."""
    g = gate(rate_per_client=1, burst_per_client=1)
    client = ip("10.0.0.1")
    assert admit([g], client, 0.0) is None
    for step in range(1, 100):
        assert admit([g], client, step / 100) is not None
    assert admit([g], client, 1.0) is None


def test_gate_check_changes_nothing() -> None:
    """check only answers; acquire counts and takes a token."""
    g = gate(max_connections=1, rate_per_client=1)
    client = ip("10.0.0.1")
    for _ in range(5):
        assert g.check(client, 0.0) is None
    assert g.statistics() == EMPTY
    g.acquire(client, 0.0)
    assert g.statistics() == GateStatistics(1, 1, 1)
    assert g.check(client, 0.0) == "max_connections 1 reached"


def test_gate_release_of_an_address_not_counted_is_ignored() -> None:
    """An extra release neither raises nor drives a count below zero."""
    g = gate(max_connections=1, max_connections_per_client=1)
    g.release(ip("10.0.0.1"))
    assert g.statistics() == EMPTY
    g.acquire(ip("10.0.0.1"), 0.0)
    g.release(ip("10.0.0.2"))
    g.release(ip("10.0.0.1"))
    g.release(ip("10.0.0.1"))
    assert g.statistics() == EMPTY
    assert admit([g], ip("10.0.0.1"), 0.0) is None
    assert admit([g], ip("10.0.0.3"), 0.0) == Refusal(W, "max_connections 1 reached")


def test_admit_is_all_or_nothing_across_gates() -> None:
    """A refusal by the third gate leaves the first two as they were, tokens included."""
    everywhere = Gate(AccessRule("access", max_connections=100, rate_per_client=1.0))
    service = Gate(AccessRule("services.web", max_connections_per_client=5, rate_per_client=1.0))
    agent = Gate(AccessRule("agents[site-a].access", deny=(ip_network("10.9.0.0/16"),)))
    gates = [everywhere, service, agent]
    assert admit(gates, ip("10.1.0.1"), 0.0) is None
    before = [g.statistics() for g in gates]
    refusal = admit(gates, ip("10.9.0.1"), 0.0)
    assert refusal == Refusal("agents[site-a].access", "deny 10.9.0.0/16")
    assert str(refusal) == "deny 10.9.0.0/16 (agents[site-a].access)"
    assert [g.statistics() for g in gates] == before
    # The refused client's bucket was not touched: its first admitted connection is on time.
    agent.rule = AccessRule("agents[site-a].access")
    assert admit(gates, ip("10.9.0.1"), 0.0) is None


def test_admit_reports_the_first_gate_that_refuses() -> None:
    """Gates are checked in order, so the outermost refusing rule is named."""
    first = Gate(AccessRule("access", deny=(ip_network("10.0.0.0/8"),)))
    second = Gate(AccessRule("services.web", allow=(ip_network("192.0.2.0/24"),)))
    assert admit([first, second], ip("10.0.0.1"), 0.0) == Refusal("access", "deny 10.0.0.0/8")
    assert admit([second, first], ip("10.0.0.1"), 0.0) == Refusal("services.web", "not in allow")
    assert admit([], ip("10.0.0.1"), 0.0) is None


def test_admit_normalises_mapped_addresses() -> None:
    """Connections admitted as ::ffff:a.b.c.d are released as a.b.c.d, and vice versa."""
    g = gate(max_connections_per_client=3)
    assert admit([g], ip("::ffff:10.0.0.1"), 0.0) is None
    g.acquire(ip("10.0.0.1"), 0.0)
    assert g.statistics() == GateStatistics(2, 1, 0)
    g.release(ip("10.0.0.1"))
    g.release(ip("::ffff:10.0.0.1"))
    assert g.statistics() == EMPTY


# --- reload -----------------------------------------------------------------


def test_gate_rule_replacement_keeps_counters() -> None:
    """A reload keeps the open connections counted: new limits see them, releases work."""
    g = gate(max_connections=10)
    client = ip("10.0.0.1")
    for _ in range(3):
        assert admit([g], client, 0.0) is None
    g.rule = rule(max_connections=3)
    assert g.rule.max_connections == 3
    assert admit([g], ip("10.0.0.2"), 0.0) == Refusal(W, "max_connections 3 reached")
    g.rule = AccessRule(W)  # no limits at all
    assert g.statistics() == GateStatistics(3, 1, 0)
    g.rule = rule(max_connections_per_client=3)
    assert admit([g], client, 0.0) == Refusal(W, "max_connections_per_client 3 reached")
    for _ in range(3):
        g.release(client)
    assert g.statistics() == EMPTY
    assert admit([g], client, 0.0) is None


def test_gate_rule_replacement_keeps_buckets_unless_the_rate_changes() -> None:
    """Buckets go on through a reload of other settings, and start full under a new rate."""
    g = gate(rate_per_client=1, burst_per_client=1)
    client = ip("10.0.0.1")
    assert admit([g], client, 0.0) is None
    g.rule = rule(rate_per_client=1, burst_per_client=1, deny=["192.0.2.0/24"])
    assert admit([g], client, 0.5) == Refusal(W, "rate_per_client 1/s exceeded")
    g.rule = rule(rate_per_client=1, burst_per_client=2)
    assert g.statistics().buckets == 0
    assert admit([g], client, 0.5) is None
    g.rule = AccessRule(W)
    assert g.statistics().buckets == 0


# --- memory -----------------------------------------------------------------


def addresses(count: int, base: str = "10.0.0.0") -> list[a.ClientIP]:
    start = int(ip_address(base))
    return [ip_address(start + i) for i in range(count)]


def test_gate_forgets_clients_when_their_connections_end() -> None:
    """100k distinct clients come and go: no per-client entry is left behind."""
    g = gate(max_connections=1_000, max_connections_per_client=2)
    clients = addresses(100_000)
    for i, client in enumerate(clients):
        assert admit([g], client, 0.0) is None
        if i >= 500:
            g.release(clients[i - 500])
    assert g.statistics() == GateStatistics(500, 500, 0)
    for client in clients[-500:]:
        g.release(client)
    assert g.statistics() == EMPTY


def test_gate_drops_refilled_buckets_under_a_flood() -> None:
    """100k distinct clients, 1 ms apart, with buckets full after 0.1 s: the table stays small."""
    g = gate(rate_per_client=10, burst_per_client=1)
    largest = 0
    for i, client in enumerate(addresses(100_000, "2001:db8::")):
        assert admit([g], client, i / 1000) is None
        g.release(client)
        largest = max(largest, g.statistics().buckets)
    assert largest <= a.BUCKETS_PRUNE_MIN
    assert g.statistics().clients == 0


def test_gate_bucket_table_is_capped_and_keeps_the_most_limited_clients() -> None:
    """100k new clients at once cannot grow the table past its cap; a busy client stays limited."""
    g = gate(rate_per_client=1, burst_per_client=5)
    busy = ip("192.0.2.1")
    for _ in range(5):
        assert admit([g], busy, 0.0) is None
    assert admit([g], busy, 0.0) is not None
    largest = 0
    for client in addresses(100_000):
        assert admit([g], client, 0.0) is None
        g.release(client)
        largest = max(largest, g.statistics().buckets)
    assert largest <= a.MAX_CLIENT_BUCKETS
    assert admit([g], busy, 0.0) == Refusal(W, "rate_per_client 1/s exceeded")


# --- properties -------------------------------------------------------------

POOL = ["10.0.0.1", "::ffff:10.0.0.1", "10.0.0.2", "2001:db8::1", "2001:db8::2", "192.0.2.9"]

operations = st.lists(
    st.tuples(st.sampled_from(["admit", "acquire", "release"]), st.sampled_from(POOL)),
    max_size=60,
)
limits = st.fixed_dictionaries(
    {},
    optional={
        "max_connections": st.integers(1, 6),
        "max_connections_per_client": st.integers(1, 3),
        "rate_per_client": st.sampled_from([0.5, 1, 3, 100]),
        "deny": st.just(["2001:db8::2"]),
        "allow": st.just(["10.0.0.0/8", "2001:db8::/32"]),
    },
)


@given(limits, operations)
def test_gate_counts_never_go_negative_and_end_empty(settings_: dict[str, Any], ops: Any) -> None:
    """Admits, acquires and releases in any order keep exact counts; releasing all empties it."""
    g = Gate(rule(**settings_))
    model: dict[a.ClientIP, int] = {}
    for step, (op, host) in enumerate(ops):
        client = client_ip(host)
        assert client is not None
        now = step * 0.1
        if op == "admit":
            if admit([g], client, now) is None:
                model[client] = model.get(client, 0) + 1
        elif op == "acquire":
            g.acquire(client, now)
            model[client] = model.get(client, 0) + 1
        elif model.get(client):
            g.release(client)
            model[client] -= 1
        else:
            g.release(client)
        stats = g.statistics()
        assert stats.connections == sum(model.values()) >= 0
        assert stats.clients == sum(1 for n in model.values() if n)
    for client, count in model.items():
        for _ in range(count + 1):
            g.release(client)
    assert g.statistics().connections == 0
    assert g.statistics().clients == 0


@given(limits, operations)
def test_admit_never_exceeds_the_limits(settings_: dict[str, Any], ops: Any) -> None:
    """Through admit alone, no limit is ever passed, whatever the order of events."""
    g = Gate(rule(**settings_))
    per_client = settings_.get("max_connections_per_client", 1_000)
    for step, (op, host) in enumerate(ops):
        client = client_ip(host)
        assert client is not None
        if op == "release":
            g.release(client)
        else:
            admit([g], client, step * 0.1)
        stats = g.statistics()
        assert stats.connections <= settings_.get("max_connections", math.inf)
        assert stats.connections <= stats.clients * per_client


@given(
    st.floats(0.1, 50),
    st.integers(1, 10),
    st.lists(st.floats(0, 20, allow_nan=False), min_size=1, max_size=80),
)
def test_gate_rate_admits_at_most_burst_plus_rate_times_window(
    rate: float, burst: int, times: list[float]
) -> None:
    """In any window of w seconds, one client gets at most burst + rate * w connections."""
    g = gate(rate_per_client=rate, burst_per_client=burst)
    client = ip("10.0.0.1")
    admitted = [t for t in sorted(times) if admit([g], client, t) is None]
    assert admitted  # the first attempt always finds a full bucket
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            window = admitted[j] - start
            assert j - i + 1 <= burst + rate * window + 1e-6


v4_networks = st.builds(
    lambda address, length: ip_network((address, length), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
v6_networks = st.builds(
    lambda address, length: ip_network((address, length), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
network_lists = st.lists(v4_networks | v6_networks, max_size=80).filter(
    lambda nets: not any(isinstance(n, IPv6Network) and n.network_address.ipv4_mapped for n in nets)
)


def inside(network: a.Network, offset: int) -> a.ClientIP:
    return ip_address(int(network.network_address) + offset % network.num_addresses)


@settings(max_examples=300)
@given(network_lists, st.data())
def test_gate_matching_agrees_with_ipaddress(nets: list[a.Network], data: st.DataObject) -> None:
    """Deny and allow match exactly the addresses ipaddress says a listed network holds."""
    deny = Gate(AccessRule("x", deny=tuple(nets)))
    allow = Gate(AccessRule("x", allow=tuple(nets)))
    candidates = [
        ip_address(data.draw(st.integers(0, 2**32 - 1))),
        ip_address(data.draw(st.integers(0, 2**128 - 1))),
    ]
    if nets:
        network = data.draw(st.sampled_from(nets))
        candidates.append(inside(network, data.draw(st.integers(0, 2**128))))
    for client in candidates:
        if isinstance(client, IPv6Address) and client.ipv4_mapped is not None:
            continue  # normalised to IPv4 by the gate, covered by the mapped-address tests
        holding = [n for n in nets if n.version == client.version and client in n]
        if holding:
            broadest = min(n.prefixlen for n in holding)
            reason = deny.check(client, 0.0)
            assert reason is not None
            named = ip_network(reason.removeprefix("deny "))
            assert named in holding
            assert named.prefixlen == broadest
            assert allow.check(client, 0.0) is None
        else:
            assert deny.check(client, 0.0) is None
            if nets:
                assert allow.check(client, 0.0) == "not in allow"
