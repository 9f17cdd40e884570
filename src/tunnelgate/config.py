"""Configuration: flags and TOML files, checked once into frozen values.

Both sides read a TOML file (``--config``) and then let flags override it.
Every problem found is collected, with the file (or "command line") and the
key, and raised together as one :class:`~tunnelgate.errors.ConfigError`;
unknown keys are problems too, so a typo never passes silently. Inner code
trusts what comes out of here. This module does no networking.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from tunnelgate import credentials
from tunnelgate.access import AccessRule, parse_access_rule
from tunnelgate.address import (
    MAX_NAME_LENGTH,
    Address,
    parse_address,
    parse_expose,
    parse_host,
    parse_name,
    parse_port_ranges,
    to_name,
)
from tunnelgate.errors import ConfigError, ConfigProblem
from tunnelgate.protocol import MAX_SERVICES

TOKEN_ENV: Final = "TUNNELGATE_TOKEN"
DEFAULT_CONTROL_PORT: Final = 8080
DEFAULT_ALLOW_PORTS: Final = "1024-65535"
MIN_TOKEN_LENGTH: Final = 16

DEFAULT_HEARTBEAT_INTERVAL: Final = 10.0
DEFAULT_HEARTBEAT_TIMEOUT: Final = 25.0
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
DEFAULT_PENDING_TIMEOUT: Final = 10.0
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
DEFAULT_POOL_SIZE: Final = 4
DEFAULT_MAX_POOL_SIZE: Final = 64
DEFAULT_RECONNECT_MIN: Final = 0.5
DEFAULT_RECONNECT_MAX: Final = 30.0
DEFAULT_DRAIN_TIMEOUT: Final = 10.0
DEFAULT_MAX_CONNECTIONS: Final = 16384
DEFAULT_MAX_PENDING_CLIENTS: Final = 1024
DEFAULT_MAX_HANDSHAKES: Final = 1024

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")


# --- the values -------------------------------------------------------------


@dataclass(frozen=True)
class ServiceConfig:
    """One service the agent exposes: ``bind:port`` on the gateway to ``local``."""

    name: str
    port: int  # 0: any free port the gateway picks
    local: Address
    bind: str = ""  # "": the gateway's default bind address
    proxy_protocol: int = 0  # PROXY protocol header sent to the service: 0 none, 1 or 2


@dataclass(frozen=True)
class AgentPolicy:
    """What the gateway lets one agent (or, unnamed, every agent) do.

    An agent proves one of ``tokens`` (kept in clear) or of ``stored_keys``
    (from ``token_hash``: see :mod:`tunnelgate.credentials`); several at once
    let a token be rotated without downtime. A policy with neither needs
    ``client_ca``: the agent's certificate is then its only credential.
    """

    name: str  # "" in single-token mode: any agent name
    tokens: tuple[bytes, ...] = field(repr=False)
    allow_ports: tuple[range, ...]
    stored_keys: tuple[bytes, ...] = field(default=(), repr=False)
    allow_bind: tuple[str, ...] = ()  # (): the gateway's allow_bind
    max_services: int = MAX_SERVICES
    max_connections: int = 0  # 0: the gateway's max_connections
    access: AccessRule | None = None  # [agents.access]: all of this agent's services
    service_access: Mapping[str, AccessRule] = field(default_factory=dict)  # by service name

    def allows_port(self, port: int) -> bool:
        return any(port in r for r in self.allow_ports)

    @property
    def token(self) -> bytes:
        """The first clear token (single-token mode has exactly one)."""
        return self.tokens[0] if self.tokens else b""


@dataclass(frozen=True)
class GatewayConfig:
    """Everything a gateway needs; see ``docs/ARCHITECTURE.md`` for each key."""

    listen: Address
    agents: tuple[AgentPolicy, ...]  # (): single-token mode, the token not read yet
    allow_ports: tuple[range, ...]  # every agent's, unless its [[agents]] table says
    tls: bool = True
    cert: Path | None = None
    key: Path | None = None
    state_dir: Path | None = None
    bind_host: str = ""  # "": the host of ``listen``
    allow_bind: tuple[str, ...] = ()  # (): only ``bind_host``
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    pending_timeout: float = DEFAULT_PENDING_TIMEOUT
    max_pool_size: int = DEFAULT_MAX_POOL_SIZE
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # client connections per session
    max_pending_clients: int = DEFAULT_MAX_PENDING_CLIENTS  # per session, awaiting a channel
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES  # control-port connections not yet authenticated
    client_ca: Path | None = None  # agents must present a certificate signed by this CA
    access: AccessRule | None = None  # [access]: every service of every agent
    service_access: Mapping[str, AccessRule] = field(default_factory=dict)  # [services.NAME]

    @property
    def default_bind(self) -> str:
        return self.bind_host or self.listen.host


@dataclass(frozen=True)
class AgentConfig:
    """Everything an agent needs; see ``docs/ARCHITECTURE.md`` for each key."""

    gateway: Address
    token: bytes = field(repr=False)
    services: tuple[ServiceConfig, ...]
    name: str = "agent"
    tls: bool = True
    ca: Path | None = None
    fingerprint: str = ""  # normalised "SHA256:<64 hex>", or ""
    cert: Path | None = None  # the agent's own certificate, for a gateway with client_ca
    key: Path | None = None
    pool_size: int = DEFAULT_POOL_SIZE
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    reconnect_min: float = DEFAULT_RECONNECT_MIN
    reconnect_max: float = DEFAULT_RECONNECT_MAX
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"


# --- reading ----------------------------------------------------------------

T = TypeVar("T")


class _Source:
    """Merged settings from a file and flags, remembering where each came from."""

    def __init__(self, path: Path | None, flags: Mapping[str, Any]) -> None:
        self.path = path
        self.problems: list[ConfigProblem] = []
        self.values: dict[str, Any] = {}
        self.origin: dict[str, tuple[str, str]] = {}  # key -> (source, label)
        if path is not None:
            try:
                with path.open("rb") as fh:
                    data = tomllib.load(fh)
            except OSError as exc:
                self.problem(str(path), "-", f"cannot read: {exc.strerror or exc}")
                data = {}
            except tomllib.TOMLDecodeError as exc:
                self.problem(str(path), "-", f"not valid TOML: {exc}")
                data = {}
            except UnicodeDecodeError as exc:
                self.problem(str(path), "-", f"not valid TOML: not UTF-8 ({exc.reason})")
                data = {}
            except RecursionError:
                self.problem(str(path), "-", "not valid TOML: nested too deeply")
                data = {}
            for key, value in data.items():
                self.values[key] = value
                self.origin[key] = (str(path), key)
        for key, value in flags.items():
            if value is not None:
                self.values[key] = value
                self.origin[key] = ("command line", "--" + key.replace("_", "-"))

    def problem(self, source: str, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(source, key, message))

    def fail(self, key: str, message: str) -> None:
        source, label = self.origin.get(key, (str(self.path or "command line"), key))
        self.problem(source, label, message)

    def reject_unknown(self, known: set[str]) -> None:
        for key in self.values:
            if key not in known:
                self.fail(key, "unknown key")

    def get(self, key: str, kind: type[T] | tuple[type, ...], default: T) -> T:
        if key not in self.values:
            return default
        value = self.values[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.fail(key, f"expected {names}, got {type(value).__name__} {value!r}")
            return default
        return value  # type: ignore[return-value]

    def parse(self, key: str, parser: Callable[[Any], T], default: T) -> T:
        if key not in self.values:
            return default
        try:
            return parser(self.values[key])
        except (ValueError, TypeError) as exc:
            self.fail(key, str(exc))
            return default

    def seconds(self, key: str, default: float, *, allow_zero: bool = False) -> float:
        value = self.get(key, float, default)
        low_ok = value >= 0 if allow_zero else value > 0
        if not low_ok or value > 3600:
            bounds = "[0, 3600]" if allow_zero else "(0, 3600]"
            self.fail(key, f"expected seconds in {bounds}, got {value}")
            return default
        return value

    def count(self, key: str, default: int, low: int, high: int) -> int:
        value = self.get(key, int, default)
        if not low <= value <= high:
            self.fail(key, f"expected an integer in [{low}, {high}], got {value}")
            return default
        return value

    def raise_problems(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _read_token_file(path: str) -> bytes:
    try:
        text = _path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read token file {path!r}: {exc.strerror or exc}") from None
    return check_token(text)


def check_token(text: str) -> bytes:
    """The token written in ``text`` (whitespace around it left out); ValueError if too short."""
    text = text.strip()
    if len(text) < MIN_TOKEN_LENGTH:
        raise ValueError(f"token too short (at least {MIN_TOKEN_LENGTH} characters)")
    return text.encode()


def read_token(token_file: str | None) -> bytes:
    """The token in ``token_file``, else in ``$TUNNELGATE_TOKEN``; ConfigError if unusable."""
    key = "--token-file" if token_file else TOKEN_ENV
    try:
        if token_file:
            return _read_token_file(token_file)
        return check_token(os.environ.get(TOKEN_ENV, ""))
    except ValueError as exc:
        raise ConfigError([ConfigProblem("command line", key, str(exc))]) from None


def _token(src: _Source) -> bytes | None:
    """The token from --token, --token-file, the environment, or the file, in that order.

    None if there is none, or if the one found is unusable (then a problem is recorded).
    """
    from_flags = [
        k for k in ("token", "token_file") if src.origin.get(k, ("",))[0] == "command line"
    ]
    env = os.environ.get(TOKEN_ENV)
    if not from_flags and env:
        try:
            return check_token(env)
        except ValueError as exc:
            src.problem("environment", TOKEN_ENV, str(exc))
            return None
    for key in from_flags or ["token", "token_file"]:
        if key in src.values:
            if key == "token":
                return src.parse(key, lambda v: check_token(str(v)), None)
            return src.parse(key, lambda v: _read_token_file(str(v)), None)
    return None


def _token_problem_recorded(src: _Source) -> bool:
    keys = {"--token", "token", "--token-file", "token_file", TOKEN_ENV}
    return any(p.key in keys for p in src.problems)


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/tunnelgate``, else ``~/.local/state/tunnelgate``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tunnelgate"


_GATEWAY_KEYS: Final = {
    "listen", "token", "token_file", "tls", "cert", "key", "state_dir", "bind_host",
    "allow_bind", "allow_ports", "heartbeat_interval", "heartbeat_timeout",
    "handshake_timeout", "pending_timeout", "max_pool_size", "agents", "log_level",
    "log_format", "drain_timeout", "max_connections", "max_pending_clients", "max_handshakes",
    "client_ca", "access", "services",
}  # fmt: skip
_AGENT_POLICY_KEYS: Final = {
    "name", "token", "token_file", "token_hash", "allow_ports", "allow_bind", "max_services",
    "max_connections", "access", "services",
}  # fmt: skip


def _log_config(src: _Source) -> LogConfig:
    level = src.get("log_level", str, "info").lower()
    if level not in LOG_LEVELS:
        src.fail("log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
        level = "info"
    fmt = src.get("log_format", str, "text")
    if fmt not in LOG_FORMATS:
        src.fail("log_format", f"expected one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
        fmt = "text"
    return LogConfig(level, fmt)


def load_gateway_config(
    path: Path | None = None,
    flags: Mapping[str, Any] | None = None,
) -> tuple[GatewayConfig, LogConfig]:
    """Read the gateway's file and flags (reading only: nothing is written).

    With no token given in any way and no ``[[agents]]``, ``agents`` is empty:
    the CLI adds the token stored in the state directory (see ``cli``).
    """
    src = _Source(path, flags or {})
    src.reject_unknown(_GATEWAY_KEYS)
    listen = src.parse(
        "listen",
        lambda v: parse_address(str(v), allow_zero=True),
        Address("0.0.0.0", DEFAULT_CONTROL_PORT),
    )
    tls = src.get("tls", bool, True)
    cert = src.parse("cert", _path, None)
    key = src.parse("key", _path, None)
    if (cert is None) != (key is None):
        src.fail("cert" if cert is not None else "key", "cert and key must be given together")
    state_dir = src.parse("state_dir", _path, None)
    bind_host = src.parse("bind_host", lambda v: parse_host(str(v)), "")
    no_binds: list[str] = []
    allow_bind = tuple(
        src.parse("allow_bind", lambda v: [parse_host(str(h)) for h in _as_list(v)], no_binds)
    )
    allow_ports = src.parse(
        "allow_ports", parse_port_ranges, parse_port_ranges(DEFAULT_ALLOW_PORTS)
    )
    client_ca = src.parse("client_ca", _existing_file, None)
    if client_ca is not None and not tls:
        src.fail("client_ca", "makes no sense with --no-tls: certificates are part of TLS")
    agents: list[AgentPolicy] = []
    tables = src.get("agents", list, [])
    for index, table in enumerate(tables):
        agents.extend(_agent_policy(src, index, table, allow_ports, client_ca is not None))
    names: list[str] = [
        t["name"] for t in tables if isinstance(t, dict) and isinstance(t.get("name"), str)
    ]
    for name in sorted({n for n in names if names.count(n) > 1}):
        src.fail("agents", f"agent {name!r} is listed more than once")
    if agents:
        for name in ("token", "token_file"):
            if name in src.values:
                src.fail(name, "not used with [[agents]]: give each agent its own token there")
    else:
        token = _token(src)
        if token is not None:
            agents.append(AgentPolicy("", (token,), allow_ports))
    access = _access_rule(src, src.values.get("access"), "access")
    service_access = _service_rules(src, src.values.get("services"), "services")
    interval = src.seconds("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL)
    timeout = src.seconds("heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT)
    if timeout <= interval:
        src.fail("heartbeat_timeout", "must be longer than heartbeat_interval")
    config = GatewayConfig(
        listen=listen,
        agents=tuple(agents),
        allow_ports=allow_ports,
        tls=tls,
        cert=cert,
        key=key,
        state_dir=state_dir,
        bind_host=bind_host,
        allow_bind=allow_bind,
        heartbeat_interval=interval,
        heartbeat_timeout=timeout,
        handshake_timeout=src.seconds("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT),
        pending_timeout=src.seconds("pending_timeout", DEFAULT_PENDING_TIMEOUT),
        max_pool_size=src.count("max_pool_size", DEFAULT_MAX_POOL_SIZE, 1, 4096),
        drain_timeout=src.seconds("drain_timeout", DEFAULT_DRAIN_TIMEOUT, allow_zero=True),
        max_connections=src.count("max_connections", DEFAULT_MAX_CONNECTIONS, 1, 1 << 20),
        max_pending_clients=src.count(
            "max_pending_clients", DEFAULT_MAX_PENDING_CLIENTS, 1, 1 << 16
        ),
        max_handshakes=src.count("max_handshakes", DEFAULT_MAX_HANDSHAKES, 1, 1 << 16),
        client_ca=client_ca,
        access=access,
        service_access=service_access,
    )
    log = _log_config(src)
    src.raise_problems()
    return config, log


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        return value
    raise ValueError(f"expected a list, got {type(value).__name__}")


def _path(value: Any) -> Path:
    """A path from a setting, ``~`` and ``~user`` expanded."""
    try:
        return Path(str(value)).expanduser()
    except RuntimeError:  # ~user for a user this system does not know
        raise ValueError(f"cannot expand {str(value)!r}: no such user's home") from None


def _existing_file(value: Any) -> Path:
    path = _path(value)
    if not path.is_file():
        raise ValueError(f"no such file: {value}")
    return path


def _strings(value: Any) -> list[str]:
    """A string or a list of strings, as a list."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ValueError("expected a string or a list of strings")
    return items


