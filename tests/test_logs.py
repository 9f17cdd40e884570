"""Log helpers: a warning repeated under abuse is throttled, with a count."""

from __future__ import annotations

import logging

from kit.logs import recording

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
        "refusing client 50 (and 49 more times since the last report)",
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


def test_throttle_admits_the_first_event_whatever_the_clock() -> None:
    """The first event always passes, even at a negative or zero time."""
    for now in (-1e9, 0.0, 12345.6):
        assert Throttle(5.0).admit(now) == 0


def test_throttle_counts_what_it_holds_back_until_the_interval_has_passed() -> None:
    """Events within the interval are held back and counted; the first one at or
    after the interval passes with that count, and the count starts again."""
    throttle = Throttle(5.0)
    assert throttle.admit(100.0) == 0
    assert [throttle.admit(t) for t in (101.0, 104.9, 104.99)] == [None, None, None]
    assert throttle.admit(105.0) == 3
    assert throttle.admit(106.0) is None
    assert throttle.admit(200.0) == 1
    assert throttle.admit(205.0) == 0
