"""The wire protocol, sans I/O: bytes in, events out; messages in, bytes out.

Frames are ``kind:8 | length:24 | payload``: MESSAGE (a msgpack-encoded,
tagged :data:`Message`), DATA (relayed bytes), END (a half-close) and ABORT
(an abnormal end, with a reason); docs/ARCHITECTURE.md ("The protocol") has
the whole format and the handshake. Everything that can arrive off the
network is validated here; anything malformed raises
:class:`~tunnelgate.errors.RemoteProtocolError`. Must not import asyncio,
socket, ssl or time: clocks and I/O belong to callers.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Annotated, Final, Literal

import msgspec

from tunnelgate.address import NAME_PATTERN
from tunnelgate.errors import LocalProtocolError, RemoteProtocolError, VersionMismatchError

PROTOCOL_VERSION: Final = 2  # 2: the proof is SCRAM over scrypt (credentials.py)

KIND_MESSAGE: Final = 1
KIND_DATA: Final = 2
KIND_END: Final = 3
KIND_ABORT: Final = 4

HEADER_SIZE: Final = 4
MAX_MESSAGE_SIZE: Final = 64 * 1024
MAX_DATA_SIZE: Final = 1024 * 1024
WHOLE_FRAME_MAX: Final = HEADER_SIZE + MAX_DATA_SIZE  # the largest frame whole_data_frame takes
MAX_ABORT_SIZE: Final = 1024
NONCE_SIZE: Final = 32
MAX_SERVICES: Final = 256  # in one Register, so per agent
MAX_WORKERS: Final = 128  # worker processes of one gateway, announced in a Welcome (< 64 KiB)
MAX_MEASURE_SECONDS: Final = 10.0  # one throughput measurement on a probe channel, at most
# How an agent's ABORT begins when it cannot reach the local service.
AGENT_REACH_FAILURE: Final = "agent "

_HEADER = struct.Struct(">I")
_LENGTH_MASK: Final = 0xFFFFFF

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
OptionalName = Annotated[str, msgspec.Meta(pattern=rf"{NAME_PATTERN}|\A\Z")]  # a name, or ""
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Host = Annotated[str, msgspec.Meta(max_length=255)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]


class Challenge(msgspec.Struct, tag="challenge", frozen=True):
    """Gateway to agent, first frame on every connection."""

    version: int
    nonce: Annotated[bytes, msgspec.Meta(min_length=NONCE_SIZE, max_length=NONCE_SIZE)]


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """Agent to gateway: who it is, what the connection is for, and the proof."""

    version: int
    # "probe": `tunnelgate doctor`'s channel, authenticated like a control channel but
    # joining no session (gateways before it close the connection on this Hello).
    role: Literal["control", "data", "probe"]
    agent: Name
    proof: Annotated[bytes, msgspec.Meta(max_length=64)]
    session: Annotated[str, msgspec.Meta(max_length=32)] = ""
    # What the agent runs ("tunnelgate 0.1.0"), for the gateway's admin API; not proven,
    # and ignored by gateways before it (msgspec skips fields it does not know).
    software: Annotated[str, msgspec.Meta(max_length=64)] = ""
    # Control channel: the agent takes its data channels back after a clean end (Finished).
    reuse: bool = False
    # Control channel: when a Welcome lists workers, the agent holds a session with each and
    # dials each session's data channels at its own worker's address (gateways of several
    # workers refuse agents without it: their data channels would reach the wrong worker).
    workers: bool = False


class Welcome(msgspec.Struct, tag="welcome", frozen=True):
    """Gateway to agent: the control channel is accepted."""

    session: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    heartbeat_interval: Seconds
    heartbeat_timeout: Seconds
    max_pool_size: Annotated[int, msgspec.Meta(ge=1, le=65536)]
    # Data channels of this session go back to the pool after a clean end: the agent said it
    # can (Hello.reuse) and the gateway allows it.
    reuse: bool = False
    # A gateway of several worker processes: every worker's own control address ("host:port",
    # by index), and the index of the one that welcomes this session. The agent holds a
    # session with each, and opens a session's data channels at its worker's own address.
    # Empty from a gateway of one process, and ignored by agents before it.
    workers: Annotated[list[Host], msgspec.Meta(max_length=MAX_WORKERS)] = []
    worker: Annotated[int, msgspec.Meta(ge=0, lt=MAX_WORKERS)] = 0


class Refused(msgspec.Struct, tag="refused", frozen=True):
    """Gateway to agent: the connection is refused. ``code`` is machine-readable."""

    code: Literal["auth", "version", "session", "busy", "shutdown"]
    reason: Annotated[str, msgspec.Meta(max_length=512)]


class ServiceRequest(msgspec.Struct, frozen=True):
    """One service an agent asks the gateway to expose; with ``group``, as a member of that
    agent group, ``group_proof`` proving its secret (:func:`~tunnelgate.credentials.make_proof`
    of the secret's credential for the group's name, over the session id, role "group", the
    agent's name and the group's). Gateways before groups ignore both."""

    name: Name
    bind: Host
    port: Port
    group: OptionalName = ""
    group_proof: Annotated[bytes, msgspec.Meta(max_length=64)] = b""


class Register(msgspec.Struct, tag="register", frozen=True):
    """Agent to gateway: expose these services too (names not yet registered)."""

    services: Annotated[list[ServiceRequest], msgspec.Meta(max_length=MAX_SERVICES)]


class ServiceResult(msgspec.Struct, frozen=True):
    """The gateway's answer for one service: the public address, or why not. ``group``: the
    group it joined, so the agent reports the service's health (only to a gateway that knows
    groups)."""

    name: Name
    ok: bool
    bind: Host = ""
    port: Port = 0
    error: Annotated[str, msgspec.Meta(max_length=512)] = ""
    group: OptionalName = ""


class Registered(msgspec.Struct, tag="registered", frozen=True):
    """Gateway to agent: one result per requested service, in the same order."""

    results: Annotated[list[ServiceResult], msgspec.Meta(max_length=MAX_SERVICES)]


class Ping(msgspec.Struct, tag="ping", frozen=True):
    """Either way on the control channel; must be answered with a Pong."""

    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Pong(msgspec.Struct, tag="pong", frozen=True):
    """The answer to a Ping, echoing its sequence number."""

    seq: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class PoolRequest(msgspec.Struct, tag="pool_request", frozen=True):
    """Gateway to agent: clients are waiting, open this many more data channels."""

    count: Annotated[int, msgspec.Meta(ge=1, le=1024)]


class PoolRelease(msgspec.Struct, tag="pool_release", frozen=True):
    """Agent to gateway: fewer clients arrive now; close this many idle pooled
    data channels. Only the gateway knows which are idle, so it closes them
    and the agent sees each end without a Start."""

    count: Annotated[int, msgspec.Meta(ge=1, le=1024)]


class PoolDiscarded(msgspec.Struct, tag="pool_discarded", frozen=True):
    """Gateway to agent: this many pooled data channels failed their check (a
    path gone silent) and were closed. The agent cannot tell which of its idle
    channels they were: it stops counting that many as ready, and opens new
    ones; the dead ones end on their own (by RST, or by TCP keepalive)."""

    count: Annotated[int, msgspec.Meta(ge=1, le=4096)]


class Start(msgspec.Struct, tag="start", frozen=True):
    """Gateway to agent on a pooled data channel: carry this client connection."""

    conn: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    service: Name
    client: Annotated[str, msgspec.Meta(max_length=64)]  # the client's "host:port"
    server: Annotated[str, msgspec.Meta(max_length=64)] = ""  # the public "host:port" it reached


class Finished(msgspec.Struct, tag="finished", frozen=True):
    """Either way on a started data channel, after the relay of ``conn`` ended cleanly (END
    each way, nothing pending): this side sends nothing more for it. Once a side has sent its
    own and received the peer's, the channel is pooled again for the next Start, so no byte
    of one connection can reach the next (docs/ARCHITECTURE.md, "Data channel reuse")."""

    conn: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Measure(msgspec.Struct, tag="measure", frozen=True):
    """Agent to gateway on a probe channel: measure throughput for ``seconds``. "sink": the
    agent sends DATA frames, then END; "source": the gateway sends them, then END. Either
    way the gateway answers with :class:`Measured`."""

    mode: Literal["sink", "source"]
    seconds: Annotated[float, msgspec.Meta(gt=0, le=MAX_MEASURE_SECONDS)]


class Measured(msgspec.Struct, tag="measured", frozen=True):
    """Gateway to agent on a probe channel: the relayed bytes it received (sink) or sent
    (source) in one measurement, and over how long."""

    size: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # bytes
    seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)]


class Health(msgspec.Struct, tag="health", frozen=True):
    """Agent to gateway: a grouped service's health check passed (or failed, and why); the
    gateway sends the group's clients only to healthy members."""

    service: Name
    healthy: bool
    reason: Annotated[str, msgspec.Meta(max_length=512)] = ""


