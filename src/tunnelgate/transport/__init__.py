"""Transports: byte streams between agent and gateway, and to clients and services.
Orchestration imports them from here, never from the modules (stream, tcp,
tls_stream, pipe, poller, ipc). ``OSError`` and ``ssl.SSLError`` become TransportError
in this package and nowhere else. It logs nothing, and must not import from
tunnelgate beyond errors, address and tls.
"""

from tunnelgate.transport.ipc import ProcessChannel
from tunnelgate.transport.pipe import SPLICE_AVAILABLE, Pipe
from tunnelgate.transport.poller import epoll_descriptors, poller, wait_error
from tunnelgate.transport.stream import SpliceableStream, Stream, WouldBlock
from tunnelgate.transport.tcp import (
    Listener,
    SocketStream,
    connect,
    inherited_listener,
    open_listener,
    resolve,
)
from tunnelgate.transport.tls_stream import WANT_RETRY, TLSContext, TLSSession, TLSStream

__all__ = [
    "SPLICE_AVAILABLE",
    "WANT_RETRY",
    "Listener",
    "Pipe",
    "ProcessChannel",
    "SocketStream",
    "SpliceableStream",
    "Stream",
    "TLSContext",
    "TLSSession",
    "TLSStream",
    "WouldBlock",
    "connect",
    "epoll_descriptors",
    "inherited_listener",
    "open_listener",
    "poller",
    "resolve",
    "wait_error",
]
