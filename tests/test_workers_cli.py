"""A gateway of several worker processes (``tunnelgate gateway --workers N``) in real
processes: the agent holds a session with each worker, both workers serve the clients of one
public port, a killed worker comes back and its agent session with it, and a port leased to one
agent is refused to another on every worker. Port 0 everywhere; waits on log lines under
deadlines, never bare sleeps."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kit.clients import echo_exchange
from kit.processes import GatewayProc, Launch, Proc, start_gateway
from kit.tokens import new_token
from kit.waiting import DEADLINE, LONGER_THAN_ANY_TEST
from prometheus_client.parser import text_string_to_metric_families

from tunnelgate import credentials
from tunnelgate.protocol import wire as p

pytestmark = pytest.mark.timeout(90)

EXPOSED = r"exposed at gateway port (\d+)"
ADMIN_URL = r"admin listening on (http://127\.0\.0\.1:\d+/)"
# Heartbeats that never come due while a test runs (a raw agent below answers none).
QUIET = ("--heartbeat-interval", str(LONGER_THAN_ANY_TEST / 2), "--heartbeat-timeout",
         str(LONGER_THAN_ANY_TEST))  # fmt: skip


def start_workers(launch: Launch, tmp_path: Path, token: str, *flags: str, tls: bool = False) -> (
    tuple[GatewayProc, list[int]]
):  # fmt: skip
    """A gateway of two workers, and each worker's own control port from its banner."""
    gateway = start_gateway(launch, tmp_path / "state", "--workers", "2", *flags, token=token,
                            tls=tls)  # fmt: skip
    line = gateway.proc.wait_line(r"^workers: 2 .*: (.*)\)$", stdout=True).group(1)
    own = [int(address.rsplit(":", 1)[1]) for address in line.split(", ")]
    assert len(own) == 2 and gateway.port not in own, line
    return gateway, own


def start_agent(
    launch: Launch, gateway: GatewayProc, token: str, expose: str, *flags: str
) -> tuple[Proc, int]:
    """An agent named site-a (unless ``flags`` say) with a session on both workers; the port."""
    args = ["agent", "--gateway", f"127.0.0.1:{gateway.port}", "--expose", expose]
    args += ["--fingerprint", gateway.fingerprint] if gateway.fingerprint else ["--no-tls"]
    if "--name" not in flags:
        args += ["--name", "site-a"]
    proc = launch(*args, *flags, token=token)
    port = int(proc.wait_line(EXPOSED).group(1))
    assert int(proc.wait_line(EXPOSED, count=2).group(1)) == port, "one port on both workers"
    return proc, port


def echo_through(port: int, payload: bytes) -> bytes:
    received, how = echo_exchange(port, payload)
    assert how == "eof", f"the echo ended with {how} after {len(received)} bytes"
    return received


def served_by(gateway: GatewayProc, worker: int) -> int:
    """Client connections worker ``worker`` has closed so far, by its log."""
    return len(gateway.proc.lines_matching(rf"\[worker={worker} .*\] closed client="))


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=DEADLINE) as answer:
        return json.loads(answer.read())


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-tcp"])
def test_workers_each_serve_the_clients_of_a_shared_port(
    launch: Launch, echo_port: int, tmp_path: Path, tls: bool
) -> None:
    """With --workers 2 the agent holds a session with each worker, at its own port; the
    clients of the one public port are spread over both, and each gets its own bytes back."""
    token = new_token()
    gateway, own = start_workers(launch, tmp_path, token, tls=tls)
    agent, port = start_agent(launch, gateway, token, f"0:127.0.0.1:{echo_port}",
                              "--admin", "127.0.0.1:0")  # fmt: skip
    for worker in (0, 1):
        gateway.proc.wait_line(rf"\[worker={worker} session=\w+ agent=site-a\] service \S+ "
                               rf"exposed on 127\.0\.0\.1:{port}$")  # fmt: skip
    url = agent.wait_line(ADMIN_URL).group(1)
    sessions = get_json(f"{url}api/v1/sessions")
    assert isinstance(sessions, list)
    assert sorted((s["worker"], s["gateway"]) for s in sessions) == [
        (0, f"127.0.0.1:{own[0]}"),
        (1, f"127.0.0.1:{own[1]}"),
    ], sessions
    services = get_json(f"{url}api/v1/services")
    assert [s["public"] for s in services] == [f"127.0.0.1:{port}"], services  # type: ignore[index, union-attr]

    payloads = [os.urandom(4096 + i) for i in range(48)]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda payload: echo_through(port, payload), payloads)) == payloads
    gateway.proc.wait_line(r"\] closed client=.* end=normal", count=len(payloads))
    counts = [served_by(gateway, worker) for worker in (0, 1)]
    assert sum(counts) == len(payloads) and all(counts), f"clients per worker: {counts}"


