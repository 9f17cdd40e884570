"""A TCP proxy between an agent and its gateway that fails on purpose.

The agent dials :attr:`FaultProxy.address` instead of the gateway; every
connection it opens is forwarded to the gateway until a test (or a soak run)
breaks it. The faults are the ones real networks and middleboxes produce:

- :meth:`~FaultProxy.reset` and :meth:`~FaultProxy.shutdown`: both ends get an
  RST, or a FIN, at once;
- :meth:`~FaultProxy.blackhole`: a cut path (a dead NAT mapping, a pulled
  cable): nothing more is forwarded either way and nothing is closed;
- :meth:`~FaultProxy.cut`: one direction only goes silent;
- :meth:`~FaultProxy.delay` and :meth:`~FaultProxy.throttle`: latency and a
  bandwidth cap, per connection and direction;
- :meth:`~FaultProxy.close_after`: a FIN or an RST after so many more bytes;
- :meth:`~FaultProxy.refuse`: new connections are reset at once.

Each fault applies to the open connections (``existing``), to the ones
accepted from then on (``new``, until :meth:`~FaultProxy.restore`), or both,
and can be limited to one kind of connection: the agent's control channel or
its data channels. ``connections=[...]`` picks open connections by hand
instead (no rule for new ones then).

**How a connection's kind is known.** The proxy never reads the bytes (under
TLS it could not): it relies on the agent's order of work. An agent opens its
control channel first, its data channels only after the gateway's Welcome,
and a new control channel only after the previous one has ended on its side.
So a connection accepted while no ``control`` connection of this proxy is
still open on the agent's side is the control channel; any other is a data
channel. This holds for **one agent per proxy** only; give each agent its own
proxy. (A data channel the agent started just before its session ended may
be accepted late and count as ``control``; it is dead on arrival.)

**What is passed on.** Without a fault, bytes are forwarded in order, a FIN
as a FIN (half-close: the other direction keeps flowing), and a reset as a
reset, never as a clean FIN: tunnelgate must make truncation visible, and a
proxy that turned resets into FINs would hide exactly what the tests look
for. A reset travels behind the bytes still delayed in its direction, but
never waits for a receiver that does not read (the sender's unsent bytes are
lost, as with TCP). A failed connect to the gateway resets the agent's side.

**Backpressure.** Each direction queues at most about ``HIGH_WATER`` bytes;
beyond that the proxy stops reading from the sender until the queue has
drained to ``LOW_WATER``, so a delayed or throttled direction slows the sender
down instead of filling memory.

The proxy is plain asyncio (the stock loop or uvloop) and needs no pytest:
``tests/soak.py`` imports it too. Every task it starts is tracked and
cancelled by :meth:`FaultProxy.aclose`, which also resets every connection
still open and re-raises the first unexpected error of a proxy task.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import termios
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final, Literal

from tunnelgate import Address

Kind = Literal["control", "data"]
Direction = Literal["up", "down"]  # up: agent -> gateway; down: gateway -> agent
CloseHow = Literal["fin", "rst"]

HIGH_WATER: Final = 1 << 20  # bytes queued in one direction before the sender is paused
LOW_WATER: Final = 256 << 10  # ... and resumed
THROTTLE_STEP: Final = 0.02  # seconds of a throttled direction's traffic per write
THROTTLE_SLACK: Final = 0.05  # lateness of a write made up for; idle time earns no burst
CONNECT_TIMEOUT: Final = 10.0  # for the connection to the gateway
FLUSH_TIMEOUT: Final = 1.0  # close_after(how="rst"): longest wait for the last bytes to leave
FLUSH_POLL_INTERVAL: Final = 0.005
CLOSE_TIMEOUT: Final = 5.0  # for the loop to report a reset connection closed
TCP_ESTABLISHED: Final = 1  # tcpi_state in TCP_INFO
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


# --- closing transports and stream writers abnormally ------------------------


def reset_transport(transport: asyncio.WriteTransport) -> None:
    """Close a connection with an RST (SO_LINGER 0), dropping what is buffered."""
    sock = transport.get_extra_info("socket")
    # Once closing, uvloop may have closed the descriptor already, and its
    # number may belong to another socket by now: leave it alone then.
    if sock is not None and not transport.is_closing():
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    with contextlib.suppress(RuntimeError):  # uvloop: the handle is closed
        transport.abort()


def shutdown_transport(transport: asyncio.BaseTransport) -> None:
    """Send a FIN at once (``shutdown(SHUT_WR)``), behind the transport's back:
    what the transport still buffers is never sent.

    uvloop's transport socket has no ``shutdown()``, so this shuts down a
    duplicate of its file descriptor: the same socket on either loop.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        return
    with (
        contextlib.suppress(OSError, ValueError),  # closed under us
        socket.socket(fileno=os.dup(sock.fileno())) as duplicate,
    ):
        duplicate.shutdown(socket.SHUT_WR)


