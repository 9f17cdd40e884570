"""Write the seed inputs of every fuzz target into ``fuzz/corpus/<target>/``.

Seeds are real encoded messages, frame streams, handshakes, config files and
PROXY protocol headers, valid and nearly valid, built with tunnelgate's own
encoders so they follow the code. Each file is named by the SHA-1 of its
content, as libFuzzer names the inputs it keeps, so running this again adds
nothing twice::

    .venv/bin/python fuzz/seed.py [TARGET ...]
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec
import targets

from tunnelgate import credentials, proxy_protocol
from tunnelgate.protocol import wire

CORPUS = Path(__file__).resolve().parent / "corpus"
TOKEN = "t" * 16 + "-seed-token"
HASH = credentials.hash_line(credentials.derive(TOKEN.encode(), "site-a").stored_key)

SAMPLES: list[wire.Message] = [
    wire.Challenge(wire.PROTOCOL_VERSION, bytes(range(32))),
    wire.Hello(wire.PROTOCOL_VERSION, "control", "site-a", b"\x01" * 32),
    wire.Hello(wire.PROTOCOL_VERSION, "data", "site-a", b"\x02" * 32, "ab12cd34"),
    wire.Welcome("ab12cd34", 10.0, 25.0, 64),
    wire.Refused("auth", "the gateway does not accept this token for agent 'site-a'"),
    wire.Register([wire.ServiceRequest("web", "", 8080), wire.ServiceRequest("db", "::", 0)]),
    wire.Registered(
        [
            wire.ServiceResult("web", True, "0.0.0.0", 8080),
            wire.ServiceResult("db", False, error="port 5432 is not allowed"),
        ]
    ),
    wire.Ping(7),
    wire.Pong(2**63 - 1),
    wire.PoolRequest(3),
    wire.PoolRelease(1),
    wire.PoolDiscarded(4096),
    wire.Start(17, "web", "203.0.113.7:51234", "198.51.100.1:443"),
    wire.Bye("shutting down"),
]


def _payload(message: wire.Message) -> bytes:
    return wire.encode_message(message)[wire.HEADER_SIZE :]


def _raw(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


def _message_frame(payload: bytes) -> bytes:
    """A MESSAGE frame around any payload, valid or not."""
    return ((wire.KIND_MESSAGE << 24) | len(payload)).to_bytes(4, "big") + payload


def _data(payload: bytes) -> bytes:
    header = bytearray(wire.HEADER_SIZE)
    wire.pack_data_header(header, len(payload))
    return bytes(header) + payload


def _frames_input(stream: bytes, cuts: list[int], step: int = 1) -> bytes:
    head = bytes([((step - 1) << 4) | len(cuts)])
    return head + b"".join(c.to_bytes(2, "big") for c in cuts) + stream


def frames_seeds() -> list[bytes]:
    everything = b"".join(wire.encode_message(m) for m in SAMPLES)
    relay = (
        wire.encode_message(SAMPLES[-2])
        + _data(b"GET / HTTP/1.1\r\n\r\n")
        + _data(bytes(300))
        + wire.END_FRAME
    )
    seeds = [
        _frames_input(everything, []),
        _frames_input(everything, [1, 5, 9, 40, 41, 200], step=3),
        _frames_input(relay, [4, 26, 30], step=16),
        _frames_input(relay, [0, 3, 26], step=7),
        _frames_input(_data(b"x") + wire.encode_abort("agent cannot connect"), [5]),
        _frames_input(wire.encode_abort(""), []),
        _frames_input(wire.encode_abort("\u00e9" * 600), [3]),  # cut to 1024 bytes
        _frames_input(b"\x02\x00\x00\x00", []),  # DATA of 0 bytes
        _frames_input(b"\x02\x10\x00\x01" + bytes(8), []),  # DATA over MAX_DATA_SIZE
        _frames_input(b"\x01\x01\x00\x01", []),  # MESSAGE over MAX_MESSAGE_SIZE
        _frames_input(b"\x03\x00\x00\x01\x00", []),  # END with payload
        _frames_input(b"\x05\x00\x00\x00", []),  # unknown kind
    ]
    return seeds


def messages_seeds() -> list[bytes]:
    seeds = [_payload(m) for m in SAMPLES]
    seeds += [
        _raw({"type": "hello", "version": 1, "role": "data", "agent": "a", "proof": b""}),
        _raw({"type": "hello", "version": 2, "role": "data", "agent": "a b", "proof": b""}),
        _raw({"type": "nope"}),
        _raw({"type": "ping", "seq": -1}),
        _raw({"type": "welcome", "session": "s", "heartbeat_interval": 0.0}),
        _raw([1, 2, 3]),
        b"\xc1",
        b"\x81\xa4type\xa4ping",
    ]
    return seeds


def handshake_seeds() -> list[bytes]:
    other_nonce = bytes(reversed(range(wire.NONCE_SIZE)))
    seeds = []
    roles: tuple[tuple[Literal["control", "data"], str], ...] = (
        ("control", ""),
        ("data", "ab12cd34"),
    )
    for role, session in roles:
        proof = credentials.proof_for(
            targets.HANDSHAKE_TOKEN, other_nonce, role, targets.HANDSHAKE_AGENT, session
        )
        hello = wire.Hello(wire.PROTOCOL_VERSION, role, targets.HANDSHAKE_AGENT, proof, session)
        seeds.append(wire.encode_message(hello))
    wrong = _raw({"type": "hello", "version": 1, "role": "control", "agent": "a", "proof": b""})
    seeds += [
        wire.encode_message(SAMPLES[1]),
        wire.encode_message(wire.Ping(1)),
        _message_frame(wrong),
        wire.END_FRAME,
        HASH.encode(),
        HASH[:-2].encode(),
        (HASH + "\n").encode(),
        b"tg2:" + b"A" * 43,
        b"tg1:abc",
    ]
    # A peer-chosen message type naming "protocol version": its error text is
    # what the gateway would put in Refused("version").
    for size in (600, 65490):  # over Refused's 512 characters; over MAX_MESSAGE_SIZE
        seeds.append(_message_frame(_raw({"type": "protocol version " + "x" * size})))
    return seeds


GATEWAY_CONFIGS = [
    "",
    f'listen = "0.0.0.0:8080"\ntoken = "{TOKEN}"\n',
    f"""listen = "[::]:0"
