"""Who may come in (``gateway/admission.py``), decided without I/O: failed
authentications and their delays, handshakes under way, and the access rules
a client of a service must pass. Time is passed in; no socket, no loop."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

import pytest
from kit.logs import recording
from kit.tokens import OTHER_TOKEN, TOKEN

from tunnelgate.access import Refusal
from tunnelgate.config import GatewayConfig, load_gateway_config
from tunnelgate.gateway import admission
from tunnelgate.gateway.admission import (
    AUTH_DELAY_FIRST,
    AUTH_DELAY_MAX,
    AUTH_FORGET,
    AUTH_SUSPECT,
    AUTH_SUSPECT_HANDSHAKES,
    WARNING_INTERVAL,
    AuthFailures,
    ClientGates,
    Handshakes,
)

pytestmark = pytest.mark.timeout(30)

HOST, OTHER_HOST = "192.0.2.7", "198.51.100.9"


# --- failed authentications ---------------------------------------------------------


def test_auth_failures_delay_doubles_per_address_up_to_the_maximum() -> None:
    """Each failure from one address is answered later than the one before
    (0.1 s, doubling) up to AUTH_DELAY_MAX; another address starts afresh."""
    failures = AuthFailures()
    answers = [failures.failed(HOST, 100.0 + n) for n in range(10)]
    assert [count for count, _ in answers] == list(range(1, 11))
    delays = [delay for _, delay in answers]
    assert delays[:4] == pytest.approx([AUTH_DELAY_FIRST * 2**n for n in range(4)])
    assert delays[-1] == AUTH_DELAY_MAX
    assert delays == sorted(delays)
    assert failures.failed(OTHER_HOST, 110.0) == (1, AUTH_DELAY_FIRST)


def test_auth_failures_forgotten_after_a_quiet_while_not_after_a_success() -> None:
    """An address's failures count until AUTH_FORGET passes without another
    one; then its next failure is a first one again."""
    failures = AuthFailures()
    for n in range(3):
        failures.failed(HOST, 10.0 * n)
    last = 20.0
    assert failures.count(HOST, last + AUTH_FORGET - 1) == 3
    assert failures.count(HOST, last + AUTH_FORGET) == 0
    assert failures.failed(HOST, last + AUTH_FORGET) == (1, AUTH_DELAY_FIRST)


def test_auth_failures_remember_a_bounded_number_of_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past AUTH_TRACKED addresses the one that failed longest ago is forgotten
    first; an address failing again counts as recent."""
    monkeypatch.setattr(admission, "AUTH_TRACKED", 3)
    failures = AuthFailures()
    for number, host in enumerate(["10.0.0.1", "10.0.0.2", "10.0.0.3"]):
        failures.failed(host, float(number))
    failures.failed("10.0.0.1", 3.0)  # now the most recent
    failures.failed("10.0.0.4", 4.0)  # one too many: 10.0.0.2 goes
    counts = {host: failures.count(host, 5.0) for host in ["10.0.0.1", "10.0.0.2", "10.0.0.3"]}
    assert counts == {"10.0.0.1": 2, "10.0.0.2": 0, "10.0.0.3": 1}


# --- handshakes under way ----------------------------------------------------------------


def test_handshakes_limit_how_many_run_at_once() -> None:
    """Up to max_handshakes run at once; the next is refused with the reason,
    and may start once one ends."""
    handshakes = Handshakes(AuthFailures())
    for n in range(3):
        assert handshakes.refusal(f"10.0.0.{n}", 0.0, max_handshakes=3) is None
        handshakes.begin(f"10.0.0.{n}")
    refusal = handshakes.refusal(HOST, 0.0, max_handshakes=3)
    assert refusal == "3 connections are in handshake (max_handshakes)"
    handshakes.end("10.0.0.1")
    assert handshakes.refusal(HOST, 0.0, max_handshakes=3) is None
    assert (handshakes.running, dict(handshakes.by_host)) == (2, {"10.0.0.0": 1, "10.0.0.2": 1})


def test_handshakes_an_address_that_keeps_failing_gets_few_at_once() -> None:
    """After AUTH_SUSPECT failures an address may hold only
    AUTH_SUSPECT_HANDSHAKES handshakes at once; other addresses are not held back."""
    failures = AuthFailures()
    handshakes = Handshakes(failures)
    for _ in range(AUTH_SUSPECT_HANDSHAKES):
        handshakes.begin(HOST)
    assert handshakes.refusal(HOST, 1.0, max_handshakes=1000) is None  # no failure yet
    for _ in range(AUTH_SUSPECT):
        failures.failed(HOST, 1.0)
    refusal = handshakes.refusal(HOST, 1.0, max_handshakes=1000)
    assert refusal == (
        f"it failed to authenticate repeatedly and has {AUTH_SUSPECT_HANDSHAKES} handshakes open"
    )
    assert handshakes.refusal(OTHER_HOST, 1.0, max_handshakes=1000) is None
    handshakes.end(HOST)
    assert handshakes.refusal(HOST, 1.0, max_handshakes=1000) is None
    assert handshakes.refusal(HOST, 1.0 + AUTH_FORGET, max_handshakes=1000) is None


