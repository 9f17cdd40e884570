"""Configuration: flags and TOML files, checked once into frozen values.

Each setting is declared once, in :data:`OPTIONS`: the CLI makes its flags from it, the loaders
check keys and fill in defaults from it; flags override the file. Every problem (unknown keys
too) is collected with its file and key path into one :class:`~tunnelgate.errors.ConfigError`.
This module only reads (files, the environment, the host name): it must not write anything,
nor import asyncio, ssl or networking (``socket`` only for the host name).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from tunnelgate import credentials
from tunnelgate.access import AccessRule, parse_access_rule
from tunnelgate.address import (
    MAX_NAME_LENGTH,
    Address,
    is_loopback,
    parse_address,
    parse_expose,
    parse_host,
    parse_name,
    parse_port_ranges,
    split_items,
    to_name,
)
from tunnelgate.errors import ConfigError, ConfigProblem
from tunnelgate.protocol.wire import MAX_SERVICES, MAX_WORKERS

TOKEN_ENV: Final = "TUNNELGATE_TOKEN"
ADMIN_TOKEN_ENV: Final = "TUNNELGATE_ADMIN_TOKEN"
GROUP_SECRET_ENV: Final = "TUNNELGATE_GROUP_SECRET"
BALANCES: Final = ("round_robin", "least_connections")  # how a group spreads its clients
HEALTH_CHECKS: Final = ("tcp", "http", "none")  # how an agent checks a grouped service
WORKER_ENV: Final = "TUNNELGATE_WORKER"  # set only by a supervisor, for its workers: JSON
MIN_TOKEN_LENGTH: Final = 16
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")
PROXY_PROTOCOL_VERSIONS: Final = {"none": 0, "v1": 1, "v2": 2}
DOCTOR_SECONDS: Final = 2.0  # tunnelgate doctor: the throughput measured this long each way
AUTO_WORKERS: Final = 8  # "workers = auto": one per core this process may run on, at most this
GATEWAY: Final = "gateway"
AGENT: Final = "agent"
BOTH: Final = (GATEWAY, AGENT)
_GW: Final = (GATEWAY,)
_AG: Final = (AGENT,)

T = TypeVar("T")


@dataclass(frozen=True)
class ServiceConfig:
    """One service the agent exposes: ``bind:port`` on the gateway to ``local``."""

    name: str
    port: int  # 0: any free port the gateway picks
    local: Address
    bind: str = ""  # "": the gateway's default bind address
    proxy_protocol: int = 0  # PROXY protocol header sent to the service: 0 none, 1 or 2
    group: str = ""  # the agent group it joins on the gateway; "": its own port
    group_secret: bytes = field(default=b"", repr=False)  # the group's, with ``group``
    health_check: str = "tcp"  # for a grouped service: "tcp" connect, "http" GET, or "none"
    health_path: str = "/"  # the GET's path, with "http"
    health_status: int = 200  # the status the GET must answer, with "http"
    health_interval: float = 5.0  # seconds between checks


@dataclass(frozen=True)
class GroupConfig:
    """An agent group the gateway allows (``[[groups]]``): agents that prove one of its secrets
    (clear, or stored keys as ``tunnelgate token --name GROUP`` prints them) may expose a
    service into it, and its clients are spread over them by ``balance``."""

    name: str
    secrets: tuple[bytes, ...] = field(repr=False)
    stored_keys: tuple[bytes, ...] = field(default=(), repr=False)
    balance: str = "round_robin"  # one of BALANCES


@dataclass(frozen=True)
class AgentPolicy:
    """What the gateway lets one agent (or, unnamed, every agent) do. Several ``tokens`` or
    ``stored_keys`` let a token rotate; with neither, a certificate is the only credential."""

    name: str  # "" in single-token mode: any agent name
    tokens: tuple[bytes, ...] = field(repr=False)
    allow_ports: tuple[range, ...]
    stored_keys: tuple[bytes, ...] = field(default=(), repr=False)
    allow_bind: tuple[str, ...] = ()  # (): the gateway's allow_bind
    max_services: int = MAX_SERVICES
    max_connections: int = 0  # 0: the gateway's max_connections
    access: AccessRule | None = None  # [agents.access]: all of this agent's services
    service_access: Mapping[str, AccessRule] = field(default_factory=dict)  # by service name
    allow_groups: tuple[str, ...] | None = None  # None: any of the gateway's [[groups]]

    def allows_port(self, port: int) -> bool:
        return any(port in r for r in self.allow_ports)

    def allows_group(self, name: str) -> bool:
        return self.allow_groups is None or name in self.allow_groups

    @property
    def token(self) -> bytes:
        """The first clear token (single-token mode has exactly one)."""
        return self.tokens[0] if self.tokens else b""


# What an [[alerts]] webhook may be told: agents and services that went away for longer
# than the grace period, and their return.
ALERT_EVENTS: Final = ("agent_offline", "agent_online", "service_down", "service_up")


@dataclass(frozen=True, kw_only=True)
class AlertConfig:
    """One webhook (``[[alerts]]``): the gateway POSTs JSON there when an agent or a service
    stays down longer than ``grace`` seconds, and again when it comes back."""

    url: str = field(repr=False)  # its path or query may hold the receiver's own secret
    events: tuple[str, ...] = ALERT_EVENTS
    grace: float = 30.0
    secret: bytes | None = field(default=None, repr=False)  # None: requests are not signed
    timeout: float = 5.0  # per attempt
    retries: int = 3  # attempts after the first

    @property
    def origin(self) -> str:
        """``scheme://host:port``: the URL as log lines show it, without path or credentials."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    listen: Address
    agents: tuple[AgentPolicy, ...]  # (): single-token mode, the token not read yet
    allow_ports: tuple[range, ...]  # every agent's, unless its [[agents]] table says
    tls: bool
    cert: Path | None
    key: Path | None
    state_dir: Path | None
    bind_host: str  # "": the host of ``listen``
    allow_bind: tuple[str, ...]  # (): only ``bind_host``
    heartbeat_interval: float
    heartbeat_timeout: float
    handshake_timeout: float
    pending_timeout: float
    max_pool_size: int
    reuse_data_channels: bool  # a data channel carries the next client after a clean end
    drain_timeout: float
    max_connections: int  # client connections per session
    max_pending_clients: int  # per session, awaiting a channel
    max_handshakes: int  # control-port connections not yet authenticated
    client_ca: Path | None  # agents must present a certificate signed by this CA
    access: AccessRule | None  # [access]: every service of every agent
    service_access: Mapping[str, AccessRule]  # [services.NAME]
    admin: Address | None = None  # the admin listener's address; None: off
    admin_token: bytes | None = field(default=None, repr=False)  # None: loopback, no credentials
    admin_tls: bool = False  # HTTPS: admin_cert, else the gateway's own certificate
    admin_cert: Path | None = None
    admin_key: Path | None = None
    alerts: tuple[AlertConfig, ...] = ()  # [[alerts]] webhooks
    groups: Mapping[str, GroupConfig] = field(default_factory=dict)  # [[groups]], by name
    fleet: str = ""  # Redis URL of the fleet's registry; "": no fleet
    fleet_name: str = "default"  # the fleet's name: gateways of one fleet share it
    fleet_node: str = ""  # this gateway's name in the fleet; "": host name and control port
    fleet_lease: float = 15.0  # seconds a fleet lease lives unless renewed
    fleet_listen: Address | None = None  # the gateway-to-gateway port; None: no forwarding
    fleet_advertise: Address | None = None  # where the others dial it; None: fleet_listen's
    fleet_ca: Path | None = None  # signs every gateway's fleet certificate (mutual TLS)
    fleet_cert: Path | None = None  # this gateway's, for the gateway-to-gateway link
    fleet_key: Path | None = None
    workers: int = 1  # processes sharing the public ports; 1: this process alone, no supervisor
    worker_ports: int = 0  # worker i's own control port is this + i; 0: any free port

    @property
    def default_bind(self) -> str:
        return self.bind_host or self.listen.host


