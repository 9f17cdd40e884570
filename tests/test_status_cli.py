"""``tunnelgate status`` on the real command line: against a real gateway and agent
started with ``--admin 127.0.0.1:0`` (their admin URL read from their log), with a client
connection open through the tunnel; with and without the admin token; against a port that
refuses, and against an HTTP server that is not a tunnelgate admin listener."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kit.ports import refusing_port
from kit.processes import GatewayProc, Launch, Proc, start_gateway
from kit.tokens import TOKEN_ENV, new_token
from kit.waiting import DEADLINE

ADMIN_URL = r"admin listening on (http://127\.0\.0\.1:\d+/)"
ADMIN_TOKEN_ENV = "TUNNELGATE_ADMIN_TOKEN"
WANTS_A_TOKEN = "the admin listener wants a token: --admin-token-file or $TUNNELGATE_ADMIN_TOKEN"

pytestmark = pytest.mark.timeout(60)


def run_status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``tunnelgate status ARGS...`` run to its end, without the test's own tokens."""
    full_env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, ADMIN_TOKEN_ENV)}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tunnelgate", "status", *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=full_env,
        timeout=DEADLINE, check=False,
    )  # fmt: skip


def section(output: str, title: str) -> list[str]:
    """The lines of the table under ``title (N):`` (its header first), without the indent."""
    lines = output.splitlines()
    [start] = [i for i, line in enumerate(lines) if line.startswith(f"{title} (")]
    rows = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        rows.append(line[2:])
    return rows


def cells(line: str) -> list[str]:
    """A table line's cells: two spaces or more part them, a cell holds at most one."""
    return re.split(r" {2,}", line.strip())


def row_with(rows: list[str], text: str) -> dict[str, str]:
    """The one row of a table with a cell ``text``, by column header."""
    [row] = [cells(line) for line in rows[1:] if text in cells(line)]
    return dict(zip(cells(rows[0]), row, strict=True))


def start_agent(launch: Launch, gateway: GatewayProc, token: str, echo_port: int) -> Proc:
    return launch(
        "agent", "--gateway", f"127.0.0.1:{gateway.port}",
        "--fingerprint", str(gateway.fingerprint), "--expose", f"0:127.0.0.1:{echo_port}",
        "--name", "site-a", "--admin", "127.0.0.1:0",
        token=token,
    )  # fmt: skip


@contextlib.contextmanager
def open_client(port: int) -> Iterator[socket.socket]:
    """A client connection through the tunnel, shown relaying (a round trip done), kept open."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
        client.sendall(b"ping")
        received = b""
        while len(received) < 4:
            data = client.recv(4)
            assert data, "the tunnel closed the client's connection"
            received += data
        assert received == b"ping"
        yield client


def test_status_shows_the_gateways_agents_services_and_connections(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """Against a gateway: the agent by name, its service, and the open connection's client."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", "--admin", "127.0.0.1:0", token=token)
    url = gateway.proc.wait_line(ADMIN_URL).group(1)
    agent = start_agent(launch, gateway, token, echo_port)
    public = int(agent.wait_line(r"exposed at gateway port (\d+)").group(1))

    with open_client(public) as client:
        client_address = "{}:{}".format(*client.getsockname())
        result = run_status("--admin", url)
    assert result.returncode == 0, result
    out = result.stdout
    assert out.startswith("gateway "), out
    assert f"listening on 127.0.0.1:{gateway.port}" in out.splitlines()[0], out
    assert row_with(section(out, "agents"), "site-a")["STATE"] == "online", out
    service = row_with(section(out, "services"), f"127.0.0.1:{echo_port}")
    assert (service["AGENT"], service["ADDRESS"]) == ("site-a", f"127.0.0.1:{public}"), out
    connection = row_with(section(out, "connections"), client_address)
    assert connection["AGENT"] == "site-a", out
    assert connection["SERVICE"] == f"127.0.0.1:{echo_port}", out
    assert connection["STATE"] == "relaying", out
    assert (connection["UP"], connection["DOWN"]) == ("4 B", "4 B"), out
    assert result.stderr == "", result


