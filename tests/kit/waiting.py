"""Waiting without bare sleeps: poll a condition under a deadline, and the
deadlines the tests share. A hang fails with a description of what was
awaited (and, for a teardown, where every task of the loop was waiting)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

DEADLINE = 10.0  # for what should happen "at once": a log line, a connection
EXIT_DEADLINE = 5.0  # "exits within a few seconds"
TEARDOWN_TIMEOUT = 10.0  # for a test's gateways, agents and services to close
# A product timeout (drain, heartbeat, handshake) set this long never expires
# while a test runs: a test that passes with it has shown that what it waited
# for did not come from that timeout. Tests assert on behaviour and order, never
# on how long something took (time is measured by `make bench`).
LONGER_THAN_ANY_TEST = 3600.0


async def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 5.0,
    what: str | Callable[[], str] = "the condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``.

    ``what`` names the condition in the failure; a callable is asked only then,
    so it can describe the state at that moment.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() >= deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {text}")
        await asyncio.sleep(0.01)


def wait_for(predicate: Callable[[], T], timeout: float, what: str | Callable[[], str]) -> T:
    """Poll ``predicate`` (blocking) until it returns something truthy; fail after
    ``timeout``, naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout} s waiting for {text}")
        time.sleep(0.05)  # polling interval under a deadline


def wait_connectable(port: int, timeout: float = DEADLINE, host: str = "127.0.0.1") -> None:
    """Wait (blocking) until something accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # polling interval under a deadline


def describe_tasks() -> str:
    """Where every other task of the loop is waiting, innermost call last."""
    lines = []
    for task in asyncio.all_tasks():
        if task is asyncio.current_task():
            continue
        lines.append(f"task {task.get_name()} (cancelling={task.cancelling()}):")
        awaitable: Any = task.get_coro()
        while awaitable is not None:
            frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
            if frame is not None:
                where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                lines.append(f"    {where} in {frame.f_code.co_name}")
            awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "ag_await", None)
    return "\n".join(lines)


async def close_within(exit_stack: contextlib.AsyncExitStack, what: str) -> None:
    """Close ``exit_stack``; a hang fails the test with every task's stack."""
    closing = asyncio.create_task(exit_stack.aclose())
    done, _ = await asyncio.wait({closing}, timeout=TEARDOWN_TIMEOUT)
    if not done:
        tasks = describe_tasks()
        closing.cancel()
        with contextlib.suppress(BaseException):
            await closing
        pytest.fail(f"closing the test's {what} hung for {TEARDOWN_TIMEOUT} s:\n{tasks}")
    closing.result()
