"""Configuration: addresses, flags and TOML files checked once, every problem reported."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tunnelgate import config as c
from tunnelgate import credentials
from tunnelgate.address import Address
from tunnelgate.errors import ConfigError, ConfigProblem
from tunnelgate.protocol.wire import Name

A = Address
TOKEN = "t" * c.MIN_TOKEN_LENGTH
AGENT = {"gateway": "gw.example:8080", "token": TOKEN}
EXPOSING = {**AGENT, "expose": ["1:a:2"]}
HEX = "ab" * 32

# Data tables, several cases a line.
# fmt: off
BAD_TYPES = [
    ('tls = "yes"', "tls", "expected bool, got str 'yes'"),
    ("heartbeat_interval = true", "heartbeat_interval", "expected float"),
    ("max_pool_size = 1.5", "max_pool_size", "expected int"),
    ("max_pool_size = 0", "max_pool_size", "[1, 4096]"),
    ("pending_timeout = 0", "pending_timeout", "seconds in (0, 3600]"),
    ('listen = "nowhere"', "listen", "expected HOST:PORT"),
    ('log_level = "loud"', "log_level", "expected one of"),
    ("drain_timeout = -1", "drain_timeout", "seconds in [0, 3600]"),
    ("max_connections = 0", "max_connections", "[1, 1048576]"),
    ("max_pending_clients = 100000", "max_pending_clients", "[1, 65536]"),
    ('max_handshakes = "many"', "max_handshakes", "expected int"),
]
INCONSISTENT = [
    ({"heartbeat_interval": 30.0}, "heartbeat_timeout", "must be longer than heartbeat_interval"),
    ({"cert": "c.pem"}, "--cert", "cert and key must be given together"),
    ({"key": "k.pem"}, "--key", "cert and key must be given together"),
]
BAD_AGENTS = f"""agents = [
  {{ name = "ok", token = "{TOKEN}" }}, {{ name = "short", token = "abc" }},
  {{ token = "{TOKEN}" }}, {{ name = "typo", token = "{TOKEN}", port = 1, allow_ports = "9-1" }},
  {{ name = "none" }},
]"""
BAD_AGENTS_KEYS = {
    "agents[1].token", "agents[2].name", "agents[3].port", "agents[3].allow_ports",
    "agents[4].token",
}
FINGERPRINTS = [HEX, HEX.upper(), f"SHA256:{HEX}", f"sha256:{HEX}", ":".join(["AB"] * 32)]
BAD_FINGERPRINTS = [
    ({"fingerprint": "SHA256:abcd"}, "64 hex digits"), ({"fingerprint": "zz" * 32}, "64 hex"),
    ({"fingerprint": "md5:" + HEX}, "64 hex"), ({"fingerprint": HEX, "tls": False}, "--no-tls"),
]
LONG_NAMES = [["1:" + "h" * 70 + ":80"], ["1:[fe80::1%eth0]:80"], ["1:" + "h" * 61 + ":80"] * 2]
# fmt: on


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(c.TOKEN_ENV, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tunnelgate.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(load: Any, *args: Any) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load(*args)
    return info.value.problems


def keys(found: list[ConfigProblem]) -> set[str]:
    return {p.key for p in found}


# --- load_gateway_config ----------------------------------------------------


def test_load_gateway_config_defaults(tmp_path: Path) -> None:
    """With nothing given: 0.0.0.0:8080, TLS, default ports, no token yet, nothing written."""
    config, log = c.load_gateway_config()
    assert config.listen == A("0.0.0.0", 8080) and config.default_bind == "0.0.0.0"
    assert config.tls and config.cert is None and config.max_pool_size == 64
    assert (config.heartbeat_interval, config.heartbeat_timeout) == (10.0, 25.0)
    assert (config.drain_timeout, config.max_connections) == (10.0, 16384)
    assert (config.max_pending_clients, config.max_handshakes) == (1024, 1024)
    assert config.agents == () and config.allow_ports == (range(1024, 65536),)
    assert not (tmp_path / "xdg").exists()
    assert (log.level, log.format) == ("info", "text")


def test_load_gateway_config_flags_override_file(tmp_path: Path) -> None:
    """A flag wins over the same key in the file; unset flags leave the file's value."""
    path = toml(tmp_path, f'listen = "0.0.0.0:9000"\ntoken = "{TOKEN}"\nmax_pool_size = 8\n')
    config, _ = c.load_gateway_config(path, {"listen": "127.0.0.1:7000", "max_pool_size": None})
    assert (config.listen, config.max_pool_size) == (A("127.0.0.1", 7000), 8)