token = "{TOKEN}"
tls = false
bind_host = "127.0.0.1"
allow_bind = ["0.0.0.0", "127.0.0.1"]
allow_ports = ["3920", "8000-8100"]
heartbeat_interval = 5
heartbeat_timeout = 12.5
handshake_timeout = 3.0
pending_timeout = 2.0
max_pool_size = 16
drain_timeout = 0
max_connections = 100
max_pending_clients = 10
max_handshakes = 50
log_level = "debug"
log_format = "json"
""",
    f"""state_dir = "~/state"
cert = "~/cert.pem"
key = "~/key.pem"
client_ca = "~/ca.pem"
allow_ports = "3920,8000-8100"
allow_bind = "0.0.0.0,127.0.0.1"

[access]
deny = ["10.0.0.0/8", "::ffff:192.168.0.0/112"]
allow = ["0.0.0.0/0", "2001:db8::/32", "198.51.100.7"]
max_connections = 1000
max_connections_per_client = 10
rate_per_client = 2.5
burst_per_client = 5

[services.web]
allow = ["203.0.113.0/24"]
rate_per_client = 100

[[agents]]
name = "site-a"
token = "tttttttttttttttt-a"
allow_ports = ["3920"]
allow_bind = ["127.0.0.1"]
max_services = 8
max_connections = 64

[agents.access]
deny = ["192.0.2.0/24"]

[agents.services.web]
max_connections_per_client = 2

[[agents]]
name = "site-b"
token_hash = "{HASH}"
token_file = "missing.token"
""",
    f"""[[agents]]
