"""The candidates: how to start, inspect and stop each way of reaching the services.

Every candidate gets the same two private services (the echo service and an
iperf3 server port) and returns two public ports that lead to them. For
``direct`` the public ports are the services themselves; the tunnels expose
both in one tunnel (one agent, one ssh session).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import measure
from system import (
    BenchError,
    Proc,
    descendants,
    first_death,
    free_port,
    kill_pids,
    listening,
    wait_until,
    which,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TUNNELGATE = REPO / ".venv" / "bin" / "tunnelgate"
READY_TIMEOUT = 30.0
TOKEN = "bench-token-not-a-secret-0123456789"


@dataclass(frozen=True)
class Public:
    """Where clients connect: the public ports for the echo service and for iperf3."""

    echo: int
    iperf: int


class EchoService:
    """The echo service (bench/echo.py), its own process on a fresh port."""

    def __init__(self, logdir: Path) -> None:
        self.proc = Proc("echo", [sys.executable, str(BENCH_DIR / "echo.py")], logdir)
        wait_until("the echo service", lambda: "listening on" in self.proc.stdout(), 10)
        self.port = int(self.proc.stdout().split("listening on", 1)[1].split()[0])

    def stop(self) -> None:
        self.proc.stop()


def tunnelgate_env() -> dict[str, str]:
    """The environment of tunnelgate's processes: the bench's, with the token, and with
    bytecode caches on as where tunnelgate is installed (PYTHONDONTWRITEBYTECODE would
    make every start compile each module again, which costs time and memory)."""
    env = {**os.environ, "TUNNELGATE_TOKEN": TOKEN}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


class Candidate:
    key = ""
    label = ""
    rss_note = ""  # which processes the RSS figures add up

    def missing(self) -> str | None:
        """Why this candidate cannot run here (a tool is missing, and how to install it)."""
        return None

    def start(self, workdir: Path, echo_port: int, iperf_port: int) -> Public:
        raise NotImplementedError

    def processes(self) -> list[int]:
        """Every process of the candidate (for CPU pinning)."""
        return []

    def rss_processes(self) -> list[int]:
        """The processes whose RSS the figures add up."""
        return self.processes()

    def rss_sides(self) -> dict[str, list[int]]:
        """The same processes by side, "gateway" (public) and "agent" (private); empty if
        the candidate has no sides."""
        return {}

    def startup(self, workdir: Path, runs: int) -> dict[str, Any] | None:
        """Start-up times (``measure.startup``), or None if the candidate has no command
        of its own to time."""
        return None

    def gone(self) -> str | None:
        """None while the candidate runs; otherwise which process died and its last log."""
        return None

    def stop(self) -> None:
        pass

    def logs(self) -> list[Path]:
        return []


class Direct(Candidate):
    """No tunnel: clients connect to the services themselves (the limit)."""

    key = "direct"
    label = "direct"
    rss_note = "no tunnel processes"

    def start(self, workdir: Path, echo_port: int, iperf_port: int) -> Public:
        return Public(echo_port, iperf_port)


class Tunnelgate(Candidate):
    """tunnelgate gateway + agent, started through the real CLI (.venv/bin/tunnelgate)."""

    rss_note = "gateway + agent"

    def __init__(self, tls: bool, admin: bool = False) -> None:
        self.tls = tls
        self.admin = admin  # the admin listener on both sides, the gateway's scraped each second
        self.key = ("tg-tls" if tls else "tg-notls") + ("-admin" if admin else "")
        self.label = ("tunnelgate TLS" if tls else "tunnelgate --no-tls") + (
            " + admin, scraped" if admin else ""
        )
        self.procs: list[Proc] = []
        self.scraping = threading.Event()

    def missing(self) -> str | None:
        if not TUNNELGATE.exists():
            return f"{TUNNELGATE} not found: run `make` first"
        return None

    def start(self, workdir: Path, echo_port: int, iperf_port: int) -> Public:
        env = tunnelgate_env()
        plain = [] if self.tls else ["--no-tls"]
        admin = ["--admin", "127.0.0.1:0"] if self.admin else []
        gateway = Proc(
            "gateway",
            [str(TUNNELGATE), "gateway", "--listen", "127.0.0.1:0", *plain, *admin,
             "--state-dir", str(workdir / "state"), "--log-level", "warning"],
            workdir, env,
        )  # fmt: skip
        self.procs.append(gateway)

        def banner_done() -> bool:
            if not gateway.alive():
                raise BenchError(gateway.died())
            return "run an agent with:" in gateway.stdout()

        wait_until("the gateway's banner", banner_done, READY_TIMEOUT)
        banner = gateway.stdout()
        found = re.search(r"listening on \S*:(\d+)", banner)
        if not found:
            raise BenchError(f"no control port in the gateway's banner:\n{banner}")
        trust = ["--no-tls"]
        if self.tls:
            fingerprint = re.search(r"certificate fingerprint: (SHA256:[0-9A-F]+)", banner)
            if not fingerprint:
                raise BenchError(f"no fingerprint in the gateway's banner:\n{banner}")
            trust = ["--fingerprint", fingerprint.group(1)]

        public = Public(free_port(), free_port())
        agent = Proc(
            "agent",
            [str(TUNNELGATE), "agent", "--gateway", f"127.0.0.1:{found.group(1)}", *trust,
             "--name", "bench", "--log-level", "warning", *admin,
             "--expose", f"{public.echo}:127.0.0.1:{echo_port}",
             "--expose", f"{public.iperf}:127.0.0.1:{iperf_port}"],
            workdir, env,
        )  # fmt: skip
        self.procs.append(agent)
        measure.wait_echo(public.echo, READY_TIMEOUT, self.gone)
        if self.admin:
            url = re.search(r"admin: (http://\S+)", gateway.stdout())
            if not url:
                raise BenchError(f"no admin address in the gateway's banner:\n{banner}")
            scraper = threading.Thread(target=self._scrape, args=(url.group(1) + "metrics",))
            scraper.daemon = True
            scraper.start()
        return public

    def _scrape(self, url: str) -> None:
        """What Prometheus does: GET /metrics once a second, while the candidate runs."""
        while not self.scraping.wait(1.0):
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
                answer.read()

    def processes(self) -> list[int]:
        return [p.pid for p in self.procs if p.alive()]

    def rss_sides(self) -> dict[str, list[int]]:
        return {p.name: [p.pid] for p in self.procs if p.alive()}

    def startup(self, workdir: Path, runs: int) -> dict[str, Any]:
        """``tunnelgate --version``, and a gateway of this candidate's kind (TLS or not)
        until its control port accepts."""
        env = tunnelgate_env()
        plain = [] if self.tls else ["--no-tls"]
        state = workdir / "startup-state"

        def gateway(port: int) -> list[str]:
            return [str(TUNNELGATE), "gateway", "--listen", f"127.0.0.1:{port}", *plain,
                    "--state-dir", str(state), "--log-level", "warning"]  # fmt: skip

        return measure.startup([str(TUNNELGATE), "--version"], gateway, env, runs, workdir)

    def gone(self) -> str | None:
        return first_death(self.procs)

    def stop(self) -> None:
        self.scraping.set()
        for proc in reversed(self.procs):  # the agent first: it says goodbye
            proc.stop()

    def logs(self) -> list[Path]:
        return [p.stderr_path for p in self.procs]


CIPHER = "aes128-gcm@openssh.com"


class SshR(Candidate):
    """OpenSSH remote forwarding (ssh -R) against a private sshd on a free loopback port."""

    key = "ssh"
    label = "ssh -R"
    rss_note = "ssh client + the sshd session processes (not the listening sshd)"

    def __init__(self) -> None:
        self.sshd_path = which("sshd", "/usr/sbin", "/usr/local/sbin")
        self.ssh_path = which("ssh")
        self.keygen = which("ssh-keygen")
        self.sshd: Proc | None = None
        self.ssh: Proc | None = None

    def missing(self) -> str | None:
        absent = [
            name
            for name, path in (("sshd", self.sshd_path), ("ssh", self.ssh_path),
                               ("ssh-keygen", self.keygen))
            if path is None
        ]  # fmt: skip
        if absent:
            return (
                f"{', '.join(absent)} not installed: apt-get install openssh-server openssh-client"
            )
        return None

    def start(self, workdir: Path, echo_port: int, iperf_port: int) -> Public:
        assert self.sshd_path and self.ssh_path and self.keygen
        for key in ("host_key", "user_key"):
            subprocess.run(
                [self.keygen, "-q", "-t", "ed25519", "-N", "", "-C", "bench",
                 "-f", str(workdir / key)],
                check=True, timeout=30, capture_output=True,
            )  # fmt: skip
        (workdir / "authorized_keys").write_text((workdir / "user_key.pub").read_text())
        port = free_port()
        config = workdir / "sshd_config"
        config.write_text(
            f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {workdir / "host_key"}
PidFile {workdir / "sshd.pid"}
AuthorizedKeysFile {workdir / "authorized_keys"}
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
GatewayPorts clientspecified
Ciphers {CIPHER}
MaxStartups 1000
UseDNS no
PrintMotd no
LogLevel ERROR
"""
        )
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
        self.sshd = Proc("sshd", [self.sshd_path, "-D", "-e", "-f", str(config)], workdir)
        sshd = self.sshd

        def sshd_listening() -> bool:
            if not sshd.alive():
                raise BenchError(sshd.died())
            return listening(port)

        wait_until(f"sshd on port {port}", sshd_listening, READY_TIMEOUT)

        public = Public(free_port(), free_port())
        self.ssh = Proc(
            "ssh",
            [self.ssh_path, "-N", "-F", "/dev/null",
             "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "ExitOnForwardFailure=yes",
             "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
             "-c", CIPHER, "-i", str(workdir / "user_key"), "-p", str(port),
             "-R", f"127.0.0.1:{public.echo}:127.0.0.1:{echo_port}",
             "-R", f"127.0.0.1:{public.iperf}:127.0.0.1:{iperf_port}",
             f"{getpass.getuser()}@127.0.0.1"],
            workdir,
        )  # fmt: skip
        measure.wait_echo(public.echo, READY_TIMEOUT, self.gone)
        return public

    def _session(self) -> list[int]:
        return descendants(self.sshd.pid) if self.sshd and self.sshd.alive() else []

    def processes(self) -> list[int]:
        pids = [p.pid for p in (self.ssh, self.sshd) if p is not None and p.alive()]
        return pids + self._session()

    def rss_processes(self) -> list[int]:
        pids = [self.ssh.pid] if self.ssh is not None and self.ssh.alive() else []
        return pids + self._session()

    def rss_sides(self) -> dict[str, list[int]]:
        """sshd's session processes hold the public ports (the gateway's side); the ssh
        client reaches the services (the agent's)."""
        client = [self.ssh.pid] if self.ssh is not None and self.ssh.alive() else []
        return {"gateway": self._session(), "agent": client}

    def gone(self) -> str | None:
        return first_death((self.sshd, self.ssh))

    def stop(self) -> None:
        session = self._session()
        if self.ssh is not None:
            self.ssh.stop()
        if self.sshd is not None:
            self.sshd.stop()
        # sshd's session processes leave the master's process group (setsid): after the
        # client went away they exit by themselves; wait a moment, then make sure.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in session):
            time.sleep(0.05)
        kill_pids(p for p in session if Path(f"/proc/{p}").exists())

    def logs(self) -> list[Path]:
        return [p.stderr_path for p in (self.sshd, self.ssh) if p is not None]


# A fresh object for every start: nothing carries over from one round to the next.
CANDIDATES: dict[str, Callable[[], Candidate]] = {
    "direct": Direct,
    "tg-notls": lambda: Tunnelgate(tls=False),
    "tg-tls": lambda: Tunnelgate(tls=True),
    "tg-tls-admin": lambda: Tunnelgate(tls=True, admin=True),
    "ssh": SshR,
}