def test_load_config_drain_timeout_zero_means_no_drain(tmp_path: Path) -> None:
    """drain_timeout = 0 is allowed on both sides: stop at once, resetting open connections."""
    path = toml(tmp_path, f'token = "{TOKEN}"\ndrain_timeout = 0\n')
    assert c.load_gateway_config(path)[0].drain_timeout == 0.0
    assert c.load_agent_config(None, {**EXPOSING, "drain_timeout": 0})[0].drain_timeout == 0.0
    assert c.load_agent_config(None, EXPOSING)[0].drain_timeout == 10.0


def test_load_gateway_config_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    """A typo in the file is reported with the file and the key."""
    path = toml(tmp_path, f'token = "{TOKEN}"\nlisten_port = 80\n')
    [problem] = problems(c.load_gateway_config, path)
    assert problem == ConfigProblem(str(path), "listen_port", "unknown key")


@pytest.mark.parametrize(("line", "key", "message"), BAD_TYPES)
def test_load_gateway_config_rejects_bad_types(
    tmp_path: Path, line: str, key: str, message: str
) -> None:
    """A value of the wrong type or range is reported under its key."""
    path = toml(tmp_path, f'token = "{TOKEN}"\n{line}\n')
    [problem] = problems(c.load_gateway_config, path)
    assert (problem.source, problem.key) == (str(path), key) and message in problem.message


def test_load_gateway_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    """Several mistakes in one file are all reported together."""
    text = 'tls = "yes"\nlisten = "x"\nmax_pool_size = -1\ncolour = 1\ntoken = "short"\n'
    found = problems(c.load_gateway_config, toml(tmp_path, text))
    assert keys(found) == {"tls", "listen", "max_pool_size", "colour", "token"}


def test_load_gateway_config_toml_syntax_error_names_file(tmp_path: Path) -> None:
    """A file that is not TOML is reported with its name."""
    path = toml(tmp_path, "listen = \n")
    [problem] = problems(c.load_gateway_config, path)
    assert (problem.source, problem.key) == (str(path), "-")
    assert problem.message.startswith("not valid TOML")


def test_load_gateway_config_token_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token comes from --token, then --token-file, then the environment, then the file."""
    token_file = tmp_path / "token.txt"
    token_file.write_text("f" * 20 + "\n", encoding="utf-8")
    path = toml(tmp_path, f'token = "{"c" * 20}"\n')
    monkeypatch.setenv(c.TOKEN_ENV, "e" * 20)

    def token(**flags: str) -> bytes:
        return c.load_gateway_config(path, flags)[0].agents[0].token

    assert token(token="a" * 20, token_file=str(token_file)) == b"a" * 20
    assert token(token_file=str(token_file)) == b"f" * 20
    assert token() == b"e" * 20
    monkeypatch.delenv(c.TOKEN_ENV)
    assert token() == b"c" * 20


def test_load_gateway_config_rejects_short_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token shorter than the minimum is refused, naming where it came from."""
    [problem] = problems(c.load_gateway_config, None, {"token": "short"})
    assert (problem.source, problem.key) == ("command line", "--token")
    assert "too short" in problem.message
    monkeypatch.setenv(c.TOKEN_ENV, "short")
    [problem] = problems(c.load_gateway_config)
    assert (problem.source, problem.key) == ("environment", c.TOKEN_ENV)


def test_load_gateway_config_agents_tables(tmp_path: Path) -> None:
    """[[agents]] give each agent its own token and ports; no token is generated."""
    (tmp_path / "lab.token").write_text("l" * 16, encoding="utf-8")
    text = f"""allow_ports = "9000-9010"
[[agents]]
name = "office"
token = "{"o" * 16}"
allow_ports = ["3920", "8000-8100"]
[[agents]]
name = "lab"
token_file = "{tmp_path / "lab.token"}"
"""
    config, _ = c.load_gateway_config(toml(tmp_path, text), {"state_dir": str(tmp_path / "s")})
    office, lab = config.agents
    assert (office.name, office.token) == ("office", b"o" * 16)
    assert (lab.name, lab.token) == ("lab", b"l" * 16)
    assert office.allows_port(3920) and office.allows_port(8100) and not office.allows_port(9000)
    assert lab.allow_ports == (range(9000, 9011),)
    assert not (tmp_path / "s").exists()


