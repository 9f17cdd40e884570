"""``--admin`` on the real command line, read with curl: health, metrics after
real traffic, credentials, the reload action, and a refusal off loopback."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from kit.clients import echo_exchange
from kit.processes import Launch, Proc, require_tool, start_gateway
from kit.tokens import new_token
from kit.waiting import DEADLINE
from prometheus_client.parser import text_string_to_metric_families

from tunnelgate.tls import fingerprint_of

ADMIN_URL = r"admin listening on (http://127\.0\.0\.1:\d+/)"


def curl(*args: str) -> tuple[int, str]:
    """(HTTP status, body) of one curl request."""
    result = subprocess.run(
        [require_tool("curl"), "-s", "-o", "-", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=True,
    )
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def admin_url(proc: Proc) -> str:
    return proc.wait_line(ADMIN_URL).group(1)


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of the one sample called ``name`` with exactly ``labels``."""
    [value] = [
        s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == name and s.labels == labels
    ]
    return float(value)


def test_gateway_and_agent_serve_health_and_metrics(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", "--admin", "127.0.0.1:0", token=token)
    gateway_admin = admin_url(gateway.proc)
    banner = gateway.proc.wait_line(r"^admin: (http://\S+)", stdout=True).group(1)
    assert banner == gateway_admin
    agent = launch(
        "agent", "--gateway", f"127.0.0.1:{gateway.port}",
        "--fingerprint", str(gateway.fingerprint), "--expose", f"0:127.0.0.1:{echo_port}",
        "--name", "site-a", "--admin", "127.0.0.1:0",
        token=token,
    )  # fmt: skip
    public = int(agent.wait_line(r"exposed at gateway port (\d+)").group(1))
    agent_admin = admin_url(agent)

    assert curl(gateway_admin + "healthz") == (200, '{"status":"ok"}')
    assert curl(agent_admin + "readyz") == (200, '{"ready":true}')
    assert echo_exchange(public, b"x" * 5000) == (b"x" * 5000, "eof")
    service = {"agent": "site-a", "service": f"127.0.0.1:{echo_port}"}
    gateway.proc.wait_line(r"closed client=")
    status, metrics = curl(gateway_admin + "metrics")
    assert status == 200
    assert sample(metrics, "tunnelgate_service_connections_total", **service) == 1
    up = sample(metrics, "tunnelgate_service_transmit_bytes_total", **service, direction="up")
    assert up == 5000
    assert sample(metrics, "tunnelgate_agent_up", agent="site-a") == 1
    status, metrics = curl(agent_admin + "metrics")
    assert status == 200
    assert sample(metrics, "tunnelgate_agent_control_up", gateway=f"127.0.0.1:{gateway.port}")

    status, body = curl("-X", "POST", "-H", "Content-Type: application/json",
                        gateway_admin + "api/v1/reload")  # fmt: skip
    assert (status, json.loads(body)) == (200, {"reloaded": "reloaded"})


def test_admin_token_is_required_when_given(launch: Launch, tmp_path: Path) -> None:
    admin_token = new_token()
    token_file = tmp_path / "admin-token"
    token_file.write_text(admin_token + "\n")
    gateway = start_gateway(
        launch, tmp_path / "state", "--admin", "127.0.0.1:0",
        "--admin-token-file", str(token_file), token=new_token(),
    )  # fmt: skip
    url = admin_url(gateway.proc)
    assert curl(url + "healthz")[0] == 200  # probes need no credentials
    assert curl(url + "metrics")[0] == 401
    assert curl("-H", f"Authorization: Bearer {admin_token}", url + "metrics")[0] == 200
    assert curl("-u", f"me:{admin_token}", url + "api/v1")[0] == 200
    gateway.proc.wait_line(r"admin: refused GET /metrics from 127\.0\.0\.1")
    assert admin_token not in "\n".join(gateway.proc.stderr)


def test_admin_off_loopback_without_a_token_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tunnelgate", "gateway", "--listen", "127.0.0.1:0",
         "--state-dir", str(tmp_path), "--token", new_token(), "--admin", "0.0.0.0:0"],
        capture_output=True, text=True, timeout=DEADLINE, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("TUNNELGATE_")},
    )  # fmt: skip
    assert result.returncode == 2, result
    assert "admin" in result.stderr and "--admin-token-file" in result.stderr


@pytest.mark.parametrize("side", ["gateway", "agent"])
def test_without_admin_the_http_libraries_are_not_loaded(side: str) -> None:
    code = (
        "import sys, tunnelgate.cli; "
        f"tunnelgate.cli._parser().parse_args(['{side}']); "
        "print(sorted(m for m in ('aiohttp', 'prometheus_client') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE, check=True
    )
    assert result.stdout.strip() == "[]", result


def test_admin_over_https_with_the_gateways_own_certificate(launch: Launch, tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('admin = "127.0.0.1:0"\nadmin_tls = true\n')
    gateway = start_gateway(launch, tmp_path / "state", "--config", str(config), token=new_token())
    url = gateway.proc.wait_line(r"admin listening on (https://127\.0\.0\.1:\d+/)").group(1)
    assert curl("-k", url + "healthz") == (200, '{"status":"ok"}')
    host, port = url.removeprefix("https://").rstrip("/").split(":")
    der = ssl_certificate(host, int(port))
    assert fingerprint_of(der) == gateway.fingerprint  # the control port's own identity
    with pytest.raises(subprocess.CalledProcessError):  # no plain HTTP on it
        curl(url.replace("https://", "http://") + "healthz")


def ssl_certificate(host: str, port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=DEADLINE) as raw,
        context.wrap_socket(raw) as wrapped,
    ):
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_an_agents_admin_tls_needs_a_certificate(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'gateway = "127.0.0.1:1"\ntoken = "0123456789abcdef0123"\n'
        'expose = ["0:127.0.0.1:2"]\nadmin = "127.0.0.1:0"\nadmin_tls = true\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "tunnelgate", "agent", "--config", str(config)],
        capture_output=True, text=True, timeout=DEADLINE, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert "admin_tls" in result.stderr and "admin_cert" in result.stderr
