"""The agent, the private side: one package, one concern per module.

* :mod:`~tunnelgate.agent.agent`: :class:`Agent`, the life cycle and the
  reconnect loop around its sessions, and :func:`expose`;
* :mod:`~tunnelgate.agent.session`: :class:`AgentSession`, one connection to
  one gateway (open, register, heartbeat, serve clients, drain), and the
  :class:`Dialer` that opens and authenticates its channels;
* :mod:`~tunnelgate.agent.pool`: how many data channels to keep open (pure),
  and the tasks that open them and serve their clients.

Nothing here imports :mod:`tunnelgate.gateway`.
"""

from tunnelgate.agent.agent import Agent, expose
from tunnelgate.agent.session import ExposedService

__all__ = ["Agent", "ExposedService", "expose"]