@dataclass(frozen=True)
class GatewayTarget:
    """One gateway the agent dials, and how it checks that gateway's certificate."""

    address: Address  # its control port
    ca: Path | None = None  # None: the system's CAs (unless pinned)
    fingerprint: str = ""  # normalised "SHA256:<64 hex>", or "": not pinned


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    gateways: tuple[GatewayTarget, ...]  # one session (one per worker) with each, on its own
    token: bytes = field(repr=False)
    services: tuple[ServiceConfig, ...]
    name: str
    tls: bool
    cert: Path | None  # the agent's own certificate, for a gateway with client_ca
    key: Path | None
    pool_size: int
    connect_timeout: float
    handshake_timeout: float
    reconnect_min: float
    reconnect_max: float
    drain_timeout: float
    admin: Address | None = None
    admin_token: bytes | None = field(default=None, repr=False)
    admin_tls: bool = False  # HTTPS with admin_cert (an agent has no certificate to lend)
    admin_cert: Path | None = None
    admin_key: Path | None = None
    require_all_gateways: bool = False  # /readyz: every gateway up, not just one

    @property
    def gateway(self) -> Address:
        """The first gateway's address (the only one, unless several are configured)."""
        return self.gateways[0].address


@dataclass(frozen=True)
class LogConfig:
    level: str
    format: str


@dataclass(frozen=True)
class Option:
    """One setting, and its flag unless ``flag`` is "". A value must be of ``kind`` (None: any);
    ``read`` checks and converts it. A bool flag sets False, a list flag repeats."""

    key: str
    sides: tuple[str, ...]
    default: Any = None
    kind: type | None = None
    read: Callable[[Any], Any] | None = None
    flag: str = ""
    metavar: str | None = None
    help: str | None = None
    choices: tuple[str, ...] | None = None
    repeats: bool = False  # the flag may be given several times, as a list is in the file

    def value(self, raw: Any) -> Any:
        kind = self.kind
        if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
            raw = float(raw)
        if kind is not None and (
            not isinstance(raw, kind) or (isinstance(raw, bool) and kind is not bool)
        ):
            raise ValueError(f"expected {kind.__name__}, got {type(raw).__name__} {raw!r}")
        value = raw if self.read is None else self.read(raw)
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}, got {value!r}")
        return value


def _within(low: int, high: int, what: str, *, open_low: bool = False) -> Callable[[Any], Any]:
    bounds = f"{'(' if open_low else '['}{low}, {high}]"

    def read(value: Any) -> Any:
        if not (value > low if open_low else value >= low) or value > high:
            raise ValueError(f"expected {what} in {bounds}, got {value}")
        return value

    return read


_integer: Final = functools.partial(_within, what="an integer")
_seconds: Final = _within(0, 3600, "seconds", open_low=True)


def _path(value: Any) -> Path:
    try:
        return Path(str(value)).expanduser()
    except RuntimeError:  # ~user for a user this system does not know
        raise ValueError(f"cannot expand {str(value)!r}: no such user's home") from None


def _existing_file(value: Any) -> Path:
    path = _path(value)
    if not path.is_file():
        raise ValueError(f"no such file: {value}")
    return path