def reset_writer(writer: asyncio.StreamWriter) -> None:
    """Close a stream connection with an RST (SO_LINGER 0)."""
    reset_transport(writer.transport)


def shutdown_writer(writer: asyncio.StreamWriter) -> None:
    """Send a FIN on a stream connection at once; see :func:`shutdown_transport`."""
    shutdown_transport(writer.transport)


def _unsent_bytes(transport: asyncio.WriteTransport) -> int:
    """Bytes written to ``transport`` that its peer has not acknowledged yet."""
    waiting = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and not transport.is_closing():
        with contextlib.suppress(OSError, ValueError):
            # SIOCOUTQ (Linux, = TIOCOUTQ): the kernel's send queue, unacknowledged bytes.
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            waiting += struct.unpack("i", queued)[0]
    return waiting


# --- one socket of a proxied connection -----------------------------------------


class _Half(asyncio.Protocol):
    """One socket of a proxied connection (the agent's or the gateway's side)."""

    def __init__(self, conn: ProxiedConnection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.eof = False  # the peer sent a FIN
        self.lost = False  # the loop reported the socket closed
        self.closing = False  # the proxy closed, reset or shut it down
        self.paused = False  # reading paused for backpressure
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed = asyncio.Event()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.conn._made(self)

    def data_received(self, data: bytes) -> None:
        self.conn._received(self, data)

    def eof_received(self) -> bool:
        self.eof = True
        self.conn._eof(self)
        return True  # keep the other direction open (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.writable.set()  # wake a writer waiting on this side
        self.closed.set()
        self.conn._lost(self, exc)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # what the proxy does with it

    @property
    def usable(self) -> bool:
        """Connected, and neither closed nor being closed."""
        return self.transport is not None and not self.lost and not self.closing

    @property
    def agent_side_open(self) -> bool:
        """For the agent's side: the agent has not closed it (as far as the proxy
        can tell, asking the kernel too, since the loop may not have said yet)."""
        if not self.usable or self.eof:
            return False
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return True
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        except (OSError, ValueError, AttributeError):
            return True
        return bool(info[0] == TCP_ESTABLISHED)

    def write(self, data: bytes) -> None:
        if self.usable:
            assert self.transport is not None
            with contextlib.suppress(RuntimeError):  # uvloop: closed under us
                self.transport.write(data)

    def write_eof(self) -> None:
        if self.usable:
            assert self.transport is not None
            with contextlib.suppress(RuntimeError, OSError):
                self.transport.write_eof()

    def pause(self) -> None:
        if not self.paused and self.usable:
            assert self.transport is not None
            self.paused = True
            with contextlib.suppress(RuntimeError):
                self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.usable:
            assert self.transport is not None
            self.paused = False
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    def reset(self) -> None:
        if self.transport is not None and not self.lost:
            reset_transport(self.transport)
        self.closing = True

    def shutdown(self) -> None:
        """FIN now; keep reading (and dropping) until the peer closes too."""
        if self.usable:
            assert self.transport is not None
            self.resume()
            shutdown_transport(self.transport)

    def close(self) -> None:
        if self.usable:
            assert self.transport is not None
            self.closing = True
            self.transport.close()


# --- one direction of a proxied connection ---------------------------------------


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_EOF: Final = _Marker("EOF")
_RESET: Final = _Marker("RESET")


class _Pipe:
    """One direction: what ``source`` sends, queued, delayed, throttled, then
    written to ``dest`` in order by :meth:`run`."""

    def __init__(
        self, conn: ProxiedConnection, source: _Half, dest: _Half, direction: Direction
    ) -> None:
        self.conn = conn
        self.source = source
        self.dest = dest
        self.direction = direction
        self.queue: deque[tuple[float, bytes | _Marker]] = deque()  # (due time, item)
        self.queued = 0  # bytes in the queue
        self.wakeup = asyncio.Event()
        self.delay = 0.0
        self.rate: int | None = None  # bytes per second
        self.cut = False
        self.next_send = 0.0  # throttle: the loop time the next write may start
        self.finished = False  # EOF or RST passed on, or the destination is gone
        self.urgent = False  # a reset is queued: stop waiting for the destination
        self.running = False  # the writer runs (the gateway's side is connected)

    @property
    def dropping(self) -> bool:
        conn = self.conn
        return (
            self.cut
            or conn.blackholed
            or conn._stopped is not None
            or self.finished
            or self.dest.lost
            or self.dest.closing
        )

    def _fast(self) -> bool:
        """The item can be written at once, bypassing the queue (order is kept)."""
        return (
            self.running
            and not self.queue
            and self.delay == 0
            and self.rate is None
            and self.conn._budget is None
            and self.dest.writable.is_set()
        )

    def _append(self, item: bytes | _Marker) -> None:
        loop = asyncio.get_running_loop()
        self.queue.append((loop.time() + self.delay, item))
        if isinstance(item, bytes):
            self.queued += len(item)
            if self.queued > HIGH_WATER:
                self.source.pause()
        self.wakeup.set()

    def feed(self, data: bytes) -> None:
        if self.dropping:
            return
        if self._fast():
            self._write(data)
        else:
            self._append(data)

    def feed_eof(self) -> None:
        if self.dropping:
            return
        if self._fast():
            self._deliver_eof()
        else:
            self._append(_EOF)

    def feed_reset(self) -> None:
        """The source was reset: pass it on, behind what is still delayed."""
        if self.cut or self.conn.blackholed or self.conn._stopped is not None:
            return  # the path hides it
        if self.finished or (self.running and not self.queue and self.delay == 0):
            self.finished = True
            self.conn._reset_half(self.dest)
            return
        self.urgent = True
        self._append(_RESET)

    def drop(self) -> None:
        """Forget what is queued; read (and drop) from the source again."""
        self.queue.clear()
        self.queued = 0
        self.urgent = False
        self.source.resume()
        self.wakeup.set()

    def _write(self, data: bytes) -> None:
        self.dest.write(data)
        self.conn.forwarded += len(data)
        if self.direction == "up":
            self.conn.up_bytes += len(data)
        else:
            self.conn.down_bytes += len(data)

    def _deliver_eof(self) -> None:
        self.finished = True
        self.dest.write_eof()
        self.conn._check_done()

    async def run(self) -> None:
        """Write what is queued to the destination, each item when it is due."""
        loop = asyncio.get_running_loop()
        conn = self.conn
        self.running = True
        try:
            while not (
                self.finished
                or conn.blackholed
                or conn._stopped is not None
                or self.dest.lost
                or self.dest.closing
            ):
                if not self.queue:
                    self.wakeup.clear()
                    await self.wakeup.wait()
                    continue
                due, item = self.queue[0]
                now = loop.time()
                if due > now:
                    await asyncio.sleep(due - now)
                    continue
                if item is _RESET:
                    self.queue.popleft()
                    self.finished = True
                    conn._reset_half(self.dest)
                    return
                if item is _EOF:
                    self.queue.popleft()
                    self._deliver_eof()
                    return
                assert isinstance(item, bytes)
                if not self.urgent and not self.dest.writable.is_set():
                    await self.dest.writable.wait()
                    continue
                size = len(item)
                if self.rate is not None and not self.urgent:
                    if self.next_send > now:
                        await asyncio.sleep(self.next_send - now)
                        continue
                    size = min(size, max(1, int(self.rate * THROTTLE_STEP)))
                    base = self.next_send if now - self.next_send < THROTTLE_SLACK else now
                    self.next_send = base + size / self.rate
                size = conn._spend(size)
                if size == len(item):
                    self.queue.popleft()
                    self._write(item)
                else:
                    self.queue[0] = (due, item[size:])
                    self._write(item[:size])
                self.queued -= size
                if self.queued <= LOW_WATER:
                    self.source.resume()
                conn._check_budget()
        finally:
            self.running = False


# --- a proxied connection ------------------------------------------------------------


class ProxiedConnection:
    """One connection of the agent, forwarded by the proxy to the gateway."""

    def __init__(self, proxy: FaultProxy, kind: Kind, id: int) -> None:
        self.kind: Kind = kind
        self.id = id  # accept order, from 1
        self.forwarded = 0  # bytes passed on, both directions
        self.up_bytes = 0  # agent -> gateway, passed on
        self.down_bytes = 0  # gateway -> agent, passed on
        self.faults: set[str] = set()  # names of the faults ever applied to it
        self.blackholed = False
        self._proxy = proxy
        self._agent = _Half(self, "agent")
        self._gateway = _Half(self, "gateway")
        self._up = _Pipe(self, self._agent, self._gateway, "up")
        self._down = _Pipe(self, self._gateway, self._agent, "down")
        self._stopped: CloseHow | None = None  # the proxy ended it, with a FIN or an RST
        self._budget: int | None = None  # close_after: bytes still to forward
        self._budget_how: CloseHow = "rst"

    def __repr__(self) -> str:
        state = "open" if self.open else "closed"
        faults = ",".join(sorted(self.faults)) or "-"
        return (
            f"<ProxiedConnection #{self.id} {self.kind} {state} up={self.up_bytes} "
            f"down={self.down_bytes} faults={faults}>"
        )

    @property
    def open(self) -> bool:
        """Neither end has closed (or half-closed) it, nor has the proxy."""
        agent, gateway = self._agent, self._gateway
        if self._stopped is not None or not agent.usable or agent.eof:
            return False
        return gateway.transport is None or (gateway.usable and not gateway.eof)

    @property
    def connected(self) -> bool:
        """The proxy's connection to the gateway exists (and is not closed)."""
        return self._gateway.usable

    @property
    def _active(self) -> bool:
        """Something is left to break: the proxy has not ended it, and one side is up."""
        return self._stopped is None and (self._agent.usable or self._gateway.usable)

    def _pipes(self) -> tuple[_Pipe, _Pipe]:
        return self._up, self._down

    def _halves(self) -> tuple[_Half, _Half]:
        return self._agent, self._gateway

    # events from the halves

    def _made(self, half: _Half) -> None:
        if half is self._agent:
            self._proxy._admit(self)

    def _received(self, half: _Half, data: bytes) -> None:
        (self._up if half is self._agent else self._down).feed(data)

    def _eof(self, half: _Half) -> None:
        if self._stopped == "fin":
            half.close()  # both sides have had the proxy's FIN: let go
            return
        (self._up if half is self._agent else self._down).feed_eof()

    def _lost(self, half: _Half, exc: Exception | None) -> None:
        outgoing, incoming = (
            (self._up, self._down) if half is self._agent else (self._down, self._up)
        )
        incoming.finished = True
        incoming.drop()
        if half.closing or self._stopped is not None or self.blackholed:
            return
        if exc is None and half.eof:
            return  # closed after its FIN, which is passed on already
        outgoing.feed_reset()  # a reset, or a close the loop did not explain: never clean

    def _check_done(self) -> None:
        """Both FINs are through: close both sockets."""
        if self._up.finished and self._down.finished and self._agent.eof and self._gateway.eof:
            self._agent.close()
            self._gateway.close()

    # faults

    def _reset_half(self, half: _Half) -> None:
        half.reset()

    def _stop(self, how: CloseHow) -> None:
        self._stopped = how
        for pipe in self._pipes():
            pipe.drop()

    def _reset(self) -> list[_Half]:
        """Reset both sides; return those that were open (to wait for)."""
        self.faults.add("reset")
        self._stop("rst")
        halves = [h for h in self._halves() if h.transport is not None and not h.lost]
        for half in halves:
            half.reset()
        return halves

    def _shutdown(self) -> None:
        self.faults.add("shutdown")
        self._stop("fin")
        for half in self._halves():
            half.shutdown()

    def _blackhole(self) -> None:
        self.faults.add("blackhole")
        self.blackholed = True
        for pipe in self._pipes():
            pipe.drop()

    def _set_delay(self, seconds: float) -> None:
        self.faults.add("delay")
        for pipe in self._pipes():
            pipe.delay = seconds

    def _set_rate(self, bytes_per_second: int) -> None:
        self.faults.add("throttle")
        for pipe in self._pipes():
            pipe.rate = bytes_per_second
            pipe.wakeup.set()

    def _cut(self, direction: Direction) -> None:
        self.faults.add(f"cut_{direction}")
        pipe = self._up if direction == "up" else self._down
        pipe.cut = True
        pipe.drop()

    def _close_after(self, nbytes: int, how: CloseHow) -> None:
        self.faults.add("close_after")
        self._budget = nbytes
        self._budget_how = how
        self._check_budget()

    def _heal(self) -> None:
        for pipe in self._pipes():
            pipe.delay = 0.0
            pipe.rate = None
            pipe.cut = False
            pipe.wakeup.set()
        self._budget = None

    def _spend(self, size: int) -> int:
        """How much of ``size`` bytes may still be forwarded (close_after)."""
        if self._budget is None:
            return size
        size = min(size, self._budget)
        self._budget -= size
        return size

    def _check_budget(self) -> None:
        if self._budget != 0 or self._stopped is not None:
            return
        self._budget = None
        self._stop(self._budget_how)
        if self._budget_how == "fin":
            for half in self._halves():
                half.write_eof()  # after what is buffered: exactly the budget, then FIN
        else:
            self._proxy._spawn(self._reset_when_flushed())

    async def _reset_when_flushed(self) -> None:
        """RST both sides once the last forwarded bytes have left (or a deadline)."""
        for _ in range(round(FLUSH_TIMEOUT / FLUSH_POLL_INTERVAL)):
            if not any(
                _unsent_bytes(h.transport) for h in self._halves() if h.usable and h.transport
            ):
                break
            await asyncio.sleep(FLUSH_POLL_INTERVAL)
        for half in self._halves():
            half.reset()


# --- the proxy -------------------------------------------------------------------------


class FaultProxy:
    """A TCP proxy, agent -> proxy -> gateway, whose connections fail on demand.

    Use as ``async with FaultProxy(gateway.address) as proxy:`` (or ``start()``
    and ``aclose()``), and give the agent ``proxy.address``. ``port`` fixes the
    listening port, so that a soak run can restart the proxy around it.
    """

    def __init__(self, target: Address, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = target
        self.host = host
        self.port = port
        self.accepted = 0
        self.connections: list[ProxiedConnection] = []
        self._rules: list[tuple[Kind | None, Callable[[ProxiedConnection], None]]] = []
        self._refusing = False
        self._server: asyncio.Server | None = None
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._errors: list[BaseException] = []

    @property
    def address(self) -> str:
        """What the agent dials: ``HOST:PORT``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Listen (on ``port``, or a free one that ``port`` then holds)."""
        loop = asyncio.get_running_loop()
        self._closed = False
        self._server = await loop.create_server(self._accept, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        """Stop listening, reset every connection, stop every task.

        Raises the first unexpected error of a proxy task, if there was one.
        """
        self._closed = True
        if self._server is not None:
            self._server.close()
        halves = [
            half
            for conn in self.connections
            for half in conn._halves()
            if half.transport is not None and not half.lost
        ]
        for half in halves:
            half.reset()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._wait_closed(halves)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._errors:
            errors, self._errors = self._errors, []
            raise errors[0]

    def live(self, kind: Kind | None = None) -> list[ProxiedConnection]:
        """Connections that forward both ways: open, connected to the gateway,
        neither black-holed nor cut."""
        return [
            conn
            for conn in self.connections
            if (kind is None or conn.kind == kind)
            and conn.open
            and conn.connected
            and not conn.blackholed
            and not conn._up.cut
            and not conn._down.cut
        ]

    def forget_closed(self) -> int:
        """Drop the connections that have ended from :attr:`connections` (a long
        soak run would otherwise keep them all); return how many."""
        kept = [
            conn
            for conn in self.connections
            if conn._agent.transport is None  # accepted, not connected yet
            or any(h.transport is not None and not h.lost for h in conn._halves())
        ]
        forgotten = len(self.connections) - len(kept)
        self.connections = kept
        return forgotten

    # --- faults ----------------------------------------------------------------

    async def reset(
        self, kind: Kind | None = None, *, connections: Iterable[ProxiedConnection] | None = None
    ) -> int:
        """RST both sides of the open connections (of ``kind``, or among
        ``connections``); wait until they are closed; return how many."""
        chosen = self._select(kind, connections)
        halves = [half for conn in chosen for half in conn._reset()]
        await self._wait_closed(halves)
        return len(chosen)

    def shutdown(
        self, kind: Kind | None = None, *, connections: Iterable[ProxiedConnection] | None = None
    ) -> int:
        """FIN both sides of the open connections at once (unsent bytes are lost)
        and forward nothing more; return how many."""
        chosen = self._select(kind, connections)
        for conn in chosen:
            conn._shutdown()
        return len(chosen)

    def blackhole(
        self,
        kind: Kind | None = None,
        *,
        existing: bool = True,
        new: bool = True,
        connections: Iterable[ProxiedConnection] | None = None,
    ) -> None:
        """A cut path: forward nothing more either way, drop what is read (a FIN
        or an RST too), close nothing. A new black-holed connection is never
        connected to the gateway. Its sockets are held until each end resets
        its own, or until :meth:`aclose`."""
        self._apply(kind, existing, new, connections, ProxiedConnection._blackhole)

    def delay(
        self,
        seconds: float,
        kind: Kind | None = None,
        *,
        existing: bool = True,
        new: bool = True,
        connections: Iterable[ProxiedConnection] | None = None,
    ) -> None:
        """Added one-way latency, in each direction; order is kept."""
        self._apply(kind, existing, new, connections, lambda conn: conn._set_delay(seconds))

    def throttle(
        self,
        bytes_per_second: int,
        kind: Kind | None = None,
        *,
        existing: bool = True,
        new: bool = True,
        connections: Iterable[ProxiedConnection] | None = None,
    ) -> None:
        """A bandwidth cap per connection and direction."""
        if bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")
        self._apply(kind, existing, new, connections, lambda conn: conn._set_rate(bytes_per_second))

    def cut(
        self,
        direction: Direction,
        kind: Kind | None = None,
        *,
        existing: bool = True,
        new: bool = True,
        connections: Iterable[ProxiedConnection] | None = None,
    ) -> None:
        """One direction goes silent (what is read is dropped, a FIN or an RST
        too); the other keeps flowing; nothing is closed."""
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', not {direction!r}")
        self._apply(kind, existing, new, connections, lambda conn: conn._cut(direction))

    def close_after(
        self,
        nbytes: int,
        kind: Kind | None = None,
        *,
        how: CloseHow = "rst",
        existing: bool = True,
        new: bool = True,
        connections: Iterable[ProxiedConnection] | None = None,
    ) -> None:
        """After ``nbytes`` more bytes forwarded (both directions together,
        counted from now, or from the accept for new connections), close both
        sides: a FIN after the last of those bytes, or an RST once they are out."""
        if nbytes < 0:
            raise ValueError("nbytes must not be negative")
        if how not in ("fin", "rst"):
            raise ValueError(f"how must be 'fin' or 'rst', not {how!r}")
        self._apply(kind, existing, new, connections, lambda conn: conn._close_after(nbytes, how))

    def refuse(self, new: bool = True) -> None:
        """New connections are reset at once (``refuse(False)`` stops that)."""
        self._refusing = new

    def restore(self) -> None:
        """New connections are forwarded normally again. Existing connections
        keep their faults (see :meth:`heal`)."""
        self._rules.clear()
        self._refusing = False

    def heal(self) -> None:
        """:meth:`restore`, and lift delay, throttle, cut and a pending
        close_after from the open connections. A black-holed connection stays
        dead, like the lost state of a NAT."""
        self.restore()
        for conn in self.connections:
            if conn._active:
                conn._heal()

    # --- inside -------------------------------------------------------------------

    def _select(
        self, kind: Kind | None, connections: Iterable[ProxiedConnection] | None
    ) -> list[ProxiedConnection]:
        pool = self.connections if connections is None else connections
        return [c for c in pool if c._active and (kind is None or c.kind == kind)]

    def _apply(
        self,
        kind: Kind | None,
        existing: bool,
        new: bool,
        connections: Iterable[ProxiedConnection] | None,
        fault: Callable[[ProxiedConnection], None],
    ) -> None:
        """Apply ``fault`` to the open connections (of ``kind``), and make it a
        rule for new ones; given ``connections``, to those (still open) only."""
        if connections is not None:
            for conn in self._select(kind, connections):
                fault(conn)
            return
        if existing:
            for conn in self._select(kind, None):
                fault(conn)
        if new:
            self._rules.append((kind, fault))

    def _classify(self) -> Kind:
        """See the module's docstring: the agent's order of work tells."""
        for conn in self.connections:
            if conn.kind == "control" and conn._agent.agent_side_open:
                return "data"
        return "control"

    def _accept(self) -> _Half:
        """The protocol factory of the listener: called once per accepted connection."""
        self.accepted += 1
        conn = ProxiedConnection(self, self._classify(), self.accepted)
        self.connections.append(conn)
        return conn._agent

    def _admit(self, conn: ProxiedConnection) -> None:
        """The agent's side is connected: refuse it, or apply the rules and connect on."""
        if self._refusing or self._closed:
            conn.faults.add("refuse")
            conn._stop("rst")
            conn._agent.reset()
            return
        for kind, fault in list(self._rules):
            if kind is None or kind == conn.kind:
                fault(conn)
        if conn._stopped is None and not conn.blackholed:
            self._spawn(self._forward(conn))

    async def _forward(self, conn: ProxiedConnection) -> None:
        """Connect to the gateway, then run both directions until they end."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(
                    lambda: conn._gateway, self.target.host, self.target.port
                )
        except (OSError, TimeoutError):
            conn._stop("rst")
            conn._agent.reset()  # as a gateway that refuses would
            return
        if conn._stopped == "rst":
            conn._gateway.reset()
        elif conn._stopped == "fin":
            conn._gateway.shutdown()
        if conn._stopped is not None or conn.blackholed:
            return
        async with asyncio.TaskGroup() as group:  # a failing direction stops the other
            group.create_task(conn._up.run())
            group.create_task(conn._down.run())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._errors.append(task.exception())  # type: ignore[arg-type]

    async def _wait_closed(self, halves: list[_Half]) -> None:
        """Until the loop has reported ``halves`` closed (at most ``CLOSE_TIMEOUT``)."""
        waits = [asyncio.ensure_future(h.closed.wait()) for h in halves if not h.lost]
        if not waits:
            return
        try:
            await asyncio.wait(waits, timeout=CLOSE_TIMEOUT)
        finally:
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