def post_json(url: str) -> object:
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=b"{}", headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=DEADLINE) as answer:
        return json.loads(answer.read())


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of ``url``'s /metrics: (name, labels) → value; a sample twice fails."""
    with urllib.request.urlopen(f"{url}metrics", timeout=DEADLINE) as answer:
        text = answer.read().decode()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} twice in the metrics"
            samples[key] = sample.value
    return samples


def agent_sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
                 **labels: str) -> float:  # fmt: skip
    return samples[(name, frozenset({"agent": "site-a", **labels}.items()))]


def test_admin_api_metrics_and_actions_of_workers_show_one_gateway(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """The supervisor's admin listener shows the workers as one gateway: the agent once, with
    a session on each worker; its service once, its counts summed over both workers; one
    agent_up in the events. Closing a connection reaches the worker that holds it, and a
    killed worker's counts stay in the totals."""
    token = new_token()
    gateway, _ = start_workers(launch, tmp_path, token, "--admin", "127.0.0.1:0")
    url = gateway.proc.wait_line(ADMIN_URL).group(1)
    assert get_json(f"{url}readyz") == {"ready": True}
    service = f"127.0.0.1:{echo_port}"  # its name
    agent, port = start_agent(launch, gateway, token, f"0:{service}")
    payloads = [os.urandom(1000 + i) for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda payload: echo_through(port, payload), payloads)) == payloads
    gateway.proc.wait_line(r"\] closed client=.* end=normal", count=len(payloads))
    counts = [served_by(gateway, worker) for worker in (0, 1)]
    assert all(counts), f"clients per worker: {counts}"

    info = get_json(f"{url}api/v1")
    assert isinstance(info, dict) and info["agents_connected"] == 1, info
    [record] = get_json(f"{url}api/v1/agents")  # type: ignore[misc]
    assert record["name"] == "site-a" and record["online"] and record["services"] == [service]
    assert record["connects"] == 2, record  # a session with each worker
    detail = get_json(f"{url}api/v1/agents/site-a")
    assert isinstance(detail, dict)
    assert sorted(s["worker"] for s in detail["sessions"]) == [0, 1], detail
    assert detail["traffic"][service]["connections"] == len(payloads), detail
    assert detail["traffic"][service]["up"] == sum(map(len, payloads)), detail
    services = get_json(f"{url}api/v1/services")
    assert services == [{"name": service, "agent": "site-a", "address": f"127.0.0.1:{port}",
                         "connections": 0, "draining": False}], services  # fmt: skip
    events = get_json(f"{url}api/v1/events")
    assert isinstance(events, list)
    kinds = [(e["kind"], e["agent"], e["service"]) for e in events]
    assert kinds.count(("agent_up", "site-a", "")) == 1, kinds
    assert kinds.count(("service_up", "site-a", service)) == 1, kinds
    samples = scrape(url)
    total = agent_sample(samples, "tunnelgate_service_connections_total", service=service)
    assert total == len(payloads)
    assert agent_sample(samples, "tunnelgate_service_up", service=service) == 1
    assert samples[("tunnelgate_agents_connected", frozenset())] == 1

    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as held:
        held.sendall(b"still here")
        assert held.recv(64) == b"still here"
        deadline = time.monotonic() + DEADLINE
        while not (open_now := get_json(f"{url}api/v1/connections")):
            assert time.monotonic() < deadline, "the held connection is not listed"
        [connection] = open_now  # type: ignore[misc]
        conn = connection["id"]
        assert post_json(f"{url}api/v1/connections/{conn}/close") == {"closed": conn}
        with pytest.raises(ConnectionResetError):
            while held.recv(64):
                pass
    with pytest.raises(urllib.error.HTTPError) as refused:  # too long for any worker's channel
        post_json(f"{url}api/v1/agents/{'x' * 5000}/disconnect")
    refused.value.close()
    assert refused.value.code == 404
    assert post_json(f"{url}api/v1/reload") == {"reloaded": "reloaded"}  # the channels still work

    pid = int(gateway.proc.wait_line(r"worker 1 started \(pid (\d+)\)").group(1))
    os.kill(pid, signal.SIGKILL)
    gateway.proc.wait_line(rf"worker 1 \(pid {pid}\) killed by SIGKILL; restarting it in ")
    samples = scrape(url)
    kept = agent_sample(samples, "tunnelgate_service_connections_total", service=service)
    assert kept >= total + 1  # the held connection's too
    events = get_json(f"{url}api/v1/events")
    assert isinstance(events, list) and not [e for e in events if e["kind"] == "agent_down"]
    assert post_json(f"{url}api/v1/agents/site-a/disconnect") == {"disconnected": "site-a"}
    agent.wait_line(r"dialing .* again|connected to gateway", count=3)


