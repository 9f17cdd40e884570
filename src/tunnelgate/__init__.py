"""tunnelgate: a reverse TCP tunnel.

An :class:`Agent` inside a private network dials out to a public
:class:`Gateway`, which then accepts clients on public ports and carries each
connection through the tunnel to a service only the agent can reach.
:func:`expose` embeds an agent in a Python program.
"""

__version__ = "0.1.0"  # first: the modules below say it (an agent's Hello, the metrics)

from tunnelgate.address import Address
from tunnelgate.agent import Agent, ExposedService, expose
from tunnelgate.gateway import Gateway

__all__ = ["Address", "Agent", "ExposedService", "Gateway", "__version__", "expose"]
