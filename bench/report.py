"""The report: medians and spread over rounds, ratios, the table, the target checks.

Input is the list of rounds that bench.py collects: for each round and each
candidate, a flat dict of figures (``FIGURES`` keys) or the reason it has
none. Output is one Markdown table (readable in a terminal too) and a list of
target checks, each met/missed/n/a. This is a report, not a test: missing a
target does not change the exit code.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

REFERENCES = ("direct", "ssh")  # ratios are taken against these two candidates


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    ratios: bool = True  # False for counts where a ratio says nothing
    tunnels_only: bool = False  # True where direct has nothing to show (the tunnel's RSS)


FIGURES = [
    Figure("up1", "iperf3 1 stream, client→service", "Gbit/s", True),
    Figure("down1", "iperf3 1 stream, service→client (-R)", "Gbit/s", True),
    Figure("up8", "iperf3 8 streams, client→service", "Gbit/s", True),
    Figure("down8", "iperf3 8 streams, service→client (-R)", "Gbit/s", True),
    Figure("rtt_p50", "64 B round trip p50, free-running", "µs", False),
    Figure("rtt_p99", "64 B round trip p99, free-running", "µs", False),
    Figure("pin_p50", "64 B round trip p50, pinned to one CPU", "µs", False),
    Figure("pin_p99", "64 B round trip p99, pinned to one CPU", "µs", False),
    Figure("conn_s", "connections/s (32 workers)", "conn/s", True),
    Figure("conn_p99", "connection p99 (connect, echo 16 B)", "ms", False),
    Figure("conn_errors", "connection errors", "count", False, ratios=False),
    Figure("idle_held", "idle connections held", "count", True, ratios=False),
    Figure("idle_echoing", "idle connections echoing afterwards", "count", True, ratios=False),
    Figure("rss_rest", "RSS at rest", "MiB", False, tunnels_only=True),
    Figure("rss_gateway", "RSS at rest, gateway side", "MiB", False, tunnels_only=True),
    Figure("rss_agent", "RSS at rest, agent side", "MiB", False, tunnels_only=True),
    Figure("rss_loaded", "RSS with the idle connections", "MiB", False, tunnels_only=True),
    Figure("rss_per_conn", "RSS per idle connection", "KiB", False, tunnels_only=True),
    Figure("start_version", "`tunnelgate --version`", "ms", False, False, True),
    Figure("start_gateway", "gateway start until it accepts", "ms", False, False, True),
    Figure("start_gateway_first", "the same, first start (new state)", "ms", False, False, True),
]
BY_KEY = {f.key: f for f in FIGURES}


@dataclass
class Stat:
    values: list[float]
    why_none: str = ""  # when there are no values

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None


def summarize(rounds: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, Stat]]:
    """candidate -> figure -> values over the rounds (or why there are none)."""
    summary: dict[str, dict[str, Stat]] = {}
    for key in keys:
        summary[key] = {}
        for figure in FIGURES:
            values: list[float] = []
            reasons: list[str] = []
            for rnd in rounds:
                run = rnd["runs"].get(key)
                if run is None:
                    continue
                if figure.key in run["figures"]:
                    values.append(run["figures"][figure.key])
                else:
                    reasons.append(run.get("reason") or run["why_missing"].get(figure.key, ""))
            why = next((r for r in reasons if r), "not measured")
            summary[key][figure.key] = Stat(values, why)
    return summary


def number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "count":
        return f"{value:,.0f}"
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def short(reason: str, width: int = 48) -> str:
    line = reason.strip().splitlines()[0] if reason.strip() else "not measured"
    return line if len(line) <= width else line[: width - 1] + "…"


def table(summary: dict[str, dict[str, Stat]], labels: dict[str, str]) -> str:
    """One Markdown table: each figure, each candidate, median, min-max, ratios.

    A candidate without a single figure (it did not start, a tool is missing)
    gets one line under the table instead of a row of n/a per figure.
    """
    header = ["figure", "unit", "better", "candidate", "median", "min-max", "x direct", "x ssh -R"]
    shown = [k for k in summary if any(s.values for s in summary[k].values())]
    rows: list[list[str]] = []
    for figure in FIGURES:
        keys = [k for k in shown if not (figure.tunnels_only and k == "direct")]
        stats = {key: summary[key][figure.key] for key in keys}
        if not any(s.values for s in stats.values()) and all(
            s.why_none.startswith("skipped") for s in stats.values()
        ):
            continue  # skipped for everyone: no rows at all
        refs = {
            ref: summary[ref][figure.key].median if ref in summary else None for ref in REFERENCES
        }
        for index, (key, stat) in enumerate(stats.items()):
            first = index == 0
            cells = [
                figure.label if first else "",
                figure.unit if first else "",
                ("higher" if figure.higher_is_better else "lower") if first else "",
                labels[key],
            ]
            if not stat.values:
                rows.append([*cells, f"n/a: {short(stat.why_none, 40)}", "", "", ""])
                continue
            spread = (
                f"{number(min(stat.values), figure.unit)}-{number(max(stat.values), figure.unit)}"
            )
            ratio_cells = []
            for ref in REFERENCES:
                r = ratio(stat.median, refs[ref])
                if key == ref or not figure.ratios or (figure.tunnels_only and ref == "direct"):
                    ratio_cells.append("")
                else:
                    ratio_cells.append("n/a" if r is None else f"{r:.2f}x")
            rows.append([*cells, number(stat.median, figure.unit), spread, *ratio_cells])
    lines = [markdown(header, rows)] if shown else ["(no figures)"]
    for key in summary:
        if key not in shown:
            why = next(iter(summary[key].values())).why_none
            lines.append(f"\n{labels[key]}: no figures: {why}")
    return "\n".join(lines)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = {4, 5, 6, 7}

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(w) if i in numeric and not c.startswith("n/a:") else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            "-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# -- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    candidate: str
    figure: str
    op: str  # ">=" or "<="
    factor: float
    reference: str | None  # "direct", "ssh", or None for an absolute bound


TARGETS = [
    *(Target("tg-notls", f, ">=", 0.5, "direct") for f in ("up1", "down1", "up8", "down8")),
    Target("tg-notls", "pin_p50", "<=", 0.8, "ssh"),  # issue 14's targets from here on
    Target("tg-notls", "conn_s", ">=", 5.0, "ssh"),
    Target("tg-notls", "conn_p99", "<=", 1.0, "ssh"),
    Target("tg-notls", "conn_errors", "<=", 0, None),
    Target("tg-notls", "rss_per_conn", "<=", 24, None),
    Target("tg-notls", "rss_gateway", "<=", 20, None),
    Target("tg-notls", "rss_agent", "<=", 20, None),
    *(Target("tg-tls", f, ">=", 1.0, "ssh") for f in ("up1", "down1")),
    *(Target("tg-tls", f, ">=", 1.3, "ssh") for f in ("up8", "down8")),
    Target("tg-tls", "pin_p50", "<=", 1.0, "ssh"),
    Target("tg-tls", "conn_s", ">=", 3.0, "ssh"),
    Target("tg-tls", "conn_p99", "<=", 1.0, "ssh"),
    Target("tg-tls", "rss_per_conn", "<=", 32, None),
    Target("tg-tls", "rss_gateway", "<=", 20, None),
    Target("tg-tls", "rss_agent", "<=", 20, None),
]
IDLE_TARGET = 10_000  # "10,000 idle connections held and all echoing" (tunnelgate --no-tls)


def check_targets(
    summary: dict[str, dict[str, Stat]], labels: dict[str, str], idle_wanted: int, fd_limit: int
) -> list[dict[str, Any]]:
    """Each target on the medians: met, missed or n/a, with the numbers behind it."""
    checks: list[dict[str, Any]] = []
    for t in TARGETS:
        figure = BY_KEY[t.figure]
        name = f"{labels.get(t.candidate, t.candidate)}: {figure.label}"
        if t.reference:
            name += f" {t.op} {t.factor:.1f} x {labels.get(t.reference, t.reference)}"
        else:
            name += f" {t.op} {t.factor:g} {figure.unit}"
        if t.figure == "conn_errors":
            name = f"{labels.get(t.candidate, t.candidate)}: zero connection errors (every round)"
        checks.append({"target": name, **_evaluate(t, summary, labels)})
    checks.append(_idle_check(summary, labels, idle_wanted, fd_limit))
    return checks


def _evaluate(
    t: Target, summary: dict[str, dict[str, Stat]], labels: dict[str, str]
) -> dict[str, Any]:
    stat = summary.get(t.candidate, {}).get(t.figure)
    if stat is None or stat.median is None:
        return {"status": "n/a", "detail": short(stat.why_none if stat else "not run", 80)}
    unit = BY_KEY[t.figure].unit
    if t.figure == "conn_errors":
        worst = max(stat.values)  # zero errors in every round, not only in the median one
        per_round = ", ".join(number(v, unit) for v in stat.values)
        status = "met" if worst <= t.factor else "missed"
        return {"status": status, "value": worst, "detail": f"errors per round: {per_round}"}
    if t.reference is None:
        measured = stat.median
        detail = f"{number(measured, unit)} {unit}"
    else:
        ref = summary.get(t.reference, {}).get(t.figure)
        if ref is None or ref.median is None:
            why = short(ref.why_none if ref else "not run", 60)
            return {"status": "n/a", "detail": f"no {labels.get(t.reference)} figure ({why})"}
        measured = stat.median / ref.median
        detail = (
            f"{measured:.2f}x ({number(stat.median, unit)} vs {number(ref.median, unit)} {unit})"
        )
    ok = measured >= t.factor if t.op == ">=" else measured <= t.factor
    return {"status": "met" if ok else "missed", "value": measured, "detail": detail}


def _idle_check(
    summary: dict[str, dict[str, Stat]], labels: dict[str, str], idle_wanted: int, fd_limit: int
) -> dict[str, Any]:
    name = (
        f"{labels.get('tg-notls', 'tg-notls')}: {IDLE_TARGET:,} idle connections held "
        "and all echoing (every round)"
    )
    stats = summary.get("tg-notls")
    if stats is None or not stats["idle_echoing"].values:
        why = stats["idle_echoing"].why_none if stats else "not run"
        return {"target": name, "status": "n/a", "detail": short(why, 80)}
    held, echoing = stats["idle_held"].values, stats["idle_echoing"].values
    ok = min(held) >= idle_wanted and min(echoing) >= idle_wanted
    detail = f"held {', '.join(number(v, 'count') for v in held)}; echoing " + ", ".join(
        number(v, "count") for v in echoing
    )
    if fd_limit < 2 * idle_wanted + 200:
        detail += (
            f"; RLIMIT_NOFILE was {fd_limit}, below the ~{2 * idle_wanted + 200} that a process"
            " with two sockets per connection needs"
        )
    if idle_wanted < IDLE_TARGET:
        detail += f" (this run opened {idle_wanted:,}, not {IDLE_TARGET:,})"
        return {"target": name, "status": ("met" if ok else "missed") + "*", "detail": detail}
    return {"target": name, "status": "met" if ok else "missed", "detail": detail}


def targets_text(checks: list[dict[str, Any]]) -> str:
    width = max(len(c["target"]) for c in checks)
    return "\n".join(
        f"- {c['status'].upper():8} {c['target'].ljust(width)}  {c['detail']}" for c in checks
    )


def summary_json(summary: dict[str, dict[str, Stat]]) -> dict[str, Any]:
    return {
        key: {
            fig: (
                {"median": s.median, "min": min(s.values), "max": max(s.values), "values": s.values}
                if s.values
                else {"median": None, "why": s.why_none}
            )
            for fig, s in stats.items()
        }
        for key, stats in summary.items()
    }
