"""The wire protocol and the session core, sans I/O.

* :mod:`~tunnelgate.protocol.wire`: frames and messages, bytes in, events out;
* :mod:`~tunnelgate.protocol.session`: which message each side may send and
  receive in each state of a channel, and the handshake's decisions.

Nothing in this package imports asyncio, socket, ssl or time, nor any other
part of tunnelgate than ``errors`` and ``credentials``.
"""
