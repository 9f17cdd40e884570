"""The layers of docs/ARCHITECTURE.md, checked: every module of src/ imports
from tunnelgate only what its layer allows, and the pure core no I/O or clock."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tunnelgate

SRC = Path(tunnelgate.__file__).parent
IO_AND_CLOCKS = {"asyncio", "socket", "ssl", "time", "selectors", "select", "uvloop"}

PURE_CORE = {
    "errors",
    "address",
    "backoff",
    "credentials",
    "access",
    "proxy_protocol",
    "protocol",
    "stats",
}
TRANSPORTS = {"tls", "transport"}
ORCHESTRATION = {"channel", "relay", "control", "gateway", "agent", "doctor"}
EDGES = {"config", "logs", "systemd", "status", "admin", "cli", "demo", "__main__", "__init__"}
EVERYTHING = PURE_CORE | TRANSPORTS | ORCHESTRATION | EDGES
# Wired by the CLI only.
COMMAND_ONLY = {"cli", "demo", "doctor", "systemd", "status", "__main__", "__init__"}

# What each module (or package) may import from tunnelgate, besides itself.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "address": {"errors"},
    "backoff": set(),
    "stats": set(),
    "credentials": set(),
    "access": {"errors", "address"},
    "proxy_protocol": {"errors", "address"},
    "protocol": {"errors", "address", "credentials"},
    "tls": {"errors"},
    "transport": {"errors", "address", "tls"},
    "channel": {"errors", "protocol", "transport"},
    "relay": {"errors", "protocol", "transport", "channel"},
    "control": {"errors", "protocol", "channel"},
    "logs": set(),
    "systemd": {"logs"},
    "status": {"errors"},
    "config": PURE_CORE,
    "gateway": EVERYTHING - {"agent", "admin"} - COMMAND_ONLY,
    "agent": EVERYTHING - {"gateway", "admin"} - COMMAND_ONLY,
    # The agent's side checked end to end: it dials like an agent and never reaches into
    # the gateway (whose probe it measures against over the wire only).
    "doctor": EVERYTHING - {"gateway", "admin"} - COMMAND_ONLY,
    "admin": EVERYTHING - COMMAND_ONLY,
    "cli": EVERYTHING,
    "demo": EVERYTHING - COMMAND_ONLY | {"__init__"},
    "__main__": {"cli"},
    "__init__": {"address", "agent", "gateway"},
}

# Modules inside orchestration packages that are pure all the same.
PURE_FILES = {"gateway/admission.py"}


def modules() -> list[str]:
    """Every top-level module and package of src/tunnelgate."""
    found = {path.stem for path in SRC.glob("*.py")}
    found |= {path.name for path in SRC.iterdir() if (path / "__init__.py").exists()}
    return sorted(found)


def files(module: str) -> list[Path]:
    single = SRC / f"{module}.py"
    return [single] if single.exists() else sorted((SRC / module).glob("*.py"))


def imports(path: Path) -> tuple[set[str], set[str]]:
    """The top-level modules ``path`` imports, and the tunnelgate modules among them."""
    outside: set[str] = set()
    ours: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                first, _, rest = alias.name.partition(".")
                (ours.add(rest.partition(".")[0]) if first == "tunnelgate" else outside.add(first))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            first, _, rest = node.module.partition(".")
            if first != "tunnelgate":
                outside.add(first)
            elif rest:
                ours.add(rest.partition(".")[0])
            else:
                ours.update(alias.name for alias in node.names if alias.name != "__version__")
    return outside, ours


def test_every_module_has_a_layer() -> None:
    """A new module is placed in a layer before it lands."""
    assert set(modules()) <= set(ALLOWED), set(modules()) - set(ALLOWED)


@pytest.mark.parametrize("module", modules())
def test_module_imports_only_what_its_layer_allows(module: str) -> None:
    """Each module imports from tunnelgate only what its row of the table allows."""
    for path in files(module):
        _, ours = imports(path)
        extra = ours - ALLOWED[module] - {module}
        assert not extra, f"{path.relative_to(SRC)} imports {sorted(extra)}"


@pytest.mark.parametrize(
    "path",
    [p for m in sorted(PURE_CORE) for p in files(m)] + [SRC / f for f in sorted(PURE_FILES)],
    ids=lambda p: str(p.relative_to(SRC)),
)
def test_pure_module_imports_no_io_or_clock(path: Path) -> None:
    """The pure core (and the pure parts of orchestration) does no I/O and
    reads no clock: time is passed in."""
    outside, _ = imports(path)
    assert not outside & IO_AND_CLOCKS, sorted(outside & IO_AND_CLOCKS)


@pytest.mark.parametrize("module", modules())
def test_module_says_what_it_is_for(module: str) -> None:
    """Every file opens with a docstring: what it is for."""
    for path in files(module):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"{path.relative_to(SRC)} has no opening paragraph"


@pytest.mark.parametrize(
    "path",
    [p for m in sorted(ORCHESTRATION) for p in files(m)],
    ids=lambda p: str(p.relative_to(SRC)),
)
def test_orchestration_sees_streams_not_sockets(path: Path) -> None:
    """Channel, relay, gateway and agent import neither socket, ssl nor select:
    they see connections through the Stream interface only."""
    outside, _ = imports(path)
    assert not outside & {"socket", "ssl", "select"}, sorted(outside & {"socket", "ssl", "select"})
