"""One agent, several gateways (``--gateway`` repeated), in real processes: the agent holds a
session with each gateway, each checked against its own pinned fingerprint, and exposes its
service on each; a gateway killed and restarted costs the other's clients nothing and gets its
session (and the same public port) back; ``/readyz`` and ``tunnelgate status`` report each
gateway; a gateway that refuses the agent is left while the others serve, and only a refusal by
every gateway ends the agent. The gateways listen on 127.0.0.1 and 127.0.0.2, port 0; waits on
log lines and answers under deadlines, never bare sleeps."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from kit.clients import echo_through, http_json
from kit.ports import refusing_port, start_listening
from kit.processes import GatewayProc, Launch, Proc, require_tool, start_gateway
from kit.tokens import new_token
from kit.waiting import DEADLINE, wait_for

pytestmark = pytest.mark.timeout(120)

ADMIN_URL = r"admin listening on (http://127\.0\.0\.1:\d+/)"
SECOND_HOST = "127.0.0.2"


def start_agent(
    launch: Launch, gateways: list[tuple[str, GatewayProc]], token: str, echo: int, *flags: str
) -> Proc:
    """An agent named site-a with each of ``gateways`` (host, gateway) pinned to its own
    fingerprint, exposing the echo service on any port, with an admin listener."""
    args = ["agent", "--name", "site-a", "--expose", f"0:127.0.0.1:{echo}"]
    for host, gateway in gateways:
        args += ["--gateway", f"{host}:{gateway.port}", "--fingerprint", str(gateway.fingerprint)]
    return launch(*args, "--admin", "127.0.0.1:0", "--reconnect-max", "1", *flags, token=token)


def exposed_port(agent: Proc, host: str, gateway: GatewayProc, count: int = 1) -> int:
    """The public port the ``count``-th session with the gateway at ``host`` got."""
    where = re.escape(f"gateway={host}:{gateway.port}")
    return int(agent.wait_line(rf"{where}.*exposed at gateway port (\d+)", count=count).group(1))


def states(admin: str) -> dict[str, str]:
    """Each gateway's state, as the agent's admin API shows it."""
    _, info = http_json(admin + "api/v1")
    return {row["gateway"]: row["state"] for row in info["gateways"]}


def test_an_agent_serves_through_each_gateway_and_survives_one_restarting(
    launch: Launch, tmp_path: Path, echo_port: int
) -> None:
    token = new_token()
    first = start_gateway(launch, tmp_path / "first", token=token)
    second = start_gateway(launch, tmp_path / "second", token=token, listen=f"{SECOND_HOST}:0")
    assert first.fingerprint != second.fingerprint, "each gateway has its own identity"
    agent = start_agent(launch, [("127.0.0.1", first), (SECOND_HOST, second)], token, echo_port)
    admin = agent.wait_line(ADMIN_URL).group(1)
    one, two = exposed_port(agent, "127.0.0.1", first), exposed_port(agent, SECOND_HOST, second)
    echo_through("127.0.0.1", one, b"through the first gateway " * 100)
    echo_through(SECOND_HOST, two, b"through the second gateway " * 100)
    a, b = f"127.0.0.1:{first.port}", f"{SECOND_HOST}:{second.port}"
    wait_for(lambda: states(admin) == {a: "serving", b: "serving"}, DEADLINE, "both serving")
    assert http_json(admin + "readyz")[0] == 200

    status = subprocess.run(
        [sys.executable, "-m", "tunnelgate", "status", "--admin", admin],
        capture_output=True, text=True, timeout=DEADLINE, check=True,
    )  # fmt: skip
    assert "agent site-a" in status.stdout and "2 gateways" in status.stdout, status.stdout
    rows = status.stdout.split("gateways (2):", 1)[1].split("sessions (", 1)[0]
    assert re.search(rf"{re.escape(a)}\s+serving", rows), status.stdout
    assert re.search(rf"{re.escape(b)}\s+serving", rows), status.stdout

    second.proc.popen.send_signal(signal.SIGKILL)
    second.proc.wait_exit()
    agent.wait_line(rf"reconnecting to {re.escape(b)} in ")
    wait_for(lambda: states(admin) == {a: "serving", b: "down"}, DEADLINE, "the second down")
    assert http_json(admin + "readyz")[0] == 200, "one gateway serving is enough by default"
    for round_ in range(5):
        echo_through("127.0.0.1", one, f"while the second is down, round {round_}".encode())

    again = start_gateway(
        launch, tmp_path / "second", token=token, listen=f"{SECOND_HOST}:{second.port}"
    )
    assert again.fingerprint == second.fingerprint and again.port == second.port
    assert exposed_port(agent, SECOND_HOST, second, count=2) == two, "the same public port"
    echo_through(SECOND_HOST, two, b"through the second gateway, back")
    echo_through("127.0.0.1", one, b"and still through the first")
    wait_for(lambda: states(admin) == {a: "serving", b: "serving"}, DEADLINE, "both serving again")


def test_readiness_can_require_every_gateway(
    launch: Launch, tmp_path: Path, echo_port: int
) -> None:
    """With --require-all-gateways, /readyz names the gateway not serving; the agent still
    serves through the other one."""
    token = new_token()
    first = start_gateway(launch, tmp_path / "first", token=token)
    second = start_gateway(launch, tmp_path / "second", token=token, listen=f"{SECOND_HOST}:0")
    gateways = [("127.0.0.1", first), (SECOND_HOST, second)]
    agent = start_agent(launch, gateways, token, echo_port, "--require-all-gateways")
    admin = agent.wait_line(ADMIN_URL).group(1)
    one = exposed_port(agent, "127.0.0.1", first)
    exposed_port(agent, SECOND_HOST, second)
    wait_for(
        lambda: http_json(admin + "readyz")[0] == 200, DEADLINE, "ready with both gateways serving"
    )

    second.proc.popen.send_signal(signal.SIGKILL)
    second.proc.wait_exit()
    wait_for(
        lambda: http_json(admin + "readyz")[0] == 503,
        DEADLINE,
        "not ready without the second gateway",
    )
    code, body = http_json(admin + "readyz")
    assert code == 503 and f"{SECOND_HOST}:{second.port}" in json.dumps(body), body
    echo_through("127.0.0.1", one, b"the first gateway still serves")


def test_a_gateway_that_refuses_is_left_while_another_serves(
    launch: Launch, tmp_path: Path, echo_port: int
) -> None:
    """A gateway whose certificate is not the pinned one is not dialed again (an error says
    why), and the other keeps serving; when every gateway refuses, the agent exits 1."""
    token = new_token()
    first = start_gateway(launch, tmp_path / "first", token=token)
    second = start_gateway(launch, tmp_path / "second", token=token, listen=f"{SECOND_HOST}:0")
    impostor = GatewayProc(second.proc, second.port, first.fingerprint)  # the wrong pin
    agent = start_agent(launch, [("127.0.0.1", first), (SECOND_HOST, impostor)], token, echo_port)
    admin = agent.wait_line(ADMIN_URL).group(1)
    b = f"{SECOND_HOST}:{second.port}"
    line = agent.wait_line(rf"ERROR .*no longer dialing {re.escape(b)}")
    assert "fingerprint" in line.group(0), line.group(0)
    echo_through("127.0.0.1", exposed_port(agent, "127.0.0.1", first), b"served by the first")
    wait_for(lambda: states(admin)[b] == "refused", DEADLINE, "the second gateway shown refused")
    assert agent.popen.poll() is None, "one refusal does not end the agent"

    wrong = new_token()
    lost = start_agent(launch, [("127.0.0.1", first), (SECOND_HOST, second)], wrong, echo_port)
    assert lost.wait_exit() == 1, lost.describe()
    assert len(lost.lines_matching("authentication failed")) == 2, lost.describe()


def test_two_gateways_in_a_file_each_with_its_pin(
    launch: Launch, tmp_path: Path, echo_port: int
) -> None:
    """The TOML form: ``gateway`` and ``fingerprint`` as lists, paired in order."""
    token = new_token()
    first = start_gateway(launch, tmp_path / "first", token=token)
    second = start_gateway(launch, tmp_path / "second", token=token, listen=f"{SECOND_HOST}:0")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'name = "site-a"\n'
        f'gateway = ["127.0.0.1:{first.port}", "{SECOND_HOST}:{second.port}"]\n'
        f'fingerprint = ["{first.fingerprint}", "{second.fingerprint}"]\n'
        f'expose = ["0:127.0.0.1:{echo_port}"]\n'
    )
    agent = launch("agent", "--config", str(config), token=token)
    echo_through("127.0.0.1", exposed_port(agent, "127.0.0.1", first), b"first, from a file")
    echo_through(SECOND_HOST, exposed_port(agent, SECOND_HOST, second), b"second, from a file")


def test_a_gateway_that_never_answers_does_not_delay_the_others(
    launch: Launch, tmp_path: Path, echo_port: int
) -> None:
    """A gateway address where nothing listens: the agent serves through the other at once
    and keeps dialing the dead one."""
    token = new_token()
    first = start_gateway(launch, tmp_path / "first", token=token)
    with refusing_port(SECOND_HOST) as dead:
        args = ["agent", "--name", "site-a", "--expose", f"0:127.0.0.1:{echo_port}",
                "--gateway", f"127.0.0.1:{first.port}", "--fingerprint", str(first.fingerprint),
                "--gateway", f"{SECOND_HOST}:{dead}", "--fingerprint", str(first.fingerprint),
                "--reconnect-max", "1"]  # fmt: skip
        agent = launch(*args, token=token)
        echo_through("127.0.0.1", exposed_port(agent, "127.0.0.1", first), b"not delayed")
        agent.wait_line(rf"reconnecting to {SECOND_HOST}:{dead} in .*\(attempt 2\)")
        assert agent.popen.poll() is None


HAPROXY = """global
    maxconn 512
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch 1
frontend public
    bind 127.0.0.1:{port}
    default_backend gateways
