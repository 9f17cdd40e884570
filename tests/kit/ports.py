"""Ports without guessing which one is free. Our own listeners take port 0 and
read back what the kernel gave; a test that needs that port again (a successor
agent, a restarted gateway) asks for exactly that one. A port that must refuse
connections is held bound and never listening, so nobody can take it meanwhile.
A program that cannot listen on port 0 (redis-server, nginx) is started on a
candidate port below the kernel's ephemeral range, where neither port 0 nor an
outgoing connection ever lands, and on another one if that one is in use. No
port is ever probed free, closed, and handed on: another test running at the
same time could take it in between."""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kit.processes import Proc
from kit.waiting import DEADLINE

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
CANDIDATES = 12000  # ports below the ephemeral range to choose from
TRIES = 8  # candidate ports tried before giving up
ADDRESS_IN_USE = re.compile(r"address already in use", re.IGNORECASE)
_LISTEN_STATE = "0A"  # TCP_LISTEN in /proc/net/tcp


@contextlib.contextmanager
def refusing_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port on which connections are refused for as long as the block runs:
    bound (without SO_REUSEADDR, so nobody else can bind it) and never listening."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as holder:
        holder.bind((host, 0))
        yield int(holder.getsockname()[1])


def _below_ephemeral() -> range:
    """Ports the kernel never hands out by itself (for port 0 or a connect)."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(EPHEMERAL_RANGE.read_text().split()[0])
    return range(max(1024, low - CANDIDATES), low)


def candidate_ports() -> list[int]:
    """Ports to offer a program that cannot listen on port 0, in random order."""
    return random.sample(_below_ephemeral(), TRIES)


def unassigned_ports(size: int) -> range:
    """``size`` consecutive ports below the kernel's ephemeral range, at a random
    place: an ``allow_ports`` policy from which the gateway must pick a port
    itself (the kernel's pick for port 0 is never in it; the gateway passes
    over a port another program holds)."""
    below = _below_ephemeral()
    start = random.randrange(below.start, below.stop - size)
    return range(start, start + size)


def port_range_spec(ports: range) -> str:
    """``ports`` as an ``allow_ports`` item: ``"FIRST-LAST"``."""
    return f"{ports.start}-{ports.stop - 1}"


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (from /proc; IPv4 and IPv6)."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            if match := re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{name}")):
                inodes.add(match.group(1))
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/net/{table}") as rows:
            next(rows)  # the header
            for row in rows:
                fields = row.split()
                if fields[3] == _LISTEN_STATE and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def start_listening(start: Callable[[int], Proc], timeout: float = DEADLINE) -> tuple[Proc, int]:
    """``start(port)`` on candidate ports until the process listens on its port
    (it said it is in use: the next candidate); returns the process and its port."""
    for port in candidate_ports():
        proc = start(port)
        deadline = time.monotonic() + timeout
        while proc.popen.poll() is None and port not in listening_ports(proc.popen.pid):
            if time.monotonic() > deadline:
                pytest.fail(f"not listening on port {port} after {timeout} s\n{proc.describe()}")
            time.sleep(0.02)  # polling interval under a deadline
        if proc.popen.poll() is None:
            return proc, port
        proc.stop()
        if not any(ADDRESS_IN_USE.search(line) for line in proc.stdout + proc.stderr):
            pytest.fail(f"exited instead of listening on port {port}\n{proc.describe()}")
    pytest.fail(f"the {TRIES} candidate ports tried were all in use")
