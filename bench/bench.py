"""tunnelgate benchmark: ``make bench`` (or ``.venv/bin/python bench/bench.py --help``).

On loopback it measures, side by side, the candidates

    direct      no tunnel (the limit)
    tg-notls    tunnelgate --no-tls      (gateway + agent through the real CLI)
    tg-tls      tunnelgate with TLS      (the default)
    ssh         ssh -R against a private sshd (aes128-gcm@openssh.com)

One round takes each candidate in turn, runs every measurement through it
and stops it. Rounds alternate the order (A B C D, then D C B A, …) so that
drift of the machine falls on every candidate alike. For one candidate:

    start the echo service and the candidate; wait for an echo through the tunnel
        RSS at rest            the tunnel's processes, once the reading is stable; each side too
        start-up               tunnelgate --version, and a gateway until its control port accepts
        throughput             iperf3 1 and 8 streams, each direction (fresh iperf3 -s -1 each)
        round trips            2,000 sequential 64-byte echoes, free-running
        round trips, pinned    the same with client, echo service and tunnel on one CPU
        connection rate        32 workers: connect, echo 16 bytes, close
    stop everything
    start everything again (fresh processes: a clean RSS baseline)
        RSS at rest
        idle connections       N connections, one echo each; RSS; every one echoes again
    stop everything

The idle connections get their own start because holding 10,000 connections
leaves traces (ssh keeps a channel table of that size and walks it on every
loop; allocators keep freed memory) that would skew whatever ran after them.

The report gives medians and min-max over rounds, ratios to direct and to
ssh -R, and the target checks; the raw data goes to JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import measure
import report
import system
from candidates import CANDIDATES, REPO, Candidate, EchoService, Public
from system import BenchError

RESULTS = Path(__file__).resolve().parent / "results"
SESSIONS = (("startup", "throughput", "rtt", "pinned", "connrate"), ("idle",))  # a fresh start each
MEASUREMENTS = tuple(name for session in SESSIONS for name in session)
FIGURES_OF = {  # which figures each measurement yields (to say why one is missing)
    "startup": ["start_version", "start_gateway_first", "start_gateway"],
    "idle": ["idle_held", "idle_echoing", "rss_loaded", "rss_per_conn"],
    "throughput": ["up1", "down1", "up8", "down8"],
    "rtt": ["rtt_p50", "rtt_p99"],
    "pinned": ["pin_p50", "pin_p99"],
    "connrate": ["conn_s", "conn_p99", "conn_errors"],
}
LABELS = {key: factory().label for key, factory in CANDIDATES.items()}
CONN_WORKERS = 32
QUICK = {
    "rounds": 1, "duration": 2.0, "idle": 1000, "round_trips": 500, "conn_seconds": 1.0,
    "startup_runs": 5,
}  # fmt: skip
FULL = {
    "rounds": 3, "duration": 5.0, "idle": 10_000, "round_trips": 2000, "conn_seconds": 3.0,
    "startup_runs": 10,
}  # fmt: skip


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark tunnelgate against direct and ssh -R on loopback.",
        epilog=f"candidates: {', '.join(CANDIDATES)}; measurements: {', '.join(MEASUREMENTS)}",
    )
    parser.add_argument(
        "--rounds", type=int, metavar="N", help=f"interleaved rounds ({FULL['rounds']})"
    )
    parser.add_argument(
        "--duration", type=float, metavar="SECONDS", help="seconds per iperf3 run (5)"
    )
    parser.add_argument("--idle", type=int, metavar="N", help="idle connections to hold (10000)")
    parser.add_argument(
        "--round-trips", type=int, metavar="N", help="64-byte round trips per run (2000)"
    )
    parser.add_argument(
        "--conn-seconds", type=float, metavar="SECONDS", help="seconds of connection rate (3)"
    )
    parser.add_argument(
        "--startup-runs", type=int, metavar="N",
        help="starts timed per command: tunnelgate --version, a gateway (10)",
    )  # fmt: skip
    parser.add_argument(
        "--only", metavar="LIST", help="comma-separated candidates to run (default: all)"
    )
    parser.add_argument("--skip", metavar="LIST", help="comma-separated measurements to skip")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke run: 1 round, 2 s iperf3, 1000 idle, 500 round trips, 1 s connection rate,"
        " 5 starts",
    )  # fmt: skip
    parser.add_argument(
        "--json", type=Path, default=RESULTS / "latest.json", metavar="PATH",
        help="raw data of the run (default bench/results/latest.json; the text goes next to it"
        " as .md)",
    )  # fmt: skip
    parser.add_argument(
        "--report", type=Path, metavar="JSON",
        help="measure nothing: print the table and targets again from a JSON file of a run",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.idle_chosen = args.idle is not None
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.only = _names(args.only, list(CANDIDATES), "candidate", parser, list(CANDIDATES))
    args.skip = _names(args.skip, [], "measurement", parser, list(MEASUREMENTS))
    if min(args.rounds, args.idle, args.round_trips, args.startup_runs) < 1:
        parser.error("--rounds, --idle, --round-trips and --startup-runs must be at least 1")
    return args


def _names(
    text: str | None,
    default: list[str],
    what: str,
    parser: argparse.ArgumentParser,
    allowed: list[str],
) -> list[str]:
    if not text:
        return default
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in allowed:
            parser.error(f"unknown {what} {name!r} (choose from {', '.join(allowed)})")
    return names


# -- one candidate in one round ----------------------------------------------------------------


class CandidateRun:
    """One candidate in one round: for each of ``SESSIONS``, start it, measure, stop it.

    Results land in ``self.record``: ``figures`` (flat, the keys of
    ``report.FIGURES``), ``why_missing`` (figure -> reason), ``raw`` (what the
    clients returned) and ``errors`` (measurement -> message).
    """

    def __init__(self, key: str, tag: str, args: argparse.Namespace, workdir: Path) -> None:
        self.key, self.tag, self.args, self.workdir = key, tag, args, workdir
        self.candidate: Candidate = CANDIDATES[key]()
        self.record: dict[str, Any] = {
            "status": "ok", "reason": "", "figures": {}, "why_missing": {}, "raw": {},
            "errors": {}, "rss_processes": self.candidate.rss_note, "logs": [],
        }  # fmt: skip
        self.figures: dict[str, float] = self.record["figures"]
        self.raw: dict[str, Any] = self.record["raw"]
        self.rss_rest_kib: int | None = None  # of the current start

    def say(self, text: str) -> None:
        print(f"  [{self.tag} {self.candidate.label}] {text}", flush=True)

    def run(self) -> dict[str, Any]:
        missing = self.candidate.missing()
        if missing:
            return self._unavailable("unavailable", missing)
        for index, measurements in enumerate(SESSIONS, start=1):
            wanted = [m for m in measurements if m not in self.args.skip]
            for name in set(measurements) - set(wanted):
                self._missing(name, "skipped (--skip)")
            if (wanted or index == 1) and not self._session(index, wanted):
                break
        return self.record

    def _session(self, index: int, measurements: list[str]) -> bool:
        """Start the echo service and a fresh candidate, measure, stop; False if it did not
        start."""
        workdir = self.workdir / f"start{index}"
        workdir.mkdir()
        self.candidate = CANDIDATES[self.key]()
        echo: EchoService | None = None
        try:
            began = time.monotonic()
            try:
                echo = EchoService(workdir)
                iperf_port = system.free_port()
                public = self.candidate.start(workdir, echo.port, iperf_port)
            except Exception as exc:  # any failure here is this row's failure
                why = f"did not start: {measure.describe(exc)}"
                if index == 1:
                    self._unavailable("failed", why)
                for name in measurements:
                    self._missing(name, why)
                return False
            self.raw[f"start{index}"] = {
                "seconds": round(time.monotonic() - began, 3),
                "pids": self.candidate.processes(),
            }
            self._rss_at_rest(index)
            self._measure(measurements, public, echo, iperf_port)
            return True
        finally:
            self.candidate.stop()
            if echo is not None:
                echo.stop()
            self._keep_logs(workdir, index)

    def _unavailable(self, status: str, reason: str) -> dict[str, Any]:
        self.record.update(status=status, reason=reason)
        self.say(f"{status}: {reason}")
        return self.record

    def _measure(
        self, measurements: list[str], public: Public, echo: EchoService, iperf_port: int
    ) -> None:
        steps: dict[str, Callable[[], None]] = {
            "throughput": lambda: self._throughput(
                public, iperf_port, echo.proc.stderr_path.parent
            ),
            "rtt": lambda: self._round_trips(public, echo, pinned=False),
            "pinned": lambda: self._round_trips(public, echo, pinned=True),
            "connrate": lambda: self._connection_rate(public),
            "idle": lambda: self._idle(public),
            "startup": lambda: self._startup(echo.proc.stderr_path.parent),
        }
        for name in measurements:
            gone = self.candidate.gone()
            if gone:
                self._missing(name, f"tunnel died earlier: {gone}")
                continue
            if name == "throughput" and not IPERF3:
                self._missing(name, "skipped: iperf3 not installed (apt-get install iperf3)")
                continue
            if name == "startup" and self.key not in TUNNELGATES:
                self._missing(name, "tunnelgate only")
                continue
            try:
                steps[name]()
            except Exception as exc:  # one failed measurement must not stop the rest
                message = measure.describe(exc)
                if not isinstance(exc, BenchError | OSError | TimeoutError):
                    traceback.print_exc()  # a bug in the bench rather than in the tunnel
                gone = self.candidate.gone()
                if gone:
                    message += f" (tunnel died: {gone})"
                self.record["errors"][name] = message
                self._missing(name, f"failed: {message}")
                self.say(f"{name} FAILED: {message}")

    def _missing(self, measurement: str, why: str) -> None:
        for figure in FIGURES_OF[measurement]:
            if figure not in self.figures:
                self.record["why_missing"].setdefault(figure, why)

    # -- the measurements --------------------------------------------------------------

    def _rss_at_rest(self, index: int) -> None:
        """RSS of the fresh candidate once stable: the figure comes from the first start;
        each start's own reading is the baseline for what follows in it."""
        start = self.raw[f"start{index}"]
        start["fds_rest"] = system.fd_count(self.candidate.processes())
        pids = self.candidate.rss_processes()
        if not pids:
            self.rss_rest_kib = None
            for figure in ("rss_rest", "rss_gateway", "rss_agent", "rss_loaded", "rss_per_conn"):
                self.record["why_missing"][figure] = self.candidate.rss_note
            self.say(f"{self._up(index)} in {start['seconds']:.2f} s")
            return
        self.rss_rest_kib = start["rss_rest_kib"] = system.settle_rss(pids)
        self.figures.setdefault("rss_rest", self.rss_rest_kib / 1024)
        line = f"{self._up(index)} in {start['seconds']:.2f} s, RSS at rest"
        line += f" {self.rss_rest_kib / 1024:.1f} MiB"
        sides = {side: system.settle_rss(p) for side, p in self.candidate.rss_sides().items()}
        start["rss_rest_sides_kib"] = sides
        for side, kib in sides.items():
            self.figures.setdefault(f"rss_{side}", kib / 1024)
        if sides:
            line += " (" + ", ".join(f"{s} {kib / 1024:.1f}" for s, kib in sides.items()) + ")"
        self.say(line)

    @staticmethod
    def _up(index: int) -> str:
        return "up" if index == 1 else "started afresh for the idle connections: up"

    def _idle(self, public: Public) -> None:
        n = self.args.idle
        result = measure.idle_connections(
            public.echo, n, lambda: system.rss_kib(self.candidate.rss_processes())
        )
        self.raw["idle"] = result
        self.figures["idle_held"] = result["held"]
        self.figures["idle_echoing"] = result["echoing"]
        line = f"idle: {result['held']}/{n} held, {result['echoing']} echoing afterwards"
        line += f" (opened in {result['open_seconds']:.1f} s)"
        if self.rss_rest_kib is not None and result["held"]:
            self.figures["rss_loaded"] = result["rss_loaded_kib"] / 1024
            per_conn = (result["rss_loaded_kib"] - self.rss_rest_kib) / result["held"]
            self.figures["rss_per_conn"] = per_conn
            line += f", {per_conn:.1f} KiB per connection"
        self.say(line)
        for kind in ("open_errors", "echo_errors"):
            if result[kind]:
                self.say(f"  idle {kind.replace('_', ' ')}: {result[kind]}")

    def _startup(self, logdir: Path) -> None:
        result = self.candidate.startup(logdir, self.args.startup_runs)
        assert result is not None  # a tunnelgate candidate
        self.raw["startup"] = result
        self.figures["start_version"] = result["version_p50_ms"]
        self.figures["start_gateway_first"] = result["gateway_first_ms"]
        self.figures["start_gateway"] = result["gateway_p50_ms"]
        self.say(
            f"start-up, median of {self.args.startup_runs}: tunnelgate --version"
            f" {result['version_p50_ms']:.0f} ms, a gateway until it accepts"
            f" {result['gateway_p50_ms']:.0f} ms (its first start"
            f" {result['gateway_first_ms']:.0f} ms)"
        )

    def _throughput(self, public: Public, iperf_port: int, logdir: Path) -> None:
        assert IPERF3
        results: dict[str, Any] = {}
        for figure, streams, reverse in (
            ("up1", 1, False), ("down1", 1, True), ("up8", 8, False), ("down8", 8, True)
        ):  # fmt: skip
            try:
                result = measure.iperf3(
                    IPERF3, public.iperf, iperf_port, seconds=self.args.duration,
                    streams=streams, reverse=reverse, logdir=logdir,
                )  # fmt: skip
            except Exception as exc:  # the other iperf3 runs still count
                message = measure.describe(exc)
                self.record["why_missing"][figure] = f"failed: {message}"
                self.record["errors"][f"throughput {figure}"] = message
                self.say(f"iperf3 {figure} FAILED: {message}")
                continue
            results[figure] = result
            self.figures[figure] = result["gbit_s"]
        self.raw["iperf3"] = results
        self.say(
            "iperf3 Gbit/s: " + ", ".join(f"{k} {v['gbit_s']:.2f}" for k, v in results.items())
        )

    def _round_trips(self, public: Public, echo: EchoService, pinned: bool) -> None:
        count = self.args.round_trips
        if not pinned:
            result = measure.round_trips(public.echo, count)
            prefix, name = "rtt", "free-running"
        else:

            def everyone() -> list[int]:
                return [*self.candidate.processes(), echo.proc.pid, os.getpid()]

            with system.pinned(everyone, PIN_CPU, ALL_CPUS) as threads:
                result = measure.round_trips(public.echo, count)
            result["pinned_threads"] = threads
            prefix, name = "pin", f"pinned to CPU {PIN_CPU} ({threads} threads)"
        self.raw[f"{prefix}_round_trips"] = result
        self.figures[f"{prefix}_p50"] = result["p50_us"]
        self.figures[f"{prefix}_p99"] = result["p99_us"]
        self.say(
            f"{count} round trips {name}: p50 {result['p50_us']:.0f} µs,"
            f" p99 {result['p99_us']:.0f} µs"
        )

    def _connection_rate(self, public: Public) -> None:
        result = measure.connection_rate(
            public.echo, workers=CONN_WORKERS, seconds=self.args.conn_seconds
        )
        self.raw["connection_rate"] = result
        self.figures["conn_s"] = result["per_s"]
        self.figures["conn_errors"] = result["errors"]
        p99 = "n/a"
        if result["p99_ms"] is not None:
            self.figures["conn_p99"] = result["p99_ms"]
            p99 = f"{result['p99_ms']:.1f} ms"
        else:
            self.record["why_missing"]["conn_p99"] = "no connection succeeded"
        self.say(f"connection rate: {result['per_s']:.0f}/s, p99 {p99}, {result['errors']} errors")
        if result["errors"]:
            self.say(f"  connection errors: {result['error_kinds']}")

    def _keep_logs(self, workdir: Path, index: int) -> None:
        """Copy the non-empty logs of the tunnel to bench/results/logs/ and say so."""
        logdir = RESULTS / "logs"
        for path in [*self.candidate.logs(), workdir / "echo.log"]:
            if not path.exists() or path.stat().st_size == 0:
                continue
            logdir.mkdir(parents=True, exist_ok=True)
            target = logdir / f"{self.tag}-{self.key}-start{index}-{path.name}"
            shutil.copyfile(path, target)
            lines = target.read_text(errors="replace").splitlines()
            self.record["logs"].append(str(target.relative_to(REPO)))
            levels = {
                level: sum(1 for line in lines if f" {level} " in line)
                for level in ("ERROR", "WARNING")
            }
            tracebacks = sum(1 for line in lines if line.startswith("Traceback"))
            self.say(
                f"log {path.name}: {len(lines)} lines, {levels['ERROR']} ERROR,"
                f" {levels['WARNING']} WARNING, {tracebacks} tracebacks"
                f" -> {target.relative_to(REPO)}"
            )


