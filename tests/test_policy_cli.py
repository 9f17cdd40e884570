"""The real CLI with several agents: `tunnelgate token --name`, token hashes in
the gateway's config, and SIGHUP reloads (good and bad) while agents work."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.processes import TUNNELGATE, GatewayProc, Launch, Proc, start_gateway
from kit.services import EchoHandler, tcp_service
from kit.tokens import TOKEN_ENV, new_token
from kit.waiting import DEADLINE

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def echo_port() -> Iterator[int]:
    with tcp_service(EchoHandler) as port:
        yield port


def start_agent(
    launch: Launch, gateway: GatewayProc, name: str, token: str, echo_port: int
) -> tuple[Proc, int]:
    """An agent named ``name`` exposing the echo service; its public port."""
    assert gateway.fingerprint is not None
    proc = launch(
        "agent", "--gateway", f"127.0.0.1:{gateway.port}", "--fingerprint", gateway.fingerprint,
        "--name", name, "--expose", f"0:127.0.0.1:{echo_port}", token=token,
    )  # fmt: skip
    return proc, int(proc.wait_line(r"exposed at gateway port (\d+)").group(1))


def echo_from(source: str, port: int, payload: bytes = b"ping") -> bytes:
    """``payload`` sent from ``source`` and echoed; b"" if the connection was refused."""
    try:
        with socket.create_connection(
            ("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0)
        ) as sock:
            sock.sendall(payload)
            received = b""
            while len(received) < len(payload):
                chunk = sock.recv(len(payload) - len(received))
                if not chunk:
                    break
                received += chunk
            return received
    except OSError:
        return b""


def token_lines(*args: str, env: dict[str, str] | None = None) -> list[str]:
    result = subprocess.run(
        [*TUNNELGATE, "token", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env={**env} if env is not None else None,
        check=True,
    )
    return result.stdout.splitlines()


def test_token_with_name_prints_a_hash_a_gateway_accepts(
    launch: Launch, tmp_path: Path, echo_port: int
) -> None:
    """`tunnelgate token --name site-a` prints a token and the [[agents]] lines;
    a gateway configured with only the hash lets that agent in, and neither
    side ever logs the token."""
    lines = token_lines("--name", "site-a")
    token = lines[0]
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token), lines
    snippet = "\n".join(line for line in lines[1:] if not line.startswith("#"))
    assert 'name = "site-a"' in snippet and re.search(r'token_hash = "tg2:[\w-]{43}"', snippet)
    assert token not in snippet
    config = tmp_path / "gateway.toml"
    config.write_text(snippet + "\n", encoding="utf-8")
    gateway = start_gateway(launch, tmp_path / "state", "--config", str(config))
    agent, port = start_agent(launch, gateway, "site-a", token, echo_port)
    assert echo_from("127.0.0.1", port) == b"ping"
    stranger = launch(
        "agent", "--gateway", f"127.0.0.1:{gateway.port}",
        "--fingerprint", str(gateway.fingerprint), "--name", "site-a",
        "--expose", f"0:127.0.0.1:{echo_port}", token=new_token(),
    )  # fmt: skip
    assert stranger.wait_exit(DEADLINE) == 1
    stranger.wait_line(r"does not accept this token for agent 'site-a'")
    for proc in (gateway.proc, agent, stranger):
        assert not any(token in line for line in proc.stderr + proc.stdout)


def test_token_hashes_an_existing_token(tmp_path: Path) -> None:
    """With --token-file (or $TUNNELGATE_TOKEN) the token given is hashed, and not printed."""
    token = new_token()
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n", encoding="utf-8")
    from_file = token_lines("--name", "site-a", "--token-file", str(token_file))
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    from_env = token_lines("--name", "site-a", env={**env, TOKEN_ENV: token})
    assert from_file == from_env
    assert not any(token in line for line in from_file)
    assert from_file[-1].startswith('token_hash = "tg2:')


def test_sighup_reload_bad_config_kept_then_good_one_applied(
    launch: Launch, tmp_path: Path, echo_port: int
) -> None:
    """SIGHUP with a broken file: an error with the reason, and everything goes
    on. SIGHUP with a good one: the removed agent is disconnected and stops
    (refused), the kept agent's open connection goes on, and its new access
    rule refuses new clients from the denied address."""
    tokens = {"site-a": new_token(), "site-b": new_token()}
    config = tmp_path / "gateway.toml"

    def write(text: str) -> None:
        config.write_text(text, encoding="utf-8")

    agents = {
        name: f'[[agents]]\nname = "{name}"\ntoken = "{token}"\n' for name, token in tokens.items()
    }
    write(agents["site-a"] + agents["site-b"])
    gateway = start_gateway(launch, tmp_path / "state", "--config", str(config))
    site_a, port_a = start_agent(launch, gateway, "site-a", tokens["site-a"], echo_port)
    site_b, port_b = start_agent(launch, gateway, "site-b", tokens["site-b"], echo_port)
    with socket.create_connection(
        ("127.0.0.1", port_a), timeout=DEADLINE, source_address=("127.0.0.2", 0)
    ) as held:
        held.sendall(b"before")
        assert held.recv(6) == b"before"

        write(agents["site-a"] + "[[agents]]\nname = 3\n")
        gateway.proc.signal(signal.SIGHUP)
        gateway.proc.wait_line(r"configuration not reloaded; the running one stays: .*agents\[1\]")
        assert echo_from("127.0.0.2", port_b) == b"ping"

        write(agents["site-a"] + '[agents.access]\ndeny = ["127.0.0.2"]\n')
        gateway.proc.signal(signal.SIGHUP)
        gateway.proc.wait_line(r"configuration reloaded: 1 agent policies; 1 session\(s\) kept")
        gateway.proc.wait_line(
            r"agent=site-b\].*disconnecting the agent: it was removed from the configuration"
        )
        assert site_b.wait_exit(DEADLINE) == 1
        held.sendall(b"after")
        assert held.recv(5) == b"after", "the kept agent's open connection goes on"
    assert echo_from("127.0.0.2", port_a) == b""
    gateway.proc.wait_line(r"refused client 127\.0\.0\.2:\d+ on service .*: deny 127\.0\.0\.2/32")
    assert echo_from("127.0.0.3", port_a) == b"ping"
    assert site_a.popen.poll() is None
    assert not site_a.lines_matching("reconnecting")


def test_gateway_warns_about_a_token_on_the_command_line(launch: Launch, tmp_path: Path) -> None:
    """A token passed with --token is visible to other local users: the gateway says so."""
    token = new_token()
    gateway = launch(
        "gateway", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state"),
        "--token", token,
    )  # fmt: skip
    gateway.wait_line(r"the token was given on the command line, where other local users")
    assert not any(token in line for line in gateway.stderr)