def _read_token_file(path: str) -> bytes:
    try:
        return check_token(_path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read token file {path!r}: {exc.strerror or exc}") from None


def check_token(text: str) -> bytes:
    """The token written in ``text`` (whitespace around it left out); ValueError if too short."""
    text = text.strip()
    if len(text) < MIN_TOKEN_LENGTH:
        raise ValueError(f"token too short (at least {MIN_TOKEN_LENGTH} characters)")
    return text.encode()


def normalize_fingerprint(text: str) -> str:
    """``SHA256:<64 hex>`` from any common spelling (prefix, colons, case)."""
    value = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("expected SHA256: and 64 hex digits, as the gateway prints it")
    return "SHA256:" + value.upper()


def _each(read: Callable[[str], T]) -> Callable[[Any], tuple[T, ...]]:
    """A reader of a string or a list of strings, each read by ``read``."""

    def each(value: Any) -> tuple[T, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ValueError("expected a string or a list of strings")
        return tuple(read(item) for item in items)

    return each


MIN_SECRET_LENGTH: Final = MIN_TOKEN_LENGTH


MAX_HEALTH_PATH: Final = 256


def _request_path(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError(f"expected a path starting with /, without spaces, got {value!r}")
    if len(value) > MAX_HEALTH_PATH:
        raise ValueError(f"a path of at most {MAX_HEALTH_PATH} characters")
    return value


def _secret(value: Any) -> bytes:
    text = str(value).strip()
    if len(text) < MIN_SECRET_LENGTH:
        raise ValueError(f"secret too short (at least {MIN_SECRET_LENGTH} characters)")
    return text.encode()


@dataclass(frozen=True)
class SentinelURL:
    """``redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT…]/SERVICE[/DB]``: Redis Sentinels to
    ask for the master of SERVICE (the password is the master's)."""

    sentinels: tuple[Address, ...]
    service: str
    db: int
    password: str | None = field(default=None, repr=False)


SENTINEL_SCHEME: Final = "redis+sentinel"


def parse_sentinel_url(url: str) -> SentinelURL:
    """A Sentinel URL's parts; ValueError if it is not one."""
    expected = "expected redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT…]/SERVICE[/DB]"
    rest = url.removeprefix(f"{SENTINEL_SCHEME}://")
    netloc, _, path = rest.partition("/")
    auth, _, hosts = netloc.rpartition("@")
    password = (auth.partition(":")[2] or None) if auth else None
    parts = [p for p in path.split("/") if p]
    db_ok = len(parts) == 1 or (len(parts) == 2 and parts[1].isdigit())
    if rest == url or not hosts or not db_ok:
        raise ValueError(expected)
    sentinels = tuple(parse_address(host) for host in hosts.split(","))
    return SentinelURL(sentinels, parts[0], int(parts[1]) if len(parts) == 2 else 0, password)


def _fleet_url(value: Any) -> str:
    """A Redis URL: redis://, rediss:// (TLS), unix://, or redis+sentinel://."""
    expected = (
        "expected redis://HOST[:PORT][/DB], rediss://… (TLS), unix://PATH or "
        "redis+sentinel://HOST:PORT[,HOST:PORT…]/SERVICE[/DB]"
    )
    if not isinstance(value, str) or any(c.isspace() for c in value):
        raise ValueError(f"{expected}, without spaces")  # never shown: it may hold a password
    if value.startswith(f"{SENTINEL_SCHEME}://"):
        parse_sentinel_url(value)
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        raise ValueError(f"{expected}: {exc}") from None
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise ValueError(expected)
    return value


def _pinned(value: Any) -> str:
    """A fingerprint, or "" for a gateway of several that is not pinned."""
    return normalize_fingerprint(str(value)) if str(value).strip() else ""


def _workers(value: Any) -> int:
    """A number of worker processes, or "auto": one per core usable here, at most AUTO_WORKERS."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return min(cores or 1, AUTO_WORKERS)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f'expected a number of processes or "auto", got {value!r}')
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f'expected a number of processes or "auto", got {value!r}') from None
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"expected 1 to {MAX_WORKERS} processes, or auto; got {count}")
    return count


def _proxy_protocol(value: Any) -> int:
    if isinstance(value, str) and value.lower() in PROXY_PROTOCOL_VERSIONS:
        return PROXY_PROTOCOL_VERSIONS[value.lower()]
    raise ValueError(f'expected "v1", "v2" or "none", got {value!r}')


_SECONDS: Final = "SECONDS"  # a metavar
# Option(key, sides, default, kind, read, flag, metavar, help): one per setting.
OPTIONS: Final = (
    Option("token", BOTH, flag="--token",
           help=f"shared secret (better: --token-file or ${TOKEN_ENV})"),
    Option("token_file", BOTH, flag="--token-file", metavar="FILE",
           help="read the token from FILE"),
    Option("tls", BOTH, True, bool, flag="--no-tls",
           help="plain TCP between agent and gateway (trusted networks, measuring)"),
    Option("drain_timeout", BOTH, 10.0, float, _within(0, 3600, "seconds"), "--drain-timeout",
           _SECONDS,
           "on SIGTERM/Ctrl-C, how long open connections may finish (default 10; 0: none)"),
    Option("log_level", BOTH, "info", str, str.lower, "--log-level", choices=LOG_LEVELS),
    Option("log_format", BOTH, "text", str, None, "--log-format", choices=LOG_FORMATS),
    Option("admin", BOTH, None, None, lambda v: parse_address(str(v), allow_zero=True), "--admin",
           "HOST:PORT",
           "serve health, Prometheus metrics and the admin API here (off by default)"),
    Option("admin_token_file", BOTH, None, None, _read_token_file, "--admin-token-file", "FILE",
           f"the admin listener's token (or ${ADMIN_TOKEN_ENV}); needed off loopback"),
    Option("admin_tls", BOTH, False, bool),  # the gateway's own certificate unless admin_cert
    Option("admin_cert", BOTH, None, None, _existing_file, "--admin-cert", "FILE",
           "serve the admin listener over HTTPS with this certificate (PEM)"),
    Option("admin_key", BOTH, None, None, _existing_file, "--admin-key", "FILE",
           "the private key of --admin-cert (PEM)"),
    # the gateway
    Option("listen", _GW, Address("0.0.0.0", 8080), None,
           lambda v: parse_address(str(v), allow_zero=True), "--listen", "HOST:PORT",
           "control port (0.0.0.0:8080)"),
    Option("cert", _GW, None, None, _path, "--cert", "FILE", "TLS certificate (PEM)"),
    Option("key", _GW, None, None, _path, "--key", "FILE", "TLS private key (PEM)"),
    Option("client_ca", _GW, None, None, _existing_file, "--client-ca", "FILE",
           "require agent certificates signed by this CA (mutual TLS)"),
    Option("state_dir", _GW, None, None, _path, "--state-dir", "DIR",
           "default $XDG_STATE_HOME/tunnelgate, else ~/.local/state/tunnelgate"),
    Option("bind_host", _GW, "", None, lambda v: parse_host(str(v)), "--bind-host", "HOST",
           "default bind address of services"),
    Option("allow_bind", _GW, (), None,
           lambda v: tuple(parse_host(str(h)) for h in split_items(v))),
    Option("allow_ports", _GW, (range(1024, 65536),), None, parse_port_ranges, "--allow-ports",
           "RANGES", "e.g. 3920,8000-8100"),
    Option("heartbeat_interval", _GW, 10.0, float, _seconds, "--heartbeat-interval", _SECONDS),
    Option("heartbeat_timeout", _GW, 25.0, float, _seconds, "--heartbeat-timeout", _SECONDS),
    Option("pending_timeout", _GW, 10.0, float, _seconds, "--pending-timeout", _SECONDS),
    Option("handshake_timeout", _GW, 10.0, float, _seconds, "--handshake-timeout", _SECONDS),
    Option("max_pool_size", _GW, 64, int, _integer(1, 4096)),
    Option("reuse_data_channels", _GW, True, bool, flag="--no-channel-reuse",
           help="a new data channel for every client (no reuse after a clean end)"),
    Option("max_connections", _GW, 16384, int, _integer(1, 1 << 20)),
    Option("max_pending_clients", _GW, 1024, int, _integer(1, 1 << 16)),
    Option("max_handshakes", _GW, 1024, int, _integer(1, 1 << 16)),
    Option("workers", _GW, 1, None, _workers, "--workers", "N|auto",
           "processes sharing the public ports, each serving any client alone (default 1; "
           f"auto: one per core, at most {AUTO_WORKERS})"),
    Option("worker_ports", _GW, 0, int, _integer(0, 65535), "--worker-ports", "PORT",
           "with --workers: worker i's own control port is PORT+i, which agents must reach "
           "(default: any free port)"),
    Option("agents", _GW, (), list),  # [[agents]] tables
    Option("access", _GW),  # [access]
    Option("services", _GW),  # [services.NAME] tables
    Option("alerts", _GW, (), list),  # [[alerts]] tables
    Option("groups", _GW, (), list),  # [[groups]] tables
    Option("fleet", _GW, "", None, _fleet_url, "--fleet", "URL",
           "share port leases and a registry of agents with the gateways of a fleet, on Redis "
           "(redis://HOST:PORT/DB, rediss://… with TLS, unix://PATH, "
           "redis+sentinel://HOST:PORT,…/SERVICE/DB)"),
    Option("fleet_name", _GW, "default", None, parse_name, "--fleet-name", "NAME",
           "the fleet's name, the same on each of its gateways (default: default)"),
    Option("fleet_node", _GW, "", None, parse_name, "--fleet-node", "NAME",
           "this gateway's name in the fleet (default: host name and control port)"),
    Option("fleet_lease", _GW, 15.0, float, _within(1, 3600, "seconds")),
    Option("fleet_listen", _GW, None, None, lambda v: parse_address(str(v), allow_zero=True),
           "--fleet-listen", "HOST:PORT",
           "take clients the fleet's other gateways forward here, and forward to them the "
           "clients of ports leased elsewhere (mutual TLS: --fleet-ca, --fleet-cert, --fleet-key)"),
    Option("fleet_advertise", _GW, None, None, lambda v: parse_address(str(v), allow_zero=True),
           "--fleet-advertise", "HOST:PORT",
           "where the other gateways reach --fleet-listen (default: its own address; port 0: "
           "the port it listens on)"),
    Option("fleet_ca", _GW, None, None, _existing_file, "--fleet-ca", "FILE",
           "the fleet's own CA, which signs every gateway's fleet certificate"),
    Option("fleet_cert", _GW, None, None, _existing_file, "--fleet-cert", "FILE",
           "this gateway's fleet certificate (PEM)"),
    Option("fleet_key", _GW, None, None, _existing_file, "--fleet-key", "FILE",
           "the private key of --fleet-cert (PEM)"),
    # the agent
    Option("gateway", _AG, (), None, _each(lambda v: parse_address(str(v))), "--gateway",
           "HOST:PORT", "the gateway's control port; repeat it for a session with each of "
           "several gateways", repeats=True),
    Option("ca", _AG, (), None, _each(lambda v: _path(v) if v else None), "--ca", "FILE",
           "trust the gateway's certificate from CA (repeated: one per --gateway, in order)",
           repeats=True),
    Option("fingerprint", _AG, (), None, _each(_pinned), "--fingerprint", "SHA256",
           "pin the gateway's certificate (repeated: one per --gateway, in order)", repeats=True),
    Option("require_all_gateways", _AG, False, bool, flag="--require-all-gateways",
           help="ready (/readyz) only while every gateway has the services, not just one"),
    Option("cert", _AG, None, None, _existing_file, "--cert", "FILE",
           "this agent's certificate (mutual TLS)"),
    Option("key", _AG, None, None, _existing_file, "--key", "FILE",
           "this agent's private key (mutual TLS)"),
    Option("expose", _AG, (), list, None, "--expose", "[BIND:]REMOTE_PORT:LOCAL_HOST:LOCAL_PORT",
           "a service to expose (repeatable); REMOTE_PORT 0 takes any free port"),
    Option("services", _AG, (), list),  # [[services]] tables
    Option("name", _AG, "", None, parse_name, "--name",
           help="this agent's name (default: the host name)"),
    Option("pool_size", _AG, 4, int, _integer(0, 256), "--pool-size", "N",
           "idle data channels to keep"),
    Option("connect_timeout", _AG, 5.0, float, _seconds),
    Option("handshake_timeout", _AG, 10.0, float, _seconds),
    Option("reconnect_min", _AG, 0.5, float, _seconds),
    Option("reconnect_max", _AG, 30.0, float, _seconds, "--reconnect-max", _SECONDS),
    Option("proxy_protocol", _AG, 0, None, _proxy_protocol, "--proxy-protocol", "v1|v2",
           "send each service a PROXY protocol header with the client's real address"),
    Option("group", _AG, "", None, parse_name, "--group", "NAME",
           "expose the services into this agent group of the gateway (with its secret)"),
    Option("group_secret", _AG, None, None, _secret),
    Option("group_secret_file", _AG, None, None, _read_token_file, "--group-secret-file", "FILE",
           f"the group's secret (or ${GROUP_SECRET_ENV})"),
)  # fmt: skip


def options(side: str) -> dict[str, Option]:
    """The options of one side (``GATEWAY`` or ``AGENT``), by key, in table order."""
    return {option.key: option for option in OPTIONS if side in option.sides}


# The keys of an [[agents]] table on the gateway and of a [[services]] table on the agent.
_AGENT_POLICY_OPTIONS: Final = (
    Option("name", (), None, None, parse_name),
    Option("token", (), (), None, _each(check_token)),
    Option("token_file", (), (), None, _each(_read_token_file)),
    Option("token_hash", (), (), None, _each(credentials.parse_hash_line)),
    Option("allow_ports", (), None, None, parse_port_ranges),  # None: the gateway's
    Option("allow_bind", (), (), None, _each(parse_host)),
    Option("max_services", (), MAX_SERVICES, int, _integer(1, MAX_SERVICES)),
    Option("max_connections", (), 0, int, _integer(1, 1 << 20)),  # 0: the gateway's
    Option("access", ()),
    Option("services", ()),
    Option("allow_groups", (), None, None, _each(parse_name)),  # None: every [[groups]] group
)
_GROUP_OPTIONS: Final = (
    Option("name", (), None, None, parse_name),
    Option("secret", (), (), None, _each(_secret)),
    Option("secret_file", (), (), None, _each(_read_token_file)),
    Option("secret_hash", (), (), None, _each(credentials.parse_hash_line)),
    Option("balance", (), "round_robin", str, choices=BALANCES),
)
_SERVICE_OPTIONS: Final = (
    Option("local", (), None, None, lambda v: parse_address(str(v))),
    Option("port", (), 0, int, _integer(0, 65535)),  # 0: any free port
    Option("name", (), None, None, parse_name),  # None: from local
    Option("bind", (), "", None, lambda v: parse_host(str(v))),
    Option("proxy_protocol", (), None, None, _proxy_protocol),  # None: the top-level one
    Option("group", (), None, None, lambda v: parse_name(v) if v else ""),  # None: top-level
    Option("health_check", (), "tcp", str, choices=HEALTH_CHECKS),
    Option("health_path", (), "/", str, _request_path),
    Option("health_status", (), 200, int, _integer(100, 599)),
    Option("health_interval", (), 5.0, float, _seconds),
)


def _webhook_url(value: Any) -> str:
    """An http:// or https:// URL with a host; never repeated in the message (its path or
    query may hold the receiver's secret)."""
    expected = "expected an http:// or https:// URL with a host"
    if not isinstance(value, str):
        raise ValueError(f"{expected}, got {type(value).__name__}")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{expected}, without spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        raise ValueError(f"{expected}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(expected)
    return value


def _alert_event(name: str) -> str:
    if name not in ALERT_EVENTS:
        raise ValueError(f"unknown event {name!r}: expected some of {', '.join(ALERT_EVENTS)}")
    return name


def _read_secret_file(path: Any) -> bytes:
    try:
        return _secret(_path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path!r}: {exc.strerror or exc}") from None


# The keys of an [[alerts]] table on the gateway.
_ALERT_OPTIONS: Final = (
    Option("url", (), None, None, _webhook_url),
    Option("events", (), ALERT_EVENTS, None, _each(_alert_event)),
    Option("grace", (), 30.0, float, _within(0, 86400, "seconds")),
    Option("secret", (), None, str, _secret),
    Option("secret_file", (), None, None, _read_secret_file),
    Option("timeout", (), 5.0, float, _seconds),
    Option("retries", (), 3, int, _integer(0, 10)),
)


@dataclass
class _Source:
    """Settings by key, each with where it came from (source, label), and the problems in them."""

    known: Mapping[str, Option]
    problems: list[ConfigProblem]
    source: str  # of problems about keys not given
    prefix: str = ""  # of their labels
    values: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None, flags: Mapping[str, Any], known: dict[str, Option]) -> _Source:
        """A file's settings, then the flags given (not None) over them."""
        src = cls(known, [], str(path or "command line"))
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = tomllib.loads(path.read_bytes().decode())
            except OSError as exc:
                src.problem(str(path), "-", f"cannot read: {exc.strerror or exc}")
            except tomllib.TOMLDecodeError as exc:
                src.problem(str(path), "-", f"not valid TOML: {exc}")
            except UnicodeDecodeError as exc:
                src.problem(str(path), "-", f"not valid TOML: not UTF-8 ({exc.reason})")
            except RecursionError:
                src.problem(str(path), "-", "not valid TOML: nested too deeply")
        src.add(data, str(path))
        src.add({k: v for k, v in flags.items() if v is not None}, "command line", flags=True)
        return src

    def add(self, values: Mapping[str, Any], source: str, *, flags: bool = False) -> None:
        """Take ``values`` from ``source``; an unknown key is a problem."""
        for key, value in values.items():
            self.values[key] = value
            flag = self.known[key].flag if key in self.known else ""
            label = (flag or "--" + key.replace("_", "-")) if flags else self.prefix + key
            self.origin[key] = (source, label)
            if key not in self.known:
                self.fail(key, "unknown key")

    def table(self, key: str, index: int, table: Any, known: tuple[Option, ...]) -> _Source | None:
        """The settings of the ``index``-th ``[[key]]`` table; None if it is not a table."""
        source, prefix = self.origin.get(key, (self.source,))[0], f"{key}[{index}]"
        if not isinstance(table, dict):
            self.problem(source, prefix, f"expected a table ([[{key}]])")
            return None
        src = _Source({o.key: o for o in known}, self.problems, source, prefix + ".")
        src.add(table, source)
        return src

    def problem(self, source: str, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(source, key, message))

    def fail(self, key: str, message: str) -> None:
        source, label = self.origin.get(key, (self.source, self.prefix + key))
        self.problem(source, label, message)

    def parse(self, key: str, parser: Callable[[Any], T], default: T) -> T:
        if key not in self.values:
            return default
        try:
            return parser(self.values[key])
        except (ValueError, TypeError) as exc:
            self.fail(key, str(exc))
            return default

    def read(self) -> dict[str, Any]:
        """Every known option's value (its default if absent or unusable)."""
        return {key: self.parse(key, o.value, o.default) for key, o in self.known.items()}

    def raise_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _fields(cls: type[Any], values: Mapping[str, Any]) -> dict[str, Any]:
    return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}


def read_token(token_file: str | None) -> bytes | None:
    """The token in ``token_file``, else ``$TUNNELGATE_TOKEN``, else None; ConfigError if bad."""
    src = _Source.load(None, {"token_file": token_file}, options(AGENT))
    token = _token(src)
    src.raise_problems()
    return token


def read_admin_token(token_file: str | None) -> bytes | None:
    """The admin listener's token in ``token_file``, else ``$TUNNELGATE_ADMIN_TOKEN``, else
    None (for a client of the admin API); ConfigError if bad."""
    src = _Source.load(None, {"admin_token_file": token_file}, options(AGENT))
    values = {
        "admin": None,
        "admin_tls": False,
        "admin_token_file": src.parse("admin_token_file", _read_token_file, None),
    }
    token = _admin_token(src, values, own_certificate=False)
    src.raise_problems()
    return token


def _token(src: _Source) -> bytes | None:
    """The token from --token, --token-file, the environment, or the file, in that
    order; None if there is none, b"" if the one found is unusable (a problem)."""
    from_flags = [
        k for k in ("token", "token_file") if src.origin.get(k, ("",))[0] == "command line"
    ]
    env = os.environ.get(TOKEN_ENV)
    if not from_flags and env:
        try:
            return check_token(env)
        except ValueError as exc:
            src.problem("environment", TOKEN_ENV, str(exc))
            return b""
    for key in from_flags or ["token", "token_file"]:
        if key in src.values:
            if key == "token":
                return src.parse(key, lambda v: check_token(str(v)), b"")
            return src.parse(key, lambda v: _read_token_file(str(v)), b"")
    return None


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/tunnelgate``, else ``~/.local/state/tunnelgate``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tunnelgate"


def _access_rule(src: _Source, table: Any, where: str) -> AccessRule | None:
    """The rule of one access table (None if absent), its problems recorded."""
    if table is None:
        return None
    rule, problems = parse_access_rule(table, where)
    for key, message in problems:
        src.problem(src.source, key, message)
    return rule


def _service_rules(src: _Source, tables: Any, where: str) -> dict[str, AccessRule]:
    """``[services.NAME]`` tables: an access rule per service name."""
    if tables is None:
        return {}
    if not isinstance(tables, dict):
        src.problem(src.source, where, "expected tables like [services.web]")
        return {}
    rules = {name: _access_rule(src, table, f"{where}.{name}") for name, table in tables.items()}
    return {name: rule for name, rule in rules.items() if rule is not None}


def _agent_policy(
    src: _Source, index: int, table: Any, default_ports: tuple[range, ...], certified: bool
) -> list[AgentPolicy]:
    problems = len(src.problems)
    if (policy := src.table("agents", index, table, _AGENT_POLICY_OPTIONS)) is None:
        return []
    values = policy.read()
    if "name" not in policy.values:
        policy.fail("name", "missing: the agent's name")
    tokens = values["token"] + values["token_file"]
    if not tokens and not values["token_hash"] and len(src.problems) == problems and not certified:
        policy.fail(
            "token",
            "missing: token, token_file or token_hash (or client_ca, for certificates alone)",
        )
    if values["name"] is None:
        return []
    label = f"agents[{values['name']}]"
    given = {
        "tokens": tokens,
        "stored_keys": values["token_hash"],
        "allow_ports": default_ports if values["allow_ports"] is None else values["allow_ports"],
        "access": _access_rule(src, values["access"], f"{label}.access"),
        "service_access": _service_rules(src, values["services"], f"{label}.services"),
    }
    if len(src.problems) > problems:
        return []
    return [AgentPolicy(**{**_fields(AgentPolicy, values), **given})]


def _groups(src: _Source, tables: list[Any], agents: list[AgentPolicy]) -> dict[str, GroupConfig]:
    """The ``[[groups]]`` tables, by name; each needs a name and a secret (or its hash)."""
    groups: dict[str, GroupConfig] = {}
    for index, table in enumerate(tables):
        problems = len(src.problems)
        if (group := src.table("groups", index, table, _GROUP_OPTIONS)) is None:
            continue
        values = group.read()
        if values["name"] is None:
            group.fail("name", "missing: the group's name")
        elif values["name"] in groups:
            group.fail("name", f"group {values['name']!r} is listed more than once")
        secrets = values["secret"] + values["secret_file"]
        if not {"secret", "secret_file", "secret_hash"} & group.values.keys():
            group.fail("secret", "missing: secret, secret_file or secret_hash")
        if len(src.problems) == problems:
            name = values["name"]
            groups[name] = GroupConfig(name, secrets, values["secret_hash"], values["balance"])
    for policy in agents:
        for name in policy.allow_groups or ():
            if name not in groups:
                src.problem(src.source, f"agents[{policy.name}].allow_groups",
                            f"no group {name!r} in [[groups]]")  # fmt: skip
    return groups


def _alerts(src: _Source, tables: list[Any]) -> tuple[AlertConfig, ...]:
    alerts: list[AlertConfig] = []
    for index, table in enumerate(tables):
        problems = len(src.problems)
        if (given := src.table("alerts", index, table, _ALERT_OPTIONS)) is None:
            continue
        values = given.read()
        if "url" not in given.values:
            given.fail("url", "missing: the webhook's http:// or https:// URL")
        elif any(a.url == values["url"] for a in alerts):
            given.fail("url", "this URL is already in another [[alerts]] table")
        if "secret" in given.values and "secret_file" in given.values:
            given.fail("secret_file", "give secret or secret_file, not both")
        if "events" in given.values and not values["events"]:
            given.fail("events", f"expected at least one of {', '.join(ALERT_EVENTS)}")
        if len(src.problems) == problems:
            alerts.append(
                AlertConfig(
                    url=values["url"],
                    events=tuple(dict.fromkeys(values["events"])),
                    grace=values["grace"],
                    secret=values["secret"] or values["secret_file"],
                    timeout=values["timeout"],
                    retries=values["retries"],
                )
            )
    return tuple(alerts)


def _check_tls(src: _Source, *needing_tls: str) -> None:
    """A certificate comes with its key, and TLS settings never with --no-tls."""
    if ("cert" in src.values) != ("key" in src.values):
        src.fail("cert" if "cert" in src.values else "key", "cert and key must be given together")
    for key in needing_tls if src.values.get("tls") is False else ():
        if key in src.values:
            src.fail(key, "makes no sense with --no-tls: it is part of TLS")


def load_gateway_config(
    path: Path | None = None, flags: Mapping[str, Any] | None = None
) -> tuple[GatewayConfig, LogConfig]:
    """Read the gateway's file and flags. With no token given in any way and no ``[[agents]]``,
    ``agents`` is empty: the CLI adds the token stored in the state directory."""
    src = _Source.load(path, flags or {}, options(GATEWAY))
    values = src.read()
    _check_tls(src, "client_ca")
    tables, ports = values["agents"], values["allow_ports"]
    certified = values["client_ca"] is not None
    agents = [a for i, t in enumerate(tables) for a in _agent_policy(src, i, t, ports, certified)]
    names = [t.get("name") for t in tables if isinstance(t, dict)]
    for name in sorted({n for n in names if isinstance(n, str) and names.count(n) > 1}):
        src.fail("agents", f"agent {name!r} is listed more than once")
    if agents:
        for key in [k for k in ("token", "token_file") if k in src.values]:
            src.fail(key, "not used with [[agents]]: give each agent its own token there")
    elif (token := _token(src)) is not None:
        agents.append(AgentPolicy("", (token,), ports))
    if values["heartbeat_timeout"] <= values["heartbeat_interval"]:
        src.fail("heartbeat_timeout", "must be longer than heartbeat_interval")
    _check_workers(src, values)
    _check_forwarding(src, values)
    given = {
        "admin_token": _admin_token(src, values, own_certificate=True),
        "agents": tuple(agents),
        "access": _access_rule(src, values["access"], "access"),
        "service_access": _service_rules(src, values["services"], "services"),
        "alerts": _alerts(src, values["alerts"]),
        "groups": _groups(src, values["groups"], agents),
    }
    src.raise_problems()
    config = GatewayConfig(**{**_fields(GatewayConfig, values), **given})
    return config, LogConfig(values["log_level"], values["log_format"])


def _check_forwarding(src: _Source, values: Mapping[str, Any]) -> None:
    """Forwarding between gateways needs a fleet and the fleet's certificates."""
    files = ("fleet_ca", "fleet_cert", "fleet_key")
    listen = values["fleet_listen"]
    if listen is None:
        for key in ("fleet_advertise", *files):
            if key in src.values:
                src.fail(key, "used only with fleet_listen (forwarding between gateways)")
        return
    if not values["fleet"]:
        src.fail("fleet_listen", "forwarding between gateways needs a fleet: give fleet too")
    for key in files:
        if key not in src.values:
            src.fail(key, "missing: the gateway-to-gateway link is mutual TLS (fleet_listen)")
    if values["fleet_advertise"] is None and listen.host in ("", "0.0.0.0", "::"):
        src.fail("fleet_advertise", f"missing: the other gateways cannot dial {listen.host}")


def _check_workers(src: _Source, values: Mapping[str, Any]) -> None:
    workers = values["workers"]
    if values["fleet"] and workers > 1:
        src.fail("fleet", "a gateway of several workers cannot join a fleet yet: workers = 1")
    if values["groups"] and workers > 1:
        src.fail("groups", "a gateway of several workers cannot have agent groups yet: workers = 1")
    if (base := values["worker_ports"]) and base + workers - 1 > 65535:
        src.fail("worker_ports", f"{base} + {workers} workers goes past port 65535")


def load_agent_config(
    path: Path | None = None, flags: Mapping[str, Any] | None = None
) -> tuple[AgentConfig, LogConfig]:
    """Read the agent's file and flags; ``flags["expose"]`` is a list of specs."""
    src = _Source.load(path, flags or {}, options(AGENT))
    values = src.read()
    if "gateway" not in src.values:
        src.problem("command line", "--gateway", "missing: the gateway's HOST:PORT")
    token = _token(src)
    if token is None and "cert" not in src.values:
        src.problem(
            "command line",
            "--token",
            f"missing: give --token, --token-file or {TOKEN_ENV} "
            "(or only --cert and --key, for a gateway that takes certificates alone)",
        )
    _check_tls(src, "ca", "fingerprint", "cert")
    given = {
        "gateways": _gateways(src, values),
        "admin_token": _admin_token(src, values, own_certificate=False),
        "token": token or b"",  # b"": certificates alone
        "services": _services(src, values),
        "name": values["name"] or to_name(socket.gethostname())[:MAX_NAME_LENGTH] or "agent",
        "reconnect_max": max(values["reconnect_max"], values["reconnect_min"]),
    }
    src.raise_problems()
    config = AgentConfig(**{**_fields(AgentConfig, values), **given})
    return config, LogConfig(values["log_level"], values["log_format"])


def _gateways(src: _Source, values: Mapping[str, Any]) -> tuple[GatewayTarget, ...]:
    """The gateways to dial, each with its CA and fingerprint: ``ca`` and ``fingerprint`` are
    one for every gateway, or one for each, in the order of ``gateway``."""
    addresses: tuple[Address, ...] = values["gateway"]
    if src.values.get("gateway") == []:
        src.fail("gateway", "an empty list: give at least one gateway's HOST:PORT")
    for address in sorted({a for a in addresses if addresses.count(a) > 1}, key=str):
        src.fail("gateway", f"{address} is listed more than once")
    checks: dict[str, tuple[Any, ...]] = {"ca": values["ca"], "fingerprint": values["fingerprint"]}
    for key, given in checks.items():
        if len(given) not in (0, 1, len(addresses)):
            src.fail(
                key,
                f"{len(given)} given for {len(addresses)} gateways: give one for all of them, "
                "or one for each, in the order of the gateways",
            )
            checks[key] = ()
        elif len(addresses) == 1 and given and given[0] in (None, ""):
            src.fail(key, "empty: an empty value only skips one of several gateways")

    def each(key: str, index: int) -> Any:
        given = checks[key]
        return given[index if len(given) > 1 else 0] if given else None

    return tuple(
        GatewayTarget(address, each("ca", i), each("fingerprint", i) or "")
        for i, address in enumerate(addresses)
    )


def _admin_token(src: _Source, values: dict[str, Any], *, own_certificate: bool) -> bytes | None:
    """The admin listener's token, from its file or the environment; a listener off
    loopback without one is a problem (anyone who can reach it could act on the tunnel).
    Its TLS settings are checked here too: a certificate means HTTPS."""
    token: bytes | None = values["admin_token_file"]
    if token is None and (env := os.environ.get(ADMIN_TOKEN_ENV)) is not None:
        try:
            token = check_token(env)
        except ValueError as exc:
            src.problem("environment", ADMIN_TOKEN_ENV, str(exc))
    admin: Address | None = values["admin"]
    if ("admin_cert" in src.values) != ("admin_key" in src.values):
        src.fail("admin_cert", "admin_cert and admin_key must be given together")
    if "admin_cert" in src.values:
        values["admin_tls"] = True
    elif values["admin_tls"] and not own_certificate:
        src.fail("admin_tls", "an agent has no certificate to lend: give admin_cert, admin_key")
    if admin is not None and token is None and not is_loopback(admin.host):
        src.fail(
            "admin",
            f"{admin} is reachable from other machines: give --admin-token-file or "
            f"${ADMIN_TOKEN_ENV}, or listen on a loopback address",
        )
    return token


def _services(src: _Source, values: Mapping[str, Any]) -> tuple[ServiceConfig, ...]:
    services: list[ServiceConfig] = []
    # --proxy-protocol and --group cover every --expose service and are the defaults of
    # [[services]] tables.
    proxy_default, group_default = values["proxy_protocol"], values["group"]
    secret = _group_secret(src, values)
    for spec in values["expose"]:
        try:
            bind, port, local = parse_expose(str(spec))
        except ValueError as exc:
            src.fail("expose", str(exc))
            continue
        name = _derived_name(local)
        group = {"group": group_default, "group_secret": secret} if group_default else {}
        services.append(ServiceConfig(name, port, local, bind, proxy_default, **group))
    for index, table in enumerate(values["services"]):
        problems = len(src.problems)
        if (given := src.table("services", index, table, _SERVICE_OPTIONS)) is None:
            continue
        fields = given.read()
        if "local" not in given.values:
            given.fail("local", "missing: the service's HOST:PORT")
        if len(src.problems) == problems:
            local, proxy = fields["local"], fields["proxy_protocol"]
            proxy = proxy_default if proxy is None else proxy
            name = fields["name"] or _derived_name(local)
            group = group_default if fields["group"] is None else fields["group"]
            health = {k: v for k, v in fields.items() if k.startswith("health_")}
            services.append(
                ServiceConfig(
                    name, fields["port"], local, fields["bind"], proxy, group,
                    secret if group else b"", **health,
                )
            )  # fmt: skip
    taken: set[str] = set()
    for index, service in enumerate(services):  # same names told apart: "web", "web#2", …
        name, count = service.name, 1
        while name in taken:
            count += 1
            name = service.name[: MAX_NAME_LENGTH - len(f"#{count}")] + f"#{count}"
        taken.add(name)
        services[index] = dataclasses.replace(service, name=name)
    if (count := len(services)) > MAX_SERVICES:
        src.problem(src.source, "services", f"{count} services; at most {MAX_SERVICES} per agent")
    if any(service.group for service in services) and not secret:
        src.problem(
            "command line",
            "--group-secret-file",
            f"missing: a grouped service needs the group's secret ({GROUP_SECRET_ENV})",
        )
    if not services and not any(
        p.key in ("--expose", "expose") or p.key.startswith("services") for p in src.problems
    ):
        src.problem("command line", "--expose", "missing: nothing to expose")
    return tuple(services)


def _group_secret(src: _Source, values: Mapping[str, Any]) -> bytes:
    """The agent's group secret: from its file, the config, or the environment."""
    secret: bytes | None = values["group_secret_file"] or values["group_secret"]
    if secret is None and (env := os.environ.get(GROUP_SECRET_ENV)) is not None:
        try:
            secret = _secret(env)
        except ValueError as exc:
            src.problem("environment", GROUP_SECRET_ENV, str(exc))
    return secret or b""


def _derived_name(local: Address) -> str:
    """A service's default name: its local address, in the protocol's name alphabet."""
    return to_name(f"{local.host}:{local.port}")[-MAX_NAME_LENGTH:]
