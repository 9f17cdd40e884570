"""A service's last reply before its reset, through the real CLI: ``tunnelgate
gateway`` and ``tunnelgate agent`` as subprocesses, plain and TLS; the service
and its clients run in this process, in threads."""

from __future__ import annotations

from pathlib import Path

import pytest
from kit.clients import send_until_reset_trials
from kit.processes import Launch, start_gateway
from kit.services import ERROR_REPLY, ErrorThenCloseHandler, tcp_service
from kit.tokens import new_token

pytestmark = pytest.mark.timeout(60)

TRIALS = 100


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain-tcp"])
def test_cli_tunnel_delivers_the_service_error_reply_before_its_reset(
    launch: Launch, tmp_path: Path, tls: bool
) -> None:
    """A service that answers an error and closes on unread input: through the
    gateway and agent, each client still writing reads the error line, then the
    reset, as over direct TCP."""
    token = new_token()
    gateway = start_gateway(launch, tmp_path / "state", token=token, tls=tls)
    with tcp_service(ErrorThenCloseHandler) as port:
        args = [
            "agent",
            "--gateway",
            f"127.0.0.1:{gateway.port}",
            "--expose",
            f"0:127.0.0.1:{port}",
        ]
        args += ["--fingerprint", gateway.fingerprint] if gateway.fingerprint else ["--no-tls"]
        agent = launch(*args, token=token)
        public_port = int(agent.wait_line(r"exposed at gateway port (\d+)").group(1))
        assert send_until_reset_trials(public_port, TRIALS) == {(ERROR_REPLY, "reset"): TRIALS}
