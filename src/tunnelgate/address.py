"""Addresses, ports and names as users write them: ``HOST:PORT`` (IPv6 in brackets),
``--expose`` in ``ssh -R`` order, port ranges, and the one name alphabet of config and wire.
Pure functions raising ``ValueError`` that quotes the text; the pure core, the transports and
the config build on it, so it must not import asyncio, socket, ssl, time or any tunnelgate module.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Final

# Names of agents and services. ':' because a service's default name is its local "host:port"
# (exposed, logged, used as [services."host:port"] keys); '#' for the "#2" that tells same-named
# services apart; '@', '/', '.' as users write them. No more: names go into logs and key paths.
NAME_CHARS: Final = "A-Za-z0-9_.:@#/-"  # a regex character class
MAX_NAME_LENGTH: Final = 64
NAME_PATTERN: Final = rf"\A[{NAME_CHARS}]{{1,{MAX_NAME_LENGTH}}}\Z"
_NOT_NAME: Final = re.compile(f"[^{NAME_CHARS}]")


def parse_name(value: Any) -> str:
    """An agent's or a service's name: 1-64 letters, digits or ._:@#/-."""
    if not isinstance(value, str) or not re.fullmatch(NAME_PATTERN, value):
        raise ValueError(f"expected 1-{MAX_NAME_LENGTH} letters, digits or ._:@#/-")
    return value


def to_name(text: str) -> str:
    """``text`` with every character a name may not hold replaced by '-'."""
    return _NOT_NAME.sub("-", text)


@dataclass(frozen=True)
class Address:
    """A host (name, IPv4 or IPv6 without brackets) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)


def is_loopback(host: str) -> bool:
    """Whether a listener on ``host`` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_colons(text: str) -> list[str]:
    """Split on ':' outside square brackets; bracketed parts keep their brackets."""
    parts: list[str] = []
    current, inside = "", False
    for char in text:
        if char == "[" and (inside or current):
            raise ValueError(f"misplaced '[' in {text!r}")
        if char == "]" and not inside:
            raise ValueError(f"unbalanced ']' in {text!r}")
        if char == ":" and not inside:
            parts.append(current)
            current = ""
        else:
            inside = char == "[" or (inside and char != "]")
            current += char
    if inside:
        raise ValueError(f"unclosed '[' in {text!r}")
    return [*parts, current]


_HOST_RE: Final = re.compile(r"^[A-Za-z0-9._-]+$")
_DIGITS: Final = re.compile(r"[0-9]{1,5}")


def parse_host(part: str, text: str | None = None) -> str:
    """A host name, IPv4 or IPv6 address (bracketed or bare); errors quote ``text``."""
    text = part if text is None else text
    bracketed = part.startswith("[") and part.endswith("]")
    if bracketed or ":" in part:  # bare as in allow_bind = ["::1"]: normalised
        try:
            address = ipaddress.IPv6Address(part[1:-1] if bracketed else part)
        except ValueError:
            raise ValueError(f"bad IPv6 address in {text!r}") from None
        return part[1:-1] if bracketed else str(address)
    if not _HOST_RE.fullmatch(part):
        raise ValueError(f"bad host {part!r} in {text!r}")
    return part


def _port(part: str, text: str, *, allow_zero: bool) -> int:
    if not _DIGITS.fullmatch(part):
        raise ValueError(f"bad port {part!r} in {text!r}")
    port = int(part)
    if port > 65535 or (port == 0 and not allow_zero):
        raise ValueError(f"port {port} out of range in {text!r}")
    return port


def parse_address(
    text: str, *, default_port: int | None = None, allow_zero: bool = False
) -> Address:
    """Parse ``host:port``, ``[v6]:port`` or (with ``default_port``) a bare host."""
    parts = _split_colons(text.strip())
    if len(parts) == 1 and default_port is not None:
        return Address(parse_host(parts[0], text), default_port)
    if len(parts) != 2:
        raise ValueError(f"expected HOST:PORT (IPv6 as [::1]:PORT), got {text!r}")
    return Address(parse_host(parts[0], text), _port(parts[1], text, allow_zero=allow_zero))


def parse_expose(text: str) -> tuple[str, int, Address]:
    """(bind, remote port, local address) of ``[BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT``."""
    parts = _split_colons(text.strip())
    if len(parts) not in (3, 4):
        raise ValueError(f"expected [BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT, got {text!r}")
    bind = parse_host(parts[0], text) if len(parts) == 4 else ""
    remote, local_host, local_port = parts[-3:]
    port = _port(remote, text, allow_zero=True)
    local = Address(parse_host(local_host, text), _port(local_port, text, allow_zero=False))
    return bind, port, local


def split_items(value: Any) -> list[Any]:
    """A list as it is, or the items of a comma-separated string."""
    if isinstance(value, str):
        return [item for item in value.split(",") if item.strip()]
    if not isinstance(value, list):
        raise ValueError(f"expected a list or a comma-separated string, got {value!r}")
    return value


def parse_port_ranges(items: Any) -> tuple[range, ...]:
    """Parse ``"3920"`` / ``"8000-8100"`` items (or one comma-separated string)."""
    ranges = []
    for item in split_items(items):
        if not isinstance(item, str | int):
            raise ValueError(f"expected a port or a range like '8000-8100', got {item!r}")
        text = str(item).strip()
        low, dash, high = text.partition("-")
        if not _DIGITS.fullmatch(low) or (dash and not _DIGITS.fullmatch(high)):
            raise ValueError(f"expected a port or a range like '8000-8100', got {text!r}")
        first, last = int(low), int(high or low)
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"bad port range {text!r}")
        ranges.append(range(first, last + 1))
    return tuple(ranges)