def _access_rule(src: _Source, table: Any, where: str) -> AccessRule | None:
    """The rule of one access table (None if absent), its problems recorded."""
    if table is None:
        return None
    source = str(src.path or "command line")
    rule, problems = parse_access_rule(table, where)
    for key, message in problems:
        src.problem(source, key, message)
    return rule


def _service_rules(src: _Source, tables: Any, where: str) -> dict[str, AccessRule]:
    """``[services.NAME]`` tables: an access rule per service name."""
    if tables is None:
        return {}
    if not isinstance(tables, dict):
        src.problem(str(src.path), where, "expected tables like [services.web]")
        return {}
    rules = {}
    for name, table in tables.items():
        rule = _access_rule(src, table, f"{where}.{name}")
        if rule is not None:
            rules[name] = rule
    return rules


def _agent_policy(
    src: _Source, index: int, table: Any, default_ports: tuple[range, ...], certified: bool
) -> list[AgentPolicy]:
    where, _ = src.origin.get("agents", (str(src.path), "agents"))
    prefix = f"agents[{index}]"
    if not isinstance(table, dict):
        src.problem(where, prefix, "expected a table ([[agents]])")
        return []
    problems = len(src.problems)
    for key in table:
        if key not in _AGENT_POLICY_KEYS:
            src.problem(where, f"{prefix}.{key}", "unknown key")
    try:
        name = parse_name(table.get("name"))
    except ValueError as exc:
        src.problem(where, f"{prefix}.name", str(exc))
        return []

    def values(key: str, parse: Callable[[str], T]) -> list[T]:
        if key not in table:
            return []
        try:
            return [parse(v) for v in _strings(table[key])]
        except ValueError as exc:
            src.problem(where, f"{prefix}.{key}", str(exc))
            return []

    tokens = values("token", check_token) + values("token_file", _read_token_file)
    stored_keys = values("token_hash", credentials.parse_hash_line)
    if not tokens and not stored_keys and len(src.problems) == problems and not certified:
        src.problem(
            where,
            f"{prefix}.token",
            "missing: token, token_file or token_hash (or client_ca, for certificates alone)",
        )
    ports = default_ports
    if "allow_ports" in table:
        try:
            ports = parse_port_ranges(table["allow_ports"])
        except ValueError as exc:
            src.problem(where, f"{prefix}.allow_ports", str(exc))
    binds = tuple(values("allow_bind", parse_host))
    limits = {}
    for key, default, high in (
        ("max_services", MAX_SERVICES, MAX_SERVICES),
        ("max_connections", 0, 1 << 20),
    ):
        value = table.get(key, default)
        if key in table and (
            not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high
        ):
            src.problem(
                where, f"{prefix}.{key}", f"expected an integer in [1, {high}], got {value!r}"
            )
            value = default
        limits[key] = value
    label = f"agents[{name}]"
    access = _access_rule(src, table.get("access"), f"{label}.access")
    service_access = _service_rules(src, table.get("services"), f"{label}.services")
    if len(src.problems) > problems:
        return []
    return [
        AgentPolicy(
            name,
            tuple(tokens),
            ports,
            stored_keys=tuple(stored_keys),
            allow_bind=binds,
            max_services=limits["max_services"],
            max_connections=limits["max_connections"],
            access=access,
            service_access=service_access,
        )
    ]