name = "site-a"
token = ["{TOKEN}", "{TOKEN}-next"]
token_hash = ["{HASH}"]
""",
    # Nearly valid: wrong types and values where tables, lists and numbers belong.
    "agents = 3\n",
    "access = []\n",
    "services = 5\n",
    '[services]\nweb = "all"\n',
    f'[[agents]]\nname = "a"\ntoken = "{TOKEN}"\nallow_ports = {{}}\n',
    f'[[agents]]\nname = "a"\ntoken = "{TOKEN}"\nallow_bind = 3\nmax_services = 0\n',
    f'[[agents]]\nname = "a"\ntoken = "{TOKEN}"\n[agents.access]\nallow = []\n',
    f'[[agents]]\nname = "a"\ntoken = "{TOKEN}"\n[agents.services]\nweb = [1]\n',
    '[[agents]]\nname = "a b"\ntoken = "short"\ntoken_hash = "tg2:abc"\n',
    '[[agents]]\nname = "a"\ntoken_file = ["nowhere", 3]\n',
    '[access]\nallow = [3]\ndeny = "10.0.0.0/8"\nrate_per_client = inf\n',
    '[access]\ndeny = ["10.0.0.1/8"]\nburst_per_client = 3\nmax_connections = true\n',
    "[access]\nrate_per_client = 1e-320\n",
    "[access]\nrate_per_client = 1e-307\nburst_per_client = 30\n",
    "[access]\nrate_per_client = 1\nburst_per_client = 1" + "0" * 310 + "\n",
    "[access]\nrate_per_client = 1e300\n",
    'listen = "nowhere"\ntls = "yes"\nmax_pool_size = 1.5\nheartbeat_interval = nan\n',
    f'token = "{TOKEN}"\n[[agents]]\nname = "a"\ntoken = "{TOKEN}"\n',
    'cert = "~nosuchuser/cert.pem"\nkey = "key.pem"\n',
    'token_file = "~nosuchuser/token"\n',
    "a = " + "[" * 600 + "]" * 600 + "\n",
    'colour = 1\nlisten = "0.0.0.0:99999"\n',
]

AGENT_CONFIGS = [
    f'gateway = "gw.example:8080"\ntoken = "{TOKEN}"\nexpose = ["3920:localhost:80"]\n',
    f"""gateway = "[::1]:8080"
name = "site-a"
token = "{TOKEN}"
fingerprint = "SHA256:A140998D8C41D90F9568E4F838F0F4839072009D40D67B5BC4BB4A3C6E5C774B"
ca = "~/ca.pem"
expose = ["0.0.0.0:3920:localhost:80", "8080:[::1]:80"]
pool_size = 0
connect_timeout = 1
handshake_timeout = 2.5
reconnect_min = 1
reconnect_max = 0.5
drain_timeout = 0
proxy_protocol = "v2"
log_level = "warning"

[[services]]
name = "db"
port = 0
local = "127.0.0.1:5432"
proxy_protocol = "none"

