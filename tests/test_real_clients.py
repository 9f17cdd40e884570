"""Real clients through the real CLI: curl against an HTTP server, redis-benchmark against Redis.

Gateway, agent and the services all run as subprocesses on loopback; the
clients are the tools people actually point at a tunnel. A test whose tool is
missing is skipped, unless ``TUNNELGATE_REQUIRE_TOOLS=1`` (as in CI), where it
fails instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from kit.processes import Launch, require_tool
from kit.tokens import new_token

pytestmark = pytest.mark.timeout(60)

CLIENT_TIMEOUT = 30.0  # for a client tool to finish its run


# --- processes --------------------------------------------------------------


def tunnel(launch: Launch, state_dir: Path, local_port: int, *, tls: bool = True) -> int:
    """Gateway and agent through the CLI, exposing ``local_port``; returns the public port."""
    token = new_token()
    gateway_args = ["gateway", "--listen", "127.0.0.1:0", "--state-dir", str(state_dir)]
    gateway = launch(*gateway_args, *([] if tls else ["--no-tls"]), token=token)
    control_port = gateway.wait_line(r"gateway listening on 127\.0\.0\.1:(\d+)").group(1)
    agent_args = ["agent", "--gateway", f"127.0.0.1:{control_port}"]
    agent_args += ["--expose", f"0:127.0.0.1:{local_port}"]
    if tls:
        fingerprint = gateway.wait_line(
            r"certificate fingerprint: (SHA256:[0-9A-F]{64})", stdout=True
        )
        agent_args += ["--fingerprint", fingerprint.group(1)]
    else:
        agent_args.append("--no-tls")
    agent = launch(*agent_args, token=token)
    return int(agent.wait_line(r"exposed at gateway port (\d+)").group(1))


# --- 11. curl and an HTTP server ----------------------------------------------


@pytest.fixture
def http_server(launch_command: Launch, tmp_path: Path) -> tuple[int, Path]:
    """``python -m http.server`` on port 0 serving a fresh directory: (port, directory)."""
    root = tmp_path / "www"
    root.mkdir()
    server = launch_command(
        sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
        "--directory", str(root),
    )  # fmt: skip
    port = int(server.wait_line(r"Serving HTTP on 127\.0\.0\.1 port (\d+)", stdout=True).group(1))
    return port, root


def curl(url: str) -> bytes:
    result = subprocess.run(
        [require_tool("curl"), "-sSf", "--max-time", str(CLIENT_TIMEOUT), url],
        capture_output=True,
        timeout=CLIENT_TIMEOUT + 5,
        check=False,
    )
    assert result.returncode == 0, (result.returncode, result.stderr)
    return result.stdout


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-tcp"])
def test_curl_fetches_a_file_through_the_tunnel(
    launch: Launch, http_server: tuple[int, Path], tmp_path: Path, tls: bool
) -> None:
    """``curl`` on the gateway's public port gets the file the HTTP server behind the agent has."""
    require_tool("curl")
    port, root = http_server
    content = b"hello from behind the tunnel\n" + secrets.token_hex(64).encode()
    (root / "file").write_bytes(content)
    public_port = tunnel(launch, tmp_path / "state", port, tls=tls)

    assert curl(f"http://127.0.0.1:{public_port}/file") == content
    assert curl(f"http://127.0.0.1:{public_port}/file") == content  # a second connection


def test_curl_fetches_a_large_file_intact(
    launch: Launch, http_server: tuple[int, Path], tmp_path: Path
) -> None:
    """A 20 MB download through the TLS tunnel arrives complete, byte for byte."""
    require_tool("curl")
    port, root = http_server
    content = os.urandom(20 * 1024 * 1024)
    (root / "big.bin").write_bytes(content)
    public_port = tunnel(launch, tmp_path / "state", port)

    body = curl(f"http://127.0.0.1:{public_port}/big.bin")
    assert len(body) == len(content)
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(content).hexdigest()


# --- 12. redis-benchmark and redis-cli against Redis --------------------------


BENCHMARK_ARGS = ("-n", "2000", "-c", "20", "-t", "set,get", "-q")


def run_redis_tool(tool: str, port: int, *args: str) -> str:
    """Run ``tool`` (redis-cli, redis-benchmark) against 127.0.0.1:``port``; its stdout."""
    result = subprocess.run(
        [tool, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result
    return result.stdout


def test_redis_benchmark_through_the_tunnel(
    launch: Launch, redis_port: int, tmp_path: Path
) -> None:
    """``redis-benchmark`` with 20 parallel clients completes SET and GET through the tunnel."""
    benchmark = require_tool("redis-benchmark")
    public_port = tunnel(launch, tmp_path / "state", redis_port)

    output = run_redis_tool(benchmark, public_port, *BENCHMARK_ARGS).replace("\r", "\n")
    for command in ("SET", "GET"):
        rate = re.search(rf"^{command}: ([\d.]+) requests per second", output, re.MULTILINE)
        assert rate is not None, output
        assert float(rate.group(1)) > 0, output


def test_redis_cli_round_trip_through_the_tunnel(
    launch: Launch, redis_port: int, tmp_path: Path
) -> None:
    """``redis-cli`` SET then GET through the tunnel returns the value stored."""
    cli = require_tool("redis-cli")
    public_port = tunnel(launch, tmp_path / "state", redis_port, tls=True)
    value = "tunnel value " + secrets.token_hex(16)

    def redis(*args: str) -> str:
        return run_redis_tool(cli, public_port, *args).strip()

    assert redis("SET", "tunnelgate:key", value) == "OK"
    assert redis("GET", "tunnelgate:key") == value
