"""Fuzz every target in turn, then minimise each corpus: what ``make fuzz`` runs.

::

    .venv/bin/python fuzz/campaign.py [--seconds 60] [--targets frames,handshake]

For each target: the seeds (``fuzz/seed.py``) are written into
``fuzz/corpus/TARGET/``; ``fuzz/run.py TARGET --keep-going`` fuzzes for the
given seconds (restarted, a few times at most, if libFuzzer stops on a hang or
a memory blow-up); ``-set_cover_merge=1`` then keeps a small set of inputs
that covers all the coverage seen, in a fresh directory that replaces the
corpus; last, every crash, hang or
memory blow-up found (in ``fuzz/crashes/TARGET/``) is copied into the corpus,
so ``make test`` replays it from then on, and so are the seeds again. A table
sums it up. ``--seconds 0`` only minimises.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import seed
import targets

FUZZ: Final = Path(__file__).resolve().parent
RUN: Final = FUZZ / "run.py"
CORPUS: Final = FUZZ / "corpus"
CRASHES: Final = FUZZ / "crashes"
MAX_RESTARTS: Final = 3
ARTIFACTS: Final = ("crash-", "timeout-", "oom-", "slow-unit-", "leak-")
QUIET: Final = re.compile(rb"^#\d+\s+(NEW|REDUCE)\b")  # one line per input kept: too many


@dataclass
class Result:
    target: str
    seconds: float = 0.0
    execs: int = 0
    crashes: int = 0  # new this run
    files: int = 0
    size: int = 0

    @property
    def rate(self) -> float:
        return self.execs / self.seconds if self.seconds else 0.0


def _libfuzzer(target: str, options: list[str]) -> tuple[int, bytes]:
    """Run ``fuzz/run.py`` under ``--keep-going``; its exit code and output,
    shown as it comes except for the per-input lines."""
    command = [sys.executable, str(RUN), target, "--keep-going", *options]
    output = bytearray()
    with subprocess.Popen(command, stderr=subprocess.STDOUT, stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        for line in process.stdout:
            output += line
            if not QUIET.match(line):
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
    return process.returncode, bytes(output)


def _artifacts(target: str) -> list[Path]:
    directory = CRASHES / target
    if not directory.is_dir():
        return []
    return sorted(
        p for p in directory.iterdir() if p.name.startswith(ARTIFACTS) and p.suffix != ".txt"
    )


def fuzz(target: str, seconds: float) -> Result:
    result = Result(target)
    deadline = time.monotonic() + seconds
    for _ in range(1 + MAX_RESTARTS):
        left = int(deadline - time.monotonic())
        if left < 1:
            break
        began = time.monotonic()
        code, output = _libfuzzer(target, [f"-max_total_time={left}"])
        result.seconds += time.monotonic() - began
        found = re.search(rb"stat::number_of_executed_units:\s*(\d+)", output)
        result.execs += int(found.group(1)) if found else 0
        if code == 0:
            break
        print(f"--- {target}: libFuzzer stopped (exit {code}); going on", flush=True)
    return result


def minimise(target: str) -> None:
    """Keep only the inputs that add coverage, then add back every artifact and seed."""
    corpus = CORPUS / target
    merged = Path(tempfile.mkdtemp(prefix=f".merge-{target}-", dir=FUZZ))
    try:
        code, output = _libfuzzer(target, ["-set_cover_merge=1", str(merged), str(corpus)])
        if code != 0 or not any(merged.iterdir()):
            sys.stdout.buffer.write(output[-2000:])
            raise SystemExit(f"{target}: merging the corpus failed (exit {code})")
        shutil.rmtree(corpus)
        merged.rename(corpus)
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    for artifact in _artifacts(target):
        digest = artifact.name.partition("-")[2]  # libFuzzer names inputs by SHA-1
        if not (corpus / digest).exists():
            shutil.copyfile(artifact, corpus / artifact.name)
    # The seeds stay, whatever coverage says: msgspec decodes in C, which
    # atheris cannot see, so one seed per message type is worth keeping.
    seed.write_seeds(target)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    parser.add_argument("--targets", default="", help="comma-separated (default: all)")
    args = parser.parse_args(argv)
    names = [n for n in args.targets.split(",") if n] or list(seed.SEEDS)
    unknown = sorted(set(names) - set(seed.SEEDS))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(seed.SEEDS)}")
    results = []
    for name in names:
        print(f"=== {name}: {args.seconds:g} s", flush=True)
        seed.write_seeds(name)
        before = set(_artifacts(name))
        result = fuzz(name, args.seconds)
        minimise(name)
        files = [p for p in (CORPUS / name).iterdir() if p.is_file()]
        result.files, result.size = len(files), sum(p.stat().st_size for p in files)
        result.crashes = len(set(_artifacts(name)) - before)
        results.append(result)
    targets.remove_stale_scratch_dirs()
    header = ("target", "seconds", "execs", "execs/s", "corpus", "bytes", "new crashes")
    print("\n{:<16}{:>9}{:>11}{:>9}{:>8}{:>9}{:>13}".format(*header))
    for r in results:
        row = (r.target, r.seconds, r.execs, r.rate, r.files, r.size, r.crashes)
        print("{:<16}{:>9.0f}{:>11}{:>9.0f}{:>8}{:>9}{:>13}".format(*row))
    found = [r.target for r in results if r.crashes]
    if found:
        print(
            f"\nnew crashes in fuzz/crashes/ ({', '.join(found)}), each with its traceback in a"
            " .txt beside it; they are in the corpus too: `make test` fails until they are fixed"
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
