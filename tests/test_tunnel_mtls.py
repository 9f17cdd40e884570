"""Mutual TLS: a gateway with ``client_ca`` takes only agents whose certificate
its CA signed and names them, in addition to their token or instead of it.

Real TLS 1.3 on loopback; the CA and certificates come from ``trustme``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from kit.clients import echo_roundtrip
from kit.logs import LogRecorder
from kit.services import LocalServer
from kit.tunnels import OpenAgent, OpenGateway

from tunnelgate import Gateway
from tunnelgate.errors import AuthenticationError, TunnelgateError

pytestmark = pytest.mark.parametrize("mode", ["tls"])


class Certificates:
    """A CA the gateway trusts, another it does not, and files of certificates they issue."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.stranger = trustme.CA()
        self.ca_file = directory / "agents-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, name: str, ca: trustme.CA | None = None) -> dict[str, str]:
        """``cert`` and ``key`` options for an agent, for ``name``."""
        leaf = (ca or self.ca).issue_cert(name)
        cert, key = self.directory / f"{name}-{id(leaf)}.crt", self.directory / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        return {"cert": str(cert), "key": str(key)}


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


async def test_mtls_certificate_and_token_both_required(
    open_gateway: OpenGateway, open_agent: OpenAgent, echo_server: LocalServer, certs: Certificates
) -> None:
    """With client_ca and a token, an agent needs both; its data channels
    (resumed TLS sessions) carry the same identity and relay."""
    gateway = await open_gateway(client_ca=str(certs.ca_file))
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"], **certs.issue("site-a"))
    (service,) = (await agent.wait_ready(10)).values()
    for _ in range(5):
        await echo_roundtrip(service.address)
    wrong_token = await open_agent(
        gateway,
        expose=[f"0:{echo_server.local}"],
        name="site-a",
        token="not-the-token-0123456789",
        **certs.issue("site-a"),
    )
    with pytest.raises(AuthenticationError, match="token"):
        await wrong_token.wait_ready(10)


async def test_mtls_agent_without_certificate_refused_with_reason(
    open_gateway: OpenGateway, open_agent: OpenAgent, echo_server: LocalServer, certs: Certificates
) -> None:
    """An agent without a certificate fails in the TLS handshake and stops
    with an error that says why; it does not retry forever."""
    gateway = await open_gateway(client_ca=str(certs.ca_file))
    agent = await open_agent(gateway, expose=[f"0:{echo_server.local}"])
    with pytest.raises(AuthenticationError, match="certificate"):
        await agent.wait_ready(10)


async def test_mtls_certificate_from_another_ca_refused(
    open_gateway: OpenGateway, open_agent: OpenAgent, echo_server: LocalServer, certs: Certificates
) -> None:
    gateway = await open_gateway(client_ca=str(certs.ca_file))
    agent = await open_agent(
        gateway, expose=[f"0:{echo_server.local}"], **certs.issue("site-a", certs.stranger)
    )
    with pytest.raises(AuthenticationError, match="certificate"):
        await agent.wait_ready(10)


async def test_mtls_certificate_must_name_the_agent(
    open_gateway: OpenGateway,
    open_agent: OpenAgent,
    echo_server: LocalServer,
    certs: Certificates,
    tunnel_log: LogRecorder,
) -> None:
    """A valid certificate for site-b does not let its holder connect as site-a."""
    gateway = await open_gateway(client_ca=str(certs.ca_file))
    agent = await open_agent(
        gateway, expose=[f"0:{echo_server.local}"], name="site-a", **certs.issue("site-b")
    )
    with pytest.raises(AuthenticationError, match="certificate"):
        await agent.wait_ready(10)
    assert tunnel_log.find("certificate is for site-b, not this agent")


async def test_mtls_certificate_alone(
    open_gateway: OpenGateway, open_agent: OpenAgent, echo_server: LocalServer, certs: Certificates
) -> None:
    """A policy without tokens takes the certificate alone; the agent has no token."""
    gateway = await open_gateway(
        token=None, client_ca=str(certs.ca_file), agents=[{"name": "site-a"}]
    )
    agent = await open_agent(
        gateway, expose=[f"0:{echo_server.local}"], token=None, **certs.issue("site-a")
    )
    (service,) = (await agent.wait_ready(10)).values()
    await echo_roundtrip(service.address)
    impostor = await open_agent(
        gateway,
        expose=[f"0:{echo_server.local}"],
        name="site-b",
        token=None,
        **certs.issue("site-b"),
    )
    with pytest.raises(AuthenticationError):
        await impostor.wait_ready(10)


async def test_mtls_policy_without_token_needs_client_ca(tmp_path: Path, mode: str) -> None:
    """Without client_ca, an [[agents]] entry with no token is a config error."""
    with pytest.raises(TunnelgateError, match=r"agents\[0\]\.token: missing"):
        Gateway(listen="127.0.0.1:0", state_dir=str(tmp_path), agents=[{"name": "site-a"}])
