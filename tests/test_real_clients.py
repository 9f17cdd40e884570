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
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

pytestmark = pytest.mark.timeout(60)

TOKEN_ENV = "TUNNELGATE_TOKEN"
DEADLINE = 10.0  # for what should happen "at once": a log line, a connection
CLIENT_TIMEOUT = 30.0  # for a client tool to finish its run


def require_tool(name: str) -> str:
    """The path of ``name``; skip without it, or fail when TUNNELGATE_REQUIRE_TOOLS=1."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("TUNNELGATE_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{name} not found on PATH, and TUNNELGATE_REQUIRE_TOOLS=1")
        pytest.skip(f"{name} not found on PATH")
    return path


# --- processes --------------------------------------------------------------


class Proc:
    """A subprocess; threads collect its stdout and stderr lines."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        self.argv = argv
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self.lines: list[str] = []  # stdout and stderr, as they come
        self._changed = threading.Condition()
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(pipe,), daemon=True)
            for pipe in (self.popen.stdout, self.popen.stderr)
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def describe(self) -> str:
        with self._changed:
            output = "\n".join(self.lines)
        return f"$ {shlex.join(self.argv)}  (exit code {self.popen.poll()})\n{output}"

    def wait_line(
        self, pattern: str, *, count: int = 1, timeout: float = DEADLINE
    ) -> re.Match[str]:
        """The ``count``-th output line matching ``pattern``; fail if none comes in time."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matches = [m for line in self.lines if (m := regex.search(line))]
                if len(matches) >= count:
                    return matches[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not any(r.is_alive() for r in self._readers):
                    why = "timed out" if remaining <= 0 else "output ended"
                    pytest.fail(f"{why} waiting for {pattern!r}\n{self.describe()}")
                self._changed.wait(min(remaining, 0.5))

    def stop(self) -> None:
        """Kill if still running; reap; close the pipes."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for reader in self._readers:
            reader.join(DEADLINE)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


Launch = Callable[..., Proc]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start a command (``token=`` goes in the environment); all killed at the end."""
    procs: list[Proc] = []
    base_env = dict(os.environ)
    base_env.pop(TOKEN_ENV, None)
    base_env["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    base_env["PYTHONUNBUFFERED"] = "1"

    def start(*argv: str, token: str | None = None, cwd: Path | None = None) -> Proc:
        env = dict(base_env)
        if token is not None:
            env[TOKEN_ENV] = token
        proc = Proc(list(argv), env, cwd)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in reversed(procs):
            proc.stop()
    # A traceback in a log is an unexpected exception: a bug, whatever the test checked.
    broken = [
        proc.describe()
        for proc in procs
        if "tunnelgate" in proc.argv and any("Traceback" in line for line in proc.lines)
    ]
    assert not broken, "a tunnelgate process logged a traceback:\n" + "\n".join(broken)


def free_port() -> int:
    """A port that was free a moment ago (redis-server cannot take port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_connectable(port: int, timeout: float = DEADLINE) -> None:
    """Wait until something accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling interval under a deadline


def tunnel(launch: Launch, state_dir: Path, local_port: int, *, tls: bool = True) -> int:
    """Gateway and agent through the CLI, exposing ``local_port``; returns the public port."""
    tunnelgate = [sys.executable, "-m", "tunnelgate"]
    token = secrets.token_urlsafe(32)
    gateway_argv = [*tunnelgate, "gateway", "--listen", "127.0.0.1:0", "--state-dir"]
    gateway = launch(*gateway_argv, str(state_dir), *([] if tls else ["--no-tls"]), token=token)
    control_port = gateway.wait_line(r"gateway listening on 127\.0\.0\.1:(\d+)").group(1)
    agent_argv = [*tunnelgate, "agent", "--gateway", f"127.0.0.1:{control_port}"]
    agent_argv += ["--expose", f"0:127.0.0.1:{local_port}"]
    if tls:
        fingerprint = gateway.wait_line(r"certificate fingerprint: (SHA256:[0-9A-F]{64})")
        agent_argv += ["--fingerprint", fingerprint.group(1)]
    else:
        agent_argv.append("--no-tls")
    agent = launch(*agent_argv, token=token)
    return int(agent.wait_line(r"exposed at gateway port (\d+)").group(1))


# --- 11. curl and an HTTP server ----------------------------------------------


@pytest.fixture
def http_server(launch: Launch, tmp_path: Path) -> tuple[int, Path]:
    """``python -m http.server`` on port 0 serving a fresh directory: (port, directory)."""
    root = tmp_path / "www"
    root.mkdir()
    server = launch(
        sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
        "--directory", str(root),
    )  # fmt: skip
    port = int(server.wait_line(r"Serving HTTP on 127\.0\.0\.1 port (\d+)").group(1))
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


@pytest.fixture
def redis_port(launch: Launch, tmp_path: Path) -> int:
    """A throwaway ``redis-server`` on loopback (no persistence); its port."""
    server = require_tool("redis-server")
    port = free_port()
    launch(
        server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(tmp_path),
        cwd=tmp_path,
    )  # fmt: skip
    wait_connectable(port)
    return port


BENCHMARK_ARGS = ("-n", "2000", "-c", "20", "-t", "set,get", "-q")


def test_redis_benchmark_through_the_tunnel(
    launch: Launch, redis_port: int, tmp_path: Path
) -> None:
    """``redis-benchmark`` with 20 parallel clients completes SET and GET through the tunnel."""
    benchmark = require_tool("redis-benchmark")
    public_port = tunnel(launch, tmp_path / "state", redis_port)

    result = subprocess.run(
        [benchmark, "-h", "127.0.0.1", "-p", str(public_port), *BENCHMARK_ARGS],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result
    output = result.stdout.replace("\r", "\n")
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
        result = subprocess.run(
            [cli, "-h", "127.0.0.1", "-p", str(public_port), *args],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, result
        return result.stdout.strip()

    assert redis("SET", "tunnelgate:key", value) == "OK"
    assert redis("GET", "tunnelgate:key") == value
