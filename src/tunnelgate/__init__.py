"""tunnelgate: a reverse TCP tunnel.

An :class:`Agent` inside a private network dials out to a public
:class:`Gateway`, which then accepts clients on public ports and carries each
connection through the tunnel to a service only the agent can reach.
:func:`expose` embeds an agent in a Python program.

The names below are imported on first use, so that ``tunnelgate --version``
loads nothing else and a gateway never loads the agent, nor an agent the gateway.
"""

from __future__ import annotations

__version__ = "0.1.0"  # first: the modules below say it (an agent's Hello, the metrics)

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from tunnelgate.address import Address
    from tunnelgate.agent import Agent, ExposedService, expose
    from tunnelgate.gateway import Gateway

__all__ = ["Address", "Agent", "ExposedService", "Gateway", "__version__", "expose"]

_HOMES = {
    "Address": "tunnelgate.address",
    "Agent": "tunnelgate.agent",
    "ExposedService": "tunnelgate.agent",
    "expose": "tunnelgate.agent",
    "Gateway": "tunnelgate.gateway",
}


def __getattr__(name: str) -> object:
    """A public name, imported from its module the first time it is asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
