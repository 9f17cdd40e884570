"""The agent's reconnect backoff: how long to wait before dialing again.

"Full jitter" (AWS's name): before attempt ``n`` wait a uniformly random time
below ``min(maximum, minimum * 2**n)``, so agents cut off together do not
come back together; a session that lasted ``STABLE_SESSION`` or more starts
the count again, as rathole does. A pure generator: the caller passes in how
long each session lasted and may pass in the random source, so tests need no
clock and no sleep. This module must not import asyncio, socket, ssl, time
or any tunnelgate module.
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
    """Delays before reconnecting, with the attempt each one precedes (from 1).

    Start it with ``next()``, then ``send()`` the duration of each session that
    ended (0 if it never came up) to get ``(delay, attempt)``.
    """
    ceiling = minimum
    attempt = 0
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
