"""The session core, sans I/O: what each side of a channel may send and
receive in each state, and the handshake's decisions.

Everything that affects transitions lives in this module (h11's rule), in two
tables: :data:`RECEIVE` and :data:`SEND` map a side and a state to the
messages allowed there and the state each leads to. A :class:`Conversation`
walks them for one channel, control or data, on one side: the gateway and the
agent call :meth:`Conversation.receive` on every message that arrives and
:meth:`Conversation.send` on every message they are about to send, so a
message out of place is a :class:`~tunnelgate.errors.RemoteProtocolError` (the
peer broke the protocol) or a :class:`~tunnelgate.errors.LocalProtocolError`
(a bug here), never a surprise further in.

The life of a channel::

    agent                                gateway
    AWAIT_CHALLENGE  ◀── Challenge ───   NEW → AWAIT_HELLO
    HELLO_DUE        ─── Hello ──────▶   AUTHENTICATING
      control: AWAIT_WELCOME ◀─ Welcome ─ → CONTROL        (or Refused → CLOSED)
               REGISTER_DUE ── Register ▶
               REGISTERING ◀─ Registered ─
               CONTROL
      data:    POOLED      (silent)        accept_data_channel() → POOLED
               STARTED     ◀── Start ───   → STARTED       (then frames: the relay's)
               (reuse: the relay ended cleanly, END each way)
               FINISHING   ── Finished ──▶ ◀── Finished ── FINISHING   (either order)
               POOLED      (both seen: silent again, until the next Start)
      probe:   PROBE       (silent)        accept_probe() → PROBE   (or Refused → CLOSED)
               PROBE       ── Ping ──────▶ ◀── Pong ──     (the first Pong: token accepted)
               SINKING     ── Measure(sink) ▶ SINKING, DATA… END ▶, ◀ Measured → PROBE
               SOURCING    ── Measure(source) ▶ SOURCING, ◀ DATA… END, ◀ Measured → PROBE
               CLOSED      ── Bye ───────▶ → CLOSED

A probe channel is `tunnelgate doctor`'s: authenticated like a control channel, it
joins no session (so a running agent of the same name is left alone), and it carries
round trips and throughput measurements. Gateways older than it close the connection
at its Hello, which the doctor reports as a gateway without the measurement.

The handshake's decisions are functions here too: :func:`authenticate` (which
policy and stored key an agent's proof matches) and :func:`auth_refusal`
(what a refused agent is told). The gateway looks up the keys (slowly: they
may need deriving) and does the I/O; the fuzz target drives these same
functions without any.

Must not import asyncio, socket, ssl or time. No transition depends on the
clock: deadlines are the caller's (``asyncio.timeout`` around a receive), and
the handshake's timed decisions (failure delays, rate limits) are
:mod:`tunnelgate.gateway.admission`'s, which takes ``now``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from tunnelgate import credentials
from tunnelgate.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from tunnelgate.protocol.wire import Event, Finished, Hello, Measure, Message, Start


class Side(enum.Enum):
    AGENT = "agent"
    GATEWAY = "gateway"


class State(enum.Enum):
    NEW = "new"  # gateway: connected, the Challenge is due
    AWAIT_CHALLENGE = "awaiting the challenge"  # agent: connected
    AWAIT_HELLO = "awaiting the hello"  # gateway
    HELLO_DUE = "hello due"  # agent
    AUTHENTICATING = "authenticating"  # gateway: the Hello is being checked
    AWAIT_WELCOME = "awaiting the welcome"  # agent, control channel
    REGISTER_DUE = "register due"  # agent, control channel
    REGISTERING = "registering"  # agent: its first Register awaits its answer
    CONTROL = "control"  # both: the session runs
    POOLED = "pooled"  # both: an idle data channel
    STARTED = "started"  # both: a data channel carries a client; only relay frames now
    FINISHING = "finishing"  # both: sent Finished for the relayed connection, awaiting the peer's
    PEER_FINISHED = "finished by the peer"  # both: received the peer's Finished, ours is due
    PROBE = "probing"  # both: a probe channel, between measurements
    SINKING = "measuring to the gateway"  # both: the agent sends DATA frames, then END
    SOURCING = "measuring from the gateway"  # both: the gateway sends DATA frames, then END
    CLOSED = "closed"  # refused or said goodbye: nothing more may pass


_A, _G = Side.AGENT, Side.GATEWAY
_S = State


def _stay(state: State, *names: str) -> dict[str, State]:
    """Messages that leave a channel in ``state``."""
    return dict.fromkeys(names, state)


# What the agent sends on a running control channel is what the gateway
# receives there, and the other way round.
_AGENT_CONTROL = ("register", "ping", "pong", "pool_release", "health", "bye")
_GATEWAY_CONTROL = ("registered", "ping", "pong", "pool_request", "pool_discarded", "bye")
# What the agent sends on a probe channel (`tunnelgate doctor`), the gateway receives.
_AGENT_PROBE: Final = {
    "ping": State.PROBE,
    "measure/sink": State.SINKING,
    "measure/source": State.SOURCING,
    "bye": State.CLOSED,
}

# Messages are named by their tag; a Hello by its tag and role.
RECEIVE: Final[dict[tuple[Side, State], dict[str, State]]] = {
    (_A, _S.AWAIT_CHALLENGE): {"challenge": _S.HELLO_DUE, "refused": _S.CLOSED},
    (_A, _S.AWAIT_WELCOME): {"welcome": _S.REGISTER_DUE, "refused": _S.CLOSED},
    (_A, _S.REGISTERING): {
        **_stay(_S.REGISTERING, "ping", "pong", "bye"),
        "registered": _S.CONTROL,
    },
    (_A, _S.CONTROL): _stay(_S.CONTROL, *_GATEWAY_CONTROL),
    # The gateway checks a data channel idle for long with a Ping.
    (_A, _S.POOLED): {
        "start": _S.STARTED,
        "ping": _S.POOLED,
        "bye": _S.CLOSED,
        "refused": _S.CLOSED,
    },
    # A probe: the gateway answers after checking the proof, Refused or Pong.
    (_A, _S.STARTED): {"finished": _S.PEER_FINISHED},
    (_A, _S.FINISHING): {"finished": _S.POOLED},
    (_A, _S.PROBE): {"pong": _S.PROBE, "refused": _S.CLOSED},
    (_A, _S.SINKING): {"measured": _S.PROBE, "abort": _S.CLOSED},
    (_A, _S.SOURCING): {
        **_stay(_S.SOURCING, "data", "end"),
        "measured": _S.PROBE,
        "abort": _S.CLOSED,
    },
    (_G, _S.AWAIT_HELLO): _stay(_S.AUTHENTICATING, "hello/control", "hello/data", "hello/probe"),
    (_G, _S.CONTROL): _stay(_S.CONTROL, *_AGENT_CONTROL),
    (_G, _S.POOLED): {"pong": _S.POOLED},
    (_G, _S.STARTED): {"finished": _S.PEER_FINISHED},
    (_G, _S.FINISHING): {"finished": _S.POOLED},
    (_G, _S.PROBE): _AGENT_PROBE,
    (_G, _S.SINKING): _stay(_S.SINKING, "data", "end"),
}

SEND: Final[dict[tuple[Side, State], dict[str, State]]] = {
    (_A, _S.HELLO_DUE): {
        "hello/control": _S.AWAIT_WELCOME,
        "hello/data": _S.POOLED,
        "hello/probe": _S.PROBE,
    },
    (_A, _S.REGISTER_DUE): {"register": _S.REGISTERING, "bye": _S.REGISTER_DUE},
    (_A, _S.REGISTERING): _stay(_S.REGISTERING, "ping", "pong", "pool_release", "bye"),
    (_A, _S.CONTROL): _stay(_S.CONTROL, *_AGENT_CONTROL),
    (_A, _S.POOLED): {"pong": _S.POOLED},
    (_A, _S.STARTED): {"finished": _S.FINISHING},
    (_A, _S.PEER_FINISHED): {"finished": _S.POOLED},
    # The agent may send its first Ping right behind its Hello: the Pong says it was accepted.
    (_A, _S.PROBE): _AGENT_PROBE,
    (_G, _S.NEW): {"challenge": _S.AWAIT_HELLO},
    (_G, _S.AWAIT_HELLO): {"refused": _S.CLOSED},  # a protocol version it does not speak
    (_G, _S.AUTHENTICATING): {"welcome": _S.CONTROL, "refused": _S.CLOSED},
    (_G, _S.CONTROL): _stay(_S.CONTROL, *_GATEWAY_CONTROL),
    (_G, _S.POOLED): {"ping": _S.POOLED, "start": _S.STARTED},
    (_G, _S.STARTED): {"finished": _S.FINISHING},
    (_G, _S.PEER_FINISHED): {"finished": _S.POOLED},
    (_G, _S.PROBE): {"pong": _S.PROBE},
    # After the END of the agent's DATA, or of its own (frames sent outside the conversation,
    # as the relay's are): the count.
    (_G, _S.SINKING): {"measured": _S.PROBE},
    (_G, _S.SOURCING): {"measured": _S.PROBE},
}

_INITIAL: Final = {Side.AGENT: State.AWAIT_CHALLENGE, Side.GATEWAY: State.NEW}


def label(event: Event) -> str:
    """How the tables name ``event``: a message's tag (a Hello's with its
    role, a Measure's with its mode), or the kind of a relay frame."""
    if isinstance(event, Hello):
        return f"hello/{event.role}"
    if isinstance(event, Measure):
        return f"measure/{event.mode}"
    config = getattr(type(event), "__struct_config__", None)
    return str(config.tag) if config is not None else type(event).__name__.lower()