# -- the whole run -----------------------------------------------------------------------------

IPERF3 = system.which("iperf3")
TUNNELGATES = tuple(key for key in CANDIDATES if key.startswith("tg-"))
ALL_CPUS = os.sched_getaffinity(0)
PIN_CPU = min(ALL_CPUS)


def preflight(args: argparse.Namespace) -> dict[str, Any]:
    """Raise RLIMIT_NOFILE, look for the system tools, and describe the machine."""
    limit = system.raise_nofile()
    notes = []
    need = 2 * args.idle + 200  # a relay process holds two sockets per connection (both sides)
    if limit < need and not args.idle_chosen:
        fits = (limit - 400) // 200 * 100  # whole hundreds, with room for listeners and the pool
        notes.append(
            f"RLIMIT_NOFILE is {limit} and cannot be raised (that needs CAP_SYS_RESOURCE): a "
            f"tunnel process holds two sockets per connection, so this run opens {fits} idle "
            f"connections, not {args.idle} (--idle N to choose)"
        )
        args.idle = fits
    elif limit < need:
        notes.append(
            f"RLIMIT_NOFILE stays at {limit} (raising the hard limit needs CAP_SYS_RESOURCE): "
            f"a tunnel process with two sockets per connection needs about {need} for "
            f"{args.idle} idle connections, so expect 'Too many open files' near "
            f"{(limit - 200) // 2} (use --idle to ask for fewer)"
        )
    if not IPERF3:
        notes.append("iperf3 is missing: throughput is skipped (apt-get install iperf3)")
    for key in args.only:
        missing = CANDIDATES[key]().missing()
        if missing:
            notes.append(f"{LABELS[key]} cannot run: {missing}")
    if not system.which("taskset"):
        notes.append("taskset is missing (not needed: pinning uses os.sched_setaffinity)")
    busy = system.cpu_busy()
    if busy > 0.15:
        notes.append(
            f"the machine was {busy:.0%} busy before the bench started: other load skews figures"
        )
    if len(ALL_CPUS) < 2:
        notes.append("only one CPU is available: free-running and pinned round trips coincide")
    ssh = system.which("ssh")
    extra = sys.argv[1:]
    command = "make bench" + (f" BENCH_ARGS={shlex.quote(' '.join(extra))}" if extra else "")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "argv": [sys.executable, *sys.argv],
        "machine": system.machine(),
        "tunnelgate": system.git_state(REPO),
        "python": sys.version.split()[0],
        "iperf3": system.tool_version([IPERF3, "-v"]) if IPERF3 else "iperf3 missing",
        "openssh": system.tool_version([ssh, "-V"]) if ssh else "ssh missing",
        "rlimit_nofile": limit,
        "cpu_busy_before": round(busy, 3),
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
        "notes": notes,
        "options": {
            "rounds": args.rounds, "iperf3_seconds": args.duration, "idle": args.idle,
            "round_trips": args.round_trips, "connection_rate_seconds": args.conn_seconds,
            "startup_runs": args.startup_runs,
            "connection_rate_workers": CONN_WORKERS, "candidates": args.only, "skip": args.skip,
            "pin_cpu": PIN_CPU,
        },
    }  # fmt: skip


