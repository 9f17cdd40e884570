"""What one new connection costs each tunnelgate process: CPU time and system calls.

``python bench/connection_cost.py [--only tg-notls,tg-tls] [--seconds 3]`` starts each
candidate as the bench does (bench/candidates.py), warms it up with a second of the
connection-rate load (32 workers, connect, echo 16 bytes, close), then runs the load again
twice: once to read each process's CPU time from /proc, once under ``strace -c -f`` to count
its system calls (skipped, with the reason, without strace). Figures are per connection
completed; the counts are exact, the CPU times move with whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import candidates
import measure

WORKERS = 32
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def syscalls(pid: int, out: Path) -> subprocess.Popen[str]:
    """``strace -c -f`` attached to ``pid`` (returned once it says so), its summary to
    ``out`` once interrupted."""
    tracer = subprocess.Popen(
        ["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert tracer.stderr is not None
    for line in tracer.stderr:  # "strace: Process N attached" (with its threads)
        if "attached" in line:
            return tracer
    raise RuntimeError(f"strace did not attach to {pid} (ptrace allowed here?)")


def summary(path: Path) -> tuple[int, dict[str, int]]:
    """The total and the busiest calls of an ``strace -c`` summary."""
    calls: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    return sum(calls.values()), calls


def run(key: str, seconds: float, workdir: Path) -> None:
    echo = candidates.EchoService(workdir)
    candidate = candidates.CANDIDATES[key]()
    try:
        public = candidate.start(workdir, echo.port, echo.port)
        sides = candidate.rss_sides()
        pids = {side: found[0] for side, found in sides.items()}
        measure.connection_rate(public.echo, WORKERS, 1.0)  # warm: the pool fills, channels reused
        before = {side: cpu_seconds(pid) for side, pid in pids.items()}
        rate = measure.connection_rate(public.echo, WORKERS, seconds)
        done = rate["connections"]
        print(f"{candidate.label}: {rate['per_s']:,.0f} connections/s, {done} completed")
        for side, pid in pids.items():
            used = (cpu_seconds(pid) - before[side]) / max(done, 1)
            print(f"  {side:8} CPU {used * 1e6:6.0f} µs per connection")
        if shutil.which("strace") is None:
            print("  (no strace: apt-get install strace, for system calls per connection)")
            return
        tracers = {side: syscalls(pid, workdir / f"{side}.strace") for side, pid in pids.items()}
        traced = measure.connection_rate(public.echo, WORKERS, seconds)["connections"]
        for tracer in tracers.values():
            tracer.send_signal(signal.SIGINT)
            tracer.wait()
        for side in pids:
            total, calls = summary(workdir / f"{side}.strace")
            top = sorted(calls.items(), key=lambda item: -item[1])[:6]
            shown = ", ".join(f"{name} {count / traced:.1f}" for name, count in top)
            print(f"  {side:8} {total / max(traced, 1):5.1f} system calls per connection: {shown}")
    finally:
        candidate.stop()
        echo.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="tg-notls,tg-tls", help="candidates (tg-notls,tg-tls)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of load per figure")
    args = parser.parse_args()
    for key in args.only.split(","):
        if key not in candidates.CANDIDATES:
            sys.exit(f"unknown candidate {key!r}")
        with tempfile.TemporaryDirectory(prefix=f"conncost-{key}-") as tmp:
            run(key, args.seconds, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