# --- access rules of services ------------------------------------------------------------


def gateway_config(tmp_path: Path, *, max_connections: int = 100) -> GatewayConfig:
    """A gateway with an access rule at each of the four places one can be."""
    config, _ = load_gateway_config(
        None,
        {
            "state_dir": str(tmp_path),
            "access": {"deny": ["10.0.0.0/8"], "max_connections": max_connections},
            "services": {"web": {"allow": ["127.0.0.0/8"]}},
            "agents": [
                {
                    "name": "site-a",
                    "token": TOKEN,
                    "access": {"max_connections_per_client": 4},
                    "services": {"web": {"rate_per_client": 10}},
                },
                {"name": "site-b", "token": OTHER_TOKEN},
            ],
        },
    )
    return config


def policy_of(config: GatewayConfig, name: str) -> Any:
    (policy,) = [p for p in config.agents if p.name == name]
    return policy


def test_client_gates_are_every_rule_that_covers_the_service_broadest_first(
    tmp_path: Path,
) -> None:
    """A client of a service passes the gateway's [access], the service's own
    table, its agent's [access] and the agent's table for the service, in
    that order; a rule that is not configured adds no gate."""
    config = gateway_config(tmp_path)
    gates = ClientGates()
    site_a = policy_of(config, "site-a")
    assert [g.rule.where for g in gates.gates_for(config, site_a, "web")] == [
        "access",
        "services.web",
        "agents[site-a].access",
        "agents[site-a].services.web",
    ]
    assert [g.rule.where for g in gates.gates_for(config, site_a, "mail")] == [
        "access",
        "agents[site-a].access",
    ]
    site_b = policy_of(config, "site-b")
    assert [g.rule.where for g in gates.gates_for(config, site_b, "mail")] == ["access"]


def test_client_gates_share_one_gate_per_rule_and_keep_its_counts_across_a_reload(
    tmp_path: Path,
) -> None:
    """Every service a rule covers shares its counters; after a reload the
    same gate enforces the new rule, still counting the connections it
    admitted before."""
    config = gateway_config(tmp_path, max_connections=2)
    gates = ClientGates()
    site_a, site_b = policy_of(config, "site-a"), policy_of(config, "site-b")
    shared = gates.gates_for(config, site_a, "web")[0]
    assert gates.gates_for(config, site_b, "mail")[0] is shared
    client = ipaddress.ip_address("127.0.0.1")
    for _ in range(2):
        assert shared.check(client, 0.0) is None
        shared.acquire(client, 0.0)
    assert shared.check(client, 0.0) == "max_connections 2 reached"

    reloaded = gateway_config(tmp_path, max_connections=3)
    again = gates.gates_for(reloaded, policy_of(reloaded, "site-a"), "web")[0]
    assert again is shared
    assert again.rule.max_connections == 3
    assert again.statistics().connections == 2
    assert again.check(client, 0.0) is None


def test_client_gates_warn_once_per_interval_and_rule_with_a_count(tmp_path: Path) -> None:
    """Under a flood of refusals each rule's warning is logged once per
    WARNING_INTERVAL, the next one saying how many were left out; another
    rule's refusals are logged on their own."""
    gates = ClientGates()
    log = logging.getLogger("tunnelgate.test")
    denied = Refusal("access", "deny 10.0.0.0/8")
    full = Refusal("agents[site-a].access", "max_connections_per_client 4 reached")
    with recording("tunnelgate", logging.WARNING) as recorder:
        for step in range(10):  # 10 refusals over 1.8 s
            gates.warn_refused(log, step * 0.2, "web", f"10.0.0.{step}:5000", denied)
        gates.warn_refused(log, 1.0, "web", "127.0.0.1:5000", full)
        gates.warn_refused(log, WARNING_INTERVAL, "web", "10.0.0.99:5000", denied)
    assert recorder.messages(logging.WARNING) == [
        "refused client 10.0.0.0:5000 on service web: deny 10.0.0.0/8 (access)",
        "refused client 127.0.0.1:5000 on service web: max_connections_per_client 4 reached "
        "(agents[site-a].access)",
        "refused client 10.0.0.99:5000 on service web: deny 10.0.0.0/8 (access) "
        "(and 9 more times since the last report)",
    ]