def interleaved(keys: list[str], round_index: int) -> list[str]:
    """A B C D in even rounds, D C B A in odd ones."""
    return list(keys) if round_index % 2 == 0 else list(reversed(keys))


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    if args.report:
        return report_again(args.report)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    meta = preflight(args)
    m = meta["machine"]
    print(
        f"tunnelgate bench: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
        f"Python {meta['python']}, {meta['iperf3'].split(' (')[0]}, {meta['openssh'].split(',')[0]}"
    )
    print(
        f"{args.rounds} round(s) of {', '.join(args.only)}; iperf3 {args.duration:g} s, "
        f"{args.idle} idle, {args.round_trips} round trips, {args.conn_seconds:g} s connection"
        f" rate, {args.startup_runs} starts"
    )
    print(f"tunnelgate: {meta['tunnelgate']}")
    for note in meta["notes"]:
        print(f"note: {note}")
    shutil.rmtree(RESULTS / "logs", ignore_errors=True)

    workroot = Path(tempfile.mkdtemp(prefix="tunnelgate-bench-"))
    rounds: list[dict[str, Any]] = []
    began = time.monotonic()
    interrupted = False
    try:
        for index in range(args.rounds):
            order = interleaved(args.only, index)
            print(f"round {index + 1}/{args.rounds}: {' → '.join(order)}", flush=True)
            rnd: dict[str, Any] = {"round": index + 1, "order": order, "runs": {}}
            rounds.append(rnd)
            for key in order:
                workdir = workroot / f"r{index + 1}-{key}"
                workdir.mkdir()
                rnd["runs"][key] = CandidateRun(key, f"r{index + 1}", args, workdir).run()
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping everything and reporting what was measured", flush=True)
    finally:
        system.stop_all()
        shutil.rmtree(workroot, ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - began, 1)
    meta["interrupted"] = interrupted
    write_report(args, meta, rounds)
    return 130 if interrupted else 0


