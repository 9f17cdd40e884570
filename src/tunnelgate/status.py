"""``tunnelgate status``: what a running gateway or agent shows on its admin API, as
plain-text tables (a gateway's agents, services and open connections; an agent's sessions
and services).

:func:`fetch` reads one JSON view with ``urllib`` and maps its failures once into the error
tree; :func:`render` is pure (the time is passed in): a column appears when some row has its
field and fields no column knows are left out, so views that gain or lose fields still print.
An edge module: it must import nothing from tunnelgate but ``errors`` (never ``admin``,
``gateway`` or ``agent``), no HTTP library beyond the stdlib (a status check never loads
aiohttp), and not asyncio.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from tunnelgate.errors import AuthenticationError, RemoteProtocolError, TransportError

DEFAULT_URL: Final = "http://127.0.0.1:9090/"
REQUEST_TIMEOUT: Final = 10.0
MAX_ANSWER_SIZE: Final = 64 * 1024 * 1024  # far above the connections view of a busy gateway
MAX_ERROR_SIZE: Final = 4096
API: Final = "api/v1"
NONE: Final = "(none)"

# Straight to the listener: a proxy from the environment would see the admin token.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def admin_url(text: str) -> str:
    """``text`` as the admin listener's base URL (``http://`` added if missing, path ending
    in ``/``); ValueError if it cannot be one."""
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http:// or https:// URL: {text!r}")
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def fetch(base: str, view: str, token: str | None, timeout: float = REQUEST_TIMEOUT) -> Any:
    """The decoded JSON of ``GET base + view``. Raises TransportError (nothing answers, or an
    HTTP error), AuthenticationError (401) or RemoteProtocolError (not HTTP, not JSON)."""
    url = urllib.parse.urljoin(base, view)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token is not None:
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            body: bytes = response.read(MAX_ANSWER_SIZE + 1)
    except urllib.error.HTTPError as exc:
        raise _refusal(exc, url, token is not None) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        why = reason.strerror if isinstance(reason, OSError) and reason.strerror else reason
        raise TransportError(f"no admin listener at {base}: {why}") from None
    except http.client.HTTPException as exc:
        raise RemoteProtocolError(f"{url} does not answer HTTP: {exc!r}") from None
    except OSError as exc:  # reset or timed out while reading the answer
        raise TransportError(f"no answer from the admin listener at {url}: {exc}") from None
    if len(body) > MAX_ANSWER_SIZE:
        raise RemoteProtocolError(f"the answer of {url} exceeds {MAX_ANSWER_SIZE} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RemoteProtocolError(f"the answer of {url} is not JSON: {exc}") from None


def _refusal(exc: urllib.error.HTTPError, url: str, with_token: bool) -> Exception:
    with contextlib.closing(exc):
        if exc.code == 401 and not with_token:
            return AuthenticationError(
                "the admin listener wants a token: --admin-token-file or $TUNNELGATE_ADMIN_TOKEN"
            )
        if exc.code == 401:
            return AuthenticationError("the admin listener refused the token")
        try:
            said = json.loads(exc.read(MAX_ERROR_SIZE)).get("error")
        except (ValueError, UnicodeDecodeError, AttributeError, OSError):
            said = None
        return TransportError(f"{url}: HTTP {exc.code} {said or exc.reason}")


def read_views(base: str, token: str | None) -> tuple[Mapping[str, Any], dict[str, list[Any]]]:
    """The side's info (``/api/v1``) and the views its tables show, by name."""
    info = fetch(base, API, token)
    if not isinstance(info, dict) or info.get("side") not in SIDES:
        raise RemoteProtocolError(f"{base}{API} does not say it is a gateway or an agent")
    views = {}
    for name, _ in SIDES[info["side"]]:
        # An agent's gateways are in its info (an agent before the "gateways" view has them).
        rows = info.get(name, []) if name in INFO_TABLES else fetch(base, f"{API}/{name}", token)
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise RemoteProtocolError(f"{base}{API}/{name} is not a list of objects")
        views[name] = rows
    return info, views


# --- rendering (pure) -----------------------------------------------------------------------


def format_size(size: float) -> str:
    """Bytes as a person reads them: ``512 B``, ``1.2 MiB``."""
    if size < 1024:
        return f"{int(size)} B"
    units = ("KiB", "MiB", "GiB", "TiB", "PiB")
    shown, index = size / 1024, 0
    while round(shown, 1) >= 1024 and index < len(units) - 1:
        shown, index = shown / 1024, index + 1
    return f"{shown:.1f} {units[index]}"


