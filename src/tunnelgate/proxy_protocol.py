"""The PROXY protocol (versions 1 and 2): the client's real address, for the service.

A service that speaks it (nginx, HAProxy, Postfix, ...) is sent one header
before any relayed byte, naming the client and the public address it reached
(:func:`header`); :func:`parse` reads one back, with the specification's
limits (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt).

Both addresses IPv4 (or IPv4-mapped IPv6, as a gateway on ``::`` sees IPv4
clients): TCP4 / AF_INET. Both IPv6: TCP6 / AF_INET6. Otherwise (missing,
unparsable or mixed): ``PROXY UNKNOWN`` (v1) or LOCAL with AF_UNSPEC (v2),
and the service uses the connection's own addresses.

Pure functions on bytes and strings: must not import asyncio, socket, ssl or
any clock, nor any tunnelgate module but ``errors``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Literal

from tunnelgate.errors import LocalProtocolError, RemoteProtocolError

V1_PREFIX: Final = b"PROXY "
V1_MAX_SIZE: Final = 107  # the longest line the specification allows, CRLF included
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_SIZE: Final = 16  # signature, version and command, family and protocol, length
MAX_HEADER_SIZE: Final = V2_FIXED_SIZE + 216  # v2 with UNIX addresses and no TLV

Family = Literal["inet", "inet6", "unix", "unspec"]
Transport = Literal["stream", "dgram", "unspec"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_COMMAND_LOCAL: Final = 0x0
_COMMAND_PROXY: Final = 0x1
_FAMILIES: Final[tuple[Family, ...]] = ("unspec", "inet", "inet6", "unix")
_TRANSPORTS: Final[tuple[Transport, ...]] = ("unspec", "stream", "dgram")
_ADDRESS_SIZES: Final[dict[Family, int]] = {"inet": 12, "inet6": 36, "unix": 216}
_UNIX_PATH_SIZE: Final = 108
_PORT_RE: Final = re.compile(r"0|[1-9][0-9]{0,4}")  # the specification forbids leading zeros


@dataclass(frozen=True)
class ProxyHeader:
    """One PROXY protocol header, as :func:`parse` read it.

    ``source`` is the client, ``destination`` the address it connected to.
    Without addresses (version 1 UNKNOWN, version 2 LOCAL or UNSPEC), both are
    "" and the ports 0: the receiver then uses the connection's own.
    ``local`` is version 2's LOCAL command: a connection the proxy made for
    itself, such as a health check. IPv6 addresses are in their compressed
    form, a UNIX path as the text before its first NUL.
    """

    version: int  # 1 or 2
    family: Family
    transport: Transport = "unspec"
    source: str = ""
    source_port: int = 0
    destination: str = ""
    destination_port: int = 0
    local: bool = False
    tlvs: tuple[tuple[int, bytes], ...] = ()  # version 2's (type, value) extensions


# --- building ---------------------------------------------------------------


def header(version: int, client: str, server: str) -> bytes:
    """The header telling a service that ``client`` connected to ``server``.

    Both are ``host:port`` with IPv6 in brackets, as the gateway writes them;
    ``server`` may be "" (an older gateway does not send it). Addresses that
    cannot be used give the header that says so (see the module's address
    rule) rather than an error: the connection is still carried.
    """
    if version not in (1, 2):
        raise LocalProtocolError(f"no PROXY protocol version {version}")
    endpoints = _endpoints(client, server)
    if version == 1:
        if endpoints is None:
            return b"PROXY UNKNOWN\r\n"
        (source, source_port), (destination, destination_port) = endpoints
        name = "TCP4" if source.version == 4 else "TCP6"
        line = f"PROXY {name} {_text(source)} {_text(destination)} {source_port} {destination_port}"
        return line.encode("ascii") + b"\r\n"
    if endpoints is None:
        return V2_SIGNATURE + bytes((0x20 | _COMMAND_LOCAL, 0x00)) + (0).to_bytes(2, "big")
    (source, source_port), (destination, destination_port) = endpoints
    block = (
        source.packed
        + destination.packed
        + source_port.to_bytes(2, "big")
        + destination_port.to_bytes(2, "big")
    )
    family = 0x10 if source.version == 4 else 0x20
    return (
        V2_SIGNATURE
        + bytes((0x20 | _COMMAND_PROXY, family | 0x01))  # 0x01: STREAM (TCP)
        + len(block).to_bytes(2, "big")
        + block
    )


def _endpoints(
    client: str, server: str
) -> tuple[tuple[IPAddress, int], tuple[IPAddress, int]] | None:
    """Both endpoints in one family, by the module's address rule, or None."""
    source, destination = _endpoint(client), _endpoint(server)
    if source is None or destination is None:
        return None
    source_v4, destination_v4 = _as_ipv4(source[0]), _as_ipv4(destination[0])
    if source_v4 is not None and destination_v4 is not None:
        return (source_v4, source[1]), (destination_v4, destination[1])
    if source[0].version == destination[0].version == 6:
        return source, destination
    return None


def _endpoint(text: str) -> tuple[IPAddress, int] | None:
    """``(address, port)`` from ``a.b.c.d:port`` or ``[v6]:port``; None otherwise."""
    host, colon, port = text.rpartition(":")
    if not colon or not _PORT_RE.fullmatch(port) or int(port) > 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 6:
        address = ipaddress.IPv6Address(address.packed)  # without a scope id ("%eth0")
    return address, int(port)


def _as_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv4Address):
        return address
    return address.ipv4_mapped


