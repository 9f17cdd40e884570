"""The wire protocol without sockets or event loop: bytes in, events out."""

from __future__ import annotations

import contextlib
import itertools
import struct
import typing

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnelgate.errors import LocalProtocolError, RemoteProtocolError
from tunnelgate.protocol import wire as p

MESSAGE_TYPES = typing.get_args(p.Message)
TAGS = [t.__struct_config__.tag for t in MESSAGE_TYPES]
NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:@#/-"

names = st.text(NAME_CHARS, min_size=1, max_size=64)
hosts = st.text(max_size=255)
ports = st.integers(0, 65535)
u63 = st.integers(0, 2**63 - 1)
seconds = st.floats(0, 3600, exclude_min=True, allow_nan=False)
version = st.just(p.PROTOCOL_VERSION)

STRATEGIES: dict[type, st.SearchStrategy[p.Message]] = {
    p.Challenge: st.builds(p.Challenge, version=version, nonce=st.binary(min_size=32, max_size=32)),
    p.Hello: st.builds(
        p.Hello,
        version,
        st.sampled_from(["control", "data", "probe"]),
        names,
        st.binary(max_size=64),
        st.text(max_size=32),
    ),
    p.Welcome: st.builds(
        p.Welcome,
        st.text(min_size=1, max_size=32),
        seconds,
        seconds,
        st.integers(1, 65536),
        st.booleans(),
        st.lists(hosts, max_size=p.MAX_WORKERS),
        st.integers(0, p.MAX_WORKERS - 1),
    ),
    p.Refused: st.builds(
        p.Refused,
        st.sampled_from(["auth", "version", "session", "busy", "shutdown"]),
        st.text(max_size=512),
    ),
    p.Register: st.builds(
        p.Register,
        st.lists(
            st.builds(
                p.ServiceRequest, names, hosts, ports, names | st.just(""), st.binary(max_size=64)
            ),
            max_size=16,
        ),
    ),
    p.Registered: st.builds(
        p.Registered,
        st.lists(
            st.builds(
                p.ServiceResult,
                names,
                st.booleans(),
                hosts,
                ports,
                st.text(max_size=512),
                names | st.just(""),
            ),
            max_size=16,
        ),
    ),
    p.Ping: st.builds(p.Ping, u63),
    p.Pong: st.builds(p.Pong, u63),
    p.PoolRequest: st.builds(p.PoolRequest, st.integers(1, 1024)),
    p.PoolRelease: st.builds(p.PoolRelease, st.integers(1, 1024)),
    p.PoolDiscarded: st.builds(p.PoolDiscarded, st.integers(1, 4096)),
    p.Start: st.builds(p.Start, u63, names, st.text(max_size=64)),
    p.Finished: st.builds(p.Finished, u63),
    p.Measure: st.builds(
        p.Measure,
        st.sampled_from(["sink", "source"]),
        st.floats(0, p.MAX_MEASURE_SECONDS, exclude_min=True),
    ),
    p.Measured: st.builds(p.Measured, u63, st.floats(0, 3600)),
    p.Health: st.builds(p.Health, names, st.booleans(), st.text(max_size=512)),
    p.Bye: st.builds(p.Bye, st.text(max_size=512)),
}
messages = st.one_of(*STRATEGIES.values())


