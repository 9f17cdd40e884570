"""Fuzz targets: one function per parser of network or user input.

Each target takes arbitrary bytes, feeds them to tunnelgate the way the
gateway or the agent would, and returns normally when tunnelgate accepted or
rejected them as documented (``RemoteProtocolError`` for wire input,
``ConfigError`` for a config file, ``ValueError`` for a hash line). Any other
exception, or a broken invariant (an ``AssertionError`` raised here), is a
bug in tunnelgate. :data:`TARGETS` maps each name to its function.

This module must not import atheris: ``tests/test_fuzz_corpus.py`` replays the
corpus through it under plain pytest, and ``fuzz/run.py`` drives it under
atheris.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import shutil
import stat
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

from tunnelgate import access, config, credentials, proxy_protocol
from tunnelgate.address import format_address
from tunnelgate.errors import (
    ConfigError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    VersionMismatchError,
)
from tunnelgate.protocol import session, wire

T = TypeVar("T")

# A normalised event: ("data", bytes) | ("end",) | ("abort", str) | ("message", Message).
Normal = tuple[Any, ...]


# --- frames -------------------------------------------------------------------
#
# Input layout: byte 0 holds the number of cuts (low 4 bits) and a step size
# (high 4 bits, plus one); then one big-endian 16-bit offset per cut; the rest
# is the byte stream. The stream is decoded four ways (whole, in the chunks
# between the cuts with the relay's `whole_data_frame` shortcut, step by step
# with `bytes_wanted`/`skip_data` as the splice path reads, and by a reference
# model written from the frame table in docs/ARCHITECTURE.md), and all four
# must agree.


def split_frames_input(data: bytes) -> tuple[list[bytes], int, bytes]:
    """The chunks, the step size and the whole stream of a ``frames`` input."""
    if not data:
        return [], 1, b""
    count, step = data[0] & 0x0F, (data[0] >> 4) + 1
    head = min(len(data), 1 + 2 * count)
    stream = data[head:]
    cuts = sorted(
        {int.from_bytes(data[i : i + 2], "big") % (len(stream) + 1) for i in range(1, head - 1, 2)}
    )
    edges = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(edges) if b > a]
    return chunks, step, stream


def _normal(event: wire.Event) -> Normal:
    if isinstance(event, wire.Data):
        return ("data", bytes(event.view))
    if isinstance(event, wire.End):
        return ("end",)
    if isinstance(event, wire.Abort):
        return ("abort", event.reason)
    return ("message", event)


def _merged(events: list[Normal]) -> list[Normal]:
    """Adjacent DATA joined and empty DATA dropped: how the bytes were cut is not
    part of what a stream means."""
    out: list[Normal] = []
    for event in events:
        if event[0] == "data":
            if not event[1]:
                continue
            if out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + event[1])
                continue
        out.append(event)
    return out


class _Outcome:
    """What one way of decoding a stream produced."""

    def __init__(self) -> None:
        self.events: list[Normal] = []
        self.failed = False  # a RemoteProtocolError ended it
        self.data_remaining = 0
        self.at_frame_boundary = True

    def key(self) -> tuple[list[Normal], bool, int | None, bool | None]:
        if self.failed:  # the decoder's state after an error is unspecified
            return _merged(self.events), True, None, None
        return _merged(self.events), False, self.data_remaining, self.at_frame_boundary


def _reference(stream: bytes) -> _Outcome:
    """The frame table of docs/ARCHITECTURE.md, read as plainly as possible."""
    out = _Outcome()
    limits = {
        wire.KIND_MESSAGE: (1, wire.MAX_MESSAGE_SIZE),
        wire.KIND_DATA: (1, wire.MAX_DATA_SIZE),
        wire.KIND_END: (0, 0),
        wire.KIND_ABORT: (0, wire.MAX_ABORT_SIZE),
    }
    pos = 0
    while pos < len(stream):
        if len(stream) - pos < wire.HEADER_SIZE:
            out.at_frame_boundary = False
            return out
        word = int.from_bytes(stream[pos : pos + wire.HEADER_SIZE], "big")
        pos += wire.HEADER_SIZE
        kind, length = word >> 24, word & 0xFFFFFF
        low, high = limits.get(kind, (1, 0))
        if not low <= length <= high:
            out.failed = True
            return out
        payload = stream[pos : pos + length]
        pos += len(payload)
        if kind == wire.KIND_DATA:
            out.events.append(("data", payload))
            if len(payload) < length:
                out.data_remaining = length - len(payload)
                out.at_frame_boundary = False
                return out
            continue
        if len(payload) < length:
            out.at_frame_boundary = False
            return out
        if kind == wire.KIND_END:
            out.events.append(("end",))
        elif kind == wire.KIND_ABORT:
            out.events.append(("abort", payload.decode("utf-8", "replace")))
        else:
            try:
                out.events.append(("message", wire.decode_message(payload)))
            except RemoteProtocolError:
                out.failed = True
                return out
    return out


def _is_one_data_frame(chunk: bytes) -> bool:
    if len(chunk) <= wire.HEADER_SIZE:
        return False
    word = int.from_bytes(chunk[: wire.HEADER_SIZE], "big")
    length = len(chunk) - wire.HEADER_SIZE
    return word >> 24 == wire.KIND_DATA and word & 0xFFFFFF == length <= wire.MAX_DATA_SIZE


def _finish(out: _Outcome, decoder: wire.FrameDecoder) -> _Outcome:
    out.data_remaining = decoder.data_remaining
    out.at_frame_boundary = decoder.at_frame_boundary
    return out


def _decode_whole(stream: bytes) -> _Outcome:
    out, decoder = _Outcome(), wire.FrameDecoder()
    try:
        out.events.extend(_normal(e) for e in decoder.feed(stream))
    except RemoteProtocolError:
        out.failed = True
        return out
    return _finish(out, decoder)


def _decode_chunks(chunks: list[bytes]) -> _Outcome:
    """As the copy path reads: a read that is exactly one DATA frame skips `feed`."""
    out, decoder = _Outcome(), wire.FrameDecoder()
    try:
        for chunk in chunks:
            length = decoder.whole_data_frame(chunk)
            expected = len(chunk) - wire.HEADER_SIZE
            if decoder.at_frame_boundary and _is_one_data_frame(chunk):
                assert length == expected, f"whole_data_frame gave {length}, expected {expected}"
                out.events.append(("data", chunk[wire.HEADER_SIZE :]))
                continue
            assert length == 0, f"whole_data_frame took {length} bytes of a {len(chunk)}-byte read"
            out.events.extend(_normal(e) for e in decoder.feed(chunk))
    except RemoteProtocolError:
        out.failed = True
        return out
    return _finish(out, decoder)


def _decode_steps(stream: bytes, step: int) -> _Outcome:
    """As the splice path reads: DATA payload is moved past the decoder with
    `skip_data`, everything else is read at most `bytes_wanted` at a time."""
    out, decoder = _Outcome(), wire.FrameDecoder()
    pos = 0
    try:
        while pos < len(stream):
            remaining = decoder.data_remaining
            wanted = decoder.bytes_wanted
            assert wanted > 0, "bytes_wanted is 0: a reader would never make progress"
            if remaining:
                assert wanted == remaining, f"bytes_wanted {wanted} != data_remaining {remaining}"
                for bad in (0, remaining + 1):
                    with contextlib.suppress(LocalProtocolError):
                        decoder.skip_data(bad)
                        raise AssertionError(f"skip_data({bad}) of {remaining} was accepted")
                count = min(remaining, step, len(stream) - pos)
                decoder.skip_data(count)
                assert decoder.data_remaining == remaining - count
                out.events.append(("data", stream[pos : pos + count]))
                pos += count
                continue
            count = min(wanted, step, len(stream) - pos)
            for event in decoder.feed(stream[pos : pos + count]):
                assert not isinstance(event, wire.Data), "a read of bytes_wanted gave DATA"
                out.events.append(_normal(event))
            pos += count
    except RemoteProtocolError:
        out.failed = True
        return out
    return _finish(out, decoder)


def _check_round_trip(message: wire.Message) -> None:
    """A decoded message encodes to a frame that decodes to an equal message."""
    try:
        frame = wire.encode_message(message)
    except LocalProtocolError:
        # The encoder writes out defaults a peer may leave out; a payload near
        # the size limit can then be too large to send back. Not a decoding bug.
        return
    events = list(wire.FrameDecoder().feed(frame))
    assert len(events) == 1 and events[0] == message, f"{message!r} came back as {events!r}"


def frames(data: bytes) -> None:
    """``FrameDecoder`` on a stream cut at chosen offsets, against a reference model."""
    chunks, step, stream = split_frames_input(data)
    reference = _reference(stream)
    for name, outcome in (
        ("feed(whole)", _decode_whole(stream)),
        ("feed(chunks)", _decode_chunks(chunks)),
        ("skip_data steps", _decode_steps(stream, step)),
    ):
        got, want = outcome.key(), reference.key()
        assert got == want, f"{name} gave {got!r}, the frame table says {want!r}"
    for event in reference.events:
        if event[0] == "message":
            _check_round_trip(event[1])


# --- messages -----------------------------------------------------------------


def messages(data: bytes) -> None:
    """``decode_message`` on a MESSAGE payload, then every state of the session
    core receives it: accepted exactly where its table lists it."""
    try:
        message: wire.Message | None = wire.decode_message(data)
    except RemoteProtocolError:
        message = None
    events: list[wire.Event] = [
        wire.Data(memoryview(data)),
        wire.End(),
        wire.Abort(data.decode("utf-8", "replace")),
    ]
    if message is not None:
        events.append(message)
        _check_round_trip(message)
    for (side, state), allowed in session.RECEIVE.items():
        for event in events:
            conversation = session.Conversation(side, state)
            try:
                result = conversation.receive(event)
            except RemoteProtocolError:
                assert session.label(event) not in allowed, f"{event!r} refused {state}"
                assert conversation.state is state, "a refused message moved the state"
                continue
            assert session.label(event) in allowed, f"{event!r} accepted {state}"
            assert result is event
            assert conversation.state is allowed[session.label(event)]


# --- handshake ----------------------------------------------------------------

HANDSHAKE_TOKEN: Final = b"fuzz-token-0123456789"
HANDSHAKE_AGENT: Final = "site-a"
HANDSHAKE_NONCE: Final = bytes(range(wire.NONCE_SIZE))
STORED_KEY: Final = credentials.derive(HANDSHAKE_TOKEN, HANDSHAKE_AGENT).stored_key


def _check_sendable(message: wire.Message) -> None:
    """What the gateway answers a Hello with is a message the agent accepts."""
    try:
        frame = wire.encode_message(message)
        event = next(wire.FrameDecoder().feed(frame))
        agent = session.Conversation(session.Side.AGENT, session.State.AWAIT_WELCOME)
        agent.receive(event)
    except ProtocolError as exc:
        shown = repr(message)[:200]
        raise AssertionError(
            f"the agent cannot take the gateway's answer ({exc}): {shown}"
        ) from exc
    assert event == message, f"{message!r} reached the agent as {event!r}"


def _hash_line(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        key = credentials.parse_hash_line(text)
    except ValueError:
        return
    assert len(key) == credentials.KEY_SIZE, f"a stored key of {len(key)} bytes"
    assert credentials.hash_line(key) == text.strip(), f"{text!r} is not how {key!r} is written"


def handshake(data: bytes) -> None:
    """The gateway's side of the handshake, through the same session core and
    :func:`~tunnelgate.protocol.session.authenticate` the gateway uses, without I/O.

    ``data`` is what an agent sent after the Challenge carrying
    ``HANDSHAKE_NONCE``. No input may pass the proof check: that would be a
    forged authentication. The same bytes are also read as a ``token_hash`` line.
    """
    _hash_line(data)
    gateway = session.Conversation(session.Side.GATEWAY)
    gateway.send(wire.Challenge(wire.PROTOCOL_VERSION, HANDSHAKE_NONCE))
    try:
        event = next(wire.FrameDecoder().feed(data), None)
        if event is None:
            return
        hello = gateway.receive(event)
    except VersionMismatchError as exc:  # the gateway answers Refused("version")
        _check_sendable(gateway.send(wire.Refused("version", exc.reason)))
        return
    except RemoteProtocolError:
        return
    assert isinstance(hello, wire.Hello)
    verdict = session.authenticate(
        hello, HANDSHAKE_NONCE, [session.Candidate(None, [STORED_KEY])], None
    )
    assert isinstance(verdict, str), f"{hello!r} passed the proof check without the token"
    refusal = wire.Refused("auth", session.auth_refusal_reason(hello, verdict))
    _check_sendable(gateway.send(refusal))


# --- config files -------------------------------------------------------------

MAX_READ_FILE_SIZE: Final = 1 << 20
_SYSTEM_TREES: Final = ("/dev", "/proc", "/sys", "/run")
SCRATCH_PREFIX: Final = "tunnelgate-fuzz-"
_scratch: Path | None = None


def _scratch_base() -> Path:
    shm = "/dev/shm"
    return Path(shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir())


def remove_stale_scratch_dirs() -> None:
    """Remove the scratch directories of processes that are gone (by the pid
    in their name): libFuzzer ends its process without running ``atexit``."""
    for stale in _scratch_base().glob(f"{SCRATCH_PREFIX}*-"):
        pid = stale.name[len(SCRATCH_PREFIX) :].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _scratch_dir() -> Path:
    """A directory made once per process (in tmpfs when there is one)."""
    global _scratch
    if _scratch is None:
        remove_stale_scratch_dirs()
        prefix = f"{SCRATCH_PREFIX}{os.getpid()}-"
        _scratch = Path(tempfile.mkdtemp(prefix=prefix, suffix="-", dir=_scratch_base()))
        (_scratch / "home").mkdir()
        atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _isolated(scratch: Path) -> Iterator[None]:
    """HOME, XDG_STATE_HOME and the working directory in ``scratch``, and no
    token in the environment, for the duration of one load."""
    saved = {k: os.environ.get(k) for k in ("HOME", "XDG_STATE_HOME", config.TOKEN_ENV)}
    cwd = os.getcwd()
    os.environ["HOME"] = str(scratch / "home")
    os.environ["XDG_STATE_HOME"] = str(scratch / "home" / "state")
    os.environ.pop(config.TOKEN_ENV, None)
    os.chdir(scratch)
    try:
        yield
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _names_unsafe_file(data: bytes, scratch: str) -> bool:
    """Whether the TOML names a path that reading could block on or that is
    large: a device, a pipe, a socket, a file under /proc, ... A config may
    point ``token_file`` anywhere; the fuzzer must not read such files."""
    try:
        values = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return False  # the loader must reject it, which is what is under test
    for text in _strings(values):
        if "\x00" in text:
            continue
        path = os.path.realpath(os.path.expanduser(text))
        inside = path == scratch or path.startswith(scratch + os.sep)
        if not inside and path.startswith(_SYSTEM_TREES):
            return True
        try:
            info = os.stat(path)
        except (OSError, ValueError):
            continue
        if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
            return True
        if info.st_size > MAX_READ_FILE_SIZE:
            return True
    return False


def _load(data: bytes, loader: Callable[[Path], T]) -> T | None:
    scratch = _scratch_dir()
    with _isolated(scratch):
        if _names_unsafe_file(data, str(scratch)):
            return None
        path = scratch / "config.toml"
        path.write_bytes(data)
        try:
            return loader(path)
        except ConfigError as exc:
            assert exc.problems, "a ConfigError without problems"
            str(exc)
            return None


_CLIENTS: Final = tuple(
    ipaddress.ip_address(a) for a in ("10.1.2.3", "2001:db8::1", "::ffff:10.1.2.3")
)


def _check_rule(rule: access.AccessRule) -> None:
    """A rule the loader accepted can be put in force and admit or refuse a client."""
    gate = access.Gate(rule)
    for now, ip in enumerate(_CLIENTS):
        refusal = access.admit([gate], ip, float(now))
        if refusal is None:
            gate.release(ip)
        else:
            str(refusal)
    gate.rule = rule
    gate.statistics()
    _check_rate(rule)


MAX_BURST_CHECKED: Final = 64


def _check_rate(rule: access.AccessRule) -> None:
    """With ``rate_per_client``, a client gets ``burst_per_client`` connections
    in the same instant, and not one more."""
    burst = rule.burst_per_client
    if not rule.rate_per_client or burst > MAX_BURST_CHECKED:
        return
    gate = access.Gate(rule)
    admitted = [ip for ip in _CLIENTS if gate.check(ip, 0.0) is None]
    if not admitted or (rule.max_connections and rule.max_connections <= burst):
        return
    ip = admitted[0]
    for _ in range(burst):
        assert access.admit([gate], ip, 0.0) is None, f"{rule!r} refused within its burst"
        gate.release(ip)
    refusal = access.admit([gate], ip, 0.0)
    assert refusal is not None, f"{rule!r} admitted {burst + 1} connections in one instant"


def gateway_config(data: bytes) -> None:
    """``load_gateway_config`` on a TOML file, then every access rule put in force."""
    loaded = _load(data, config.load_gateway_config)
    if loaded is None:
        return
    gateway, _ = loaded
    rules = [gateway.access, *gateway.service_access.values()]
    for policy in gateway.agents:
        rules += [policy.access, *policy.service_access.values()]
    for rule in rules:
        if rule is not None:
            _check_rule(rule)


def agent_config(data: bytes) -> None:
    """``load_agent_config`` on a TOML file."""
    _load(data, config.load_agent_config)


# --- PROXY protocol -----------------------------------------------------------

MAX_PREFIXES_CHECKED: Final = 300
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _plain(text: str) -> IPAddress:
    """The address, an IPv4-mapped IPv6 one as the IPv4 address it carries."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _parse_back(built: bytes, version: int) -> proxy_protocol.ProxyHeader:
    """A header :func:`proxy_protocol.header` built parses back whole."""
    result = proxy_protocol.parse(built)  # RemoteProtocolError here is a bug: we built it
    assert result is not None and result[1] == len(built), f"{built!r} parsed as {result!r}"
    assert result[0].version == version
    return result[0]


