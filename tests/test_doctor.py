"""``tunnelgate doctor`` in real processes: against a gateway started from the CLI and a
local echo service, what a user sees for a good setup and for each thing that can be
wrong (token, fingerprint, a local service down, the gateway unreachable), and that a
running agent of the same name is left alone. Ports: 0, or held refusing; waits on
lines and exits under deadlines."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from kit.ports import refusing_port
from kit.processes import GatewayProc, Launch, start_gateway
from kit.tokens import new_token
from kit.waiting import DEADLINE
from test_cli import echo_through, start_agent

pytestmark = pytest.mark.timeout(60)

GATEWAY_CHECKS = ("resolve", "reach", "tls", "token")
MEASUREMENTS = ("rtt", "upload", "download")
SECONDS = "0.3"  # each way: the numbers matter here, not their precision
DOCTOR_DEADLINE = 3 * DEADLINE  # two handshakes, two measurements, and a cold start


def doctor_args(gateway: GatewayProc, *expose: str, port: int | None = None) -> list[str]:
    args = ["doctor", "--gateway", f"127.0.0.1:{port or gateway.port}", "--name", "site-a"]
    for spec in expose:
        args += ["--expose", spec]
    if gateway.fingerprint:
        args += ["--fingerprint", gateway.fingerprint]
    else:
        args.append("--no-tls")
    return [*args, "--seconds", SECONDS]


def run_doctor(launch: Launch, args: list[str], token: str) -> tuple[int, dict[str, list[str]]]:
    """The doctor's exit code, and its checks by name: [status, detail, hint...]."""
    proc = launch(*args, token=token)
    code = proc.wait_exit(DOCTOR_DEADLINE)
    checks: dict[str, list[str]] = {}
    name = ""
    for line in proc.stdout:
        if line.startswith(" "):  # a hint, under its check
            checks[name].append(line.strip())
            continue
        status, first, rest = line.split(None, 2)
        name = first
        if first == "service":
            second, rest = rest.split(None, 1)
            name = f"service {second}"
        assert status in ("ok", "FAIL", "skip"), line
        assert name not in checks, f"{name} reported twice\n{proc.describe()}"
        checks[name] = [status, rest]
    assert checks, proc.describe()
    return code, checks


def statuses(checks: dict[str, list[str]]) -> dict[str, str]:
    return {name: check[0] for name, check in checks.items()}


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-tcp"])
def test_doctor_passes_every_check_on_a_good_setup(
    launch: Launch, echo_port: int, tmp_path: Path, tls: bool
) -> None:
    """A working setup: every check ok, exit 0, with a round trip and both rates in
    numbers; the gateway logs one line per probe."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token, tls=tls)
    code, checks = run_doctor(launch, doctor_args(gateway, f"0:127.0.0.1:{echo_port}"), token)

    service = f"service 127.0.0.1:{echo_port}"
    expected = [*GATEWAY_CHECKS, service, *MEASUREMENTS]
    assert list(checks) == expected
    assert set(statuses(checks).values()) == {"ok"}, checks
    assert code == 0
    assert re.search(r"^round trip \d+\.\d ms \(min \d+\.\d ms, max", checks["rtt"][1]), checks
    for name in ("upload", "download"):
        assert re.search(r"^\d+\.\d Mbit/s \(\d+\.\d MB in \d+\.\d\d s\)", checks[name][1]), checks
    assert "accepts the token of agent 'site-a'" in checks["token"][1]
    # The token's probe, then the measurement's.
    gateway.proc.wait_line(r"INFO .*\[agent=site-a\] probe from 127\.0\.0\.1:\d+ .*1 ping")
    line = gateway.proc.wait_line(r"probe from .*, received \d+ bytes .*, sent \d+ bytes")
    assert "6 ping(s)" in line.string, line.string


def test_doctor_with_a_wrong_token_fails_the_token_check(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """A token the gateway does not know: the token check fails in plain words, the
    measurement is skipped, exit 1."""
    gateway = start_gateway(launch, tmp_path / "state", token=new_token())
    code, checks = run_doctor(launch, doctor_args(gateway, f"0:127.0.0.1:{echo_port}"), new_token())

    assert code == 1
    assert statuses(checks)["tls"] == "ok"
    status, detail, hint = checks["token"]
    assert status == "FAIL"
    assert "the gateway refused the token" in detail
    assert "does not accept this token for agent 'site-a'" in detail
    assert "hint: give the gateway's token" in hint
    assert statuses(checks)[f"service 127.0.0.1:{echo_port}"] == "ok"
    for name in MEASUREMENTS:
        assert checks[name] == ["skip", "skipped: the gateway refused the token"]
    gateway.proc.wait_line(r"WARNING .*authentication failed for agent 'site-a'.*probe channel")


def test_doctor_with_a_wrong_fingerprint_shows_both(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """A pinned fingerprint that is not the gateway's: the TLS check fails and shows the
    one expected and the one seen; nothing after it is tried."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token)
    assert gateway.fingerprint is not None
    wrong = "SHA256:" + "AB" * 32
    args = doctor_args(gateway, f"0:127.0.0.1:{echo_port}")
    args[args.index("--fingerprint") + 1] = wrong
    code, checks = run_doctor(launch, args, token)

    assert code == 1
    status, detail, hint = checks["tls"]
    assert status == "FAIL"
    assert f"expected {wrong}, seen {gateway.fingerprint}" in detail
    assert "pin the fingerprint it prints at start" in hint
    for name in ("token", *MEASUREMENTS):
        assert checks[name] == ["skip", "skipped: TLS failed"]