def _text(address: IPAddress) -> str:
    """The address in hexadecimal groups only, as version 1 asks for IPv6.

    (Python 3.13 and later write an IPv4-mapped address with a dotted tail.)
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        low = int(address) & 0xFFFFFFFF
        return f"::ffff:{low >> 16:x}:{low & 0xFFFF:x}"
    return str(address)


# --- parsing ----------------------------------------------------------------


def parse(data: bytes) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``data`` and its length in bytes.

    None while ``data`` is a valid but incomplete beginning of one: read more
    and call again with everything so far. Raises
    :class:`~tunnelgate.errors.RemoteProtocolError` as soon as the bytes cannot
    be a valid header (the specification asks receivers to drop the
    connection then), including a version 1 line without its CRLF in the
    first 107 bytes and a version 2 length too short for its addresses.
    """
    if V2_SIGNATURE.startswith(bytes(data[: len(V2_SIGNATURE)])):
        return _parse_v2(data)
    if V1_PREFIX.startswith(bytes(data[: len(V1_PREFIX)])):
        return _parse_v1(data)
    raise RemoteProtocolError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    window = bytes(data[:V1_MAX_SIZE])
    end = window.find(b"\r\n")
    if end < 0:
        if len(window) >= V1_MAX_SIZE:
            raise RemoteProtocolError(f"PROXY v1 line without CRLF in {V1_MAX_SIZE} bytes")
        if b"\n" in window or b"\r" in window[:-1]:
            raise RemoteProtocolError("PROXY v1 line not ended by CRLF")
        return None
    line = window[:end]
    if b"\r" in line or b"\n" in line:
        raise RemoteProtocolError("PROXY v1 line not ended by CRLF")
    size = end + 2
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return ProxyHeader(1, "unspec"), size  # the rest of an UNKNOWN line is ignored
    try:
        fields = line.decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise RemoteProtocolError("PROXY v1 line is not ASCII") from None
    if len(fields) != 6:
        raise RemoteProtocolError(f"PROXY v1 line has {len(fields)} fields, expected 6")
    _, name, source, destination, source_port, destination_port = fields
    if name not in ("TCP4", "TCP6"):
        raise RemoteProtocolError(f"PROXY v1 protocol {name[:8]!r}, expected TCP4 or TCP6")
    family: Family = "inet" if name == "TCP4" else "inet6"
    return ProxyHeader(
        1,
        family,
        "stream",
        _v1_address(source, family),
        _v1_port(source_port),
        _v1_address(destination, family),
        _v1_port(destination_port),
    ), size


def _v1_address(text: str, family: Family) -> str:
    try:
        if family == "inet":
            return str(ipaddress.IPv4Address(text))
        if "%" not in text:
            return str(ipaddress.IPv6Address(text))
    except ValueError:
        pass
    kind = "IPv4" if family == "inet" else "IPv6"
    raise RemoteProtocolError(f"PROXY v1 address {text[:40]!r} is not {kind}")


def _v1_port(text: str) -> int:
    if not _PORT_RE.fullmatch(text) or int(text) > 65535:
        raise RemoteProtocolError(
            f"PROXY v1 port {text[:8]!r} is not 0-65535 without leading zeros"
        )
    return int(text)


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) > 12 and (data[12] >> 4 != 2 or data[12] & 0x0F > _COMMAND_PROXY):
        raise RemoteProtocolError(f"PROXY v2 version and command {data[12]:#04x} undefined")
    if len(data) > 13 and (data[13] >> 4 >= len(_FAMILIES) or data[13] & 0x0F >= len(_TRANSPORTS)):
        raise RemoteProtocolError(f"PROXY v2 family and protocol {data[13]:#04x} undefined")
    if len(data) < V2_FIXED_SIZE:
        return None
    local = data[12] & 0x0F == _COMMAND_LOCAL
    family, transport = _FAMILIES[data[13] >> 4], _TRANSPORTS[data[13] & 0x0F]
    length = int.from_bytes(data[14:16], "big")
    if local or "unspec" in (family, transport):
        # Addresses to be ignored; whatever the length says is skipped.
        family, transport = "unspec", "unspec"
    needed = _ADDRESS_SIZES.get(family, 0)
    if length < needed:
        raise RemoteProtocolError(
            f"PROXY v2 length {length} is too short for {family} addresses ({needed} bytes)"
        )
    size = V2_FIXED_SIZE + length
    if len(data) < size:
        return None
    if family == "unspec":
        return ProxyHeader(2, "unspec", local=local), size
    block = bytes(data[V2_FIXED_SIZE:size])
    tlvs = _tlvs(block[needed:])
    if family == "unix":
        source = _unix_path(block[:_UNIX_PATH_SIZE])
        destination = _unix_path(block[_UNIX_PATH_SIZE:needed])
        return ProxyHeader(2, family, transport, source, 0, destination, 0, tlvs=tlvs), size
    width = 4 if family == "inet" else 16
    ports = block[2 * width : needed]
    return ProxyHeader(
        2,
        family,
        transport,
        str(ipaddress.ip_address(block[:width])),
        int.from_bytes(ports[:2], "big"),
        str(ipaddress.ip_address(block[width : 2 * width])),
        int.from_bytes(ports[2:], "big"),
        tlvs=tlvs,
    ), size


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    """Type-length-value items filling ``block`` exactly, each ``(type, value)``."""
    items = []
    offset = 0
    while offset < len(block):
        if len(block) - offset < 3:
            raise RemoteProtocolError("PROXY v2 TLV cut short")
        end = offset + 3 + int.from_bytes(block[offset + 1 : offset + 3], "big")
        if end > len(block):
            raise RemoteProtocolError("PROXY v2 TLV longer than the header")
        items.append((block[offset], block[offset + 3 : end]))
        offset = end
    return tuple(items)
