"""Where a round trip's microseconds go: ``.venv/bin/python bench/rtt_profile.py``.

First, in this process, the parts one at a time, warm (``timeit``, the best of 7
runs): system calls as Python makes them on loopback TCP and TLS, and the relay's
pumps with their streams stubbed (their own Python). Then, for each candidate, it
starts the echo service and the candidate as the bench does (``candidates.py``),
pins every process to one CPU as the bench's pinned figure does, and drives one
connection with sequential 64-byte round trips (the bench's own client):

    time      p50 and p99 of N round trips, nothing attached
    cpu       CPU time per round trip of each process (/proc/PID/task/*/schedstat)
              and its context switches
    syscalls  system calls per round trip of each tunnel process, by name
              (``strace -c -f``, attached only for this phase)
    profile   the pinned CPU sampled (``perf record -a -C CPU -g``): each sample goes
              to a process and a part (Python, TLS, the event loop, each system
              call, the loopback delivery to the receiver inside a send, the
              context switch); each process's parts are its shares of the samples
              times its CPU time from ``cpu`` (perf's own interrupts left out)
    trace     with ``--trace N``: the system calls of N round trips, in order

Everything on one CPU runs one step after another, so the parts add up to the
round trip. strace slows its tracees but not what they call. Needs strace and
perf (linux-perf); without one, its phase says so and the rest runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import measure
import system
import uvloop
from candidates import CANDIDATES, Candidate, EchoService, SshR, Tunnelgate

PIN_CPU = min(os.sched_getaffinity(0))
ALL_CPUS = os.sched_getaffinity(0)
SIZE = 64
ATTACH_WAIT = 0.5  # seconds for strace or perf to attach before the round trips start

# Kernel functions that name the system call a sample of kernel time is in (the
# outermost that matches), and those that say what it was doing inside it.
_SYSCALL = re.compile(r"^(?:__(?:x64|se|do)_sys_|__sys_|ksys_|do_)(\w+)$")
_SYSCALL_NAMES = {  # several entry points, one name in the table
    "recvfrom": "recv", "recvmsg": "recv", "read": "recv",
    "sendto": "send", "sendmsg": "send", "write": "send", "writev": "send",
    "epoll_wait": "epoll_wait", "epoll_pwait": "epoll_wait",
    "epoll_ctl": "epoll_ctl", "splice": "splice",
}  # fmt: skip
_DELIVERY = {  # in a send on loopback: the receiver's TCP runs, then wakes the receiver
    "net_rx_action", "__netif_receive_skb", "process_backlog", "handle_softirqs",
    "tcp_v4_rcv", "sock_def_readable", "ep_poll_callback", "try_to_wake_up",
}  # fmt: skip
_KERNEL_ENTRY = (
    "entry_SYSCALL",
    "do_syscall",
    "x64_sys_call",
    "exit_to_user",
    "__rseq",
    "__get_user",
    "__put_user",
)
_WRAPPERS = (("epoll_", "epoll_wait"), ("recv", "recv"), ("read", "recv"), ("send", "send"),
             ("write", "send"), ("splice", "splice"))  # fmt: skip
_SWITCH = {"__schedule", "finish_task_switch", "schedule_tail"}
TIMER_PART = "perf's own timer interrupts"
_TIMER = {
    "asm_sysvec_apic_timer_interrupt",
    "sysvec_apic_timer_interrupt",
    "hrtimer_interrupt",
    "__sysvec_apic_timer_interrupt",
}
USER_PARTS = (  # shared object (a substring of its path) -> part, the first that matches
    ("libssl", "TLS"), ("libcrypto", "TLS"), ("_ssl.", "TLS"),
    ("uvloop", "event loop"), ("libuv", "event loop"),
    ("libpython", "Python"), ("python3", "Python"), ("/lib-dynload/", "Python"),
    ("libc.so", "libc"), ("libc-", "libc"), ("ld-linux", "libc"),
    ("sshd", "ssh"), ("/ssh", "ssh"),
)  # fmt: skip


def processes_of(candidate: Candidate, echo: EchoService) -> dict[int, str]:
    """pid -> role, for every process that takes part in a round trip."""
    roles = {os.getpid(): "client", echo.proc.pid: "echo service"}
    if isinstance(candidate, Tunnelgate):
        for proc in candidate.procs:
            roles[proc.pid] = proc.name
    elif isinstance(candidate, SshR):
        if candidate.ssh is not None:
            roles[candidate.ssh.pid] = "ssh"
        for pid in candidate.processes():
            roles.setdefault(pid, "sshd")
    return roles


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in ns."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError):  # a thread that just ended
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def switches(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        total += sum(int(n) for n in re.findall(r"_ctxt_switches:\s+(\d+)", status))
    return total


class Driver:
    """One client connection of 64-byte round trips (the bench's client), run in
    bursts on one uvloop event loop."""

    def __init__(self, port: int) -> None:
        self.loop = uvloop.new_event_loop()
        self.client = self.loop.run_until_complete(measure._connect(port))
        self.payload = bytes(range(SIZE))

    def round_trips(self, count: int) -> list[float]:
        async def run() -> list[float]:
            samples = []
            clock = time.perf_counter_ns
            for _ in range(count):
                start = clock()
                await self.client.echo(self.payload)
                samples.append((clock() - start) / 1000)
            return samples

        return self.loop.run_until_complete(asyncio.wait_for(run(), 120))

    def close(self) -> None:
        self.client.close()
        self.loop.run_until_complete(asyncio.sleep(0.05))
        self.loop.close()


def attached(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    time.sleep(ATTACH_WAIT)
    return proc


def detach(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the phases ---------------------------------------------------------------------------------


def phase_time(driver: Driver, count: int) -> dict[str, float]:
    ordered = sorted(driver.round_trips(count))
    return {
        "p50": measure.percentile(ordered, 50),
        "p99": measure.percentile(ordered, 99),
        "mean": sum(ordered) / len(ordered),
    }


def phase_cpu(driver: Driver, roles: dict[int, str], count: int) -> dict[str, tuple[float, float]]:
    """role -> (CPU µs per round trip, context switches per round trip)."""
    before = {pid: (cpu_ns(pid), switches(pid)) for pid in roles}
    driver.round_trips(count)
    after = {pid: (cpu_ns(pid), switches(pid)) for pid in roles}
    found: dict[str, tuple[float, float]] = {}
    for pid, role in roles.items():
        cpu = (after[pid][0] - before[pid][0]) / 1000 / count
        cs = (after[pid][1] - before[pid][1]) / count
        old = found.get(role, (0.0, 0.0))
        found[role] = (old[0] + cpu, old[1] + cs)
    return found


def phase_syscalls(
    driver: Driver, roles: dict[int, str], count: int, workdir: Path
) -> dict[str, Counter[str]] | str:
    """role -> system call -> calls per round trip (the client and the echo service left out)."""
    strace = shutil.which("strace")
    if strace is None:
        return "strace is missing: apt-get install strace"
    watched = {pid: role for pid, role in roles.items() if role not in ("client", "echo service")}
    tracers = {}
    for pid in watched:
        out = workdir / f"strace-{pid}.txt"
        argv = [strace, "-c", "-f", "-q", "-o", str(out), "-p", str(pid)]
        tracers[pid] = (attached(argv, workdir / f"strace-{pid}.err"), out)
    try:
        driver.round_trips(count)
    finally:
        for proc, _ in tracers.values():
            detach(proc)
    found: dict[str, Counter[str]] = defaultdict(Counter)
    for pid, (_, out) in tracers.items():
        for line in out.read_text().splitlines():
            fields = line.split()
            # % time, seconds, usecs/call, calls, [errors], syscall
            if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
                calls = int(fields[3])
                errors = int(fields[4]) if len(fields) == 6 else 0
                name = fields[-1]
                found[watched[pid]][name] += calls
                if errors:
                    found[watched[pid]][f"{name} (failed)"] += errors
    return {
        role: Counter({name: n / count for name, n in calls.items() if n >= count // 10})
        for role, calls in found.items()
    }


def kernel_part(frames: list[str]) -> str:
    """The part of a kernel sample, from its call chain (innermost frame first)."""
    call = ""
    for name in reversed(frames):
        if (found := _SYSCALL.match(name)) and found.group(1) in _SYSCALL_NAMES:
            call = _SYSCALL_NAMES[found.group(1)]
            break
        if found and name.startswith("__x64_sys_"):
            call = found.group(1)
            break
    else:  # at the entry or the exit: the C library's wrapper says which call
        wrapper = next((n for n in frames if not n.startswith(_KERNEL_ENTRY)), "")
        call = next((c for needle, c in _WRAPPERS if needle in wrapper), "")
    inside = set(frames)
    if inside & _SWITCH:
        return "context switch"
    if inside & _TIMER:
        return TIMER_PART
    if call in ("send", "splice") and inside & _DELIVERY:
        return f"{call}: delivery to the receiver"
    if call:
        return f"kernel: {call}"
    if "do_syscall_64" in inside:
        return "kernel: entry and exit"
    return "kernel: other"


def user_part(dso: str) -> str:
    for needle, part in USER_PARTS:
        if needle in dso:
            return part
    return "other user"


def phase_profile(
    driver: Driver, roles: dict[int, str], count: int, workdir: Path, frequency: int
) -> dict[str, Counter[str]] | str:
    """role -> part -> share of the role's samples (perf's own timer interrupts left out)."""
    perf = shutil.which("perf")
    if perf is None:
        return "perf is missing: apt-get install linux-perf"
    data = workdir / "perf.data"
    argv = [perf, "record", "-q", "-a", "-C", str(PIN_CPU), "-g", "-e", "cpu-clock"]
    argv += ["-F", str(frequency), "-o", str(data)]
    recorder = attached(argv, workdir / "perf-record.err")
    try:
        driver.round_trips(count)
    finally:
        detach(recorder)
    script = subprocess.run(
        [perf, "script", "-i", str(data), "-F", "pid,period,ip,sym,dso"],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    totals: dict[str, Counter[str]] = defaultdict(Counter)
    for block in script.stdout.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines:
            continue
        head = lines[0].split()
        try:
            pid, period = int(head[0]), int(head[1])
        except (IndexError, ValueError):
            continue
        frames = []
        dso = ""
        for line in lines[1:]:
            parts = line.split()
            if len(parts) < 2:
                continue
            sym = parts[1].split("+", 1)[0]
            if not dso:
                dso = parts[-1].strip("()")
            frames.append(sym)
        role = roles.get(pid, "idle" if pid == 0 else "other processes")
        part = kernel_part(frames) if "kernel" in dso else user_part(dso)
        totals[role][part] += period
    shares = {}
    for role, parts in totals.items():
        parts.pop(TIMER_PART, None)
        total = sum(parts.values())
        if role != "idle" and total:
            shares[role] = Counter({part: ns / total for part, ns in parts.items()})
    return shares


def phase_trace(driver: Driver, roles: dict[int, str], count: int, workdir: Path) -> str:
    strace = shutil.which("strace")
    if strace is None:
        return "strace is missing: apt-get install strace"
    watched = [pid for pid, role in roles.items() if role not in ("client", "echo service")]
    out = workdir / "trace.txt"
    argv = [strace, "-f", "-q", "-tt", "-o", str(out)]
    for pid in watched:
        argv += ["-p", str(pid)]
    tracer = attached(argv, workdir / "trace.err")
    try:
        driver.round_trips(count)
    finally:
        detach(tracer)
    names = {str(pid): role for pid, role in roles.items()}
    threads = {
        str(tid): role for pid, role in roles.items() for tid in os.listdir(f"/proc/{pid}/task")
    }
    lines = []
    for line in out.read_text().splitlines():
        tid, _, rest = line.partition(" ")
        who = threads.get(tid, names.get(tid, tid))
        lines.append(f"{who:>8}  {rest}")
    return "\n".join(lines)


# -- the parts, in this process ---------------------------------------------------------------


class _Stub:
    """A stream whose calls cost nothing but the Python call: for timing the pumps'
    own code. ``incoming`` is what each read returns."""

    def __init__(self, incoming: bytes = b"", again: bool = False) -> None:
        self.incoming = incoming
        self.again = again  # every second read finds nothing (a reader that reads on)
        self.reads_all_ready = not again
        self.turn = False

    def try_receive_into(self, buffer: memoryview) -> int:
        from tunnelgate.transport import WouldBlock

        self.turn = not self.turn
        if self.again and not self.turn:
            raise WouldBlock
        buffer[: len(self.incoming)] = self.incoming
        return len(self.incoming)

    def try_send(self, data: memoryview | bytes, more: bool = False) -> int:
        return len(data)


def _best(call: Callable[[], object], number: int = 20_000, repeat: int = 7) -> float:
    """µs per call: the best of ``repeat`` timings of ``number`` calls."""
    import timeit

    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


async def _parts() -> list[tuple[str, float]]:
    import socket

    from tunnelgate import relay, tls
    from tunnelgate.channel import Channel
    from tunnelgate.protocol.session import Side
    from tunnelgate.protocol.wire import HEADER_SIZE, pack_data_header
    from tunnelgate.transport import SocketStream, TLSStream, WouldBlock, poller

    def tcp_pair() -> tuple[socket.socket, socket.socket]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            one = socket.create_connection(listener.getsockname())
            two, _ = listener.accept()
        for sock in (one, two):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return one, two

    found = []
    payload = bytes(range(SIZE))
    frame = bytearray(HEADER_SIZE + SIZE)
    pack_data_header(frame, SIZE)
    frame[HEADER_SIZE:] = payload
    buffer = memoryview(bytearray(256 * 1024))

    # System calls as Python makes them, on loopback TCP.
    one, two = tcp_pair()
    found.append(
        (
            "send 64 B + recv it (socket methods)",
            _best(lambda: (one.send(payload), two.recv_into(buffer))),
        )
    )
    ready = poller(asyncio.get_running_loop())
    one.send(payload)  # two stays readable: a ready event on every poll
    ready.add_reader(two.fileno(), lambda: None)
    found.append(("Poller.dispatch: epoll_wait + one no-op callback", _best(ready.dispatch)))
    ready.remove_reader(two.fileno())
    two.recv_into(buffer)
    stream_one, stream_two = SocketStream(one), SocketStream(two)
    found.append((
        "SocketStream.try_send 64 B + try_receive_into",
        _best(lambda: (stream_one.try_send(payload), stream_two.try_receive_into(buffer))),
    ))  # fmt: skip

    def nothing() -> None:
        try:  # noqa: SIM105 (contextlib.suppress would be timed too)
            stream_two.try_receive_into(buffer)
        except WouldBlock:
            pass

    found.append(("SocketStream.try_receive_into finding nothing (EAGAIN)", _best(nothing)))

    # The same over TLS, as the gateway and an agent pinning it make it.
    with tempfile.TemporaryDirectory() as state:
        cert, key, _ = tls.ensure_self_signed(Path(state), [])
        pin = tls.certificate_fingerprint(cert)
        three, four = tcp_pair()
        server = TLSStream(SocketStream(three), tls.server_context(cert, key), server_side=True)
        client = TLSStream(SocketStream(four), tls.client_context(None, pin), server_side=False)
        await asyncio.gather(server.handshake(), client.handshake())
    found.append((
        "TLSStream.try_send 64 B + try_receive_into",
        _best(lambda: (client.try_send(payload), server.try_receive_into(buffer))),
    ))  # fmt: skip

    def tls_nothing() -> None:
        try:  # noqa: SIM105
            server.try_receive_into(buffer)
        except WouldBlock:
            pass

    found.append(("TLSStream.try_receive_into finding nothing (EAGAIN)", _best(tls_nothing)))

    # The pumps' own Python, their streams stubbed: one 64-byte message per call.
    five, six = tcp_pair()
    seven, eight = tcp_pair()
    for splice in (True, False):
        if not splice:
            os.environ["TUNNELGATE_NO_SPLICE"] = "1"
        channel = Channel(SocketStream(seven), Side.GATEWAY)
        state = relay._Relay(SocketStream(five), channel, "client", relay.RelayResult())
        path = state.result.path
        out, inbound = state.outbound, state.inbound
        out.src, out.dst = _Stub(payload), _Stub()  # type: ignore[assignment]
        inbound.src, inbound.dst = _Stub(bytes(frame)), _Stub()  # type: ignore[assignment]
        name_out, name_in = type(out).__name__, type(inbound).__name__
        found.append((f"{name_out}.on_readable ({path} path), Python only", _best(out.on_readable)))
        found.append(
            (f"{name_in}.on_readable ({path} path), Python only", _best(inbound.on_readable))
        )
        if not splice:
            inbound.src = _Stub(bytes(frame), again=True)  # type: ignore[assignment]
            found.append((
                f"{name_in}.on_readable, reading until nothing is left (TLS), Python only",
                _best(inbound.on_readable),
            ))  # fmt: skip
        state.stop()
    os.environ.pop("TUNNELGATE_NO_SPLICE", None)
    stub = _Stub()
    found.append(
        ("a stub stream's call (two in each pump line above)", _best(lambda: stub.try_send(b"")))
    )
    for sock in (one, two, three, four, five, six, seven, eight):
        sock.close()
    return found


def phase_parts() -> None:
    print(f"\n== the parts, in this process: µs per call (the best of 7 runs of 20,000), {SIZE} B")
    found = _uvloop_run(_parts())
    print(table([["call", "µs"], *([name, f"{us:.2f}"] for name, us in found)]))


def _uvloop_run(coro: object) -> list[tuple[str, float]]:
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(coro)  # type: ignore[arg-type]
    finally:
        loop.close()


# -- the report -------------------------------------------------------------------------------


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        out.append("| " + " | ".join(cells) + " |")
        if index == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def _scaled(shares: Counter[str], us: float) -> Counter[str]:
    return Counter({part: share * us for part, share in shares.items()})


def report_profile(profile: dict[str, Counter[str]]) -> str:
    order = ["client", "gateway", "agent", "ssh", "sshd", "echo service"]
    roles = sorted(profile, key=lambda r: order.index(r) if r in order else len(order))
    parts = Counter[str]()
    for role in roles:
        parts.update(profile[role])
    columns = [part for part, _ in parts.most_common() if parts[part] >= 0.05]
    rows = [["µs per round trip", *columns, "all"]]
    for role in roles:
        rows.append([role, *(f"{profile[role][c]:.1f}" for c in columns)])
        rows[-1].append(f"{sum(profile[role].values()):.1f}")
    rows.append(["all", *(f"{parts[c]:.1f}" for c in columns), f"{sum(parts.values()):.1f}"])
    return table(rows)


def profile_candidate(key: str, args: argparse.Namespace, workdir: Path) -> None:
    candidate = CANDIDATES[key]()
    if why := candidate.missing():
        print(f"== {candidate.label}: cannot run: {why}")
        return
    echo = EchoService(workdir)
    try:
        public = candidate.start(workdir, echo.port, system.free_port())
        roles = processes_of(candidate, echo)
        everyone: Callable[[], list[int]] = lambda: [*roles]  # noqa: E731
        with system.pinned(everyone, PIN_CPU, ALL_CPUS):
            driver = Driver(public.echo)
            try:
                driver.round_trips(args.warmup)
                report(candidate.label, driver, roles, args, workdir)
            finally:
                driver.close()
    finally:
        candidate.stop()
        echo.stop()


def report(
    label: str, driver: Driver, roles: dict[int, str], args: argparse.Namespace, workdir: Path
) -> None:
    n = args.round_trips
    print(f"\n== {label}, pinned to CPU {PIN_CPU}, {n} round trips of {SIZE} B per phase")
    timed = phase_time(driver, n)
    print(
        f"time: p50 {timed['p50']:.1f} µs, p99 {timed['p99']:.1f} µs, mean {timed['mean']:.1f} µs"
    )
    cpu = phase_cpu(driver, roles, n)
    rows = [["process", "CPU µs per round trip", "context switches per round trip"]]
    for role, (us, cs) in cpu.items():
        rows.append([role, f"{us:.1f}", f"{cs:.2f}"])
    rows.append(["all", f"{sum(u for u, _ in cpu.values()):.1f}", ""])
    print(table(rows))
    if "syscalls" not in args.skip:
        calls = phase_syscalls(driver, roles, min(n, args.traced), workdir)
        if isinstance(calls, str):
            print(f"syscalls: {calls}")
        else:
            names = sorted({name for counts in calls.values() for name in counts})
            rows = [["system calls per round trip", *calls, "all"]]
            for name in names:
                per_role = [calls[role][name] for role in calls]
                rows.append([name, *(f"{x:.2f}" for x in per_role), f"{sum(per_role):.2f}"])
            totals = [
                sum(v for k, v in counts.items() if "(failed)" not in k)
                for counts in calls.values()
            ]
            rows.append(["all", *(f"{t:.2f}" for t in totals), f"{sum(totals):.2f}"])
            print(table(rows))
    if "profile" not in args.skip:
        shares = phase_profile(driver, roles, n, workdir, args.frequency)
        if isinstance(shares, str):
            print(f"profile: {shares}")
        else:  # each process's shares of its CPU time measured without perf
            print(report_profile({r: _scaled(shares[r], cpu[r][0]) for r in cpu if r in shares}))
    if args.trace:
        print(phase_trace(driver, roles, args.trace, workdir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="tg-notls,tg-tls", help="candidates (tg-notls,tg-tls)")
    parser.add_argument("--round-trips", type=int, default=10_000, help="per phase (10000)")
    parser.add_argument("--traced", type=int, default=3_000, help="round trips under strace (3000)")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--frequency", type=int, default=5_000, help="perf samples/s (5000)")
    parser.add_argument("--skip", default="", help="phases to skip: parts,syscalls,profile")
    parser.add_argument("--trace", type=int, default=0, metavar="N", help="trace N round trips")
    args = parser.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    system.raise_nofile()
    if "parts" not in args.skip:
        phase_parts()
    for key in filter(None, args.only.split(",")):
        with tempfile.TemporaryDirectory(prefix=f"rtt-{key}-") as tmp:
            try:
                profile_candidate(key, args, Path(tmp))
            finally:
                system.stop_all()


if __name__ == "__main__":
    main()