def test_doctor_reports_a_local_service_that_is_down(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """One of two local services refuses connections: its check fails, the other's and
    the gateway's pass, exit 1."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token)
    with refusing_port() as down:
        args = doctor_args(gateway, f"0:127.0.0.1:{echo_port}", f"0:127.0.0.1:{down}")
        code, checks = run_doctor(launch, args, token)

    assert code == 1
    status, detail, hint = checks[f"service 127.0.0.1:{down}"]
    assert status == "FAIL"
    assert f"cannot connect to 127.0.0.1:{down}: connection refused" in detail
    assert f"listening on 127.0.0.1:{down}" in hint
    failed = {name for name, status in statuses(checks).items() if status != "ok"}
    assert failed == {f"service 127.0.0.1:{down}"}, checks


def test_doctor_with_the_gateway_unreachable_skips_what_needs_it(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """Nothing listens at the gateway's address: the reachability check fails, the
    checks that need the gateway are skipped saying why, the local service is checked."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token)
    with refusing_port() as port:
        args = doctor_args(gateway, f"0:127.0.0.1:{echo_port}", port=port)
        code, checks = run_doctor(launch, args, token)

    assert code == 1
    assert checks["resolve"][0] == "ok"
    status, detail, _ = checks["reach"]
    assert status == "FAIL"
    assert f"cannot connect to 127.0.0.1:{port}: connection refused" in detail
    for name in ("tls", "token", *MEASUREMENTS):
        assert checks[name] == ["skip", "skipped: the gateway cannot be reached"]
    assert statuses(checks)[f"service 127.0.0.1:{echo_port}"] == "ok"


def test_doctor_leaves_a_running_agent_of_the_same_name_alone(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """A doctor run while the agent it checks is running: the agent keeps its session
    (the same id, no reconnect), and its tunnel keeps carrying bytes."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token)
    agent, public_port = start_agent(
        launch, gateway, token, f"0:127.0.0.1:{echo_port}", "--name", "site-a"
    )
    connected = agent.wait_line(r"\[[^\]]*session=(\w+)[^\]]*\] connected to gateway")
    session = connected.group(1)
    gateway.proc.wait_line(rf"\[[^\]]*session={session}[^\]]*\] session started")

    code, checks = run_doctor(launch, doctor_args(gateway, f"0:127.0.0.1:{echo_port}"), token)
    assert code == 0, checks
    gateway.proc.wait_line(r"probe from .*, received \d+ bytes")

    assert echo_through(public_port, b"still here") == b"still here"
    assert len(agent.lines_matching(r"connected to gateway")) == 1, agent.describe()
    ids = set(re.findall(r"session=(\w+)", "\n".join(agent.stderr)))
    assert ids == {session}, agent.describe()
    assert not agent.lines_matching(r"reconnecting"), agent.describe()
    assert len(gateway.proc.lines_matching(r"session started")) == 1, gateway.proc.describe()
    assert not gateway.proc.lines_matching(r"replacing its session|session ended")


def test_doctor_checks_each_gateway_and_the_services_once(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """Two gateways: the gateway checks and the measurement run for each, every line naming
    its gateway; the local service is checked once; one unreachable gateway fails the run."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token)
    with refusing_port("127.0.0.2") as port:
        dead = f"127.0.0.2:{port}"
        args = doctor_args(gateway, f"0:127.0.0.1:{echo_port}")
        args += ["--gateway", dead, "--fingerprint", str(gateway.fingerprint)]
        proc = launch(*args, token=token)
        code = proc.wait_exit(DOCTOR_DEADLINE)
    checks = [line.split(None, 2) for line in proc.stdout if not line.startswith(" ")]

    assert code == 1, proc.describe()
    live = f"127.0.0.1:{gateway.port}: "
    first = [(status, name) for status, name, detail in checks if detail.startswith(live)]
    assert first == [("ok", name) for name in (*GATEWAY_CHECKS, *MEASUREMENTS)], proc.describe()
    second = {name: status for status, name, detail in checks if detail.startswith(dead + ": ")}
    assert (second["resolve"], second["reach"], second["token"]) == ("ok", "FAIL", "skip")
    assert [name for _, name, _ in checks].count("service") == 1, proc.describe()
