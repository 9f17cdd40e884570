"""Traffic history and the event log, kept across restarts in SQLite.

A :class:`History` is one database file (WAL) in the gateway's state directory:
bytes and connections per service per minute (kept ``MINUTES_KEPT``) and per day
(kept ``DAYS_KEPT``), and the events (at most ``EVENTS_KEPT``). The
:class:`Recorder` task adds what the gateway's counters moved each minute; every
write runs in a worker thread, never on the relay's path. A database that cannot
be written (a full or read-only disk) pauses the history with a warning and the
counts wait in memory for the next minute; one that is corrupt is moved aside and
made anew. Nothing here can stop the tunnel.

Part of the admin listener: imported only with ``--admin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Final

from tunnelgate.logs import Throttle
from tunnelgate.stats import Event

logger = logging.getLogger(__package__)

FILE_NAME: Final = "history.sqlite3"
MINUTES_KEPT: Final = 48 * 3600  # seconds
DAYS_KEPT: Final = 400 * 86400
EVENTS_KEPT: Final = 100_000
INTERVAL: Final = 60.0  # seconds between writes
RANGES: Final = {"1h": (3600, "minutes"), "24h": (86400, "minutes"), "30d": (30 * 86400, "days")}

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS minutes (agent TEXT, service TEXT, t INTEGER, connections INTEGER,
    up INTEGER, down INTEGER, PRIMARY KEY (agent, service, t)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS days (agent TEXT, service TEXT, t INTEGER, connections INTEGER,
    up INTEGER, down INTEGER, PRIMARY KEY (agent, service, t)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, time REAL, kind TEXT, agent TEXT,
    service TEXT, detail TEXT);
"""
_ADD: Final = """
INSERT INTO {table} VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (agent, service, t) DO UPDATE SET
    connections = connections + excluded.connections, up = up + excluded.up,
    down = down + excluded.down
"""

# (agent, service) -> (connections, bytes up, bytes down), as counted since the process began
Totals = dict[tuple[str, str], tuple[int, int, int]]


class History:
    """One history database; every method blocks (call it in a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one thread at a time, whichever the loop used

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self._db = self._open()
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError):
                    raise  # cannot open or write here: not a reason to discard the file
                aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
                logger.warning("history: %s is unusable (%s); moved to %s", self.path, exc, aside)
                self.path.rename(aside)
                self._db = self._open()
        return self._db

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        return db

    def add(self, now: float, moved: Totals, events: Iterable[Event]) -> None:
        """Add the counts ``moved`` in the minute of ``now`` (and its day), and ``events``."""
        minute, day = int(now // 60 * 60), int(now // 86400 * 86400)
        rows = [(a, s, c, up, down) for (a, s), (c, up, down) in moved.items() if c or up or down]
        with self._lock:
            db = self._connect()
            with db:
                db.execute("BEGIN")
                for table, t in (("minutes", minute), ("days", day)):
                    db.executemany(
                        _ADD.format(table=table), [(a, s, t, c, up, dn) for a, s, c, up, dn in rows]
                    )
                db.executemany(
                    "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                    [(None, e.time, e.kind, e.agent, e.service, e.detail) for e in events],
                )
                db.execute("DELETE FROM minutes WHERE t < ?", (now - MINUTES_KEPT,))
                db.execute("DELETE FROM days WHERE t < ?", (now - DAYS_KEPT,))
                db.execute(
                    "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?",
                    (EVENTS_KEPT,),
                )

    def traffic(self, agent: str, service: str, span: str, now: float) -> list[dict[str, float]]:
        """Connections and bytes of one service over the last ``span`` (a key of RANGES)."""
        seconds, table = RANGES[span]
        with self._lock:
            rows = self._connect().execute(
                f"SELECT t, connections, up, down FROM {table} "
                "WHERE agent = ? AND service = ? AND t >= ? ORDER BY t",
                (agent, service, now - seconds),
            )
            return [{"t": t, "connections": c, "up": u, "down": d} for t, c, u, d in rows]

    def events(self, limit: int = 1000) -> list[dict[str, object]]:
        """The most recent stored events, oldest first."""
        with self._lock:
            rows = self._connect().execute(
                "SELECT time, kind, agent, service, detail FROM events ORDER BY id DESC LIMIT ?",
                (limit,),
            )
            keys = ("time", "kind", "agent", "service", "detail")
            return [dict(zip(keys, row, strict=True)) for row in reversed(rows.fetchall())]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class Recorder:
    """Every ``interval`` seconds, add to the history what the counters moved."""

    def __init__(
        self,
        history: History,
        totals: Callable[[], Awaitable[Totals]],
        events: Callable[[int], tuple[Event, ...]],
        interval: float = INTERVAL,
    ) -> None:
        self.history = history
        self._totals = totals
        self._events = events
        self._interval = interval
        self._written: Totals = {}  # what the history holds of this process's counts
        self._last_event = 0
        self._failures = Throttle(600.0)
        self.writes = 0  # successful ones, for tests and the API

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.write()

    async def write(self) -> None:
        """Write what moved since the last successful write; on failure it waits for the next."""
        now, totals, moved = time.time(), await self._totals(), {}
        for key, (connections, up, down) in totals.items():
            was = self._written.get(key, (0, 0, 0))
            moved[key] = (connections - was[0], up - was[1], down - was[2])
        events = self._events(self._last_event)
        try:
            await asyncio.to_thread(self.history.add, now, moved, events)
        except (sqlite3.Error, OSError) as exc:
            self._failures.warning(
                logger, time.monotonic(), "history paused: cannot write %s: %s",
                self.history.path, exc,
            )  # fmt: skip
            return
        self._written = totals
        if events:
            self._last_event = events[-1].id
        self.writes += 1

    async def close(self) -> None:
        """A last write of the minute under way, then the database closes."""
        with contextlib.suppress(Exception):
            await self.write()
        await asyncio.to_thread(self.history.close)
