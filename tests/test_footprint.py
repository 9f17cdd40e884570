"""What a tunnelgate process loads: ``tunnelgate --version`` next to nothing, a gateway
or an agent only its own side, and neither the optional parts (the admin listener and
its packages, the doctor, the status client, the demo, certificate making) unless they
are asked for; and what a running gateway keeps. Each case runs in a fresh interpreter,
the way the command starts."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kit.clients import echo_exchange
from kit.processes import GatewayProc, Launch, Proc, rss_kib, start_gateway
from kit.tokens import new_token
from kit.waiting import DEADLINE

from tunnelgate import credentials, tls

pytestmark = pytest.mark.timeout(60)

SCRYPT_KIB = 128 * credentials.SCRYPT_R * credentials.SCRYPT_N // 1024  # one derivation's memory
# What no gateway or agent needs at rest (``--admin``, ``[[alerts]]``, ``tunnelgate
# doctor``, ``status``, ``demo`` and a first start's certificate load them).
OPTIONAL = {
    "aiohttp",
    "prometheus_client",
    "sqlite3",
    "cryptography",
    "urllib.request",
    "tunnelgate.admin",
    "tunnelgate.doctor",
    "tunnelgate.status",
    "tunnelgate.demo",
    "tunnelgate.gateway.supervisor",  # a gateway of one process runs no supervisor
}
# What ``tunnelgate --version`` must not load: the event loop, TLS, the wire protocol,
# the configuration and either side.
HEAVY = {
    "asyncio",
    "ssl",
    "msgspec",
    "uvloop",
    "cryptography",
    "tunnelgate.config",
    "tunnelgate.gateway",
    "tunnelgate.agent",
}


def loaded(*argv: str) -> set[str]:
    """The modules a fresh ``python ARGV...`` imported, from ``-X importtime``."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 0, result
    return imported(result.stderr.splitlines())


def imported(lines: list[str]) -> set[str]:
    """The module names in ``-X importtime`` lines (``import time: self | total | name``)."""
    return {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}


def among(modules: set[str], packages: set[str]) -> set[str]:
    """The ``modules`` that are one of ``packages`` or inside one."""
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)}


def test_version_loads_neither_a_side_nor_the_event_loop() -> None:
    """``tunnelgate --version`` answers without loading the event loop, TLS, the
    protocol, the configuration or either side."""
    modules = loaded("-m", "tunnelgate", "--version")
    assert "tunnelgate.cli" in modules
    assert not among(modules, HEAVY), sorted(among(modules, HEAVY))


def test_package_names_load_on_first_use() -> None:
    """``import tunnelgate`` loads neither side; each public name still imports."""
    script = (
        "import sys, tunnelgate\n"
        "print(sorted(m for m in sys.modules if m.startswith('tunnelgate.')))\n"
        "from tunnelgate import Address, Agent, ExposedService, Gateway, expose\n"
        "print(Gateway.__module__, Agent.__module__, expose.__module__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=DEADLINE
    )
    assert result.returncode == 0, result
    before, after = result.stdout.splitlines()
    assert before == "[]"
    assert after == "tunnelgate.gateway.gateway tunnelgate.agent.agent tunnelgate.agent.agent"


@pytest.mark.parametrize(
    ("side", "other"),
    [("tunnelgate.gateway", "tunnelgate.agent"), ("tunnelgate.agent", "tunnelgate.gateway")],
    ids=["gateway", "agent"],
)
def test_a_side_loads_neither_the_other_nor_the_optional_parts(side: str, other: str) -> None:
    """Importing one side and the command line loads neither the other side nor the
    admin listener, its packages, the doctor, the status client, the demo or cryptography."""
    modules = loaded("-c", f"import tunnelgate.cli, {side}")
    assert side in modules
    unwanted = among(modules, OPTIONAL | {other})
    assert not unwanted, sorted(unwanted)


def start_agent(
    launch: Launch, gateway: GatewayProc, token: str, name: str, service: int, **options: Any
) -> tuple[Proc, int]:
    """An agent named ``name`` exposing ``service``; it and the service's public port."""
    trust = ["--fingerprint", gateway.fingerprint] if gateway.fingerprint else ["--no-tls"]
    proc = launch(
        "agent", "--gateway", f"127.0.0.1:{gateway.port}", *trust, "--name", name,
        "--expose", f"0:127.0.0.1:{service}", token=token, **options,
    )  # fmt: skip
    return proc, int(proc.wait_line(r"exposed at gateway port (\d+)").group(1))


def test_running_gateway_and_agent_load_only_their_own_side(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """A gateway and its agent, connected and relaying a client, have loaded neither the
    other side nor the optional parts."""
    tls.ensure_self_signed(tmp_path / "state", [])  # a restart: its first start made it
    token, importtime = new_token(), {"PYTHONPROFILEIMPORTTIME": "1"}
    gateway = start_gateway(launch, tmp_path / "state", token=token, env=importtime)
    agent, port = start_agent(launch, gateway, token, "site-a", echo_port, env=importtime)
    assert echo_exchange(port, b"footprint") == (b"footprint", "eof")
    for proc in (agent, gateway.proc):
        proc.signal(signal.SIGTERM)
        assert proc.wait_exit() == 0, proc.describe()
    for proc, side, other in (
        (gateway.proc, "tunnelgate.gateway", "tunnelgate.agent"),
        (agent, "tunnelgate.agent", "tunnelgate.gateway"),
    ):
        modules = imported(proc.stderr)
        assert side in modules, proc.describe()
        unwanted = among(modules, OPTIONAL | {other})
        assert not unwanted, f"{side}: {sorted(unwanted)}"


def test_first_start_makes_the_certificate_without_loading_cryptography(
    launch: Launch, tmp_path: Path
) -> None:
    """A gateway's first start makes its certificate in a child process: the gateway
    itself, which may then run for months, never maps cryptography's library."""
    gateway = start_gateway(launch, tmp_path / "state", token=new_token())
    assert (tmp_path / "state" / tls.CERT_FILE).exists()
    assert gateway.fingerprint == tls.certificate_fingerprint(tmp_path / "state" / tls.CERT_FILE)
    maps = Path(f"/proc/{gateway.pid}/maps").read_text()
    assert "/cryptography/" not in maps


def test_gateway_keeps_nothing_of_deriving_each_agents_key(
    launch: Launch, echo_port: int, tmp_path: Path
) -> None:
    """A clear token's key is derived per agent name with scrypt (16 MiB of memory) when
    that agent first connects; none of those 16 MiB stay resident in the gateway."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token, tls=False)
    start_agent(launch, gateway, token, "site-1", echo_port)
    first = rss_kib(gateway.pid)
    for name in ("site-2", "site-3"):
        start_agent(launch, gateway, token, name, echo_port)
    growth = rss_kib(gateway.pid) - first
    assert growth < SCRYPT_KIB // 2, f"the gateway grew by {growth} KiB for two more agents"
