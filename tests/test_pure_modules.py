"""The pure modules keep to what their opening paragraph says they must not import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tunnelgate

SRC = Path(tunnelgate.__file__).parent
IO_AND_CLOCKS = {"asyncio", "socket", "ssl", "time", "selectors", "uvloop"}

# module: what it may import from tunnelgate
PURE = {
    "address": set(),
    "backoff": set(),
    "protocol": {
        "address",
        "credentials",
        "errors",
        "protocol",
        "protocol.session",
        "protocol.wire",
    },
}


def imported(module: str) -> set[str]:
    """Every module that ``tunnelgate/<module>.py`` (or the package) imports, anywhere in it."""
    names: set[str] = set()
    files = (
        [SRC / f"{module}.py"] if (SRC / f"{module}.py").exists() else (SRC / module).glob("*.py")
    )
    trees = [ast.parse(path.read_text(encoding="utf-8")) for path in files]
    for node in (node for tree in trees for node in ast.walk(tree)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "tunnelgate":
                names.update(f"tunnelgate.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", sorted(PURE))
def test_pure_module_imports_no_io_clock_or_other_layer(module: str) -> None:
    """A pure module imports no I/O or clock, and from tunnelgate only what it may."""
    names = imported(module)
    assert not {n.partition(".")[0] for n in names} & IO_AND_CLOCKS, names
    ours = {n.removeprefix("tunnelgate.") for n in names if n.startswith("tunnelgate.")}
    assert ours <= PURE[module], ours - PURE[module]
