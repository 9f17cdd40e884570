"""The gateway, the public side: :mod:`.gateway` (control port, sessions, drain, reload),
:mod:`.session` (one agent's), :mod:`.pool`, :mod:`.admission` (who may come in, without
I/O) and :mod:`.ports`. Nothing here imports :mod:`tunnelgate.agent`."""

from tunnelgate.gateway.gateway import Gateway

__all__ = ["Gateway"]