def _check_header_round_trip(parsed: proxy_protocol.ProxyHeader) -> None:
    """The addresses of a parsed header, built again, parse back to the same
    (both IPv4 or IPv4-mapped: as TCP4; otherwise as TCP6, unchanged)."""
    if parsed.family not in ("inet", "inet6"):
        return
    client = format_address(parsed.source, parsed.source_port)
    server = format_address(parsed.destination, parsed.destination_port)
    source, destination = _plain(parsed.source), _plain(parsed.destination)
    expected: tuple[str, IPAddress, IPAddress]
    if source.version == destination.version == 4:
        expected = ("inet", source, destination)
    else:
        expected = (
            "inet6",
            ipaddress.ip_address(parsed.source),
            ipaddress.ip_address(parsed.destination),
        )
    read = _plain if expected[0] == "inet" else ipaddress.ip_address
    for version in (1, 2):
        again = _parse_back(proxy_protocol.header(version, client, server), version)
        assert again.family == expected[0], f"{parsed!r} built as {again!r}"
        got = (again.family, read(again.source), read(again.destination))
        assert got == expected, f"{parsed!r} built as {again!r}"
        assert (again.source_port, again.destination_port) == (
            parsed.source_port,
            parsed.destination_port,
        )


def _check_header_from_text(data: bytes) -> None:
    """``header`` on the ``client``/``server`` strings of a Start (peer-controlled)."""
    fields = data.decode("latin-1").split(" ")
    client, server = fields[0][:64], (fields[1][:64] if len(fields) > 1 else "")
    for version in (1, 2):
        built = _parse_back(proxy_protocol.header(version, client, server), version)
        if built.family != "unspec":
            ports = (built.source_port, built.destination_port)
            assert ports == (int(client.rpartition(":")[2]), int(server.rpartition(":")[2]))


