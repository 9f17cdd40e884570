"""The agent pool's demand (``agent/pool.py``, :class:`Demand`): how many data
channels to keep open, pure arithmetic with the time passed in. No sockets,
no event loop, no clock."""

from __future__ import annotations

import pytest

from tunnelgate.agent.pool import DEMAND_WINDOW, MAX_EXTRA_CHANNELS, Demand

pytestmark = pytest.mark.timeout(30)

POOL_SIZE = 2
LIMIT = 64  # the gateway's max_pool_size
OPEN_TIME = 0.5  # seconds to open a channel, in these tests


def demand(pool_size: int = POOL_SIZE, limit: int = LIMIT, idle: int = 0) -> Demand:
    """A demand at time 0 whose channels take ``OPEN_TIME`` to open, ``idle`` of them open."""
    found = Demand(pool_size, limit, now=0.0)
    found.open_time = OPEN_TIME
    found.idle = idle
    return found


def test_demand_without_clients_wants_pool_size_channels() -> None:
    """Before any client, the agent keeps pool_size channels: all to open at first."""
    fresh = Demand(POOL_SIZE, LIMIT, now=100.0)
    assert fresh.target(100.0) == POOL_SIZE
    assert fresh.to_open(100.0) == POOL_SIZE
    fresh.opening = 1
    assert fresh.to_open(100.0) == POOL_SIZE - 1  # one on its way already
    fresh.opening, fresh.idle = 0, POOL_SIZE
    assert fresh.to_open(100.0) == 0


def test_demand_opened_counts_an_idle_channel_and_averages_the_open_time() -> None:
    """Each channel opened is idle, and the time it took moves the average a quarter of the way."""
    fresh = Demand(POOL_SIZE, LIMIT, now=0.0)
    fresh.opened(0.4)
    assert (fresh.idle, fresh.open_time) == (1, pytest.approx(0.1))
    fresh.opened(0.4)
    assert (fresh.idle, fresh.open_time) == (2, pytest.approx(0.175))


@pytest.mark.parametrize(("clients", "target"), [(1, POOL_SIZE), (5, 5), (20, 20)])
def test_demand_target_follows_the_rate_of_clients(clients: int, target: int) -> None:
    """Clients arriving faster than the pool refills raise the target to the
    channels that would be in use while new ones open, twice over:
    rate x open time x 2 (20 clients in an instant, 0.5 s each: 20)."""
    arriving = demand()
    for _ in range(clients):
        arriving.started(10.0)
    assert arriving.rate_now(10.0) == pytest.approx(clients / DEMAND_WINDOW)
    assert arriving.target(10.0) == target


def test_demand_target_stays_within_the_gateways_limit() -> None:
    """However fast clients come, the agent keeps no more than the gateway's max_pool_size."""
    arriving = demand(limit=8)
    for _ in range(100):
        arriving.started(10.0)
    assert arriving.target(10.0) == 8
    arriving.request(50)
    assert arriving.target(10.0) == 8


def test_demand_target_decays_back_to_pool_size_once_clients_stop() -> None:
    """After a burst, the rate fades (by e each window): the target comes down
    step by step, never up, to pool_size."""
    burst = demand()
    for _ in range(20):
        burst.started(10.0)
    targets = [burst.target(10.0 + step * DEMAND_WINDOW / 2) for step in range(20)]
    assert targets[0] == 20
    assert targets[2] == 7  # one window later: 20 / e per second
    assert targets == sorted(targets, reverse=True)
    assert targets[-1] == POOL_SIZE


def test_demand_surplus_only_after_a_quiet_window() -> None:
    """Idle channels beyond the target are released only once no client has
    come for a whole window, and each only once."""
    busy = demand(idle=10)
    busy.started(10.0)  # the rate is 1/s: the target stays pool_size
    assert busy.target(10.0) == POOL_SIZE
    assert busy.surplus(10.0 + DEMAND_WINDOW / 2) == 0  # a client came just now
    quiet = 10.0 + 1.5 * DEMAND_WINDOW
    assert busy.surplus(quiet) == 10 - POOL_SIZE
    busy.releasing += busy.surplus(quiet)  # as the pool asks the gateway (PoolRelease)
    assert busy.surplus(quiet) == 0
    busy.started(quiet)
    assert busy.surplus(quiet + DEMAND_WINDOW / 2) == 0


def test_demand_clients_on_reused_channels_keep_it_busy_but_raise_no_target() -> None:
    """A client on a reused channel gives it back after its end: it adds nothing to the
    rate (the target stays pool_size however many come), but it is activity, so the
    channels it and the others ride are not released as surplus while they come."""
    reusing = demand(idle=10)
    for n in range(20):
        reusing.started(10.0 + n * 0.01, fresh=False)
    assert reusing.target(10.2) == POOL_SIZE
    assert reusing.surplus(10.2 + DEMAND_WINDOW / 2) == 0  # clients came just now
    assert reusing.surplus(10.2 + 1.5 * DEMAND_WINDOW) == 10 - POOL_SIZE  # then quiet
    reusing.started(20.0, fresh=True)  # a fresh channel taken: the rate moves
    assert reusing.rate_now(20.0) > 0


def test_demand_request_adds_channels_the_gateway_asked_for() -> None:
    """Channels the gateway asks for (PoolRequest) come on top of the target,
    each one opened counts one off, and no flood of requests asks for more
    than MAX_EXTRA_CHANNELS."""
    asked = demand(limit=10_000)
    asked.request(3)
    assert asked.target(0.0) == POOL_SIZE + 3
    assert asked.to_open(0.0) == POOL_SIZE + 3
    asked.opened(OPEN_TIME)
    assert (asked.extra, asked.target(0.0)) == (2, POOL_SIZE + 2)
    for _ in range(100):
        asked.request(1000)
    assert asked.extra == MAX_EXTRA_CHANNELS


def test_demand_discarded_channels_are_not_ready_and_replaced() -> None:
    """Pooled channels the gateway found dead (PoolDiscarded) no longer count
    as ready, so as many new ones are opened; never more lost than idle."""
    pooled = demand(idle=POOL_SIZE)
    assert pooled.to_open(0.0) == 0
    pooled.discarded(2)
    assert (pooled.ready, pooled.to_open(0.0)) == (0, POOL_SIZE)
    pooled.discarded(5)
    assert pooled.lost == POOL_SIZE


def test_demand_settled_forgets_releases_and_requests_still_outstanding() -> None:
    """Once demand stayed flat for a window, channels asked to be released and
    channels the gateway asked for are counted afresh."""
    flat = demand(idle=6)
    flat.releasing = 3
    flat.request(4)
    flat.settled()
    assert (flat.releasing, flat.extra) == (0, 0)
    assert flat.target(0.0) == POOL_SIZE
    assert flat.surplus(2 * DEMAND_WINDOW) == 6 - POOL_SIZE
