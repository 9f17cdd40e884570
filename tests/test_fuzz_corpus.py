"""The fuzz corpus replayed: every input kept in ``fuzz/corpus/<target>/`` (seeds,
what fuzzing found, and crashes once found) goes through its target again.

A target returns normally when tunnelgate accepts an input or rejects it as
documented; anything else it raises is a bug. No atheris here: the targets in
``fuzz/targets.py`` are plain functions. ``make fuzz`` grows the corpus, and
is where a slow input shows (its per-input ``-timeout``): time is not asserted here.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


def _load_targets() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tunnelgate_fuzz_targets", FUZZ / "targets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


targets = _load_targets()
NAMES = sorted(targets.TARGETS)


def _inputs(name: str) -> list[Path]:
    directory = FUZZ / "corpus" / name
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []


def test_fuzz_corpus_covers_every_target() -> None:
    """Every target has a corpus directory with inputs in it, and no directory
    is left without a target."""
    assert all(_inputs(name) for name in NAMES), {name: len(_inputs(name)) for name in NAMES}
    directories = {p.name for p in (FUZZ / "corpus").iterdir() if p.is_dir()}
    assert directories == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_fuzz_corpus_replays_without_bugs(name: str) -> None:
    """Every kept input of the target is accepted or rejected as documented."""
    target = targets.TARGETS[name]
    failures = []
    for path in _inputs(name):
        try:
            target(path.read_bytes())
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            failures.append(
                f"fuzz/corpus/{name}/{path.name}: {type(exc).__name__}: {str(exc)[:300]}"
                f" (at {Path(where.filename).name}:{where.lineno})"
                f"\n  replay: .venv/bin/python fuzz/run.py {name} fuzz/corpus/{name}/{path.name}"
            )
    assert not failures, f"{len(failures)} input(s) found bugs:\n" + "\n".join(failures)