def proxy_header(data: bytes) -> None:
    """``proxy_protocol.parse`` on what a service would read first, plus ``header``
    round trips."""
    _check_header_from_text(data)
    try:
        result = proxy_protocol.parse(data)
    except RemoteProtocolError:
        return
    end = len(data) if result is None else result[1]
    if result is not None:
        assert 0 < end <= len(data), f"a header of {end} bytes in {len(data)}"
        assert proxy_protocol.parse(data[:end]) == result, "the header depends on what follows"
        _check_header_round_trip(result[0])
    # Every strict beginning of a valid header (or of a valid beginning) is incomplete.
    for size in range(min(end, MAX_PREFIXES_CHECKED)):
        assert proxy_protocol.parse(data[:size]) is None, f"{data[:size]!r} is not incomplete"


def forward_request(data: bytes) -> None:
    """What another gateway of the fleet sends first on a link: ``request_size`` on its head,
    ``decode_request`` on the body; a request accepted encodes back to the same bytes."""
    from tunnelgate.gateway import forwarding

    head, rest = data[: forwarding.HEAD_SIZE], data[forwarding.HEAD_SIZE :]
    try:
        size = forwarding.request_size(head)
        if len(rest) < size:
            return
        request = forwarding.decode_request(rest[:size])
    except RemoteProtocolError:
        return
    assert 0 < request.port < 65536 and len(request.client) <= 64, request
    again = forwarding.encode_request(request)
    assert forwarding.decode_request(again[forwarding.HEAD_SIZE :]) == request


TARGETS: Final[dict[str, Callable[[bytes], None]]] = {
    "frames": frames,
    "messages": messages,
    "handshake": handshake,
    "gateway_config": gateway_config,
    "agent_config": agent_config,
    "proxy_header": proxy_header,
    "forward_request": forward_request,
}
