"""Agent groups in real processes: several agents expose their own local service into one group
of the gateway (its ``[[groups]]``, proved with the group's secret); the gateway spreads new
clients over the members that serve, round robin or by fewest connections; a member that leaves
(killed) or fails its health check (TCP, or an HTTP status) gets no new client, and a member
healthy again gets them back; a wrong secret or a group the policy does not allow is refused
with its reason while the group serves on. Each member's service says its name first, so every
client knows which member carried it. Port 0 everywhere; waits on log lines, never sleeps."""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import re
import signal
import socket
import socketserver
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from kit.processes import GatewayProc, Launch, Proc, start_gateway
from kit.services import tcp_service
from kit.tokens import new_token
from kit.waiting import DEADLINE, wait_for

from tunnelgate import credentials

pytestmark = pytest.mark.timeout(120)

EXPOSED = r"exposed at gateway port (\d+)"
ADMIN_URL = r"admin listening on (http://127\.0\.0\.1:\d+/)"


def named_echo(name: str) -> type[socketserver.BaseRequestHandler]:
    """A threaded service that says ``name`` and a newline, then echoes until its peer ends."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with contextlib.suppress(OSError):
                self.request.sendall(name.encode() + b"\n")
                while data := self.request.recv(65536):
                    self.request.sendall(data)

    return Handler


def who_answers(port: int, payload: bytes = b"through the group", host: str = "127.0.0.1") -> str:
    """Connect, read the member's name, check the echo of ``payload``; the name."""
    with socket.create_connection((host, port), timeout=DEADLINE) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while data := sock.recv(65536):
            received += data
    name, _, echoed = bytes(received).partition(b"\n")
    assert echoed == payload, f"{name!r} echoed {echoed!r}"
    return name.decode()


def group_config(tmp_path: Path, secret: str, *, balance: str = "round_robin",
                 extra: str = "") -> Path:  # fmt: skip
    """A gateway file with group "web", its secret stored as the hash ``tunnelgate token``
    prints."""
    stored = credentials.hash_line(credentials.derive(secret.encode(), "web").stored_key)
    path = tmp_path / "gateway.toml"
    text = f'[[groups]]\nname = "web"\nsecret_hash = "{stored}"\nbalance = "{balance}"\n'
    path.write_text(text + extra)
    return path


def group_gateway(launch: Launch, tmp_path: Path, secret_file: Path, *flags: str,
                  token: str | None = None, balance: str = "round_robin",
                  extra: str = "") -> GatewayProc:  # fmt: skip
    """A gateway (no TLS) with group "web" of the secret in ``secret_file``."""
    config = group_config(tmp_path, secret_file.read_text(), balance=balance, extra=extra)
    return start_gateway(launch, tmp_path / "state", "--config", str(config), *flags,
                         token=token, tls=False)  # fmt: skip


def start_member(
    launch: Launch, gateway: GatewayProc, token: str, name: str, service: int, secret_file: Path,
    *flags: str,
) -> tuple[Proc, int]:  # fmt: skip
    """Agent ``name`` exposing ``service`` into group web; the group's port."""
    agent = launch(
        "agent", "--gateway", f"127.0.0.1:{gateway.port}", "--no-tls", "--name", name,
        "--expose", f"0:127.0.0.1:{service}", "--group", "web",
        "--group-secret-file", str(secret_file), *flags, token=token,
    )  # fmt: skip
    return agent, int(agent.wait_line(EXPOSED).group(1))


def test_a_group_spreads_clients_and_a_member_that_leaves_costs_them_nothing(
    launch: Launch, tmp_path: Path, secret_file: Path
) -> None:
    token = new_token()
    gateway = group_gateway(launch, tmp_path, secret_file, token=token)
    with tcp_service(named_echo("a")) as service_a, tcp_service(named_echo("b")) as service_b:
        a, port = start_member(launch, gateway, token, "a", service_a, secret_file)
        b, same = start_member(launch, gateway, token, "b", service_b, secret_file)
        assert same == port, "one public port for the group"
        gateway.proc.wait_line(r"joined group web on .* \(2 member\(s\)\)")

        answers = [who_answers(port, f"client {i}".encode()) for i in range(10)]
        assert Counter(answers) == {"a": 5, "b": 5}, answers
        assert all(x != y for x, y in itertools.pairwise(answers)), answers

        a.popen.send_signal(signal.SIGKILL)
        a.wait_exit()
        gateway.proc.wait_line(r"left group web \(1 member\(s\) left\)")
        assert [who_answers(port, f"after {i}".encode()) for i in range(10)] == ["b"] * 10
        assert not gateway.proc.lines_matching(r"refusing client"), gateway.proc.describe()

        b.popen.send_signal(signal.SIGTERM)
        assert b.wait_exit() == 0
        gateway.proc.wait_line(r"left group web \(0 member\(s\) left\)")
        with pytest.raises(ConnectionRefusedError):  # the last member out closes the port
            socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()


