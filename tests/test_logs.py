"""Log helpers: a warning repeated under abuse is throttled, with a count."""

from __future__ import annotations

import logging

from conftest import recording

from tunnelgate.logs import TextFormatter, Throttle


def test_throttle_logs_once_per_interval_with_a_count_of_the_rest() -> None:
    """A flood of the same warning gives one line per interval, and the next
    line says how many were left out."""
    throttle = Throttle(5.0)
    log = logging.getLogger("tunnelgate.test")
    with recording("tunnelgate", logging.WARNING) as recorder:
        for step in range(100):  # 100 events over 10 s
            throttle.warning(log, step * 0.1, "refusing client %d", step)
    assert recorder.messages() == [
        "refusing client 0",
        "refusing client 50 (and 49 more since the last report)",
    ]


def test_text_lines_escape_control_characters() -> None:
    """A peer's words in a message (an unknown message tag, a reason) cannot
    start a forged line or hide one: control characters are escaped."""
    record = logging.LogRecord(
        "tunnelgate.gateway", logging.WARNING, __file__, 1,
        "closing connection from %s: %s", ("203.0.113.9:4711", "bad\nINFO forged\rline\x1b[2K"),
        None,
    )  # fmt: skip
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.endswith("bad\\x0aINFO forged\\x0dline\\x1b[2K")
