"""The command line in real processes: what a user typing ``tunnelgate ...`` sees.

Gateway and agent run as subprocesses (``python -m tunnelgate``) on loopback,
always on port 0 unless a test needs a fixed port. Tests wait on log lines,
banners and exits with deadlines, never on bare sleeps, and every process a
test starts is killed in the ``launch`` fixture's teardown.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shlex
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kit.clients import echo_exchange
from kit.ports import listening_ports
from kit.processes import AGENT_COMMAND_RE, GatewayProc, Launch, Proc, start_gateway
from kit.services import tcp_service
from kit.tokens import TOKEN_ENV, new_token
from kit.waiting import DEADLINE, LONGER_THAN_ANY_TEST

from tunnelgate.config import load_gateway_config
from tunnelgate.errors import ConfigError
from tunnelgate.gateway.gateway import with_stored_token

pytestmark = pytest.mark.timeout(60)


# --- processes --------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short ``tunnelgate`` command to completion."""
    full_env = dict(os.environ)
    full_env.pop(TOKEN_ENV, None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tunnelgate", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=DEADLINE,
        check=False,
    )


def banner_agent_command(proc: Proc) -> tuple[dict[str, str], list[str]]:
    """The banner's agent command line: its environment assignments and its arguments."""
    words = shlex.split(proc.wait_line(AGENT_COMMAND_RE, stdout=True).group(1))
    env = {}
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[:2] == ["tunnelgate", "agent"], words
    return env, words[2:]


def agent_args(gateway: GatewayProc, *expose: str) -> list[str]:
    args = ["agent", "--gateway", f"127.0.0.1:{gateway.port}"]
    for spec in expose:
        args += ["--expose", spec]
    if gateway.fingerprint:
        args += ["--fingerprint", gateway.fingerprint]
    else:
        args.append("--no-tls")
    return args


def start_agent(
    launch: Launch, gateway: GatewayProc, token: str, expose: str, *flags: str
) -> tuple[Proc, int]:
    """An agent whose service is exposed; returns it and the service's public port."""
    proc = launch(*agent_args(gateway, expose), *flags, token=token)
    port = int(proc.wait_line(r"exposed at gateway port (\d+)").group(1))
    return proc, port


# --- services and clients -----------------------------------------------------


class _SlowStreamHandler(socketserver.BaseRequestHandler):
    """Streams a long response in small paced chunks, then ends it cleanly."""

    chunk = b"x" * 16384
    count = 4096  # 64 MiB: far more than a test reads

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            for _ in range(self.count):
                self.request.sendall(self.chunk)
                time.sleep(0.002)  # pacing of the service, not a wait of the test


class _PacedResponseHandler(socketserver.BaseRequestHandler):
    """Streams ``PACED_RESPONSE`` over about a second, then ends it cleanly."""

    chunk_size = 16384

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            for offset in range(0, len(PACED_RESPONSE), self.chunk_size):
                self.request.sendall(PACED_RESPONSE[offset : offset + self.chunk_size])
                time.sleep(0.003)  # pacing of the service, not a wait of the test


PACED_RESPONSE = random.Random(4).randbytes(4 << 20)


def echo_through(port: int, payload: bytes) -> bytes:
    """Send ``payload`` then EOF to ``port``; return everything read until a clean EOF."""
    received, how = echo_exchange(port, payload)
    assert how == "eof", f"the echo ended with {how} after {len(received)} bytes"
    return received


def wait_refused(port: int, timeout: float = DEADLINE) -> None:
    """Wait until nothing listens on ``port`` any more."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE):
                pass
        except ConnectionRefusedError:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"port {port} still accepts connections after {timeout} s")
        time.sleep(0.05)  # polling interval under a deadline


# --- 1. the seed scenario ---------------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-tcp"])
def test_tunnel_carries_bytes_both_ways(
    launch: Launch, echo_port: int, tmp_path: Path, tls: bool
) -> None:
    """A client on the gateway's public port reaches the agent's service: bytes through and back."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token, tls=tls)
    _, public_port = start_agent(launch, gateway, token, f"0:127.0.0.1:{echo_port}")

    assert echo_through(public_port, b"hello through the tunnel\n") == (
        b"hello through the tunnel\n"
    )
    payload = os.urandom(3 * 1024 * 1024)
    assert echo_through(public_port, payload) == payload
    gateway.proc.wait_line(r"closed client=127\.0\.0\.1:\d+ .*end=normal", count=2)