def test_least_connections_sends_new_clients_to_the_member_with_fewer(
    launch: Launch, tmp_path: Path, secret_file: Path
) -> None:
    token = new_token()
    gateway = group_gateway(
        launch,
        tmp_path,
        secret_file,
        "--admin",
        "127.0.0.1:0",
        token=token,
        balance="least_connections",
    )
    admin = gateway.proc.wait_line(ADMIN_URL).group(1)

    def open_clients() -> dict[str, int]:  # by member, as the gateway counts them
        with urllib.request.urlopen(admin + "api/v1/groups", timeout=DEADLINE) as answer:
            (group,) = json.loads(answer.read())
        return {m["agent"]: m["connections"] for m in group["members"]}

    with tcp_service(named_echo("a")) as service_a, tcp_service(named_echo("b")) as service_b:
        _, port = start_member(launch, gateway, token, "a", service_a, secret_file)
        start_member(launch, gateway, token, "b", service_b, secret_file)
        gateway.proc.wait_line(r"\(2 member\(s\)\)")
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as held:
            busy = held.makefile("rb").readline().decode().strip()
            idle = {"a": "b", "b": "a"}[busy]
            for _ in range(6):  # each one closed at the gateway before the next one
                assert who_answers(port) == idle
                wait_for(lambda: open_clients() == {busy: 1, idle: 0}, DEADLINE,
                         "the gateway to count the client closed")  # fmt: skip


class Status(http.server.BaseHTTPRequestHandler):
    """A web service of member ``server.name``: GET /healthz answers ``server.health``;
    anything else answers the member's name."""

    def do_GET(self) -> None:
        health = self.server.health  # type: ignore[attr-defined]
        code, body = (health, b"health") if self.path == "/healthz" else (200, b"")
        body = body or self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def web_member(name: str) -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Status)
    server.name, server.health = name, 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def agent_file(tmp_path: Path, name: str, gateway: GatewayProc, service: int, check: str) -> Path:
    path = tmp_path / f"agent-{name}.toml"
    path.write_text(
        f'gateway = "127.0.0.1:{gateway.port}"\ntls = false\nname = "{name}"\n'
        f'[[services]]\nlocal = "127.0.0.1:{service}"\ngroup = "web"\n{check}'
        "health_interval = 0.2\n"
    )
    return path


