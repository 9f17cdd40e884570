"""The tables of ``tunnelgate status``, rendered without a network: sizes and ages as a
person reads them, aligned columns, "(none)" for an empty table, and views that have
fewer or more fields than the columns know."""

from __future__ import annotations

import pytest

from tunnelgate.status import admin_url, format_age, format_size, render

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("size", "shown"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1258291, "1.2 MiB"),
     (1024**2 - 1, "1.0 MiB"), (5 * 1024**3, "5.0 GiB"), (3 * 1024**5, "3.0 PiB")],
)  # fmt: skip
def test_format_size_reads_like_a_person_writes(size: int, shown: str) -> None:
    """Bytes in binary units with one decimal."""
    assert format_size(size) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (0.9, "0s"), (45, "45s"), (192.5, "3m12s"), (3600, "1h00m"),
     (7500, "2h05m"), (3 * 86400 + 4 * 3600 + 59, "3d04h"), (-5, "0s")],
)  # fmt: skip
def test_format_age_reads_like_a_person_writes(seconds: float, shown: str) -> None:
    """Seconds, minutes, hours, days: the two largest units."""
    assert format_age(seconds) == shown


def test_admin_url_takes_host_and_port_or_a_url() -> None:
    """``HOST:PORT`` becomes http://HOST:PORT/; a path keeps its prefix; other schemes fail."""
    assert admin_url("127.0.0.1:9090") == "http://127.0.0.1:9090/"
    assert admin_url("https://gw.example:9090/tunnel") == "https://gw.example:9090/tunnel/"
    assert admin_url("http://[::1]:9090/") == "http://[::1]:9090/"
    with pytest.raises(ValueError, match="not an http"):
        admin_url("ftp://gw.example/")


def test_render_gateway_aligns_columns_and_says_none() -> None:
    """Columns line up whatever the width of a cell; an empty table says (none)."""
    info = {
        "side": "gateway",
        "version": "1.0",
        "address": "0.0.0.0:8080",
        "uptime": 75.0,
        "tls": True,
        "fingerprint": "SHA256:AB",
        "auth_failures": {"token": 2, "timeout": 0},
    }
    agents = [
        {"name": "a", "online": True, "address": "10.0.0.1:5000", "connected_at": NOW - 30,
         "last_seen": NOW - 1, "services": ["web", "db"], "connections": 12, "up": 2048,
         "down": 10},
        {"name": "long-name", "online": False, "address": None, "connected_at": None,
         "last_seen": NOW - 4000, "services": [], "connections": 0, "up": 0, "down": 0},
    ]  # fmt: skip
    page = render(info, {"agents": agents, "services": [], "connections": []}, NOW)
    lines = page.splitlines()
    assert lines[0] == "gateway 1.0 listening on 0.0.0.0:8080, up 1m15s"
    assert "certificate fingerprint: SHA256:AB" in lines
    assert "authentication failures: token=2" in lines
    table = lines[lines.index("agents (2):") + 1 : lines.index("agents (2):") + 4]
    assert table == [
        "  NAME       STATE    ADDRESS        CONNECTED  LAST SEEN  SERVICES  CONNS       UP  DOWN",
        "  a          online   10.0.0.1:5000  30s        1s         web,db       12  2.0 KiB  10 B",
        "  long-name  offline  -              -          1h06m      -             0      0 B   0 B",
    ]  # fmt: skip
    assert page.endswith("services (0):\n  (none)\n\nconnections (0):\n  (none)")


def test_render_agent_shows_the_fields_it_knows_and_only_those() -> None:
    """A column appears when some row has its field; a field no column knows is left out."""
    info = {"side": "agent", "version": "1.0", "name": "site-a", "gateway": "gw:8080"}
    sessions = [{"id": "ab12", "gateway": "gw:8080", "age": 5.0, "mystery": "xyz",
                 "pool": {"idle": 2, "serving": 1}}]  # fmt: skip
    services = [{"name": "web", "public": "0.0.0.0:3920", "local": "127.0.0.1:80", "up": 5}]
    gateways = [{"gateway": "gw:8080", "state": "serving", "sessions": 3, "rtt": 0.0012,
                 "reconnects": {"closed": 2, "refused": 0}, "last_seen": NOW}]  # fmt: skip
    page = render(info, {"gateways": gateways, "sessions": sessions, "services": services}, NOW)
    assert page.splitlines() == [
        "agent site-a (1.0), gateway gw:8080",
        "",
        "gateways (1):",
        "  GATEWAY  STATE    CONNECTS  RECONNECTS  RTT     LAST SEEN",
        "  gw:8080  serving         3  closed=2    1.2 ms  0s",
        "",
        "sessions (1):",
        "  ID    GATEWAY  AGE  POOL",
        "  ab12  gw:8080  5s   idle=2 serving=1",
        "",
        "services (1):",
        "  NAME  PUBLIC        LOCAL          UP",
        "  web   0.0.0.0:3920  127.0.0.1:80  5 B",
    ]


def test_render_agent_with_several_gateways_shows_each_and_why_one_refused() -> None:
    gateways = [
        {"gateway": "a:1", "state": "serving", "sessions": 1, "reconnects": {"closed": 0}},
        {"gateway": "b:2", "state": "refused", "refused": "authentication failed: token",
         "sessions": 0, "reconnects": {"refused": 1}},
    ]  # fmt: skip
    info = {"side": "agent", "version": "1.0", "name": "site-a", "gateway": "a:1",
            "gateways": gateways}  # fmt: skip
    lines = render(info, {"gateways": gateways}, NOW).splitlines()
    assert lines[0] == "agent site-a (1.0), 2 gateways"
    assert lines[2:6] == [
        "gateways (2):",
        "  GATEWAY  STATE    REFUSED                       CONNECTS  RECONNECTS",
        "  a:1      serving  -                                    1  -",
        "  b:2      refused  authentication failed: token         0  refused=1",
    ]