# --- 2. first start and second start ----------------------------------------


def test_gateway_first_start_prints_identity_and_second_start_reuses_it(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """First start prints fingerprint, token and an agent command line; a restart keeps them."""
    state = tmp_path / "state"
    first = start_gateway(launch, state)
    banner = "\n".join(first.proc.stdout)
    token = first.proc.wait_line(r"^token: (\S+)", stdout=True).group(1)
    assert len(token) >= 32
    assert first.fingerprint is not None
    env, words = banner_agent_command(first.proc)
    assert words[words.index("--gateway") + 1] == f"127.0.0.1:{first.port}", banner
    assert words[words.index("--fingerprint") + 1] == first.fingerprint, banner
    assert "--expose" in words, banner
    given = env.pop(TOKEN_ENV, None) or words[words.index("--token") + 1]
    assert given == token, banner
    assert not env, f"unexpected environment in the command line: {env}"

    assert (state / "token").read_text().strip() == token
    assert (state / "token").stat().st_mode & 0o077 == 0, "the token file is private"
    assert (state / "gateway.crt").is_file()
    assert (state / "gateway.key").stat().st_mode & 0o077 == 0, "the key file is private"
    first.proc.signal(signal.SIGTERM)
    assert first.proc.wait_exit() == 0

    second = start_gateway(launch, state)
    assert second.fingerprint == first.fingerprint
    assert second.proc.wait_line(r"^token: (\S+)", stdout=True).group(1) == token

    # The printed command line works, with the user's own --expose.
    env, words = banner_agent_command(second.proc)
    words[words.index("--expose") + 1] = f"0:127.0.0.1:{echo_port}"
    agent = launch("agent", *words, token=env.get(TOKEN_ENV))
    public_port = int(agent.wait_line(r"exposed at gateway port (\d+)").group(1))
    assert echo_through(public_port, b"ping") == b"ping"


# --- 3. signals ---------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("first", ["agent", "gateway"])
def test_signal_stops_gateway_and_agent_cleanly(
    launch: Launch, echo_port: int, tmp_path: Path, signum: int, first: str
) -> None:
    """SIGTERM or SIGINT (Ctrl-C) stops the gateway and the agent with exit code 0, at once."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token)
    agent, public_port = start_agent(launch, gateway, token, f"0:127.0.0.1:{echo_port}")
    assert echo_through(public_port, b"before") == b"before"

    order = [agent, gateway.proc] if first == "agent" else [gateway.proc, agent]
    for proc in order:
        proc.signal(signum)
        assert proc.wait_exit() == 0, proc.describe()
        assert not proc.lines_matching("Traceback"), proc.describe()
    if first == "agent":
        wait_refused(public_port)


@pytest.mark.parametrize("stopped", ["agent", "gateway"])
def test_signal_stop_says_goodbye_to_the_peer(
    launch: Launch, echo_port: int, tmp_path: Path, stopped: str
) -> None:
    """A SIGTERM'd side tells its peer goodbye: the peer logs a clean end, not a reset."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token)
    agent, _ = start_agent(launch, gateway, token, f"0:127.0.0.1:{echo_port}")
    if stopped == "agent":
        agent.signal(signal.SIGTERM)
        assert agent.wait_exit() == 0
        ended = gateway.proc.wait_line(r"session ended")
        assert "agent said goodbye" in ended.string, gateway.proc.describe()
        assert "WARNING" not in ended.string, gateway.proc.describe()
    else:
        gateway.proc.signal(signal.SIGTERM)
        assert gateway.proc.wait_exit() == 0
        ended = agent.wait_line(r"reconnecting to")
        assert "gateway said goodbye" in ended.string, agent.describe()
        assert " INFO " in ended.string, agent.describe()


# --- 4. wrong token -----------------------------------------------------------


def test_agent_with_wrong_token_is_refused(launch: Launch, echo_port: int, tmp_path: Path) -> None:
    """A wrong token: the agent stops with an error, the gateway logs who tried, no port opens."""
    gateway = start_gateway(launch, tmp_path / "state", token=new_token())
    agent = launch(*agent_args(gateway, f"0:127.0.0.1:{echo_port}"), token=new_token())

    assert agent.wait_exit() == 1  # "refused", as documented in cli.py
    assert agent.lines_matching("authentication failed"), agent.describe()
    gateway.proc.wait_line(r"WARNING.*authentication failed.*from 127\.0\.0\.1:\d+")
    assert not gateway.proc.lines_matching("exposed"), gateway.proc.describe()
    assert listening_ports(gateway.pid) == {gateway.port}  # its control port, nothing else


# --- 5. fingerprint mismatch --------------------------------------------------


def test_agent_with_wrong_fingerprint_is_refused(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """A pinned fingerprint that is not the gateway's: the agent stops and says both."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token)
    wrong = "SHA256:" + "AB" * 32
    assert gateway.fingerprint != wrong
    args = ["agent", "--gateway", f"127.0.0.1:{gateway.port}", "--fingerprint", wrong]
    agent = launch(*args, "--expose", f"0:127.0.0.1:{echo_port}", token=token)

    assert agent.wait_exit() == 1  # "refused", as documented in cli.py
    text = "\n".join(agent.stderr)
    assert re.search(rf"expected {wrong}", text), agent.describe()
    assert re.search(rf"seen {gateway.fingerprint}", text), agent.describe()
    assert not gateway.proc.lines_matching("session started"), gateway.proc.describe()


# --- 6. bad configuration -----------------------------------------------------

GOOD_TOKEN = "0123456789abcdef0123456789abcdef"

_AGENT_BASE = f'gateway = "127.0.0.1:9"\ntoken = "{GOOD_TOKEN}"\n'
_EXPOSE = 'expose = ["0:127.0.0.1:80"]\n'

# case: (command, file text, the key the error must name)
BAD_FILES = {
    "gateway-unknown-key": (
        "gateway", 'listen = "127.0.0.1:0"\nlisten_port = 8080\n', "listen_port"
    ),
    "gateway-bad-type": (
        "gateway", 'listen = "127.0.0.1:0"\nheartbeat_interval = "often"\n', "heartbeat_interval"
    ),
    "gateway-bad-address": ("gateway", 'listen = "nonsense"\n', "listen"),
    "gateway-agent-policy": (
        "gateway",
        f'[[agents]]\nname = "a"\ntoken = "{GOOD_TOKEN}"\nports = "1-2"\n',
        "agents[0].ports",
    ),
    "agent-unknown-key": ("agent", _AGENT_BASE + _EXPOSE + "poolsize = 3\n", "poolsize"),
    "agent-bad-type": ("agent", _AGENT_BASE + _EXPOSE + 'pool_size = "many"\n', "pool_size"),
    "agent-bad-address": (
        "agent", _AGENT_BASE + '[[services]]\nlocal = "nowhere"\n', "services[0].local"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_config_file_is_refused_naming_file_and_key(tmp_path: Path, case: str) -> None:
    """A bad config file stops the command with exit code 2, naming the file and the key."""
    role, text, key = BAD_FILES[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg-state")}

    started = run_cli(role, "--config", str(path), env=env)
    assert started.returncode == 2, started
    assert f"{path}: {key}:" in started.stderr, started.stderr

    checked = run_cli("check-config", str(path), env=env)
    assert checked.returncode == 2, checked
    assert f"{path}: {key}:" in checked.stderr, checked.stderr


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["agent", "--gateway", "127.0.0.1:9", "--expose", "garbage"], "--expose"),
        (["agent", "--gateway", "127.0.0.1:9", "--expose", "0:127.0.0.1:99999"], "--expose"),
        (["agent", "--gateway", "nonsense", "--expose", "0:127.0.0.1:80"], "--gateway"),
        (["gateway", "--listen", "nonsense"], "--listen"),
        (["gateway", "--listen", "127.0.0.1:http"], "--listen"),
    ],
    ids=["expose-garbage", "expose-port", "gateway-address", "listen-garbage", "listen-port"],
)
def test_bad_flag_is_refused_naming_it(tmp_path: Path, args: list[str], key: str) -> None:
    """A bad flag value stops the command with exit code 2 and names the flag."""
    env = {TOKEN_ENV: GOOD_TOKEN, "XDG_STATE_HOME": str(tmp_path / "xdg-state")}
    if args[0] == "gateway":
        args = [*args, "--state-dir", str(tmp_path / "state")]
    result = run_cli(*args, env=env)
    assert result.returncode == 2, result
    assert f"command line: {key}:" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("args", "env", "key"),
    [
        (["--token-file", "/nonexistent/token"], {}, "command line: --token-file:"),
        ([], {TOKEN_ENV: "short"}, f"environment: {TOKEN_ENV}:"),
    ],
    ids=["missing-token-file", "short-env-token"],
)
def test_bad_token_is_refused_naming_its_source(
    tmp_path: Path, args: list[str], env: dict[str, str], key: str
) -> None:
    """An unreadable token file or a too-short token stops gateway and agent with exit code 2."""
    env = {**env, "XDG_STATE_HOME": str(tmp_path / "xdg-state")}
    commands = [
        ["gateway", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state")],
        ["agent", "--gateway", "127.0.0.1:9", "--expose", "0:127.0.0.1:80"],
    ]
    for command in commands:
        result = run_cli(*command, *args, env=env)
        assert result.returncode == 2, result
        assert key in result.stderr, result.stderr
    assert not (tmp_path / "state" / "token").exists(), "a bad token is never replaced"


def test_gateway_on_a_busy_port_exits_with_a_clear_error(tmp_path: Path) -> None:
    """A control port already taken: the gateway exits non-zero at once, naming the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = run_cli(
            "gateway", "--listen", address, "--state-dir", str(tmp_path / "state"),
            env={TOKEN_ENV: GOOD_TOKEN},
        )  # fmt: skip
    assert result.returncode not in (0, 2), result
    assert f"cannot listen on {address}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_check_config_accepts_good_files(tmp_path: Path) -> None:
    """``check-config`` says ok (exit 0) for a good gateway file and a good agent file."""
    gateway = tmp_path / "gateway.toml"
    gateway.write_text(
        'listen = "127.0.0.1:8080"\n'
        f'[[agents]]\nname = "site-a"\ntoken = "{GOOD_TOKEN}"\n'
        'allow_ports = ["3920", "8000-8100"]\n'
    )
    agent = tmp_path / "agent.toml"
    agent.write_text(
        f'gateway = "gw.example:8080"\ntoken = "{GOOD_TOKEN}"\nname = "site-a"\n'
        'expose = ["3920:localhost:80"]\n'
        '[[services]]\nname = "db"\nport = 8001\nlocal = "127.0.0.1:5432"\n'
    )
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg-state")}
    for path, kind in [(gateway, "gateway"), (agent, "agent")]:
        result = run_cli("check-config", str(path), env=env)
        assert result.returncode == 0, result
        assert f"ok ({kind} config" in result.stdout, result.stdout


def test_check_config_says_a_file_is_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 gets the loader's message and exit 2, not a traceback."""
    path = tmp_path / "latin1.toml"
    path.write_bytes('listen = "caf\xe9"\n'.encode("latin-1"))
    result = run_cli("check-config", str(path))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert f"{path}: " in result.stderr and "UTF-8" in result.stderr, result.stderr


def test_check_config_writes_nothing(tmp_path: Path) -> None:
    """``check-config`` only reads: it creates no token or state directory."""
    state = tmp_path / "state"
    path = tmp_path / "gateway.toml"
    path.write_text(f'listen = "127.0.0.1:8080"\nstate_dir = "{state}"\n')
    result = run_cli("check-config", str(path), env={"XDG_STATE_HOME": str(tmp_path / "xdg")})
    assert result.returncode == 0, result
    assert not state.exists(), sorted(state.rglob("*"))


def test_stored_token_is_made_private_once_and_reused(tmp_path: Path) -> None:
    """Without a token the gateway's config gets one from its state directory:
    made on first start (mode 0600, directory 0700), the same one after that."""
    state = tmp_path / "state"
    config, _ = load_gateway_config(None, {"state_dir": str(state), "allow_ports": "3920"})
    first, path = with_stored_token(config)
    assert path == state / "token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    [policy] = first.agents
    assert policy.name == "" and policy.allow_ports == (range(3920, 3921),)
    assert policy.token == path.read_bytes().strip() and len(policy.token) >= 32
    second, _ = with_stored_token(config)
    assert second.agents == first.agents


def test_stored_token_unusable_is_refused_not_replaced(tmp_path: Path) -> None:
    """An empty (e.g. half-written) stored token is a config error naming the file; it stays."""
    (tmp_path / "token").write_text("", encoding="utf-8")
    config, _ = load_gateway_config(None, {"state_dir": str(tmp_path)})
    with pytest.raises(ConfigError) as info:
        with_stored_token(config)
    [problem] = info.value.problems
    assert problem.source == str(tmp_path / "token") and "delete it" in problem.message
    assert (tmp_path / "token").read_text(encoding="utf-8") == ""


def test_stored_token_not_used_when_a_token_is_given(tmp_path: Path) -> None:
    """A token given in any way (here --token) leaves the state directory alone."""
    config, _ = load_gateway_config(None, {"state_dir": str(tmp_path / "s"), "token": GOOD_TOKEN})
    assert with_stored_token(config) == (config, None)
    assert not (tmp_path / "s").exists()


# --- 7. no silent truncation ----------------------------------------------------


@pytest.mark.parametrize(
    ("victim", "signum", "tls"),
    [
        ("agent", signal.SIGKILL, True),
        ("agent", signal.SIGKILL, False),
        ("agent", signal.SIGTERM, True),
        ("gateway", signal.SIGTERM, True),
        ("gateway", signal.SIGKILL, True),
    ],
    ids=[
        "agent-SIGKILL-tls",
        "agent-SIGKILL-plain-tcp",
        "agent-SIGTERM",
        "gateway-SIGTERM",
        "gateway-SIGKILL",
    ],
)
def test_tunnel_ending_mid_transfer_resets_the_client(
    launch: Launch, tmp_path: Path, victim: str, signum: int, tls: bool
) -> None:
    """When agent or gateway goes away mid-response (killed, or stopped with a drain
    deadline shorter than the response), the client sees a reset, never a clean end."""
    token = new_token()
    drain = ("--drain-timeout", "0.5")
    gateway = start_gateway(launch, tmp_path / "state", *drain, token=token, tls=tls)
    with tcp_service(_SlowStreamHandler) as service_port:
        agent, public_port = start_agent(
            launch, gateway, token, f"0:127.0.0.1:{service_port}", *drain
        )
        with socket.create_connection(("127.0.0.1", public_port), timeout=DEADLINE) as client:
            received = 0
            while received < 512 * 1024:
                chunk = client.recv(65536)
                assert chunk, "the response ended before the tunnel was stopped"
                received += len(chunk)
            stopped = agent if victim == "agent" else gateway.proc
            stopped.signal(signum)
            code = stopped.wait_exit()
            assert code == (0 if signum == signal.SIGTERM else -signal.SIGKILL), code
            deadline = time.monotonic() + DEADLINE
            with pytest.raises(ConnectionResetError):
                while time.monotonic() < deadline:
                    if not client.recv(65536):
                        pytest.fail(
                            f"clean EOF after {received} bytes: a truncation looks complete"
                        )
                pytest.fail(f"still receiving {DEADLINE} s after the {victim} stopped")


def test_agent_restarted_after_sigkill_gets_its_port_back(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """A killed agent, started again, takes back its public port at once."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token)
    first, public_port = start_agent(launch, gateway, token, f"0:127.0.0.1:{echo_port}")
    expose = f"{public_port}:127.0.0.1:{echo_port}"  # the port the first one was given
    first.signal(signal.SIGKILL)
    first.wait_exit()
    second, port = start_agent(launch, gateway, token, expose)
    assert port == public_port, second.describe()
    assert echo_through(public_port, b"back") == b"back"


# --- 8. graceful shutdown -----------------------------------------------------


def read_some(client: socket.socket, at_least: int) -> bytearray:
    received = bytearray()
    while len(received) < at_least:
        chunk = client.recv(65536)
        assert chunk, "the response ended too early"
        received += chunk
    return received


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-tcp"])
@pytest.mark.parametrize("victim", ["agent", "gateway"])
def test_sigterm_drains_open_connections_and_refuses_new_ones(
    launch: Launch, tmp_path: Path, victim: str, tls: bool
) -> None:
    """SIGTERM mid-response: no new client or agent is taken, the open response
    arrives whole, then the process exits 0 without waiting for the deadline."""
    token = new_token()
    # A drain deadline that never comes while the test runs: exiting at all
    # shows the process ended with its last connection.
    drain = ("--drain-timeout", f"{LONGER_THAN_ANY_TEST:g}")
    gateway = start_gateway(launch, tmp_path / "state", *drain, token=token, tls=tls)
    with tcp_service(_PacedResponseHandler) as service_port:
        agent, public_port = start_agent(
            launch, gateway, token, f"0:127.0.0.1:{service_port}", *drain
        )
        with socket.create_connection(("127.0.0.1", public_port), timeout=DEADLINE) as client:
            received = read_some(client, 256 * 1024)
            stopped = agent if victim == "agent" else gateway.proc
            stopped.signal(signal.SIGTERM)
            stopped.wait_line(rf"draining: waiting up to {LONGER_THAN_ANY_TEST:g} s for 1 ")
            wait_refused(public_port)  # the port is free at once, mid-drain
            if victim == "gateway":
                wait_refused(gateway.port)
            while chunk := client.recv(65536):
                received += chunk
        assert hashlib.sha256(received).digest() == hashlib.sha256(PACED_RESPONSE).digest()
        assert stopped.wait_exit() == 0, stopped.describe()
        stopped.wait_line(r"drained: every (client )?connection finished")
    if victim == "agent":
        ended = gateway.proc.wait_line(r"session ended")
        assert "agent said goodbye" in ended.string and " INFO " in ended.string, ended.string
    else:
        ended = agent.wait_line(r"reconnecting to")
        assert "gateway said goodbye" in ended.string and " INFO " in ended.string, ended.string


@pytest.mark.parametrize("victim", ["agent", "gateway"])
def test_second_sigint_exits_at_once_without_draining(
    launch: Launch, tmp_path: Path, victim: str
) -> None:
    """Ctrl-C twice: the process exits at once (code 130) and the open client is reset."""
    token = new_token()
    drain = ("--drain-timeout", f"{LONGER_THAN_ANY_TEST:g}")  # exiting at all: not drained
    gateway = start_gateway(launch, tmp_path / "state", *drain, token=token)
    with tcp_service(_SlowStreamHandler) as service_port:
        agent, public_port = start_agent(
            launch, gateway, token, f"0:127.0.0.1:{service_port}", *drain
        )
        with socket.create_connection(("127.0.0.1", public_port), timeout=DEADLINE) as client:
            read_some(client, 256 * 1024)
            stopped = agent if victim == "agent" else gateway.proc
            stopped.signal(signal.SIGINT)
            stopped.wait_line(rf"draining: waiting up to {LONGER_THAN_ANY_TEST:g} s")
            stopped.signal(signal.SIGINT)
            assert stopped.wait_exit() == 130, stopped.describe()
            deadline = time.monotonic() + DEADLINE
            with pytest.raises(ConnectionResetError):
                while time.monotonic() < deadline:
                    assert client.recv(65536), "clean EOF: a truncation looks complete"
                pytest.fail("still receiving after the forced exit")


# --- 9. gateway restart -------------------------------------------------------


def test_agent_comes_back_after_gateway_restart(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """The gateway is killed and restarted: the agent reconnects by itself, clients get through."""
    token = new_token()
    state = tmp_path / "state"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_flags = ("--token-file", str(token_file))
    gateway = start_gateway(launch, state, *token_flags)
    agent = launch(
        *agent_args(gateway, f"0:127.0.0.1:{echo_port}"), *token_flags, "--reconnect-max", "1"
    )
    public_port = int(agent.wait_line(r"exposed at gateway port (\d+)").group(1))
    assert echo_through(public_port, b"before") == b"before"

    gateway.proc.signal(signal.SIGKILL)
    gateway.proc.wait_exit()
    agent.wait_line(r"reconnecting to")
    # On the port the first one was given; the agent asks for its service's port again.
    again = start_gateway(launch, state, *token_flags, listen=f"127.0.0.1:{gateway.port}")
    assert again.fingerprint == gateway.fingerprint
    agent.wait_line(rf"exposed at gateway port {public_port}\b", count=2, timeout=15)
    assert echo_through(public_port, b"after") == b"after"
    assert agent.popen.poll() is None


# --- 10. JSON logs, and no secret in them --------------------------------------


def assert_json_lines(proc: Proc, *secrets_: str) -> None:
    """Every stderr line of ``proc`` is a JSON log record holding none of ``secrets_``."""
    assert proc.stderr, proc.describe()
    for line in proc.stderr:
        for secret in secrets_:
            assert secret not in line, f"a token is in a log line: {line}"
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n{proc.describe()}")
        assert isinstance(record, dict), line
        assert isinstance(record.get("level"), str), line
        assert isinstance(record.get("message"), str), line


JSON_FLAGS = ("--log-format", "json", "--log-level", "debug")


def test_json_logs_are_json_lines_without_the_token(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """With ``--log-format json`` every log line is a JSON object, and no line holds a token."""
    gateway = start_gateway(launch, tmp_path / "state", *JSON_FLAGS)
    token = gateway.proc.wait_line(r"^token: (\S+)", stdout=True).group(1)
    # The agent takes the token as a flag, the path that logs a warning about it.
    agent = launch(
        *agent_args(gateway, f"0:127.0.0.1:{echo_port}"), f"--token={token}", *JSON_FLAGS
    )
    public_port = int(agent.wait_line(r"exposed at gateway port (\d+)").group(1))
    assert echo_through(public_port, b"json") == b"json"
    agent.wait_line(r"closed client=")
    # A wrong token is logged by the gateway; neither token may appear in that line.
    wrong = new_token()
    intruder = launch(*agent_args(gateway, f"0:127.0.0.1:{echo_port}"), *JSON_FLAGS, token=wrong)
    assert intruder.wait_exit() != 0
    gateway.proc.wait_line("authentication failed")
    for proc in (agent, gateway.proc):
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0

    assert_json_lines(gateway.proc, token, wrong)
    assert_json_lines(agent, token)
    assert any(token in line for line in gateway.proc.stdout), "the banner shows the token"
    assert not any(token in line for line in agent.stdout)
    assert not any(wrong in line for line in intruder.stderr + intruder.stdout)


def test_json_logs_of_a_refused_agent_are_json_lines(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """With ``--log-format json`` a refused agent's stderr is JSON lines too, to its last line."""
    gateway = start_gateway(launch, tmp_path / "state", token=new_token())
    wrong = new_token()
    intruder = launch(*agent_args(gateway, f"0:127.0.0.1:{echo_port}"), *JSON_FLAGS, token=wrong)
    assert intruder.wait_exit() == 1
    assert_json_lines(intruder, wrong)


# --- 11. small commands -------------------------------------------------------


def test_version_prints_the_version() -> None:
    """``tunnelgate --version`` prints the package's version."""
    from tunnelgate import __version__

    result = run_cli("--version")
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"tunnelgate {__version__}"


def test_token_prints_a_fresh_strong_token() -> None:
    """``tunnelgate token`` prints a new random token of 32+ URL-safe characters each time."""
    tokens = []
    for _ in range(2):
        result = run_cli("token")
        assert result.returncode == 0, result
        tokens.append(result.stdout.strip())
    for token in tokens:
        assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", token), token
    assert tokens[0] != tokens[1]


def test_gateway_out_of_descriptors_reports_once_per_interval_and_recovers(
    launch_command: Launch, tmp_path: Path
) -> None:
    """At its open-files limit the gateway keeps running, logs the failing
    accept once per interval with a count (not once per retry), and accepts
    again as soon as descriptors are free."""
    limited = (
        "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48)); "
        "os.execv(sys.executable, [sys.executable, '-m', 'tunnelgate', *sys.argv[1:]])"
    )
    proc = launch_command(
        sys.executable, "-c", limited, "gateway", "--listen", "127.0.0.1:0", "--no-tls",
        "--state-dir", str(tmp_path / "state"), token=new_token(),
    )  # fmt: skip
    port = int(proc.wait_line(r"gateway listening on 127\.0\.0\.1:(\d+)").group(1))
    clients: list[socket.socket] = []
    try:
        for _ in range(80):  # each one held until its handshake times out (10 s)
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE))
        second = proc.wait_line(r"accept failed on the control port: too many open files", count=2)
        assert re.search(r"\(and \d+ more times since the last report\)", second.string), second
        assert len(proc.lines_matching("accept failed")) == 2  # ten retries a second, two lines
    finally:
        for client in clients:
            client.close()
    deadline = time.monotonic() + DEADLINE
    while True:  # the held connections end at their EOF; then a new one gets its Challenge
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
            sock.settimeout(1.0)
            with contextlib.suppress(TimeoutError, ConnectionError):
                if sock.recv(1) == b"\x01":  # a MESSAGE frame: the Challenge
                    break
        assert time.monotonic() < deadline, "the gateway never accepted again"