def whose(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/who", timeout=DEADLINE) as answer:
        return str(answer.read().decode())


def test_a_member_failing_its_http_health_check_gets_no_clients_until_it_passes(
    launch: Launch, tmp_path: Path, secret_file: Path
) -> None:
    token = new_token()
    gateway = group_gateway(launch, tmp_path, secret_file, token=token)
    check = 'health_check = "http"\nhealth_path = "/healthz"\nhealth_status = 200\n'
    env = {"TUNNELGATE_GROUP_SECRET": secret_file.read_text()}
    with web_member("a") as site_a, web_member("b") as site_b:
        members = {}
        for name, site in (("a", site_a), ("b", site_b)):
            path = agent_file(tmp_path, name, gateway, site.server_address[1], check)
            members[name] = launch("agent", "--config", str(path), token=token, env=env)
        port = int(members["a"].wait_line(EXPOSED).group(1))
        members["b"].wait_line(EXPOSED)
        gateway.proc.wait_line(r"\(2 member\(s\)\)")
        assert Counter(whose(port) for _ in range(4)) == {"a": 2, "b": 2}

        site_a.health = 503  # type: ignore[attr-defined]
        line = members["a"].wait_line(r"failed its health check: (.*)").group(1)
        assert "GET /healthz answered 503, expected 200" in line
        gateway.proc.wait_line(r"agent=a\b.*unhealthy .*503.*: out of group web")
        assert [whose(port) for _ in range(6)] == ["b"] * 6

        site_a.health = 200  # type: ignore[attr-defined]
        members["a"].wait_line(r"is healthy again")
        gateway.proc.wait_line(r"healthy again: back in group web")
        assert "a" in [whose(port) for _ in range(4)]


def test_a_member_whose_service_stops_answering_tcp_is_taken_out(
    launch: Launch, tmp_path: Path, secret_file: Path
) -> None:
    token = new_token()
    gateway = group_gateway(launch, tmp_path, secret_file, token=token)
    env = {"TUNNELGATE_GROUP_SECRET": secret_file.read_text()}
    with tcp_service(named_echo("b")) as service_b:
        with tcp_service(named_echo("a")) as service_a:
            path = agent_file(tmp_path, "a", gateway, service_a, "")
            a = launch("agent", "--config", str(path), token=token, env=env)
            port = int(a.wait_line(EXPOSED).group(1))
            path = agent_file(tmp_path, "b", gateway, service_b, "")
            launch("agent", "--config", str(path), token=token, env=env).wait_line(EXPOSED)
            gateway.proc.wait_line(r"\(2 member\(s\)\)")
        # a's service is gone: its agent's next check fails, and the group leaves it out
        a.wait_line(r"failed its health check: cannot connect to 127\.0\.0\.1")
        gateway.proc.wait_line(r"agent=a\b.*unhealthy .*: out of group web")
        assert [who_answers(port) for _ in range(6)] == ["b"] * 6


def test_a_wrong_secret_or_a_group_not_allowed_is_refused_and_the_group_serves_on(
    launch: Launch, tmp_path: Path, secret_file: Path
) -> None:
    tokens = {name: new_token() for name in ("a", "c", "d", "e")}
    allowed = {"a": 'allow_groups = ["web"]', "d": "allow_groups = []"}
    agents = "".join(
        f'[[agents]]\nname = "{name}"\ntoken = "{token}"\n{allowed.get(name, "")}\n'
        for name, token in tokens.items()
    )
    gateway = group_gateway(launch, tmp_path, secret_file, extra=agents)
    with tcp_service(named_echo("a")) as service_a, tcp_service(named_echo("x")) as other:
        _, port = start_member(launch, gateway, tokens["a"], "a", service_a, secret_file)

        wrong = tmp_path / "wrong-secret"
        wrong.write_text(new_token())
        c = launch("agent", "--gateway", f"127.0.0.1:{gateway.port}", "--no-tls", "--name", "c",
                   "--expose", f"0:127.0.0.1:{other}", "--group", "web", "--group-secret-file",
                   str(wrong), token=tokens["c"])  # fmt: skip
        c.wait_line(r"ERROR .*not exposed: wrong secret for group 'web'")
        gateway.proc.wait_line(r"agent=c\b.*join group web: wrong secret")

        d = launch("agent", "--gateway", f"127.0.0.1:{gateway.port}", "--no-tls", "--name", "d",
                   "--expose", f"0:127.0.0.1:{other}", "--group", "web", "--group-secret-file",
                   str(secret_file), token=tokens["d"])  # fmt: skip
        d.wait_line(r"ERROR .*not exposed: this agent may not join group 'web' \(allow_groups\)")

        assert who_answers(port) == "a", "the group serves on"

        e = launch("agent", "--gateway", f"127.0.0.1:{gateway.port}", "--no-tls", "--name", "e",
                   "--expose", f"0:127.0.0.1:{other}", "--group", "nope", "--group-secret-file",
                   str(secret_file), token=tokens["e"])  # fmt: skip
        e.wait_line(r"ERROR .*not exposed: the gateway has no agent group 'nope'")
        assert [who_answers(port) for _ in range(3)] == ["a"] * 3


def test_the_admin_api_and_metrics_show_the_group(
    launch: Launch, tmp_path: Path, secret_file: Path
) -> None:
    token = new_token()
    gateway = group_gateway(launch, tmp_path, secret_file, "--admin", "127.0.0.1:0", token=token)
    admin = gateway.proc.wait_line(ADMIN_URL).group(1)
    with urllib.request.urlopen(admin + "metrics", timeout=DEADLINE) as answer:
        metrics = answer.read().decode()
    assert re.search(r'^tunnelgate_group_members\{group="web"\} 0\.0$', metrics, re.M), metrics
    with tcp_service(named_echo("a")) as service_a, tcp_service(named_echo("b")) as service_b:
        _, port = start_member(launch, gateway, token, "a", service_a, secret_file)
        start_member(launch, gateway, token, "b", service_b, secret_file)
        gateway.proc.wait_line(r"\(2 member\(s\)\)")
        with urllib.request.urlopen(admin + "api/v1/groups", timeout=DEADLINE) as answer:
            (group,) = json.loads(answer.read())
        assert (group["name"], group["balance"], group["address"]) == (
            "web", "round_robin", f"127.0.0.1:{port}")  # fmt: skip
        assert sorted((m["agent"], m["healthy"]) for m in group["members"]) == [
            ("a", True), ("b", True)]  # fmt: skip
        with urllib.request.urlopen(admin + "metrics", timeout=DEADLINE) as answer:
            metrics = answer.read().decode()
        assert re.search(r'^tunnelgate_group_members\{group="web"\} 2\.0$', metrics, re.M)
        assert re.search(r'^tunnelgate_group_healthy_members\{group="web"\} 2\.0$', metrics, re.M)


def test_a_member_at_its_limit_passes_the_client_to_another(
    launch: Launch, tmp_path: Path, secret_file: Path
) -> None:
    """Member a may hold one connection (max_connections = 1): with it held, a client whose turn
    is a's is taken by b instead of being reset."""
    tokens = {"a": new_token(), "b": new_token()}
    agents = (f'[[agents]]\nname = "a"\ntoken = "{tokens["a"]}"\nmax_connections = 1\n'
              f'[[agents]]\nname = "b"\ntoken = "{tokens["b"]}"\n')  # fmt: skip
    gateway = group_gateway(launch, tmp_path, secret_file, extra=agents)
    with tcp_service(named_echo("a")) as service_a, tcp_service(named_echo("b")) as service_b:
        _, port = start_member(launch, gateway, tokens["a"], "a", service_a, secret_file)
        start_member(launch, gateway, tokens["b"], "b", service_b, secret_file)
        gateway.proc.wait_line(r"\(2 member\(s\)\)")
        with contextlib.ExitStack() as held:
            names = []
            for _ in range(2):  # a, then b: round robin
                sock = held.enter_context(socket.create_connection(("127.0.0.1", port)))
                names.append(sock.makefile("rb").readline().decode().strip())
            assert names == ["a", "b"]
            assert who_answers(port, b"a's turn, but a is full") == "b"
        gateway.proc.wait_line(r"agent=a\].*refusing client .*max_connections")
        assert not gateway.proc.lines_matching(r"refusing client .* on group")


def test_a_reload_that_revokes_a_group_secret_ends_its_members_sessions(
    launch: Launch, tmp_path: Path, secret_file: Path
) -> None:
    """Two secrets during a rotation; the old one removed and the gateway reloaded (SIGHUP):
    the member that joined with it is disconnected, and refused when it tries again."""
    token, new_secret = new_token(), new_token()
    old_hash = credentials.hash_line(credentials.derive(secret_file.read_text().encode(),
                                                        "web").stored_key)  # fmt: skip
    new_hash = credentials.hash_line(credentials.derive(new_secret.encode(), "web").stored_key)
    config = tmp_path / "gateway.toml"
    config.write_text(f'[[groups]]\nname = "web"\nsecret_hash = ["{old_hash}", "{new_hash}"]\n')
    gateway = start_gateway(launch, tmp_path / "state", "--config", str(config), token=token,
                            tls=False)  # fmt: skip
    rotated = tmp_path / "new-secret"
    rotated.write_text(new_secret)
    with tcp_service(named_echo("a")) as service_a, tcp_service(named_echo("b")) as service_b:
        a, port = start_member(launch, gateway, token, "a", service_a, secret_file)
        start_member(launch, gateway, token, "b", service_b, rotated)
        gateway.proc.wait_line(r"\(2 member\(s\)\)")

        config.write_text(f'[[groups]]\nname = "web"\nsecret_hash = ["{new_hash}"]\n')
        gateway.proc.popen.send_signal(signal.SIGHUP)
        gateway.proc.wait_line(r"agent=a\].*the secret it joined group web with was revoked")
        a.wait_line(r"ERROR .*not exposed: wrong secret for group 'web'")
        assert [who_answers(port) for _ in range(3)] == ["b"] * 3


def test_agent_groups_on_a_gateway_of_workers_are_refused_with_the_reason(
    launch: Launch, tmp_path: Path, secret_file: Path
) -> None:
    config = group_config(tmp_path, secret_file.read_text())
    proc = launch("gateway", "--listen", "127.0.0.1:0", "--config", str(config), "--no-tls",
                  "--workers", "2", "--state-dir", str(tmp_path / "state"),
                  token=new_token())  # fmt: skip
    assert proc.wait_exit() == 2
    assert proc.lines_matching(r"groups.*cannot have agent groups yet"), proc.describe()