def report_again(path: Path) -> int:
    """``--report JSON``: the text of a finished run, again, from its raw data."""
    data = json.loads(path.read_text())
    meta, rounds = data["meta"], data["rounds"]
    text, _, _ = render(meta, rounds, meta["options"]["candidates"], meta["options"]["idle"])
    print(text)
    return 0


def render(
    meta: dict[str, Any], rounds: list[dict[str, Any]], keys: list[str], idle: int
) -> tuple[str, dict[str, dict[str, report.Stat]], list[dict[str, Any]]]:
    """The report: table, RSS note, targets, machine and command; plus summary and checks."""
    summary = report.summarize(rounds, keys)
    table = report.table(summary, LABELS)
    checks = report.check_targets(summary, LABELS, idle, meta["rlimit_nofile"])
    targets = report.targets_text(checks)
    rss_notes = "; ".join(f"{LABELS[k]}: {CANDIDATES[k]().rss_note}" for k in keys if k != "direct")
    m = meta["machine"]
    text = "\n".join(
        [
            f"Medians over {len(rounds)} interleaved round(s), min-max across rounds. "
            "Ratios: candidate / reference (higher is better for throughput and "
            "connections/s; lower is better for latency and RSS).",
            "",
            table,
            "",
            f"RSS counts {rss_notes}.",
            "",
            "Targets (medians of the rounds; * = run with fewer idle connections than the target):",
            "",
            targets,
            "",
            f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, {m['memory']}, Linux {m['kernel']}, "
            f"Python {meta['python']}, {meta['iperf3']}, {meta['openssh']}",
            f"tunnelgate: {meta['tunnelgate']}",
            f"Command: `{meta['command']}` ({meta['date']}, {meta['seconds'] / 60:.1f} min"
            + (", INTERRUPTED" if meta["interrupted"] else "")
            + ")",
            *(f"Note: {note}" for note in meta["notes"]),
        ]
    )
    return text, summary, checks


def write_report(
    args: argparse.Namespace, meta: dict[str, Any], rounds: list[dict[str, Any]]
) -> None:
    text, summary, checks = render(meta, rounds, args.only, args.idle)
    print("\n" + text)
    errors = [
        f"round {r['round']} {LABELS[k]}: {what}: {msg}"
        for r in rounds
        for k, run in r["runs"].items()
        for what, msg in run["errors"].items()
    ]
    if errors:
        print("\nErrors:\n" + "\n".join(f"- {e}" for e in errors))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "summary": report.summary_json(summary),
        "targets": checks,
        "rounds": rounds,
    }
    args.json.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    args.json.with_suffix(".md").write_text(text + "\n")
    print(f"\nraw data: {args.json}  (table: {args.json.with_suffix('.md')})")


if __name__ == "__main__":
    sys.exit(main())