def test_load_gateway_config_agents_errors_have_key_paths(tmp_path: Path) -> None:
    """Each mistake in [[agents]] is reported with its key path, like agents[1].token."""
    path = toml(tmp_path, BAD_AGENTS)
    found = problems(c.load_gateway_config, path)
    assert {p.source for p in found} == {str(path)} and keys(found) == BAD_AGENTS_KEYS


def test_load_gateway_config_policy_keys(tmp_path: Path) -> None:
    """Several tokens (clear and hashed), bind addresses, limits and access tables."""
    line = credentials.hash_line(credentials.derive(TOKEN.encode(), "site-a").stored_key)
    text = f"""[access]
deny = ["203.0.113.0/24"]
[services.web]
max_connections = 10
[[agents]]
name = "site-a"
token = ["{TOKEN}", "{"u" * 16}"]
token_hash = "{line}"
allow_bind = ["0.0.0.0", "::1"]
max_services = 3
max_connections = 100
[agents.access]
allow = ["10.0.0.0/8"]
[agents.services.db]
rate_per_client = 2
"""
    config, _ = c.load_gateway_config(toml(tmp_path, text))
    (policy,) = config.agents
    assert policy.tokens == (TOKEN.encode(), b"u" * 16)
    assert policy.stored_keys == (credentials.parse_hash_line(line),)
    assert policy.allow_bind == ("0.0.0.0", "::1")
    assert (policy.max_services, policy.max_connections) == (3, 100)
    assert policy.access is not None and policy.access.where == "agents[site-a].access"
    assert policy.service_access["db"].rate_per_client == 2
    assert config.access is not None and config.service_access["web"].max_connections == 10
    assert TOKEN not in repr(config) and line not in repr(config)


BAD_POLICIES = f"""client_ca = "/no/such/ca.pem"
services = 5
[access]
allow = "10.0.0.0/8"
[[agents]]
name = "a"
token_hash = "tg2:nope"
max_services = 0
allow_bind = ["bad host"]
[agents.services.web]
colour = "blue"
[[agents]]
name = "a"
token = "{TOKEN}"
max_connections = true
[[agents]]
name = "b"
"""
BAD_POLICY_KEYS = {
    "client_ca", "services", "access.allow", "agents[0].token_hash", "agents[0].max_services",
    "agents[0].allow_bind", "agents[a].services.web.colour", "agents[1].max_connections",
    "agents", "agents[2].token",
}  # fmt: skip


def test_load_gateway_config_policy_errors_have_key_paths(tmp_path: Path) -> None:
    """Each mistake in a policy or an access table is reported with its key path;
    an agent listed twice, and one without a token and without client_ca, too."""
    found = problems(c.load_gateway_config, toml(tmp_path, BAD_POLICIES))
    assert keys(found) == BAD_POLICY_KEYS, found
    assert any("listed more than once" in p.message for p in found)


