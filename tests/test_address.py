"""Addresses, ``--expose`` specs, port ranges and names, as users write them."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnelgate import address as a
from tunnelgate.protocol.wire import Name

A = a.Address

# Data tables, several cases a line.
# fmt: off
GOOD_ADDRESSES = [
    ("example.com:80", A("example.com", 80)), ("10.0.0.1:443", A("10.0.0.1", 443)),
    ("[::1]:8080", A("::1", 8080)), ("[fe80::1%eth0]:22", A("fe80::1%eth0", 22)),
    (" localhost:65535 ", A("localhost", 65535)),
]
BAD_ADDRESSES = [
    ("localhost", "expected HOST:PORT"), ("a:b:c", "expected HOST:PORT"),
    ("::1:80", r"IPv6 as \[::1\]:PORT"), ("[::1", r"unclosed '\['"),
    ("host:70000", "port 70000 out of range"), ("host:0", "port 0 out of range"),
    ("host:", "bad port ''"), ("host:http", "bad port 'http'"),
    (":80", "bad host ''"), ("[]:80", "bad IPv6 address"),
]
GOOD_EXPOSES = [
    ("8080:localhost:80", ("", 8080, A("localhost", 80))),
    ("0.0.0.0:8080:127.0.0.1:80", ("0.0.0.0", 8080, A("127.0.0.1", 80))),
    ("[::]:8080:[::1]:80", ("::", 8080, A("::1", 80))),
    ("8080:[::1]:80", ("", 8080, A("::1", 80))), ("0:db:5432", ("", 0, A("db", 5432))),
]
BAD_EXPOSES = [
    ("8080:80", r"expected \[BIND:\]REMOTE_PORT"), ("a:1:b:2:3", r"expected \[BIND:\]"),
    ("8080:localhost:0", "port 0 out of range"), ("70000:h:80", "port 70000 out of range"),
    ("web:localhost:80", "bad port 'web'"), ("8080:no such host:80", "bad host"),
    ("[::1:8080:h:80", "unclosed"),
]
GOOD_RANGES = [
    ("3920", (range(3920, 3921),)), ("8000-8100", (range(8000, 8101),)),
    ("80, 443,8000-8001", (range(80, 81), range(443, 444), range(8000, 8002))),
    (["22", 80, "1-2"], (range(22, 23), range(80, 81), range(1, 3))),
]
BAD_RANGES = ["8100-8000", "0", "70000", "1-70000", "a", "-80", "1-2-3", [1.5]]
# fmt: on


# --- addresses, services, port ranges -------------------------------------


@pytest.mark.parametrize(("text", "expected"), GOOD_ADDRESSES)
def test_parse_address_accepts_names_ipv4_and_bracketed_ipv6(text: str, expected: A) -> None:
    """HOST:PORT works for names, IPv4 and [IPv6]; str() gives back a parsable form."""
    assert a.parse_address(text) == expected
    assert a.parse_address(str(expected)) == expected


@pytest.mark.parametrize(("text", "message"), BAD_ADDRESSES)
def test_parse_address_rejects_bad_text_with_helpful_message(text: str, message: str) -> None:
    """A bad address says what is wrong and quotes what was given."""
    with pytest.raises(ValueError, match=message) as info:
        a.parse_address(text)
    assert repr(text) in str(info.value)


def test_parse_address_allow_zero_and_default_port() -> None:
    """Port 0 is accepted when allowed; with a default port a bare host is enough."""
    assert a.parse_address("0.0.0.0:0", allow_zero=True) == A("0.0.0.0", 0)
    assert a.parse_address("example.com", default_port=80) == A("example.com", 80)
    assert a.parse_address("[::1]", default_port=80) == A("::1", 80)


@pytest.mark.parametrize(("text", "expected"), GOOD_EXPOSES)
def test_parse_expose_reads_ssh_r_order(text: str, expected: tuple[str, int, A]) -> None:
    """[BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT as in ssh -R; remote port 0 means any."""
    assert a.parse_expose(text) == expected


@pytest.mark.parametrize(("text", "message"), BAD_EXPOSES)
def test_parse_expose_rejects_bad_specs(text: str, message: str) -> None:
    """A bad --expose spec says which part is wrong."""
    with pytest.raises(ValueError, match=message):
        a.parse_expose(text)


@pytest.mark.parametrize(("items", "expected"), GOOD_RANGES)
def test_parse_port_ranges_accepts_ports_ranges_and_lists(items: Any, expected: Any) -> None:
    """Single ports, inclusive ranges, comma strings and TOML lists all work."""
    assert a.parse_port_ranges(items) == expected


@pytest.mark.parametrize("items", BAD_RANGES)
def test_parse_port_ranges_rejects_bad_ranges(items: Any) -> None:
    """Reversed, out-of-range or malformed ranges are refused."""
    with pytest.raises(ValueError, match="range"):
        a.parse_port_ranges(items)


def test_parse_port_ranges_rejects_open_ended_range() -> None:
    """A range missing its upper end is an error, not silently one port."""
    with pytest.raises(ValueError):
        a.parse_port_ranges("8000-")


@given(st.text() | st.text(alphabet="[]:%.-0123456789abcdef ", max_size=24))
def test_parse_address_and_expose_raise_only_value_error(text: str) -> None:
    """Any text is parsed or refused with ValueError, never another exception."""
    for parse in (a.parse_address, a.parse_expose):
        with contextlib.suppress(ValueError):
            parse(text)


# --- names ----------------------------------------------------------------------

GOOD_NAMES = ["web", "site-a", "a:80", "db#2", "team@site", "eu/fra.1", "x" * 64]
BAD_NAMES = ["", "x" * 65, "has space", "a%eth0", "é", "line\nbreak", 7, None]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_name_accepted_by_config_is_accepted_on_the_wire(name: str) -> None:
    """A name the config takes is one the gateway takes off the wire, and the other way round."""
    assert a.parse_name(name) == name
    assert msgspec.convert(name, Name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_name_refused_by_config_is_refused_on_the_wire(name: Any) -> None:
    """The config and the wire protocol refuse the same names."""
    with pytest.raises(ValueError, match="letters, digits"):
        a.parse_name(name)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(name, Name)


@given(st.text(max_size=80))
def test_to_name_makes_a_valid_name_of_any_text(text: str) -> None:
    """Any text, cut to the length limit, becomes a valid name (or stays empty)."""
    name = a.to_name(text)[: a.MAX_NAME_LENGTH]
    assert len(name) == len(text[: a.MAX_NAME_LENGTH])
    assert not name or re.fullmatch(a.NAME_PATTERN, name)
