"""The reconnect backoff: full jitter under a doubling ceiling, reset by a stable session."""

from __future__ import annotations

from collections.abc import Generator

from hypothesis import given
from hypothesis import strategies as st

from tunnelgate.backoff import STABLE_SESSION, backoff


def ceilings(minimum: float, maximum: float, lasted: list[float]) -> list[tuple[float, int]]:
    """(ceiling, attempt) for sessions that lasted so long: the jitter returns its upper bound."""
    delays: Generator[tuple[float, int], float, None] = backoff(
        minimum, maximum, uniform=lambda low, high: high
    )
    next(delays)
    return [delays.send(length) for length in lasted]


def test_backoff_doubles_up_to_the_maximum() -> None:
    """Failed attempts in a row wait up to 0.5, 1, 2, 4 ... seconds, never above the maximum."""
    got = ceilings(0.5, 30.0, [0.0] * 9)
    assert got == [
        (0.5, 1), (1.0, 2), (2.0, 3), (4.0, 4), (8.0, 5), (16.0, 6), (30.0, 7), (30.0, 8),
        (30.0, 9),
    ]  # fmt: skip


def test_backoff_starts_again_after_a_stable_session() -> None:
    """A session that lasted STABLE_SESSION resets the count; a shorter one does not."""
    lasted = [0.0, 0.0, 0.0, STABLE_SESSION - 0.1, STABLE_SESSION, 0.0]
    assert ceilings(1.0, 60.0, lasted) == [
        (1.0, 1), (2.0, 2), (4.0, 3), (8.0, 4), (1.0, 1), (2.0, 2),
    ]  # fmt: skip


def test_backoff_jitters_from_zero() -> None:
    """Each delay is drawn between 0 and the ceiling (full jitter, not equal jitter)."""
    bounds: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        bounds.append((low, high))
        return (low + high) / 2

    delays = backoff(2.0, 5.0, uniform=uniform)
    next(delays)
    assert [delays.send(0.0)[0] for _ in range(3)] == [1.0, 2.0, 2.5]
    assert bounds == [(0.0, 2.0), (0.0, 4.0), (0.0, 5.0)]


def test_backoff_survives_days_of_failed_attempts() -> None:
    """Thousands of failed attempts (hours without the gateway) keep the maximum, no overflow."""
    got = ceilings(0.5, 30.0, [0.0] * 5000)
    assert got[-1] == (30.0, 5000)


@given(
    st.floats(0.01, 3600),
    st.floats(0.01, 3600),
    st.lists(st.floats(0, 100), max_size=50),
)
def test_backoff_delays_stay_within_zero_and_the_maximum(
    minimum: float, maximum: float, lasted: list[float]
) -> None:
    """With the random jitter, every delay is between 0 and the maximum."""
    delays = backoff(minimum, maximum)
    next(delays)
    for length in lasted:
        delay, attempt = delays.send(length)
        assert 0.0 <= delay <= maximum and attempt >= 1