[[services]]
name = "admin"
bind = "127.0.0.1"
port = 8000
local = "[::1]:9000"
""",
    f'gateway = "h:1"\ntoken = "{TOKEN}"\nservices = [3]\n',
    f'gateway = "h:1"\ntoken = "{TOKEN}"\nexpose = "1:a:2"\n',
    f'gateway = "h:1"\ntoken = "{TOKEN}"\nexpose = [{{}}]\n',
    f'gateway = "h:1"\ntoken = "{TOKEN}"\n[[services]]\nlocal = "a:1"\nname = 3\nbind = []\n',
    f'gateway = "h:1"\ntoken = "{TOKEN}"\n[[services]]\nlocal = 5\nport = true\n',
    f'gateway = "h:1"\ntoken = "{TOKEN}"\nproxy_protocol = 1\n[[services]]\nlocal = "a:1"\n',
    'gateway = "h:1"\ntoken_file = "missing.token"\nexpose = ["1:a:2"]\n',
    'gateway = "h:1"\ntoken_file = "~nosuchuser/token"\nexpose = ["1:a:2"]\n',
    f'gateway = "h:1"\ntoken = "{TOKEN}"\nca = "~nosuchuser/ca.pem"\nexpose = ["1:a:2"]\n',
    f'gateway = "h:1"\ntoken = "{TOKEN}"\ntls = false\nfingerprint = "SHA256:00"\n',
    'gateway = 3\ntoken = 3\nname = "a b"\npool_size = 300\n',
]

PROXY_HEADERS = [
    proxy_protocol.header(1, "203.0.113.7:51234", "198.51.100.1:443"),
    proxy_protocol.header(1, "[2001:db8::7]:51234", "[2001:db8::1]:443"),
    proxy_protocol.header(1, "[::ffff:203.0.113.7]:1", "198.51.100.1:443"),
    proxy_protocol.header(1, "", ""),
    proxy_protocol.header(2, "203.0.113.7:51234", "198.51.100.1:443"),
    proxy_protocol.header(2, "[2001:db8::7]:51234", "[::ffff:198.51.100.1]:443"),
    proxy_protocol.header(2, "", ""),
    proxy_protocol.header(2, "[2001:db8::7]:51234", "[2001:db8::1]:443") + b"GET / HTTP/1.1\r\n",
    b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\n",
    b"PROXY TCP4 " + b"1" * 120,
    proxy_protocol.V2_SIGNATURE + b"\x21\x31\x00\xd8" + b"/tmp/a\x00".ljust(216, b"\x00"),
    proxy_protocol.V2_SIGNATURE + b"\x21\x11\x00\x12" + bytes(12) + b"\x04\x00\x03abc",
    proxy_protocol.V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(12) + b"\x04\x00",
    proxy_protocol.V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),
    proxy_protocol.V2_SIGNATURE + b"\x10\x00\x00\x00",
    proxy_protocol.V2_SIGNATURE[:7],
    b"203.0.113.7:51234 198.51.100.1:443",
    b"[2001:db8::7]:80 [::ffff:1.2.3.4]:0",
    b"[fe80::1%eth0]:22 [::1]:22",
]


def forward_request_seeds() -> list[bytes]:
    """Requests on a link between gateways: valid, cut, too long, of the wrong types."""
    from tunnelgate.gateway import forwarding

    good = forwarding.encode_request(
        forwarding.Request(4000, "site-a", "203.0.113.7:51234", "198.51.100.1:4000", "gateway-1")
    )
    six = forwarding.Request(4000, "group web", "[2001:db8::7]:80", "", "n")
    wrong = msgspec.msgpack.encode({"port": 0, "client": 7, "server": "", "node": "x"})
    extra = msgspec.msgpack.encode({"port": 1, "client": "", "server": "", "node": "", "x": 1})
    return [
        good,
        good + b"client bytes that follow",
        good[:-3],
        forwarding.encode_request(six),
        b"TGF1\xff\xff" + bytes(64),
        b"TGF1\x00\x00",
        b"TGF0\x00\x01\x80",
        b"TGF1" + len(wrong).to_bytes(2, "big") + wrong,
        b"TGF1" + len(extra).to_bytes(2, "big") + extra,
    ]


SEEDS: dict[str, Callable[[], list[bytes]]] = {
    "frames": frames_seeds,
    "messages": messages_seeds,
    "handshake": handshake_seeds,
    "gateway_config": lambda: [text.encode() for text in GATEWAY_CONFIGS],
    "agent_config": lambda: [text.encode() for text in AGENT_CONFIGS],
    "proxy_header": lambda: list(PROXY_HEADERS),
    "forward_request": forward_request_seeds,
}


def write_seeds(target: str) -> int:
    """Write the seeds of ``target``; the number of files that were new."""
    directory = CORPUS / target
    directory.mkdir(parents=True, exist_ok=True)
    new = 0
    for seed in SEEDS[target]():
        path = directory / hashlib.sha1(seed).hexdigest()
        if not path.exists():
            path.write_bytes(seed)
            new += 1
    return new


def main(argv: list[str]) -> int:
    names = argv or list(targets.TARGETS)
    unknown = sorted(set(names) - set(SEEDS))
    if unknown:
        print(f"unknown target(s): {', '.join(unknown)}; known: {', '.join(SEEDS)}")
        return 2
    for name in names:
        print(f"{name}: {write_seeds(name)} new seed(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