def test_load_gateway_config_client_ca_allows_agents_without_tokens(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here", encoding="utf-8")
    text = f'client_ca = "{ca}"\n[[agents]]\nname = "site-a"\n'
    config, _ = c.load_gateway_config(toml(tmp_path, text))
    assert config.client_ca == ca and config.agents[0].tokens == ()
    [problem] = problems(c.load_gateway_config, toml(tmp_path, text), {"tls": False})
    assert problem.key == "--no-tls" or "client_ca" in problem.key


def test_load_agent_config_certificate_instead_of_token(tmp_path: Path) -> None:
    cert, key = tmp_path / "a.crt", tmp_path / "a.key"
    cert.write_text("x", encoding="utf-8")
    key.write_text("x", encoding="utf-8")
    flags = {"gateway": "gw:1", "expose": ["1:a:2"], "cert": str(cert), "key": str(key)}
    config, _ = c.load_agent_config(None, flags)
    assert (config.cert, config.key, config.token) == (cert, key, b"")
    [problem] = problems(c.load_agent_config, None, {**flags, "key": None})
    assert "together" in problem.message


@pytest.mark.parametrize(("flags", "key", "message"), INCONSISTENT)
def test_load_gateway_config_rejects_inconsistent_settings(
    flags: dict[str, Any], key: str, message: str
) -> None:
    """A heartbeat timeout not above the interval, or a cert without its key, is refused."""
    [problem] = problems(c.load_gateway_config, None, {"token": TOKEN, **flags})
    assert (problem.key, problem.message) == (key, message)


# --- load_agent_config ------------------------------------------------------


def test_load_agent_config_expose_flags_and_services_tables(tmp_path: Path) -> None:
    """--expose specs and [[services]] tables both become services."""
    text = '[[services]]\nname = "db"\nlocal = "[::1]:5432"\nport = 15432\nbind = "0.0.0.0"\n'
    flags = {**AGENT, "expose": ["8080:localhost:80", "127.0.0.1:0:web:8000"]}
    config, _ = c.load_agent_config(toml(tmp_path, text), flags)
    assert [(s.name, s.bind, s.port, s.local) for s in config.services] == [
        ("localhost:80", "", 8080, A("localhost", 80)),
        ("web:8000", "127.0.0.1", 0, A("web", 8000)),
        ("db", "0.0.0.0", 15432, A("::1", 5432)),
    ]
    assert config.gateway == A("gw.example", 8080) and config.token == TOKEN.encode()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"expose": ["1:a:2"]}, {"--gateway", "--token"}), (AGENT, {"--expose"})],
)
def test_load_agent_config_reports_missing_settings(
    flags: dict[str, Any], expected: set[str]
) -> None:
    """A missing gateway, token or service is reported under the flag to give."""
    found = problems(c.load_agent_config, None, flags)
    assert keys(found) == expected and all(p.message.startswith("missing") for p in found)


def test_load_agent_config_reports_every_missing_setting() -> None:
    """An empty configuration reports the gateway, the token and the services together."""
    assert keys(problems(c.load_agent_config, None, {})) == {"--gateway", "--token", "--expose"}


def test_load_agent_config_unreadable_token_file_is_one_problem(tmp_path: Path) -> None:
    """A token file that cannot be read is reported once, not also as a missing token."""
    flags = {"gateway": "gw:1", "token_file": str(tmp_path / "absent"), "expose": ["1:a:2"]}
    assert keys(problems(c.load_agent_config, None, flags)) == {"--token-file"}


@pytest.mark.parametrize("text", FINGERPRINTS)
def test_load_agent_config_normalises_fingerprint(text: str) -> None:
    """Any usual spelling of the gateway's fingerprint becomes SHA256:<HEX>."""
    config, _ = c.load_agent_config(None, {**EXPOSING, "fingerprint": text})
    assert config.gateways[0].fingerprint == "SHA256:" + HEX.upper()


@pytest.mark.parametrize(("flags", "message"), BAD_FINGERPRINTS)
def test_load_agent_config_rejects_bad_fingerprint(flags: dict[str, Any], message: str) -> None:
    """A fingerprint that is not 64 hex digits, or given with TLS off, is refused."""
    [problem] = problems(c.load_agent_config, None, {**EXPOSING, **flags})
    assert problem.key == "--fingerprint" and message in problem.message


def test_load_agent_config_suffixes_duplicate_service_names() -> None:
    """Services with the same name get #2, #3 so each is told apart."""
    flags = {**AGENT, "expose": ["1:a:80", "2:a:80", "3:a:80", "4:b:80"]}
    config, _ = c.load_agent_config(None, flags)
    assert [s.name for s in config.services] == ["a:80", "a:80#2", "a:80#3", "b:80"]


def test_load_agent_config_service_names_stay_unique(tmp_path: Path) -> None:
    """Suffixing never produces a name another service already has."""
    names = ["web#2", "web", "web"]
    text = "".join(f'[[services]]\nname = "{n}"\nlocal = "h:{i}"\n' for i, n in enumerate(names, 1))
    config, _ = c.load_agent_config(toml(tmp_path, text), AGENT)
    assert len({s.name for s in config.services}) == 3


@pytest.mark.parametrize("expose", LONG_NAMES)
def test_load_agent_config_service_names_fit_the_protocol(expose: list[str]) -> None:
    """Every service name the loader makes is one the gateway accepts (<= 64 chars, no '%')."""
    config, _ = c.load_agent_config(None, {**AGENT, "expose": expose})
    for service in config.services:
        msgspec.convert(service.name, Name)


