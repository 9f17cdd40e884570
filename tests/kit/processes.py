"""Programs as subprocesses: ``tunnelgate`` itself (``python -m tunnelgate``)
and the tools and services around it (curl, redis, nginx). A :class:`Proc`
collects its output lines so a test can wait for one under a deadline;
:func:`start_gateway` starts a gateway and reads its port and fingerprint
from what it prints; :func:`require_tool` skips a test without a tool."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from kit.waiting import DEADLINE, EXIT_DEADLINE

TUNNELGATE = [sys.executable, "-m", "tunnelgate"]
SYSTEM_DIRS = ("/usr/sbin", "/sbin")  # daemons (nginx) live here, often off a user's PATH
FINGERPRINT_RE = r"SHA256:[0-9A-F]{64}"
# The banner's suggested agent command, maybe after environment assignments.
AGENT_COMMAND_RE = r"^\s+((?:[A-Z_]+=\S+\s+)*tunnelgate agent .*)$"


class Proc:
    """A subprocess; threads collect its stdout and stderr lines."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        self.argv = argv
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def is_tunnelgate(self) -> bool:
        return self.argv[: len(TUNNELGATE)] == TUNNELGATE

    @property
    def command(self) -> str:
        """The command line as a user would type it."""
        if self.is_tunnelgate:
            return shlex.join(["tunnelgate", *self.argv[len(TUNNELGATE) :]])
        return shlex.join(self.argv)

    def _read(self, pipe: IO[str], lines: list[str]) -> None:
        for line in pipe:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _output_done(self) -> bool:
        return not any(reader.is_alive() for reader in self._readers)

    def describe(self) -> str:
        with self._changed:
            return (
                f"$ {self.command}  (exit code {self.popen.poll()})\n"
                + "--- stdout ---\n"
                + "\n".join(self.stdout)
                + "\n--- stderr ---\n"
                + "\n".join(self.stderr)
            )

    def wait_line(
        self, pattern: str, *, stdout: bool = False, count: int = 1, timeout: float = DEADLINE
    ) -> re.Match[str]:
        """The ``count``-th line of stderr (or stdout) matching ``pattern``; fail if none
        comes in time."""
        regex = re.compile(pattern)
        lines = self.stdout if stdout else self.stderr
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matches = [m for line in lines if (m := regex.search(line))]
                if len(matches) >= count:
                    return matches[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._output_done():
                    why = "timed out" if remaining <= 0 else "output ended"
                    pytest.fail(
                        f"{why} waiting for line #{count} matching {pattern!r}\n{self.describe()}"
                    )
                self._changed.wait(min(remaining, 0.5))

    def lines_matching(self, pattern: str, *, stdout: bool = False) -> list[str]:
        with self._changed:
            return [
                line
                for line in (self.stdout if stdout else self.stderr)
                if re.search(pattern, line)
            ]

    def wait_exit(self, timeout: float = EXIT_DEADLINE) -> int:
        """The exit code; fail if the process is still running after ``timeout``."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout} s\n{self.describe()}")
        for reader in self._readers:
            reader.join(DEADLINE)
        return code

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def stop(self) -> None:
        """Kill if still running; reap; close the pipes."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for reader in self._readers:
            reader.join(DEADLINE)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


def rss_kib(pid: int) -> int:
    """The resident memory of process ``pid``, in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


# The type of the ``launch`` and ``launch_command`` fixtures.
Launch = Callable[..., Proc]


def require_tool(name: str) -> str:
    """The path of ``name``; skip without it, or fail when TUNNELGATE_REQUIRE_TOOLS=1."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SYSTEM_DIRS])
    path = shutil.which(name, path=search)
    if path is None:
        if os.environ.get("TUNNELGATE_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{name} not found on PATH, and TUNNELGATE_REQUIRE_TOOLS=1")
        pytest.skip(f"{name} not found on PATH")
    return path


@dataclass
class GatewayProc:
    proc: Proc
    port: int
    fingerprint: str | None  # None with --no-tls

    @property
    def pid(self) -> int:
        return self.proc.popen.pid


def start_gateway(
    launch: Launch,
    state_dir: Path,
    *flags: str,
    token: str | None = None,
    tls: bool = True,
    listen: str = "127.0.0.1:0",
    env: dict[str, str] | None = None,
) -> GatewayProc:
    """A gateway whose banner has been printed; its control port read from its log."""
    args = ["gateway", "--listen", listen, "--state-dir", str(state_dir), *flags]
    if not tls:
        args.append("--no-tls")
    proc = launch(*args, token=token, env=env)
    host = re.escape(listen.rsplit(":", 1)[0])
    port = int(proc.wait_line(rf"gateway listening on {host}:(\d+)").group(1))
    proc.wait_line(AGENT_COMMAND_RE, stdout=True)  # the banner's last line
    fingerprint = None
    for line in proc.lines_matching(r"^certificate fingerprint: ", stdout=True):
        fingerprint = line.split(": ", 1)[1].strip()
        assert re.fullmatch(FINGERPRINT_RE, fingerprint), line
    assert (fingerprint is not None) == tls, proc.describe()
    return GatewayProc(proc, port, fingerprint)