def format_age(seconds: float) -> str:
    """A duration as a person reads it: ``45s``, ``3m12s``, ``2h05m``, ``3d04h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(value: Any, now: float) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(_text(item, now) for item in value) or "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={_text(v, now)}" for k, v in value.items()) or "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _size(value: Any, now: float) -> str:
    return format_size(value) if _number(value) else _text(value, now)


def _age(value: Any, now: float) -> str:
    return format_age(value) if _number(value) else _text(value, now)


def _since(value: Any, now: float) -> str:
    """A Unix time as the time since then."""
    return format_age(now - value) if _number(value) and value else _text(None, now)


def _online(value: Any, now: float) -> str:
    return "online" if value else "offline"


def _draining(value: Any, now: float) -> str:
    return "draining" if value else "open"


def _reconnects(value: Any, now: float) -> str:
    """Reconnects by reason, the reasons that happened: ``closed=2 refused=1``."""
    if isinstance(value, dict):
        value = {reason: count for reason, count in value.items() if count}
    return _text(value, now)


def _milliseconds(value: Any, now: float) -> str:
    return f"{value * 1000:.1f} ms" if _number(value) else _text(value, now)


@dataclass(frozen=True)
class Column:
    """A field of a view's rows, shown under ``header``."""

    key: str
    header: str
    show: Callable[[Any, float], str] = _text  # (value, now) -> cell
    right: bool = False  # aligned to the right (numbers)


def _count(key: str, header: str) -> Column:
    return Column(key, header, right=True)


def _bytes(key: str, header: str) -> Column:
    return Column(key, header, _size, right=True)


GATEWAY_TABLES: Final = (
    ("agents", (
        Column("name", "NAME"), Column("online", "STATE", _online),
        Column("address", "ADDRESS"), Column("connected_at", "CONNECTED", _since),
        Column("last_seen", "LAST SEEN", _since), _count("connects", "CONNECTS"),
        Column("services", "SERVICES"), _count("connections", "CONNS"),
        _bytes("up", "UP"), _bytes("down", "DOWN"),
    )),
    ("services", (
        Column("name", "NAME"), Column("agent", "AGENT"), Column("address", "ADDRESS"),
        _count("connections", "CONNS"), Column("draining", "STATE", _draining),
    )),
    ("connections", (
        _count("id", "ID"), Column("agent", "AGENT"), Column("service", "SERVICE"),
        Column("client", "CLIENT"), Column("age", "AGE", _age), _bytes("up", "UP"),
        _bytes("down", "DOWN"), Column("state", "STATE"),
    )),
)  # fmt: skip
AGENT_TABLES: Final = (
    ("gateways", (
        Column("gateway", "GATEWAY"), Column("state", "STATE"), Column("refused", "REFUSED"),
        _count("sessions", "CONNECTS"), Column("reconnects", "RECONNECTS", _reconnects),
        Column("rtt", "RTT", _milliseconds), Column("last_seen", "LAST SEEN", _since),
    )),
    ("sessions", (
        Column("id", "ID"), Column("gateway", "GATEWAY"), Column("worker", "WORKER"),
        Column("state", "STATE"), Column("age", "AGE", _age), Column("services", "SERVICES"),
        _count("connections", "CONNS"), _bytes("up", "UP"),
        _bytes("down", "DOWN"), Column("pool", "POOL"),
    )),
    ("services", (
        Column("name", "NAME"), Column("public", "PUBLIC"), Column("local", "LOCAL"),
        _count("connections", "CONNS"), _bytes("up", "UP"),
        _bytes("down", "DOWN"),
    )),
)  # fmt: skip
INFO_TABLES: Final = frozenset({"gateways"})  # rows taken from the side's info, not a view
SIDES: Final[Mapping[str, Sequence[tuple[str, Sequence[Column]]]]] = {
    "gateway": GATEWAY_TABLES,
    "agent": AGENT_TABLES,
}


def table(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]], now: float) -> list[str]:
    """The lines of an aligned table: the columns some row has, in their order."""
    if not rows:
        return [NONE]
    shown = [c for c in columns if any(c.key in row for row in rows)]
    cells = [[c.header for c in shown]]
    cells += [[c.show(row.get(c.key), now) for c in shown] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(shown))]
    return [
        "  ".join(
            cell.rjust(width) if c.right else cell.ljust(width)
            for c, cell, width in zip(shown, line, widths, strict=True)
        ).rstrip()
        for line in cells
    ]


def _headline(info: Mapping[str, Any], now: float) -> list[str]:
    version = info.get("version", "?")
    if info.get("side") == "agent":
        gateways = info.get("gateways")
        count = len(gateways) if isinstance(gateways, list) else 1
        where = f"{count} gateways" if count > 1 else f"gateway {info.get('gateway', '?')}"
        lines = [f"agent {info.get('name', '?')} ({version}), {where}"]
    else:
        lines = [f"gateway {version} listening on {info.get('address', '?')}"]
        if isinstance(uptime := info.get("uptime"), int | float):
            lines[0] += f", up {format_age(uptime)}"
        if info.get("tls") is False:
            lines.append("TLS is OFF")
        elif info.get("fingerprint"):
            lines.append(f"certificate fingerprint: {info['fingerprint']}")
        for key, what in (("auth_failures", "authentication"), ("tls_failures", "TLS")):
            counts = info.get(key)
            if isinstance(counts, dict) and (seen := {k: n for k, n in counts.items() if n}):
                lines.append(f"{what} failures: {_text(seen, now)}")
    return lines


def render(info: Mapping[str, Any], views: Mapping[str, Sequence[Any]], now: float) -> str:
    """The status page: a headline, then each table of the side with its title and count."""
    lines = _headline(info, now)
    for name, columns in SIDES[info["side"]]:
        rows = views.get(name, [])
        lines += ["", f"{name} ({len(rows)}):"]
        lines += ["  " + line for line in table(columns, rows, now)]
    return "\n".join(lines)