def frame(kind: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """A raw frame; ``length`` overrides the header's length field."""
    return struct.pack(">I", kind << 24 | (len(payload) if length is None else length)) + payload


def data_frame(payload: bytes) -> bytes:
    buffer = bytearray(p.HEADER_SIZE + len(payload))
    p.pack_data_header(buffer, len(payload))
    buffer[p.HEADER_SIZE :] = payload
    return bytes(buffer)


def merged(events: typing.Iterable[object]) -> list[object]:
    """``events`` with adjacent data joined: DATA chunking is not part of the protocol."""
    out: list[object] = []
    for event in events:
        if isinstance(event, bytes) and out and isinstance(out[-1], bytes):
            event = out.pop() + event
        out.append(event)
    return out


def decode(chunks: typing.Iterable[bytes]) -> list[object]:
    """Feed ``chunks`` to one decoder and return its events as comparable values."""
    decoder, events = p.FrameDecoder(), []
    for chunk in chunks:
        for event in decoder.feed(chunk):
            if isinstance(event, p.Data):
                events.append(bytes(event.view))  # the view dies at the next feed
            elif isinstance(event, p.End):
                events.append("END")
            elif isinstance(event, p.Abort):
                events.append(("ABORT", event.reason))
            else:
                events.append(event)
    assert decoder.at_frame_boundary
    return merged(events)


# (encoded frame, expected event) pairs of every kind
items = st.one_of(
    messages.map(lambda m: (p.encode_message(m), m)),
    st.binary(min_size=1, max_size=64).map(lambda d: (data_frame(d), d)),
    st.just((p.END_FRAME, "END")),
    st.text(max_size=40).map(lambda r: (p.encode_abort(r), ("ABORT", r))),
)


def test_strategies_cover_every_message_type() -> None:
    """Every message type of the protocol has a round-trip strategy here."""
    assert set(STRATEGIES) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("kind", MESSAGE_TYPES, ids=TAGS)
@given(data=st.data())
def test_message_round_trips(kind: type, data: st.DataObject) -> None:
    """A message encoded by one side is decoded to an equal message by the other."""
    message = data.draw(STRATEGIES[kind])
    assert decode([p.encode_message(message)]) == [message]


@given(pairs=st.lists(items, max_size=12), cuts=st.lists(st.integers(0, 2000)))
def test_decoder_events_do_not_depend_on_chunking(pairs: list, cuts: list[int]) -> None:
    """Whole, one byte at a time or cut anywhere, a stream decodes to the same events."""
    stream = b"".join(encoded for encoded, _ in pairs)
    expected = merged(event for _, event in pairs)
    assert decode([stream]) == expected
    assert decode(stream[i : i + 1] for i in range(len(stream))) == expected
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    assert decode(stream[a:b] for a, b in itertools.pairwise(bounds)) == expected


def test_decoder_split_at_every_offset_gives_same_events() -> None:
    """A stream with every frame kind, cut in two at any offset, decodes the same."""
    stream = b"".join(
        [
            p.encode_message(p.Hello(p.PROTOCOL_VERSION, "data", "agent-1", b"\x01" * 32)),
            p.encode_message(p.Start(7, "web", "203.0.113.9:4711")),
            data_frame(b"GET / HTTP/1.1\r\n"),
            data_frame(b"\x00" * 5),
            p.END_FRAME,
            p.encode_abort(""),
            p.encode_abort("relay reset \N{SNOWMAN}"),
            p.encode_message(p.Bye("shutdown")),
        ]
    )
    whole = decode([stream])
    assert len(whole) == 7  # the two data frames merge
    for offset in range(len(stream) + 1):
        assert decode([stream[:offset], stream[offset:]]) == whole, offset


def test_encode_abort_cuts_long_reasons() -> None:
    """An over-long abort reason is cut to fit instead of breaking the frame."""
    [reason] = [e[1] for e in decode([p.encode_abort("x" * 5000)])]
    assert reason == "x" * p.MAX_ABORT_SIZE


scalars = st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.binary()
msgpack_values = st.recursive(
    st.one_of(*scalars, st.text(), st.sampled_from(TAGS)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
frames = st.builds(
    frame,
    st.integers(0, 5),
    st.binary(max_size=64) | msgpack_values.map(msgspec.msgpack.encode),
)


@given(chunks=st.lists(st.binary() | frames))
def test_decoder_only_raises_remote_protocol_error(chunks: list[bytes]) -> None:
    """Whatever a peer sends, in whatever chunks, the only failure is RemoteProtocolError."""
    decoder = p.FrameDecoder()
    with contextlib.suppress(RemoteProtocolError):
        for chunk in chunks:
            list(decoder.feed(chunk))
    with contextlib.suppress(RemoteProtocolError):
        list(p.FrameDecoder().feed(b"".join(chunks)))


def hello_payload(**fields: object) -> bytes:
    valid = {"type": "hello", "version": 1, "role": "data", "agent": "a", "proof": b""}
    return msgspec.msgpack.encode(valid | fields)


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", "unknown frame kind 0x47"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "unknown frame kind 0x16"),
        (frame(p.KIND_MESSAGE, length=p.MAX_MESSAGE_SIZE + 1), "65537 bytes (limit 65536)"),
        (frame(p.KIND_MESSAGE, length=0), "message frame of 0 bytes"),
        (frame(p.KIND_DATA, length=0), "data frame of 0 bytes"),
        (frame(p.KIND_END, length=5), "end frame with 5 bytes of payload"),
        (frame(p.KIND_ABORT, length=p.MAX_ABORT_SIZE + 1), "abort frame of 1025 bytes"),
        (frame(p.KIND_MESSAGE, b"\xc1"), "undecodable message: MessagePack data is malformed"),
        (frame(p.KIND_MESSAGE, msgspec.msgpack.encode({"type": "teleport"})), "'teleport'"),
        (frame(p.KIND_MESSAGE, hello_payload(version=9)), "version 9 (this side speaks 2)"),
        (frame(p.KIND_MESSAGE, hello_payload(agent="bad name!")), "`$.agent`"),
        (frame(p.KIND_MESSAGE, hello_payload(agent="a" * 65)), "`$.agent`"),
        (frame(p.KIND_MESSAGE, hello_payload(agent="")), "`$.agent`"),
    ],
    ids=lambda v: None if isinstance(v, bytes) else v[:30],
)
def test_decoder_rejects_bad_input_with_helpful_reason(stream: bytes, reason: str) -> None:
    """Bad input is refused, from its header alone if that is bad, saying what was wrong."""
    with pytest.raises(RemoteProtocolError) as caught:
        list(p.FrameDecoder().feed(stream))
    assert reason in caught.value.reason
    assert str(caught.value).startswith("protocol error: ")


def test_decoder_rejects_agent_name_with_trailing_newline() -> None:
    """A name is one of the allowed characters only, no line break sneaks through."""
    with pytest.raises(RemoteProtocolError, match="agent"):
        list(p.FrameDecoder().feed(frame(p.KIND_MESSAGE, hello_payload(agent="agent\n"))))


def test_decoder_rejects_deeply_nested_message() -> None:
    """A small but deeply nested message is a protocol error, not a crash."""
    payload = b"\x82\xa4type\xa3bye\xa1z" + b"\x91" * 60_000 + b"\xc0"
    with pytest.raises(RemoteProtocolError):
        list(p.FrameDecoder().feed(frame(p.KIND_MESSAGE, payload)))


NONCE = bytes(range(32))


EXAMPLES: dict[type, p.Message] = {
    p.Challenge: p.Challenge(p.PROTOCOL_VERSION, NONCE),
    p.Hello: p.Hello(p.PROTOCOL_VERSION, "data", "a", bytes(32), "s1"),
    p.Welcome: p.Welcome("s1", 10.0, 30.0, 64),
    p.Refused: p.Refused("auth", "bad token"),
    p.Register: p.Register([p.ServiceRequest("web", "0.0.0.0", 8080)]),
    p.Registered: p.Registered([p.ServiceResult("web", True, "0.0.0.0", 8080)]),
    p.Ping: p.Ping(1),
    p.Pong: p.Pong(1),
    p.PoolRequest: p.PoolRequest(2),
    p.PoolRelease: p.PoolRelease(2),
    p.PoolDiscarded: p.PoolDiscarded(4),
    p.Start: p.Start(1, "web", "203.0.113.9:4711"),
    p.Finished: p.Finished(1),
    p.Measure: p.Measure("sink", 2.0),
    p.Measured: p.Measured(1 << 30, 2.0),
    p.Health: p.Health("web", False, "GET / answered 503, expected 200"),
    p.Bye: p.Bye("shutdown"),
}


def test_encode_message_refuses_oversized_message() -> None:
    """Sending a message the peer would reject fails here, as a local bug."""
    services = [p.ServiceRequest("n" * 64, "h" * 255, 65535)] * 256  # within every limit
    with pytest.raises(LocalProtocolError, match="message too large to send"):
        p.encode_message(p.Register(services))
    assert len(p.encode_message(p.Register(services[:128]))) <= p.MAX_MESSAGE_SIZE


def test_welcome_naming_the_most_workers_fits_in_a_message() -> None:
    """A gateway of MAX_WORKERS workers, each announced with the longest host, can say so."""
    workers = ["h" * 249 + ":65535"] * p.MAX_WORKERS
    welcome = p.Welcome("s" * 32, 10.0, 30.0, 64, True, workers, p.MAX_WORKERS - 1)
    assert p.decode_message(p.encode_message(welcome)[p.HEADER_SIZE :]) == welcome


def test_welcome_of_a_gateway_of_one_process_names_no_workers() -> None:
    """A Welcome without the workers' fields (an older gateway's) means one process."""
    older = msgspec.msgpack.encode(
        {"type": "welcome", "session": "s1", "heartbeat_interval": 10.0,
         "heartbeat_timeout": 30.0, "max_pool_size": 64}
    )  # fmt: skip
    welcome = p.decode_message(older)
    assert isinstance(welcome, p.Welcome) and (welcome.workers, welcome.worker) == ([], 0)


@pytest.mark.parametrize("length", [0, p.MAX_DATA_SIZE + 1])
def test_pack_data_header_refuses_invalid_length(length: int) -> None:
    """A DATA frame is 1 to MAX_DATA_SIZE bytes; anything else is a local bug."""
    with pytest.raises(LocalProtocolError, match=f"data frame of {length} bytes"):
        p.pack_data_header(bytearray(p.HEADER_SIZE), length)


def test_pack_data_header_accepts_largest_frame() -> None:
    """A full-size DATA frame goes through the decoder in one piece."""
    payload = bytes(range(256)) * (p.MAX_DATA_SIZE // 256)
    assert decode([data_frame(payload)]) == [payload]


def test_whole_data_frame_only_for_exactly_one_complete_data_frame() -> None:
    """The relay's fast path: one whole DATA frame gives its length and
    consumes nothing; anything else gives 0 and leaves the decoder as it was."""
    decoder = p.FrameDecoder()
    one = frame(p.KIND_DATA, b"hello")
    assert decoder.whole_data_frame(one) == 5
    assert decoder.at_frame_boundary
    assert decoder.whole_data_frame(one[:-1]) == 0  # incomplete
    assert decoder.whole_data_frame(one + one) == 0  # two frames
    assert decoder.whole_data_frame(frame(p.KIND_END)) == 0
    assert decoder.whole_data_frame(frame(p.KIND_ABORT, b"why")) == 0
    assert decoder.whole_data_frame(frame(p.KIND_DATA, b"x", length=2)) == 0  # length lies
    list(decoder.feed(one[:2]))  # a header under way: not a fast-path case
    assert decoder.whole_data_frame(one) == 0
    events = list(decoder.feed(one[2:]))
    assert [bytes(e.view) for e in events if isinstance(e, p.Data)] == [b"hello"]