_AGENT_KEYS: Final = {
    "gateway", "token", "token_file", "tls", "ca", "fingerprint", "name", "expose",
    "services", "pool_size", "connect_timeout", "handshake_timeout", "reconnect_min",
    "reconnect_max", "log_level", "log_format", "drain_timeout", "proxy_protocol", "cert", "key",
}  # fmt: skip
_SERVICE_KEYS: Final = {"name", "bind", "port", "local", "proxy_protocol"}
PROXY_PROTOCOL_VERSIONS: Final = {"none": 0, "v1": 1, "v2": 2}


def normalize_fingerprint(text: str) -> str:
    """``SHA256:<64 hex>`` from any common spelling (prefix, colons, case)."""
    value = text.strip()
    if value.lower().startswith("sha256:"):
        value = value[7:]
    value = value.replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("expected SHA256: and 64 hex digits, as the gateway prints it")
    return "SHA256:" + value.upper()


def default_agent_name() -> str:
    name = to_name(socket.gethostname())[:MAX_NAME_LENGTH]
    return name or "agent"


def load_agent_config(
    path: Path | None = None, flags: Mapping[str, Any] | None = None
) -> tuple[AgentConfig, LogConfig]:
    """Read the agent's file and flags; ``flags["expose"]`` is a list of specs."""
    src = _Source(path, flags or {})
    src.reject_unknown(_AGENT_KEYS)
    gateway = src.parse("gateway", lambda v: parse_address(str(v)), None)
    if gateway is None and "gateway" not in src.values:
        src.problem("command line", "--gateway", "missing: the gateway's HOST:PORT")
    token = _token(src)
    if token is None and not _token_problem_recorded(src) and "cert" not in src.values:
        src.problem(
            "command line",
            "--token",
            f"missing: give --token, --token-file or {TOKEN_ENV} "
            "(or only --cert and --key, for a gateway that takes certificates alone)",
        )
    tls = src.get("tls", bool, True)
    ca = src.parse("ca", _path, None)
    fingerprint = src.parse("fingerprint", lambda v: normalize_fingerprint(str(v)), "")
    if not tls and (ca is not None or fingerprint):
        src.fail("ca" if ca is not None else "fingerprint", "makes no sense with --no-tls")
    cert = src.parse("cert", _existing_file, None)
    key = src.parse("key", _existing_file, None)
    if ("cert" in src.values) != ("key" in src.values):
        src.fail("cert" if "cert" in src.values else "key", "cert and key must be given together")
    if not tls and "cert" in src.values:
        src.fail("cert", "makes no sense with --no-tls: certificates are part of TLS")
    name = src.parse("name", parse_name, default_agent_name())
    services = _services(src)
    reconnect_min = src.seconds("reconnect_min", DEFAULT_RECONNECT_MIN)
    reconnect_max = src.seconds("reconnect_max", DEFAULT_RECONNECT_MAX)
    config = AgentConfig(
        gateway=gateway or Address("localhost", DEFAULT_CONTROL_PORT),
        token=token or b"",
        services=services,
        name=name,
        tls=tls,
        ca=ca,
        fingerprint=fingerprint,
        cert=cert,
        key=key,
        pool_size=src.count("pool_size", DEFAULT_POOL_SIZE, 0, 256),
        connect_timeout=src.seconds("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
        handshake_timeout=src.seconds("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT),
        reconnect_min=reconnect_min,
        reconnect_max=max(reconnect_max, reconnect_min),
        drain_timeout=src.seconds("drain_timeout", DEFAULT_DRAIN_TIMEOUT, allow_zero=True),
    )
    log = _log_config(src)
    src.raise_problems()
    return config, log


def _services(src: _Source) -> tuple[ServiceConfig, ...]:
    services: list[ServiceConfig] = []
    # The top-level setting (--proxy-protocol) covers every --expose service and
    # is the default of [[services]] tables.
    proxy_default = src.parse("proxy_protocol", _proxy_protocol, 0)
    for spec in src.get("expose", list, []):
        try:
            bind, port, local = parse_expose(str(spec))
        except ValueError as exc:
            src.fail("expose", str(exc))
            continue
        services.append(ServiceConfig(_derived_name(local), port, local, bind, proxy_default))
    where, _ = src.origin.get("services", (str(src.path), "services"))
    for index, table in enumerate(src.get("services", list, [])):
        prefix = f"services[{index}]"
        if not isinstance(table, dict):
            src.problem(where, prefix, "expected a table ([[services]])")
            continue
        bad = False
        for key in table:
            if key not in _SERVICE_KEYS:
                src.problem(where, f"{prefix}.{key}", "unknown key")
                bad = True
        if "local" not in table:
            src.problem(where, f"{prefix}.local", "missing: the service's HOST:PORT")
            continue
        try:
            local = parse_address(str(table["local"]))
        except ValueError as exc:
            src.problem(where, f"{prefix}.local", str(exc))
            continue
        port = table.get("port", 0)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            src.problem(where, f"{prefix}.port", f"expected a port 0-65535, got {port!r}")
            continue
        name = table.get("name", _derived_name(local))
        try:
            name = parse_name(name) if "name" in table else name
            bind = parse_host(str(table["bind"])) if "bind" in table else ""
        except ValueError as exc:
            src.problem(where, f"{prefix}.name/bind", str(exc))
            continue
        proxy = proxy_default
        if "proxy_protocol" in table:
            try:
                proxy = _proxy_protocol(table["proxy_protocol"])
            except ValueError as exc:
                src.problem(where, f"{prefix}.proxy_protocol", str(exc))
                continue
        if not bad:
            services.append(ServiceConfig(name, port, local, bind, proxy))
    taken: set[str] = set()
    unique = []
    for service in services:
        name, count = service.name, 1
        while name in taken:
            count += 1
            suffix = f"#{count}"
            name = service.name[: MAX_NAME_LENGTH - len(suffix)] + suffix
        taken.add(name)
        unique.append(
            ServiceConfig(name, service.port, service.local, service.bind, service.proxy_protocol)
        )
    if len(unique) > MAX_SERVICES:
        src.problem(
            "command line" if src.path is None else str(src.path),
            "services",
            f"{len(unique)} services; at most {MAX_SERVICES} per agent",
        )
    if not unique and not any(
        p.key in ("--expose", "expose") or p.key.startswith("services") for p in src.problems
    ):
        src.problem("command line", "--expose", "missing: nothing to expose")
    return tuple(unique)


def _proxy_protocol(value: Any) -> int:
    """The PROXY protocol version of a ``proxy_protocol`` setting (0: none)."""
    if isinstance(value, str) and value.lower() in PROXY_PROTOCOL_VERSIONS:
        return PROXY_PROTOCOL_VERSIONS[value.lower()]
    raise ValueError(f'expected "v1", "v2" or "none", got {value!r}')


def _derived_name(local: Address) -> str:
    """A service's default name: its local address, in the protocol's name alphabet."""
    return to_name(f"{local.host}:{local.port}")[-MAX_NAME_LENGTH:]