def test_killed_worker_is_restarted_and_the_agent_returns_to_it(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """A worker killed outright: the other serves every client meanwhile; the supervisor
    starts it again on the same own port, the agent's session returns, and it serves again."""
    token = new_token()
    gateway, own = start_workers(launch, tmp_path, token)
    agent, port = start_agent(launch, gateway, token, f"0:127.0.0.1:{echo_port}")
    pid = int(gateway.proc.wait_line(r"worker 1 started \(pid (\d+)\)").group(1))

    os.kill(pid, signal.SIGKILL)
    gateway.proc.wait_line(rf"worker 1 \(pid {pid}\) killed by SIGKILL; restarting it in ")
    before = served_by(gateway, 0)
    for index in range(16):  # its listeners died with it: the kernel sends every client to 0
        payload = f"while worker 1 is away: {index}".encode()
        assert echo_through(port, payload) == payload
    gateway.proc.wait_line(r"\[worker=0 .*\] closed client=", count=before + 16)

    restarted = int(gateway.proc.wait_line(r"worker 1 started \(pid (\d+)\)", count=2).group(1))
    assert restarted != pid
    gateway.proc.wait_line(rf"\[worker=1\] worker 1 of 2 serving .* its own 127\.0\.0\.1:{own[1]} ",
                           count=2)  # fmt: skip
    # The first of these two may be the session that found the workers through the gateway.
    agent.wait_line(rf"\[agent=site-a worker=1 session=\w+\] connected to gateway .* \(worker 1 "
                    rf"of 2, at 127\.0\.0\.1:{own[1]}\)$", count=2)  # fmt: skip
    gateway.proc.wait_line(rf"\[worker=1 session=\w+ agent=site-a\] service \S+ exposed on "
                           rf"127\.0\.0\.1:{port}$", count=2)  # fmt: skip
    served = served_by(gateway, 1)
    deadline = time.monotonic() + DEADLINE
    while served_by(gateway, 1) == served:  # the kernel spreads clients by their address
        assert time.monotonic() < deadline, "no client reached the restarted worker"
        assert echo_through(port, b"and back again") == b"and back again"
    assert not agent.lines_matching("dialing .* again"), "the agent kept its other session"


def test_agent_spreads_anew_over_a_restarted_gateways_workers(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """A gateway restarted on its control port, its workers on other own ports: the agent
    finds none of the old ones, dials the gateway again, and holds a session with each new one,
    its service on the port it had."""
    token = new_token()
    first, _ = start_workers(launch, tmp_path, token)
    agent, port = start_agent(launch, first, token, f"0:127.0.0.1:{echo_port}")
    first.proc.signal(signal.SIGTERM)
    assert first.proc.wait_exit() == 0
    second = start_gateway(launch, tmp_path / "state", "--workers", "2", token=token, tls=False,
                           listen=f"127.0.0.1:{first.port}")  # fmt: skip
    agent.wait_line(rf"no session with any worker of the gateway .*; dialing 127\.0\.0\.1:"
                    rf"{first.port} again")  # fmt: skip
    for worker in (0, 1):
        second.proc.wait_line(rf"\[worker={worker} session=\w+ agent=site-a\] service \S+ "
                              rf"exposed on 127\.0\.0\.1:{port}$")  # fmt: skip
    assert echo_through(port, b"after the restart") == b"after the restart"


def hold_port_on_one_worker(port: int, token: str, agent: str) -> tuple[socket.socket, int]:
    """A control session, by hand, with the worker whose own port is ``port`` only (as no
    agent of tunnelgate does): it registers one service on any port; the session and the port."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    decoder = p.FrameDecoder()

    def receive() -> p.Event:
        while True:
            data = sock.recv(65536)
            assert data, "the gateway closed the control channel"
            if events := list(decoder.feed(data)):
                return events[0]

    challenge = receive()
    assert isinstance(challenge, p.Challenge)
    proof = credentials.make_proof(
        credentials.derive(token.encode(), agent), challenge.nonce, "control", agent, ""
    )
    hello = p.Hello(p.PROTOCOL_VERSION, "control", agent, proof, "", "by hand", False, True)
    sock.sendall(p.encode_message(hello))
    welcome = receive()
    assert isinstance(welcome, p.Welcome) and welcome.workers, welcome
    sock.sendall(p.encode_message(p.Register([p.ServiceRequest("held", "", 0)])))
    registered = receive()
    assert isinstance(registered, p.Registered) and registered.results[0].ok, registered
    return sock, registered.results[0].port


def test_port_leased_to_an_agent_on_one_worker_is_refused_to_another_on_every_worker(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """An agent holding a port through worker 0 alone: a second agent asking for that port is
    refused on worker 0 (its own sessions' port) and on worker 1 (the supervisor's lease)."""
    token = new_token()
    gateway, own = start_workers(launch, tmp_path, token, *QUIET)
    held, port = hold_port_on_one_worker(own[0], token, "site-a")
    with held:
        gateway.proc.wait_line(rf"\[worker=0 session=\w+ agent=site-a\] service held exposed on "
                               rf"127\.0\.0\.1:{port}$")  # fmt: skip
        args = ["agent", "--gateway", f"127.0.0.1:{gateway.port}", "--no-tls", "--name", "site-b"]
        other = launch(*args, "--expose", f"{port}:127.0.0.1:{echo_port}", token=token)
        refused = rf"not exposed: port {port} is held by another agent"
        other.wait_line(refused, count=2)  # one session with each worker
        gateway.proc.wait_line(rf"\[worker=1 session=\w+ agent=site-b\] service \S+ refused: "
                               rf"port {port} is held by another agent")  # fmt: skip
        assert not other.lines_matching(EXPOSED)


def test_agent_without_worker_sessions_is_refused_by_a_gateway_of_workers(
    launch: Launch, tmp_path: Path
) -> None:
    """An agent that would send its data channels to any worker is told to upgrade, at once."""
    token = new_token()
    gateway, _ = start_workers(launch, tmp_path, token)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=DEADLINE) as sock:
        decoder = p.FrameDecoder()
        challenge = next(decoder.feed(sock.recv(65536)))
        assert isinstance(challenge, p.Challenge)
        proof = credentials.make_proof(
            credentials.derive(token.encode(), "old"), challenge.nonce, "control", "old", ""
        )
        hello = p.Hello(p.PROTOCOL_VERSION, "control", "old", proof, "", "older", True)
        sock.sendall(p.encode_message(hello))
        refused = next(decoder.feed(sock.recv(65536)))
    assert isinstance(refused, p.Refused) and refused.code == "version", refused
    assert "2 worker processes" in refused.reason


def test_workers_reload_together_and_stop_when_the_supervisor_is_told(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """SIGHUP reaches every worker; SIGTERM stops them all (drained) and the supervisor exits 0."""
    token = new_token()
    gateway, _ = start_workers(launch, tmp_path, token)
    pids = [
        int(gateway.proc.wait_line(rf"worker {i} started \(pid (\d+)\)").group(1)) for i in (0, 1)
    ]
    start_agent(launch, gateway, token, f"0:127.0.0.1:{echo_port}")

    gateway.proc.signal(signal.SIGHUP)
    for worker in (0, 1):
        gateway.proc.wait_line(
            rf"\[worker={worker}\] configuration reloaded: .* 1 session\(s\) kept"
        )
    gateway.proc.signal(signal.SIGTERM)
    assert gateway.proc.wait_exit() == 0
    for worker in (0, 1):
        assert gateway.proc.lines_matching(rf"\[worker={worker}\] gateway stopped")
    assert not [pid for pid in pids if running(pid)], "a worker outlived it"


def test_workers_drain_once_when_every_process_gets_sigterm(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """As systemd stops a service (SIGTERM to each of its processes): every worker drains
    once, none takes its supervisor's word for a second signal, and all exit cleanly."""
    token = new_token()
    gateway, _ = start_workers(launch, tmp_path, token)
    pids = [
        int(gateway.proc.wait_line(rf"worker {i} started \(pid (\d+)\)").group(1)) for i in (0, 1)
    ]
    start_agent(launch, gateway, token, f"0:127.0.0.1:{echo_port}")
    for pid in [gateway.pid, *pids]:
        os.kill(pid, signal.SIGTERM)
    assert gateway.proc.wait_exit() == 0
    for worker in (0, 1):
        assert gateway.proc.lines_matching(rf"\[worker={worker}\] gateway stopped")
    assert not gateway.proc.lines_matching("received again"), gateway.proc.describe()


def running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_workers_stop_when_their_supervisor_is_killed(launch: Launch, tmp_path: Path) -> None:
    """A supervisor killed outright leaves no worker behind: each sees it gone and stops."""
    gateway, _ = start_workers(launch, tmp_path, new_token())
    pids = [
        int(gateway.proc.wait_line(rf"worker {i} started \(pid (\d+)\)").group(1)) for i in (0, 1)
    ]
    gateway.proc.popen.kill()
    for worker in (0, 1):
        gateway.proc.wait_line(rf"\[worker={worker}\] the supervisor is gone; stopping")
        gateway.proc.wait_line(rf"\[worker={worker}\] gateway stopped")
    deadline = time.monotonic() + DEADLINE
    while any(running(pid) for pid in pids):
        assert time.monotonic() < deadline, "a worker outlived its supervisor"
        time.sleep(0.05)  # polling interval under a deadline


def test_one_worker_is_the_gateway_of_one_process(launch: Launch, tmp_path: Path) -> None:
    """--workers 1 (the default) is today's gateway: no supervisor, no worker, one process."""
    gateway = start_gateway(launch, tmp_path / "state", "--workers", "1", token=new_token())
    assert not gateway.proc.lines_matching(r"^workers:", stdout=True)
    assert not gateway.proc.lines_matching(r"worker")
    children = Path(f"/proc/{gateway.pid}/task/{gateway.pid}/children")
    assert children.read_text().strip() == ""


def test_first_start_fails_if_a_worker_cannot_start(launch: Launch, tmp_path: Path) -> None:
    """A worker own port that cannot be bound: the gateway says so and exits 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        base = taken.getsockname()[1]
        proc = launch("gateway", "--listen", "127.0.0.1:0", "--workers", "2", "--no-tls",
                      "--worker-ports", str(base), "--state-dir", str(tmp_path / "state"),
                      token=new_token())  # fmt: skip
        assert proc.wait_exit() == 1
    assert re.search(rf"cannot listen on 127\.0\.0\.1:{base}", "\n".join(proc.stderr))
