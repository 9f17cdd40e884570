"""Transports: byte streams between agent and gateway, and to clients and services.

Orchestration (channel, relay, gateway, agent) sees connections only through
the :class:`Stream` interface and imports from this package, never from its
modules. What each module is for:

* ``stream`` — the interface: :class:`Stream`, :class:`SpliceableStream`,
  :class:`WouldBlock` (:class:`WouldBlockOnWrite`);
* ``tcp`` — plain TCP: :class:`SocketStream`, :func:`connect`,
  :func:`open_listener` and :class:`Listener`;
* ``tls_stream`` — :class:`TLSStream`, TLS 1.3 on a TCP stream's socket
  (contexts and certificates come from :mod:`tunnelgate.tls`);
* ``pipe`` — kernel pipes for the relay's splice path;
* ``poller`` — readiness of descriptors, an epoll set per event loop.

This is the transport edge: ``OSError`` and ``ssl.SSLError`` become
:class:`~tunnelgate.errors.TransportError` in this package and nowhere else.
It must not import gateway, agent, relay, channel, cli or logs (it logs
nothing), nor the protocol's framing; from config only ``Address`` and
``format_address``.
"""

from tunnelgate.transport.pipe import SPLICE_AVAILABLE, Pipe
from tunnelgate.transport.poller import Poller, epoll_descriptors, poller
from tunnelgate.transport.stream import SpliceableStream, Stream, WouldBlock, WouldBlockOnWrite
from tunnelgate.transport.tcp import Listener, SocketStream, connect, open_listener
from tunnelgate.transport.tls_stream import WANT_RETRY, TLSContext, TLSSession, TLSStream

__all__ = [
    "SPLICE_AVAILABLE",
    "WANT_RETRY",
    "Listener",
    "Pipe",
    "Poller",
    "SocketStream",
    "SpliceableStream",
    "Stream",
    "TLSContext",
    "TLSSession",
    "TLSStream",
    "WouldBlock",
    "WouldBlockOnWrite",
    "connect",
    "epoll_descriptors",
    "open_listener",
    "poller",
]
