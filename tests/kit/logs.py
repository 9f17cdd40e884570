"""Recording log lines during a test: tunnelgate's (to assert on what it
logged) and asyncio's (lost tasks and exceptions), and the check that a test
logged nothing unexpected: no traceback, no line that cannot be formatted,
no token."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class LogRecorder(logging.Handler):
    """Keeps the log records of one test."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.INFO) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    def find(self, text: str, level: int = logging.INFO) -> list[str]:
        return [m for m in self.messages(level) if text in m]


@contextlib.contextmanager
def recording(name: str, level: int) -> Iterator[LogRecorder]:
    """The records of logger ``name`` at ``level`` and up, while in the block."""
    logger = logging.getLogger(name)
    recorder = LogRecorder()
    old_level = logger.level
    logger.addHandler(recorder)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield recorder
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(old_level)


def unexpected_lines(ours: LogRecorder, loop: LogRecorder, secrets: tuple[str, ...]) -> list[str]:
    """What tunnelgate (``ours``) or asyncio (``loop``) logged that no test
    expects: a traceback (an unexpected exception: a bug), a line that cannot
    be formatted, one of ``secrets``, or any asyncio error (a lost task or
    exception)."""
    problems = [ours.format(r) for r in ours.records if r.exc_info]
    problems += [loop.format(r) for r in loop.records]
    for record in ours.records:
        try:
            message = record.getMessage()
        except Exception as exc:  # a bad format string or arguments
            problems.append(f"cannot format {record.msg!r} % {record.args!r}: {exc!r}")
            continue
        if any(secret in message for secret in secrets):
            problems.append(f"a token in the log: {message}")
    return problems
