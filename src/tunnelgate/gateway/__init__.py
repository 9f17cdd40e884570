"""The gateway, the public side: one package, one concern per module.

* :mod:`~tunnelgate.gateway.gateway`: :class:`Gateway`, the control port, the
  handshake, the registry of sessions, drain, stop and reload;
* :mod:`~tunnelgate.gateway.session`: :class:`GatewaySession`, one agent's
  control loop, services, clients and drain;
* :mod:`~tunnelgate.gateway.pool`: a session's idle data channels and the
  clients waiting for one;
* :mod:`~tunnelgate.gateway.admission`: who may come in (authentication
  delays, handshake limits, access rules), without I/O;
* :mod:`~tunnelgate.gateway.ports`: which session holds which public port.

Nothing here imports :mod:`tunnelgate.agent`.
"""

from tunnelgate.gateway.admission import (
    AUTH_DELAY_FIRST,
    AUTH_DELAY_MAX,
    AUTH_SUSPECT,
    AUTH_SUSPECT_HANDSHAKES,
)
from tunnelgate.gateway.gateway import Gateway, GatewayStatistics, with_stored_token
from tunnelgate.gateway.pool import POOL_CHECK_AGE, POOL_CHECK_TIMEOUT, PoolStatistics
from tunnelgate.gateway.session import (
    ClientStatistics,
    GatewaySession,
    ServiceStatistics,
    SessionStatistics,
)

__all__ = [
    "AUTH_DELAY_FIRST",
    "AUTH_DELAY_MAX",
    "AUTH_SUSPECT",
    "AUTH_SUSPECT_HANDSHAKES",
    "POOL_CHECK_AGE",
    "POOL_CHECK_TIMEOUT",
    "ClientStatistics",
    "Gateway",
    "GatewaySession",
    "GatewayStatistics",
    "PoolStatistics",
    "ServiceStatistics",
    "SessionStatistics",
    "with_stored_token",
]
