"""What a tunnelgate process loads: ``tunnelgate --version`` next to nothing, a gateway
or an agent only its own side, and neither the optional parts (the admin listener and
its packages, the doctor, the status client, the demo, certificate making) unless they
are asked for. Each case runs in a fresh interpreter, the way the command starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kit.waiting import DEADLINE

pytestmark = pytest.mark.timeout(60)

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