def test_load_agent_config_services_unknown_key_path(tmp_path: Path) -> None:
    """An unknown key in [[services]] is reported as services[0].foo in that file."""
    path = toml(tmp_path, '[[services]]\nlocal = "h:1"\nfoo = 1\n[[services]]\nport = 2\n')
    found = problems(c.load_agent_config, path, AGENT)
    assert [(p.source, p.key) for p in found] == [
        (str(path), "services[0].foo"),
        (str(path), "services[1].local"),
    ]


# --- ConfigError and properties ---------------------------------------------


def test_config_error_str_single_problem_is_one_line() -> None:
    """One problem reads as a single line: file, key, message."""
    error = ConfigError([ConfigProblem("gw.toml", "listen", "bad port")])
    assert str(error) == "bad configuration: gw.toml: listen: bad port"


def test_config_error_str_several_problems_counted_one_per_line() -> None:
    """Several problems: a count, then one indented line each."""
    error = ConfigError(
        [ConfigProblem("a.toml", "tls", "x"), ConfigProblem("command line", "--y", "z")]
    )
    assert str(error).splitlines() == [
        "bad configuration (2 problems):",
        "  a.toml: tls: x",
        "  command line: --y: z",
    ]


# --- PROXY protocol -----------------------------------------------------------


def test_load_agent_config_proxy_protocol_flag_covers_every_exposed_service() -> None:
    """--proxy-protocol v2 makes every --expose service get a version 2 header; none without."""
    flags = {**AGENT, "expose": ["1:a:2", "3:b:4"]}
    config, _ = c.load_agent_config(None, {**flags, "proxy_protocol": "v2"})
    assert [s.proxy_protocol for s in config.services] == [2, 2]
    config, _ = c.load_agent_config(None, flags)
    assert [s.proxy_protocol for s in config.services] == [0, 0]


def test_load_agent_config_services_proxy_protocol_overrides_the_default(tmp_path: Path) -> None:
    """A [[services]] table's proxy_protocol wins; a table without one takes the top level's."""
    text = (
        'proxy_protocol = "v1"\n'
        '[[services]]\nlocal = "h:1"\n'
        '[[services]]\nlocal = "h:2"\nproxy_protocol = "v2"\n'
        '[[services]]\nlocal = "h:3"\nproxy_protocol = "none"\n'
    )
    config, _ = c.load_agent_config(toml(tmp_path, text), AGENT)
    assert [s.proxy_protocol for s in config.services] == [1, 2, 0]
    config, _ = c.load_agent_config(toml(tmp_path, text), {**AGENT, "proxy_protocol": "v2"})
    assert [s.proxy_protocol for s in config.services] == [2, 2, 0]


SERVICE = '[[services]]\nlocal = "h:1"\n'
BAD_PROXY_PROTOCOLS = [
    (SERVICE + 'proxy_protocol = "v3"\n', {}, "file", "services[0].proxy_protocol"),
    (SERVICE + "proxy_protocol = 2\n", {}, "file", "services[0].proxy_protocol"),
    ("proxy_protocol = true\n" + SERVICE, {}, "file", "proxy_protocol"),
    (SERVICE, {"proxy_protocol": "2"}, "command line", "--proxy-protocol"),
]


@pytest.mark.parametrize(("text", "flags", "where", "key"), BAD_PROXY_PROTOCOLS)
def test_load_agent_config_rejects_bad_proxy_protocol(
    tmp_path: Path, text: str, flags: dict[str, Any], where: str, key: str
) -> None:
    """A proxy_protocol other than "v1", "v2" or "none" is reported at its key."""
    path = toml(tmp_path, text)
    [problem] = problems(c.load_agent_config, path, {**AGENT, **flags})
    assert (problem.source, problem.key) == (str(path) if where == "file" else where, key)
    assert 'expected "v1", "v2" or "none"' in problem.message


def test_load_gateway_config_agents_given_as_arguments_report_key_paths() -> None:
    """[[agents]] passed in Python (as Gateway(agents=[...]) does) report agents[0].name too."""
    found = problems(c.load_gateway_config, None, {"agents": [{"name": "a b", "token": TOKEN}]})
    assert [(p.source, p.key) for p in found] == [("command line", "agents[0].name")]


def test_load_gateway_config_workers_default_to_one_process() -> None:
    """Without --workers the gateway is one process, as it always was."""
    config, _ = c.load_gateway_config(None, {"token": TOKEN})
    assert (config.workers, config.worker_ports) == (1, 0)