class Conversation:
    """The state of one channel on one side; see the module's tables. On a data channel it
    also holds the connection its last Start named: a Finished must name the same one."""

    __slots__ = ("conn", "side", "state")

    def __init__(self, side: Side, state: State | None = None) -> None:
        self.side = side
        self.state = _INITIAL[side] if state is None else state
        self.conn: int | None = None  # the connection started on this data channel

    def receive(self, event: Event) -> Event:
        """``event`` if it may arrive now (and move to the state it leads to);
        raises RemoteProtocolError otherwise. Only a probe's measuring states list
        relay frames: everywhere else the result is a message."""
        name = label(event)
        after = RECEIVE.get((self.side, self.state), {}).get(name)
        if after is None:
            raise RemoteProtocolError(f"unexpected {name} frame while {self.state.value}")
        if isinstance(event, Start | Finished):
            self._check_conn(event, RemoteProtocolError)
        self.state = after
        return event

    def send(self, message: Message) -> Message:
        """``message`` if this side may send it now (and move on); raises
        LocalProtocolError otherwise."""
        name = label(message)
        after = SEND.get((self.side, self.state), {}).get(name)
        if after is None:
            raise LocalProtocolError(f"cannot send {name} while {self.state.value}")
        if isinstance(message, Start | Finished):
            self._check_conn(message, LocalProtocolError)
        self.state = after
        return message

    def _check_conn(self, message: Start | Finished, error: type[ProtocolError]) -> None:
        """A Start names the channel's connection, another each time (not in order: a client
        that waited may get a channel that carried a later one); a Finished that one."""
        if isinstance(message, Start):
            if message.conn == self.conn:
                raise error(f"start of conn {message.conn} again")
            self.conn = message.conn
        elif message.conn != self.conn:
            raise error(f"finished for conn {message.conn} while carrying conn {self.conn}")

    def accept_data_channel(self) -> None:
        """Gateway: an authenticated data channel joins the pool, unanswered."""
        self._accept(State.POOLED, "pool a data channel")

    def accept_probe(self) -> None:
        """Gateway: an authenticated probe channel, unanswered until its first Ping."""
        self._accept(State.PROBE, "accept a probe")

    def _accept(self, state: State, what: str) -> None:
        if self.side is not Side.GATEWAY or self.state is not State.AUTHENTICATING:
            raise LocalProtocolError(f"cannot {what} while {self.state.value}")
        self.state = state


