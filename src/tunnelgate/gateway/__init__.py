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

from tunnelgate.gateway.gateway import Gateway

__all__ = ["Gateway"]
