"""The agent's reconnect backoff, "full jitter": a random wait below ``min(maximum, minimum *
2**attempt)``, so agents cut off together do not come back together; a session that lasted
``STABLE_SESSION`` starts the count again. A pure generator fed with session durations (random
source injectable): it must not import asyncio, socket, ssl, time or any tunnelgate module.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from typing import Final

STABLE_SESSION: Final = 30.0  # a session this long (seconds) resets the backoff


def backoff(
    minimum: float,
    maximum: float,
    *,
    stable: float = STABLE_SESSION,
    uniform: Callable[[float, float], float] = random.uniform,
) -> Generator[tuple[float, int], float, None]:
    """``(delay, attempt)`` before each reconnect: start it with ``next()``, then
    ``send()`` how long each ended session lasted (0 if it never came up)."""
    ceiling, attempt = minimum, 0
    lasted = yield 0.0, 0
    while True:
        if lasted >= stable:
            ceiling, attempt = minimum, 0
        delay = uniform(0.0, min(maximum, ceiling))
        attempt += 1
        # Doubling stops at the maximum: 2**attempt itself would not fit a float
        # after a thousand failed attempts (a few hours away from the gateway).
        ceiling = min(ceiling * 2, maximum)
        lasted = yield delay, attempt
