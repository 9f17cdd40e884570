"""A real ``redis-server``'s protocol error through the real CLI: Redis answers
``-ERR Protocol error`` and closes on unread input (an RST) while the client is
still writing; the client reads the error, then the reset. Without
``redis-server`` the tests are skipped, unless ``TUNNELGATE_REQUIRE_TOOLS=1``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from kit.clients import send_until_reset_trials
from kit.processes import Launch, start_gateway
from kit.tokens import new_token

pytestmark = pytest.mark.timeout(60)

TRIALS = 25
PROTOCOL_ERROR = b"-ERR Protocol error"
BAD_REQUEST = b"\x00"  # no inline request ends before Redis gives up on it


def protocol_errors_then_resets(port: int) -> Counter[tuple[bytes, str]]:
    """``TRIALS`` clients send ``BAD_REQUEST`` and more until ``port`` resets them,
    then read: those that read a Redis protocol error and then the reset are
    counted as (``PROTOCOL_ERROR``, "reset"), the others as they went."""
    outcomes = send_until_reset_trials(port, TRIALS, first=BAD_REQUEST)
    return Counter(
        {
            (PROTOCOL_ERROR if received.startswith(PROTOCOL_ERROR) else received, how): count
            for (received, how), count in outcomes.items()
        }
    )


def test_redis_direct_client_reads_the_protocol_error_then_the_reset(redis_port: int) -> None:
    """Straight to Redis, a client still writing gets the protocol error, then the reset."""
    assert protocol_errors_then_resets(redis_port) == {(PROTOCOL_ERROR, "reset"): TRIALS}


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-tcp"])
def test_redis_protocol_error_reaches_the_client_through_the_tunnel(
    launch: Launch, redis_port: int, tmp_path: Path, tls: bool
) -> None:
    """Through gateway and agent, a client still writing gets Redis's protocol
    error, then the reset, as when connected directly."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token, tls=tls)
    args = [
        "agent",
        "--gateway",
        f"127.0.0.1:{gateway.port}",
        "--expose",
        f"0:127.0.0.1:{redis_port}",
    ]
    args += ["--fingerprint", gateway.fingerprint] if gateway.fingerprint else ["--no-tls"]
    agent = launch(*args, token=token)
    public_port = int(agent.wait_line(r"exposed at gateway port (\d+)").group(1))
    assert protocol_errors_then_resets(public_port) == {(PROTOCOL_ERROR, "reset"): TRIALS}