class Bye(msgspec.Struct, tag="bye", frozen=True):
    """Either way: the session is ending on purpose (shutdown, replaced)."""

    reason: Annotated[str, msgspec.Meta(max_length=512)]


Message = (
    Challenge
    | Hello
    | Welcome
    | Refused
    | Register
    | Registered
    | Ping
    | Pong
    | PoolRequest
    | PoolRelease
    | PoolDiscarded
    | Start
    | Finished
    | Measure
    | Measured
    | Health
    | Bye
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class Data:
    """Relayed bytes. ``view`` points into the buffer given to :meth:`FrameDecoder.feed`
    and is valid only until the next call: consume it first."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view


class End:
    """The peer half-closed: it will send no more relayed bytes."""

    __slots__ = ()


class Abort:
    """The peer ended the relay abnormally, for ``reason``."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


Event = Message | Data | End | Abort

END_FRAME: Final = _HEADER.pack(KIND_END << 24)


def encode_message(message: Message) -> bytes:
    """Encode one message as a complete MESSAGE frame."""
    payload = _encoder.encode(message)
    if len(payload) > MAX_MESSAGE_SIZE:
        raise LocalProtocolError(f"message too large to send ({len(payload)} bytes)")
    return _HEADER.pack((KIND_MESSAGE << 24) | len(payload)) + payload


def encode_abort(reason: str) -> bytes:
    """Encode an ABORT frame; the reason is cut to ``MAX_ABORT_SIZE`` bytes."""
    payload = reason.encode("utf-8", "replace")[:MAX_ABORT_SIZE]
    return _HEADER.pack((KIND_ABORT << 24) | len(payload)) + payload


def pack_data_header(buffer: bytearray | memoryview, length: int) -> None:
    """Write a DATA header for ``length`` payload bytes into ``buffer[0:4]``.

    The relay reads payload into ``buffer[4:]`` and sends header and payload
    with one call, so relaying allocates nothing per chunk.
    """
    if not 0 < length <= MAX_DATA_SIZE:
        raise LocalProtocolError(f"data frame of {length} bytes")
    _HEADER.pack_into(buffer, 0, (KIND_DATA << 24) | length)


class FrameDecoder:
    """Turns a byte stream into events, whatever the chunking of the input.

    DATA payload is passed through as views of the caller's buffer, never
    copied; headers and message bodies split across reads are collected here,
    bounded by ``MAX_MESSAGE_SIZE``.
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._kind = 0
        self._remaining = 0  # payload bytes still due for the current frame
        self._body = bytearray()  # MESSAGE/ABORT payload collected so far
        self._in_frame = False

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is buffered."""
        return not self._in_frame and not self._header

    @property
    def data_remaining(self) -> int:
        """Payload bytes still due for the current DATA frame, 0 outside one.

        A caller may move these bytes itself (``os.splice``) instead of
        feeding them, then account for them with :meth:`skip_data`.
        """
        return self._remaining if self._in_frame and self._kind == KIND_DATA else 0

    @property
    def bytes_wanted(self) -> int:
        """Bytes that complete the current header, or the current non-DATA
        frame: reading exactly this many never reads into a DATA payload."""
        if not self._in_frame:
            return HEADER_SIZE - len(self._header)
        return self._remaining

    def whole_data_frame(self, data: bytes | bytearray | memoryview) -> int:
        """If ``data`` is exactly one complete DATA frame and no frame is
        under way, the payload length (the caller takes ``data[4:]``); else 0
        and nothing is consumed. The common case of a small message, without
        the generator of :meth:`feed`."""
        if self._in_frame or self._header or not HEADER_SIZE < len(data) <= WHOLE_FRAME_MAX:
            return 0  # (a longer one is left to feed(), which also checks MAX_DATA_SIZE)
        (word,) = _HEADER.unpack_from(data)
        length = len(data) - HEADER_SIZE
        return length if word == (KIND_DATA << 24) | length else 0

    def skip_data(self, count: int) -> None:
        """Account for ``count`` DATA payload bytes the caller moved itself."""
        if not 0 < count <= self.data_remaining:
            raise LocalProtocolError(f"cannot skip {count} of {self.data_remaining} data bytes")
        self._remaining -= count
        if self._remaining == 0:
            self._in_frame = False

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Event]:
        """Yield the events completed by ``data``. Raises RemoteProtocolError."""
        view = memoryview(data)
        pos = 0
        size = len(view)
        while pos < size:
            if not self._in_frame:
                need = HEADER_SIZE - len(self._header)
                if not self._header and size - pos >= HEADER_SIZE:
                    (word,) = _HEADER.unpack_from(view, pos)
                    pos += HEADER_SIZE
                else:
                    take = min(need, size - pos)
                    self._header += view[pos : pos + take]
                    pos += take
                    if len(self._header) < HEADER_SIZE:
                        return
                    (word,) = _HEADER.unpack(self._header)
                    self._header.clear()
                event = self._begin(word >> 24, word & _LENGTH_MASK)
                if event is not None:
                    yield event
                continue
            take = min(self._remaining, size - pos)
            if self._kind == KIND_DATA:
                self._remaining -= take
                if self._remaining == 0:
                    self._in_frame = False
                yield Data(view[pos : pos + take])
                pos += take
                continue
            self._body += view[pos : pos + take]
            pos += take
            self._remaining -= take
            if self._remaining == 0:
                yield self._finish()

    def _begin(self, kind: int, length: int) -> Event | None:
        if kind == KIND_DATA:
            if length == 0 or length > MAX_DATA_SIZE:
                raise RemoteProtocolError(f"data frame of {length} bytes")
        elif kind == KIND_MESSAGE:
            if length == 0 or length > MAX_MESSAGE_SIZE:
                raise RemoteProtocolError(
                    f"message frame of {length} bytes (limit {MAX_MESSAGE_SIZE})"
                )
        elif kind == KIND_END:
            if length != 0:
                raise RemoteProtocolError(f"end frame with {length} bytes of payload")
            return End()
        elif kind == KIND_ABORT:
            if length > MAX_ABORT_SIZE:
                raise RemoteProtocolError(f"abort frame of {length} bytes")
            if length == 0:
                return Abort("")
        else:
            raise RemoteProtocolError(f"unknown frame kind {kind:#04x}")
        self._kind = kind
        self._remaining = length
        self._in_frame = True
        return None

    def _finish(self) -> Event:
        self._in_frame = False
        body = bytes(self._body)
        self._body.clear()
        if self._kind == KIND_ABORT:
            return Abort(body.decode("utf-8", "replace"))
        return decode_message(body)


def decode_message(payload: bytes) -> Message:
    """Decode one MESSAGE payload. Raises RemoteProtocolError."""
    try:
        message: Message = _decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise RemoteProtocolError(f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise RemoteProtocolError(f"undecodable message: {exc}") from None
    except RecursionError:
        raise RemoteProtocolError("message nested too deeply") from None
    if isinstance(message, Challenge | Hello) and message.version != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"protocol version {message.version} (this side speaks {PROTOCOL_VERSION})"
        )
    return message
