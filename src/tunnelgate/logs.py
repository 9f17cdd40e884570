"""Log lines with connection context, as text or JSON lines.

A :class:`ContextLogger` adds fields (``session``, ``agent``, ``conn``,
``service``) shown as ``[session=ab12 conn=17]`` in text and as keys in JSON.
Only the CLI calls :func:`configure`. Levels: ERROR a bug or unexpected
failure; WARNING a misbehaving peer, a refused authentication, a timeout; INFO
life-cycle events and one line per closed connection; DEBUG frames. No
payload above DEBUG, never a token. Imports nothing from the package.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, Final, TextIO


class ContextLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger that adds fixed context fields to every line."""

    def __init__(self, logger: logging.Logger, **context: object) -> None:
        super().__init__(logger, context)
        self.context = context

    def bind(self, **context: object) -> ContextLogger:
        """A new logger with more context fields."""
        return ContextLogger(self.logger, **{**self.context, **context})

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        extra = dict(kwargs.get("extra") or {})
        extra["ctx"] = {**self.context, **extra.get("ctx", {})}
        kwargs["extra"] = extra
        return msg, kwargs


class Throttle:
    """Lets a repeated event through once per ``interval`` seconds, with a count
    of the ones held back: under abuse (thousands of refused connections a
    second) the log gets one line per interval. Time is passed in."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._reported_at: float | None = None
        self._held_back = 0

    def admit(self, now: float) -> int | None:
        """None if an event at ``now`` comes too soon after the last one let
        through (it is counted); else the count held back since that one."""
        if self._reported_at is not None and now - self._reported_at < self.interval:
            self._held_back += 1
            return None
        held_back, self._reported_at, self._held_back = self._held_back, now, 0
        return held_back

    def log(
        self,
        log: logging.Logger | logging.LoggerAdapter[Any],
        level: int,
        now: float,
        msg: str,
        *args: object,
    ) -> bool:
        """``log.log(level, msg, *args)`` if :meth:`admit` lets it, with the count appended;
        whether it did."""
        held_back = self.admit(now)
        if held_back is not None:
            more = f" (and {held_back} more times since the last report)" if held_back else ""
            log.log(level, msg + "%s", *args, more)
        return held_back is not None

    def warning(
        self, log: logging.Logger | logging.LoggerAdapter[Any], now: float, msg: str, *args: object
    ) -> bool:
        return self.log(log, logging.WARNING, now, msg, *args)


def log_closed(
    log: logging.Logger | logging.LoggerAdapter[Any],
    client: str,
    up: int,
    down: int,
    duration: float,
    end: str,
    *,
    normal: bool,
) -> None:
    """The one line each side writes per closed client connection: bytes ``up``
    (client to service) and ``down``, and how it ended; INFO if it ended
    normally, else WARNING."""
    log.log(
        logging.INFO if normal else logging.WARNING,
        "closed client=%s up=%d down=%d duration=%.3fs end=%s",
        client,
        up,
        down,
        duration,
        end,
    )


# Peers' words reach log lines (reasons, names in errors): escape control
# characters, so that nobody can forge a line or hide one with \r or \n.
_CONTROLS: Final = {c: f"\\x{c:02x}" for c in [*range(32), 127]}


def _utc(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = getattr(record, "ctx", None) or {}
        fields = " ".join(f"{k}={v}" for k, v in ctx.items())
        text = f"{_utc(record)} {record.levelname:<7} {record.name.removeprefix('tunnelgate.')}"
        if fields:
            text += f" [{fields}]"
        text += " " + record.getMessage().translate(_CONTROLS)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": _utc(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "ctx", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _Context(logging.Filter):
    """Puts fixed fields first in every line's context (a gateway worker's index)."""

    def __init__(self, context: dict[str, object]) -> None:
        super().__init__()
        self.context = context

    def filter(self, record: logging.LogRecord) -> bool:
        record.ctx = {**self.context, **(getattr(record, "ctx", None) or {})}
        return True


def configure(
    level: str = "info",
    fmt: str = "text",
    stream: TextIO | None = None,
    context: dict[str, object] | None = None,
) -> None:
    """Send tunnelgate's logs to ``stream`` (stderr) at ``level`` in ``fmt``; ``context``:
    fields every line carries."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if context:
        handler.addFilter(_Context(context))
    root = logging.getLogger("tunnelgate")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