@pytest.mark.parametrize(("given", "workers"), [("3", 3), (2, 2), ("auto", None), ("AUTO", None)])
def test_load_gateway_config_workers_a_number_or_auto(given: object, workers: int | None) -> None:
    """--workers takes a count, or auto: one per core this process may use, at most 8."""
    config, _ = c.load_gateway_config(None, {"token": TOKEN, "workers": given})
    if workers is None:
        cores = len(os.sched_getaffinity(0))
        workers = min(cores, c.AUTO_WORKERS)
    assert config.workers == workers


@pytest.mark.parametrize("given", ["0", "many", 1.5, True, "129"])
def test_load_gateway_config_refuses_other_worker_counts(given: object) -> None:
    """Anything but 1 to MAX_WORKERS or auto is refused, naming the flag."""
    with pytest.raises(ConfigError) as caught:
        c.load_gateway_config(None, {"token": TOKEN, "workers": given})
    assert [p.key for p in caught.value.problems] == ["--workers"]


def test_load_gateway_config_refuses_worker_ports_past_65535() -> None:
    with pytest.raises(ConfigError) as caught:
        c.load_gateway_config(None, {"token": TOKEN, "workers": "2", "worker_ports": 65535})
    assert [p.key for p in caught.value.problems] == ["--worker-ports"]
    assert "65535" in str(caught.value)


def test_load_gateway_config_takes_an_admin_listener_and_alerts_with_workers() -> None:
    options = {"admin": "127.0.0.1:0", "alerts": [{"url": "http://127.0.0.1:9/hook"}]}
    config, _ = c.load_gateway_config(None, {"token": TOKEN, "workers": "2", **options})
    assert config.workers == 2 and config.admin is not None and len(config.alerts) == 1


def test_load_agent_config_pairs_each_gateway_with_its_pin_and_ca(tmp_path: Path) -> None:
    """Repeated --gateway: one fingerprint (or CA) for all of them, or one each, in order;
    an empty entry leaves that gateway unpinned."""
    other = "cd" * 32
    flags = {**EXPOSING, "gateway": ["a.example:1", "b.example:2"]}
    config, _ = c.load_agent_config(None, {**flags, "fingerprint": [HEX]})
    assert [g.fingerprint for g in config.gateways] == ["SHA256:" + HEX.upper()] * 2
    assert config.gateway == A("a.example", 1), "the first gateway, for one-gateway callers"
    config, _ = c.load_agent_config(None, {**flags, "fingerprint": [HEX, other]})
    assert [(str(g.address), g.fingerprint) for g in config.gateways] == [
        ("a.example:1", "SHA256:" + HEX.upper()),
        ("b.example:2", "SHA256:" + other.upper()),
    ]
    text = 'gateway = ["a.example:1", "b.example:2"]\nca = ["", "ca.pem"]\n'
    config, _ = c.load_agent_config(toml(tmp_path, text), EXPOSING | {"gateway": None})
    assert [(g.ca, g.fingerprint) for g in config.gateways] == [(None, ""), (Path("ca.pem"), "")]


@pytest.mark.parametrize(
    ("flags", "key", "message"),
    [
        ({"gateway": ["a:1", "b:2", "c:3"], "fingerprint": [HEX, HEX]}, "--fingerprint",
         "2 given for 3 gateways"),
        ({"gateway": ["a:1", "b:2"], "ca": ["x.pem", "y.pem", "z.pem"]}, "--ca",
         "3 given for 2 gateways"),
        ({"gateway": ["a:1", "a:1"]}, "--gateway", "a:1 is listed more than once"),
        ({"gateway": ["a:1"], "fingerprint": [""]}, "--fingerprint", "empty"),
        ({"gateway": ["a:1", "nowhere"]}, "--gateway", "expected HOST:PORT"),
    ],
)  # fmt: skip
def test_load_agent_config_rejects_gateways_that_do_not_add_up(
    flags: dict[str, Any], key: str, message: str
) -> None:
    found = problems(c.load_agent_config, None, {**EXPOSING, **flags})
    assert [(p.key, message in p.message) for p in found] == [(key, True)], found


def test_load_agent_config_rejects_an_empty_list_of_gateways(tmp_path: Path) -> None:
    found = problems(c.load_agent_config, toml(tmp_path, "gateway = []\n"), {
        "token": TOKEN, "expose": ["1:a:2"]})  # fmt: skip
    assert [p.key for p in found] == ["gateway"] and "empty list" in found[0].message