# --- the handshake's decisions -------------------------------------------------

P = TypeVar("P")


@dataclass(frozen=True)
class Candidate(Generic[P]):
    """A policy that may admit an agent, with the stored keys its proof may
    match; none: the agent's certificate alone admits it."""

    policy: P
    keys: Sequence[bytes]


@dataclass(frozen=True)
class Admitted(Generic[P]):
    policy: P
    key: bytes  # the stored key its proof matched; b"": its certificate alone
    nonce: bytes = b""  # the Challenge's: later proofs on the channel are bound to it


def authenticate(
    hello: Hello,
    nonce: bytes,
    candidates: Iterable[Candidate[P]],
    certificate_names: frozenset[str] | None = None,
) -> Admitted[P] | str:
    """The first candidate that admits the agent of ``hello``, or why none does.

    ``certificate_names`` are the names in the agent's verified certificate,
    when the gateway requires one: the agent's name must be among them. Every
    key of every candidate is checked, each in constant time, so the time
    taken does not tell which key came close.
    """
    if certificate_names is not None and hello.agent not in certificate_names:
        shown = ", ".join(sorted(certificate_names)) or "no name"
        return f"certificate is for {shown}, not this agent"
    found: Admitted[P] | None = None
    for candidate in candidates:
        if not candidate.keys:
            found = found or Admitted(candidate.policy, b"", nonce)
            continue
        for key in candidate.keys:
            if credentials.check_proof(
                key, hello.proof, nonce, hello.role, hello.agent, hello.session
            ):
                found = found or Admitted(candidate.policy, key, nonce)
    return found if found is not None else "token is wrong"


def auth_refusal_reason(hello: Hello, why: str) -> str:
    """What a refused agent is told: what was not accepted, never the detail."""
    return f"the gateway does not accept this {why.split()[0]} for agent {hello.agent!r}"