backend gateways
    balance roundrobin
    default-server check inter 100ms fall 1 rise 1
    server first 127.0.0.1:{first}
    server second {second_host}:{second}
"""


def test_clients_through_a_balancer_survive_a_gateway_going_down(
    launch: Launch, launch_command: Launch, tmp_path: Path, echo_port: int
) -> None:
    """HAProxy (TCP mode, health checks, redispatch) in front of the service's port on two
    gateways: clients reach it through both; one gateway killed, every new client still gets
    its own echo, through the other; the gateway back, the balancer uses it again."""
    haproxy = require_tool("haproxy")
    token = new_token()
    first = start_gateway(launch, tmp_path / "first", token=token)
    second = start_gateway(launch, tmp_path / "second", token=token, listen=f"{SECOND_HOST}:0")
    agent = start_agent(launch, [("127.0.0.1", first), (SECOND_HOST, second)], token, echo_port)
    one, two = exposed_port(agent, "127.0.0.1", first), exposed_port(agent, SECOND_HOST, second)

    def start(port: int) -> Proc:
        config = tmp_path / f"haproxy-{port}.cfg"
        config.write_text(HAPROXY.format(port=port, first=one, second_host=SECOND_HOST,
                                         second=two))  # fmt: skip
        return launch_command(haproxy, "-db", "-f", str(config))

    _, front = start_listening(start)

    def served(gateway: GatewayProc) -> int:  # clients that sent bytes (not health checks)
        return len(gateway.proc.lines_matching(r"closed client=\S+ up=[1-9]"))

    for i in range(20):
        echo_through("127.0.0.1", front, f"balanced client {i} ".encode() * 50)
    assert served(first) > 0 and served(second) > 0, "the balancer uses both gateways"

    first.proc.popen.send_signal(signal.SIGKILL)
    first.proc.wait_exit()
    before = served(second)
    for i in range(20):  # from the first moment: a refused connect is redispatched
        echo_through("127.0.0.1", front, f"after the kill {i} ".encode() * 50)
    wait_for(lambda: served(second) >= before + 20, DEADLINE, "the second gateway to serve all")

    again = start_gateway(launch, tmp_path / "first", token=token, listen=f"127.0.0.1:{first.port}")
    assert exposed_port(agent, "127.0.0.1", first, count=2) == one, "the same public port"

    def used_again() -> bool:
        echo_through("127.0.0.1", front, b"once the first gateway is back")
        return served(again) > 0

    wait_for(used_again, 3 * DEADLINE, "the balancer to use the first gateway again")
