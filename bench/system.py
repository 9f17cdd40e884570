"""Operating-system helpers for the bench: processes, ports, /proc, RSS, CPU pinning.

Everything here is synchronous and Linux-only (it reads /proc). Every wait
has a deadline and raises ``BenchError`` when it passes, so the bench never
hangs.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

NOFILE_WANTED = 200_000


class BenchError(Exception):
    """A step of the bench failed; the message says which and why."""


# -- processes --------------------------------------------------------------------------

_running: list[Proc] = []  # every process the bench started and has not stopped yet


class Proc:
    """A child process in its own session, with stdout/stderr going to files.

    Its own session keeps a Ctrl-C in the terminal away from it: the bench
    stops its children itself, in order, on the way out.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        logdir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.stdout_path = logdir / f"{name}.out"
        self.stderr_path = logdir / f"{name}.log"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        _running.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(5)
        if self in _running:
            _running.remove(self)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def log_tail(self, lines: int = 8) -> str:
        text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        return "\n".join(text[-lines:])

    def died(self) -> str:
        """Why the process is gone, with the end of its log."""
        tail = self.log_tail()
        return f"{self.name} exited with code {self.popen.returncode}" + (
            f":\n{tail}" if tail else ""
        )


def first_death(procs: Iterable[Proc | None]) -> str | None:
    """Which of ``procs`` died, with its last log; None while they all run."""
    for proc in procs:
        if proc is not None and not proc.alive():
            return proc.died()
    return None


def stop_all() -> None:
    """Stop every process the bench started, newest first (used on the way out)."""
    for proc in reversed(list(_running)):
        proc.stop(timeout=3.0)


def kill_pids(pids: Iterable[int]) -> None:
    """SIGKILL stray processes by id (an sshd session left behind by its master)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (children, grandchildren, …), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_until(what: str, check: Callable[[], bool], timeout: float, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


# -- ports -------------------------------------------------------------------------------

_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback TCP port (bound to port 0 and released); never the same one twice."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def listening(port: int) -> bool:
    """Whether some socket listens on TCP ``port`` (read from /proc, without connecting).

    Connecting would be a test in itself for ``iperf3 -s -1``; reading the
    socket table is not.
    """
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(suffix) and fields[3] == "0A":  # 0A = LISTEN
                return True
    return False


# -- resources ---------------------------------------------------------------------------


def raise_nofile(wanted: int = NOFILE_WANTED) -> int:
    """Raise RLIMIT_NOFILE (soft and hard) so that the bench and its children may hold
    tens of thousands of sockets; returns the soft limit reached."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):  # not root: up to the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pids: Iterable[int]) -> int:
    """Sum of VmRSS over ``pids`` in KiB (a process that is gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            pass
    return total


def fd_count(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


class Settle:
    """Poll a reading until it stops moving: the last ``window`` samples within
    ``tolerance`` (relative) of each other, or ``timeout`` seconds passed."""

    def __init__(
        self, window: int = 4, every: float = 0.25, tolerance: float = 0.005, timeout: float = 15.0
    ) -> None:
        self.window, self.every, self.tolerance, self.timeout = window, every, tolerance, timeout
        self.samples: list[int] = []

    def add(self, value: int) -> bool:
        """Record a sample; True when the reading has settled."""
        self.samples.append(value)
        last = self.samples[-self.window :]
        if len(last) < self.window:
            return False
        return max(last) - min(last) <= max(64, self.tolerance * max(last))


def settle_rss(pids: Sequence[int], timeout: float = 15.0) -> int:
    settle = Settle(timeout=timeout)
    deadline = time.monotonic() + timeout
    while not settle.add(rss_kib(pids)) and time.monotonic() < deadline:
        time.sleep(settle.every)
    return settle.samples[-1]


# -- CPU pinning -------------------------------------------------------------------------


def _threads(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def set_affinity(pids: Iterable[int], cpus: set[int]) -> int:
    """Set the CPU affinity of every thread of every process in ``pids``; returns how
    many threads were set. ``os.getpid()`` may be among them (the bench itself)."""
    count = 0
    for pid in pids:
        for tid in _threads(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.sched_setaffinity(tid, cpus)
                count += 1
    return count


@contextlib.contextmanager
def pinned(pids: Callable[[], list[int]], cpu: int, restore: set[int]) -> Iterator[int]:
    """Pin all threads of ``pids()`` (called again on the way out, to catch processes
    forked meanwhile) to ``cpu``; restore ``restore`` afterwards. Yields the thread count."""
    count = set_affinity(pids(), {cpu})
    try:
        yield count
    finally:
        set_affinity(pids(), restore)


# -- tools and machine -------------------------------------------------------------------


def which(tool: str, *extra_dirs: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    for directory in extra_dirs:
        path = Path(directory) / tool
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def tool_version(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def git_state(repo: Path) -> str:
    """Which tunnelgate code ran: the commit, and whether src/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "src"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout?)"
    return f"{head} + uncommitted changes in {len(dirty)} file(s) of src/" if dirty else head


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def cpu_busy(seconds: float = 1.0) -> float:
    """The share of all CPUs busy over ``seconds`` (0..1): is someone else using the machine?"""
    busy0, total0 = _cpu_times()
    time.sleep(seconds)
    busy1, total1 = _cpu_times()
    return (busy1 - busy0) / max(1, total1 - total0)


def machine() -> dict[str, str | int]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"
    return {
        "nproc": os.cpu_count() or 0,
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory": mem,
        "kernel": os.uname().release,
    }
