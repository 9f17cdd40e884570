"""Run one fuzz target under atheris (libFuzzer), coverage-guided.

::

    .venv/bin/python fuzz/run.py TARGET [--keep-going] [libFuzzer options] [DIR|FILE ...]

Without a directory or file, the corpus is ``fuzz/corpus/TARGET/``: libFuzzer
starts from it and writes the new inputs it finds there. Files given instead
are run once each, which replays a crash with its traceback::

    .venv/bin/python fuzz/run.py frames fuzz/crashes/frames/crash-1234abcd

A crash stops libFuzzer and leaves the input in ``fuzz/crashes/TARGET/``
(``-artifact_prefix``). With ``--keep-going`` (what ``fuzz/campaign.py``
uses), an exception is recorded instead, once per place it was raised: the
input and its traceback go to ``fuzz/crashes/TARGET/``, and fuzzing goes on.
Hangs (``-timeout``) and memory blow-ups (``-rss_limit_mb``) still stop it.

tunnelgate, and the standard modules its parsers lean on (``tomllib``,
``ipaddress``), are instrumented as they are imported, so coverage of them
guides the fuzzer; comparisons in ``re`` and ``str`` methods are hooked too.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Final

import atheris

FUZZ: Final = Path(__file__).resolve().parent
CORPUS: Final = FUZZ / "corpus"
CRASHES: Final = FUZZ / "crashes"
INSTRUMENTED: Final = ("tunnelgate", "tomllib", "ipaddress")

# Inputs larger than this bring no new code: the frame and message limits are
# checked on the header, and the config and PROXY parsers have little state.
MAX_LEN: Final = {
    "frames": 8192,
    "messages": 8192,
    "handshake": 4096,
    "gateway_config": 4096,
    "agent_config": 4096,
    "proxy_header": 1024,
}
DEFAULTS: Final = ("-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1")
SITE_PREFIX: Final = "site: "


def _site(exc: BaseException) -> str:
    """Where an exception was raised: its type and the innermost frame in
    tunnelgate or the targets (a RecursionError deep in tomllib is one site)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/tunnelgate/" in f.filename or f.filename.endswith("targets.py")]
    if not frames:
        return type(exc).__name__
    frame = (ours or frames)[-1]
    return f"{type(exc).__name__} at {frame.filename}:{frame.lineno}"


def _known_sites(directory: Path) -> set[str]:
    sites = set()
    for report in directory.glob("*.txt"):
        first = report.read_text(errors="replace").partition("\n")[0]
        if first.startswith(SITE_PREFIX):
            sites.add(first[len(SITE_PREFIX) :])
    return sites


def recording(name: str, target: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """``target``, with each new exception site's input and traceback written
    to ``fuzz/crashes/NAME/`` instead of stopping the fuzzer."""
    directory = CRASHES / name
    directory.mkdir(parents=True, exist_ok=True)
    seen = _known_sites(directory)

    def run(data: bytes) -> None:
        try:
            target(data)
        except Exception as exc:
            site = _site(exc)
            if site in seen:
                return
            seen.add(site)
            path = directory / f"crash-{hashlib.sha1(data).hexdigest()}"
            path.write_bytes(data)
            text = "".join(traceback.format_exception(exc))
            path.with_name(path.name + ".txt").write_text(
                f"{SITE_PREFIX}{site}\ninput: {data!r}\n\n{text}"
            )
            print(f"\n=== {name}: new crash ({site}), input in {path}\n{text}", file=sys.stderr)

    return run


def main(argv: list[str]) -> int:
    keep_going = "--keep-going" in argv
    args = [a for a in argv[1:] if a != "--keep-going"]
    if not args or args[0] not in MAX_LEN:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        print(f"targets: {', '.join(MAX_LEN)}", file=sys.stderr)
        return 2
    name, options = args[0], args[1:]

    atheris.enabled_hooks.add("str")
    # atheris imported some of these itself, uninstrumented: import them afresh.
    for module in [m for m in sys.modules if m.partition(".")[0] in INSTRUMENTED]:
        del sys.modules[module]
    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        import targets
    # Only now: atheris cannot hook the bytes patterns that cryptography compiles
    # on import. Patterns compiled at import are not hooked; those compiled (or
    # looked up in re's cache) in a call are.
    atheris.enabled_hooks.add("RegEx")

    target = targets.TARGETS[name]
    if keep_going:
        target = recording(name, target)
    given = {option.partition("=")[0] for option in options if option.startswith("-")}
    flags = [
        f for f in (*DEFAULTS, f"-max_len={MAX_LEN[name]}") if f.partition("=")[0] not in given
    ]
    if "-artifact_prefix" not in given:
        (CRASHES / name).mkdir(parents=True, exist_ok=True)
        flags.append(f"-artifact_prefix={CRASHES / name}/")
    if not any(not option.startswith("-") for option in options):
        (CORPUS / name).mkdir(parents=True, exist_ok=True)
        options = [*options, str(CORPUS / name)]
    # libFuzzer runs its helper processes (-merge) with argv joined into a shell
    # command, so the first word must be a whole command that reaches this script.
    command = [sys.executable, str(Path(__file__).resolve()), name]
    if keep_going:
        command.append("--keep-going")
    atheris.Setup([shlex.join(command), *flags, *options], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
