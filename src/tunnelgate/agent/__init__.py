"""The agent, the private side: :mod:`~tunnelgate.agent.agent` (the life cycle and reconnect
loop), :mod:`~tunnelgate.agent.session` (one connection to one gateway, and the :class:`Dialer`)
and :mod:`~tunnelgate.agent.pool` (the data channels). Nothing here imports the gateway.
"""

from tunnelgate.agent.agent import Agent, expose
from tunnelgate.agent.session import ExposedService

__all__ = ["Agent", "ExposedService", "expose"]