def test_status_shows_an_agents_sessions_and_services(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """Against an agent: its name, its session with the gateway and its service."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token)
    agent = start_agent(launch, gateway, token, echo_port)
    url = agent.wait_line(ADMIN_URL).group(1)
    session = agent.wait_line(r"session=(\w+)\] connected to gateway").group(1)
    public = int(agent.wait_line(r"exposed at gateway port (\d+)").group(1))

    result = run_status("--admin", url)
    assert result.returncode == 0, result
    out = result.stdout
    assert out.splitlines()[0].startswith("agent site-a "), out
    row = row_with(section(out, "sessions"), session)
    assert row["GATEWAY"] == f"127.0.0.1:{gateway.port}", out
    assert row["SERVICES"] == f"127.0.0.1:{echo_port}", out
    service = row_with(section(out, "services"), f"127.0.0.1:{echo_port}")
    assert service["PUBLIC"] == f"127.0.0.1:{public}", out


def test_status_needs_the_admin_token_when_the_listener_has_one(
    launch: Launch, tmp_path: Path
) -> None:
    """Without the token: exit 1 and how to give it; with it (file or environment): the tables."""
    admin_token = new_token()
    token_file = tmp_path / "admin-token"
    token_file.write_text(admin_token + "\n")
    gateway = start_gateway(
        launch, tmp_path / "state", "--admin", "127.0.0.1:0",
        "--admin-token-file", str(token_file), token=new_token(),
    )  # fmt: skip
    url = gateway.proc.wait_line(ADMIN_URL).group(1)

    refused = run_status("--admin", url)
    assert refused.returncode == 1, refused
    assert WANTS_A_TOKEN in refused.stderr, refused
    assert refused.stdout == "", refused

    wrong_file = tmp_path / "wrong-token"
    wrong_file.write_text(new_token())
    wrong = run_status("--admin", url, "--admin-token-file", str(wrong_file))
    assert wrong.returncode == 1, wrong
    assert "refused the token" in wrong.stderr, wrong

    for given in (
        run_status("--admin", url, "--admin-token-file", str(token_file)),
        run_status("--admin", url, env={ADMIN_TOKEN_ENV: admin_token}),
    ):
        assert given.returncode == 0, given
        assert "agents (0):\n  (none)" in given.stdout, given
    assert admin_token not in "\n".join(gateway.proc.stderr + gateway.proc.stdout)


def test_status_without_an_admin_listener_says_so() -> None:
    """A port where nothing listens: exit 1 and "no admin listener at URL"."""
    with refusing_port() as port:
        result = run_status("--admin", f"127.0.0.1:{port}")
    assert result.returncode == 1, result
    assert f"no admin listener at http://127.0.0.1:{port}/: " in result.stderr, result
    assert "Traceback" not in result.stderr, result


class _Handler(http.server.BaseHTTPRequestHandler):
    answers: dict[str, bytes] = {}

    def do_GET(self) -> None:
        body = self.answers.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def http_server(answers: dict[str, bytes]) -> Iterator[str]:
    """A stdlib HTTP server on port 0 answering GET path with ``answers[path]``; its URL."""
    handler = type("Handler", (_Handler,), {"answers": answers})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()
            thread.join(DEADLINE)


def test_status_of_an_answer_that_is_not_json_says_so() -> None:
    """An HTTP server that answers text where JSON is expected: exit 1, "not JSON"."""
    with http_server({"/api/v1": b"<html>hello</html>"}) as url:
        result = run_status("--admin", url)
    assert result.returncode == 1, result
    assert f"the answer of {url}api/v1 is not JSON" in result.stderr, result
    assert "Traceback" not in result.stderr, result


def test_status_prints_the_fields_it_knows_and_loads_no_aiohttp() -> None:
    """An agent's views with fields added later: known ones shown (bytes humanized),
    unknown ones left out; the command never imports aiohttp."""
    sessions = [{"id": "ab12", "gateway": "gw:8080", "age": 192.5, "services": ["web"],
                 "up": 1258291, "later_field": "SECRET-VALUE"}]  # fmt: skip
    services = [{"name": "web", "public": "0.0.0.0:3920", "local": "127.0.0.1:80"}]
    answers = {
        "/api/v1": json.dumps(
            {
                "side": "agent",
                "name": "site-a",
                "gateway": "gw:8080",
                "gateways": [{"gateway": "gw:8080", "state": "serving"}],
            }
        ),
        "/api/v1/sessions": json.dumps(sessions),
        "/api/v1/services": json.dumps(services),
    }
    code = (
        "import sys\nfrom tunnelgate import cli\ncode = cli.main(sys.argv[1:])\n"
        "print('aiohttp loaded' if 'aiohttp' in sys.modules else 'no aiohttp')\nsys.exit(code)"
    )
    with http_server({k: v.encode() for k, v in answers.items()}) as url:
        result = subprocess.run(
            [sys.executable, "-c", code, "status", "--admin", url],
            capture_output=True, text=True, timeout=DEADLINE, check=False,
        )  # fmt: skip
    assert result.returncode == 0, result
    assert result.stdout.endswith("no aiohttp\n"), result
    row = row_with(section(result.stdout, "sessions"), "ab12")
    assert (row["AGE"], row["UP"]) == ("3m12s", "1.2 MiB"), result.stdout
    assert "SECRET-VALUE" not in result.stdout and "LATER" not in result.stdout, result.stdout
    assert "(none)" not in result.stdout
