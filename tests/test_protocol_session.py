"""The session core without sockets or an event loop: every (side, state,
message) pair against the tables, and the handshake's decisions."""

from __future__ import annotations

import itertools

import pytest

from tunnelgate import credentials
from tunnelgate.errors import LocalProtocolError, RemoteProtocolError
from tunnelgate.protocol import session as s
from tunnelgate.protocol import wire as p

NONCE = bytes(range(p.NONCE_SIZE))
TOKEN = b"a-token-for-the-session-core-tests"

EXAMPLES: list[p.Event] = [
    p.Challenge(p.PROTOCOL_VERSION, NONCE),
    p.Hello(p.PROTOCOL_VERSION, "control", "site-a", bytes(32)),
    p.Hello(p.PROTOCOL_VERSION, "data", "site-a", bytes(32), "s1"),
    p.Welcome("s1", 10.0, 30.0, 64),
    p.Refused("auth", "bad token"),
    p.Register([p.ServiceRequest("web", "0.0.0.0", 8080)]),
    p.Registered([p.ServiceResult("web", True, "0.0.0.0", 8080)]),
    p.Ping(1),
    p.Pong(1),
    p.PoolRequest(2),
    p.PoolRelease(2),
    p.PoolDiscarded(4),
    p.Health("web", False, "refused"),
    p.Start(1, "web", "203.0.113.9:4711"),
    p.Finished(0),
    p.Bye("shutdown"),
    p.Hello(p.PROTOCOL_VERSION, "probe", "site-a", bytes(32)),
    p.Measure("sink", 2.0),
    p.Measure("source", 2.0),
    p.Measured(1024, 2.0),
    p.Data(memoryview(b"x")),
    p.End(),
    p.Abort("gone"),
]
LABELS = [s.label(event) for event in EXAMPLES]
MESSAGES: list[p.Message] = [e for e in EXAMPLES if not isinstance(e, p.Data | p.End | p.Abort)]
EVERY_STATE = list(itertools.product(s.Side, s.State))


def test_examples_cover_every_label_in_the_tables() -> None:
    """Each message the tables name has an example here, so no entry goes untested."""
    named = {name for table in (s.RECEIVE, s.SEND) for row in table.values() for name in row}
    assert named <= set(LABELS), named - set(LABELS)


@pytest.mark.parametrize(("side", "state"), EVERY_STATE, ids=lambda v: str(v.value))
@pytest.mark.parametrize("event", EXAMPLES, ids=LABELS)
def test_receive_follows_the_table(side: s.Side, state: s.State, event: p.Event) -> None:
    """A message is accepted exactly where the table lists it, and moves the
    state where the table says; anything else is the peer's protocol error
    and leaves the state as it was."""
    conversation = s.Conversation(side, state)
    conversation.conn = 0  # a data channel that carried conn 0: Finished(0) names it
    allowed = s.RECEIVE.get((side, state), {})
    name = s.label(event)
    if name in allowed:
        assert conversation.receive(event) is event
        assert conversation.state is allowed[name]
    else:
        with pytest.raises(RemoteProtocolError, match=f"unexpected {name} frame while"):
            conversation.receive(event)
        assert conversation.state is state


@pytest.mark.parametrize(("side", "state"), EVERY_STATE, ids=lambda v: str(v.value))
@pytest.mark.parametrize("event", MESSAGES, ids=[s.label(m) for m in MESSAGES])
def test_send_follows_the_table(side: s.Side, state: s.State, event: p.Message) -> None:
    """This side may send a message exactly where the table lists it; anything
    else is a bug here (LocalProtocolError), caught before it is sent."""
    conversation = s.Conversation(side, state)
    conversation.conn = 0  # a data channel that carried conn 0: Finished(0) names it
    allowed = s.SEND.get((side, state), {})
    name = s.label(event)
    if name in allowed:
        assert conversation.send(event) is event
        assert conversation.state is allowed[name]
    else:
        with pytest.raises(LocalProtocolError, match=f"cannot send {name} while"):
            conversation.send(event)
        assert conversation.state is state


def walk(agent: s.Conversation, gateway: s.Conversation, message: p.Message) -> None:
    """One message from whichever side may send it to the other."""
    sender, receiver = (
        (agent, gateway)
        if (agent.side, agent.state) in s.SEND
        and s.label(message) in s.SEND[(agent.side, agent.state)]
        else (gateway, agent)
    )
    receiver.receive(sender.send(message))


def test_a_control_channel_runs_from_challenge_to_bye() -> None:
    """The whole life of a control channel, both sides stepping in turn."""
    agent, gateway = s.Conversation(s.Side.AGENT), s.Conversation(s.Side.GATEWAY)
    for message in [*EXAMPLES[0:2], EXAMPLES[3], EXAMPLES[5], EXAMPLES[6]]:
        walk(agent, gateway, message)  # type: ignore[arg-type]
    assert agent.state is gateway.state is s.State.CONTROL
    for message in (p.Ping(1), p.Pong(1), p.PoolRequest(1), p.PoolRelease(1), p.Bye("bye")):
        walk(agent, gateway, message)
    assert agent.state is gateway.state is s.State.CONTROL


def test_a_data_channel_is_pooled_checked_then_started() -> None:
    """A data channel: Challenge, Hello, pooled without an answer, a Ping
    check, then Start; after Start no message may pass either way."""
    agent, gateway = s.Conversation(s.Side.AGENT), s.Conversation(s.Side.GATEWAY)
    walk(agent, gateway, EXAMPLES[0])  # type: ignore[arg-type]
    walk(agent, gateway, EXAMPLES[2])  # type: ignore[arg-type]
    gateway.accept_data_channel()
    assert agent.state is gateway.state is s.State.POOLED
    walk(agent, gateway, p.Ping(0))
    walk(agent, gateway, p.Pong(0))
    walk(agent, gateway, p.Start(1, "web", "203.0.113.9:4711"))
    assert agent.state is gateway.state is s.State.STARTED
    with pytest.raises(RemoteProtocolError):
        agent.receive(p.Ping(2))
    with pytest.raises(LocalProtocolError):
        gateway.send(p.Ping(2))


def started(conn: int = 1) -> tuple[s.Conversation, s.Conversation]:
    """Both sides of a data channel carrying ``conn``."""
    agent, gateway = s.Conversation(s.Side.AGENT), s.Conversation(s.Side.GATEWAY)
    walk(agent, gateway, EXAMPLES[0])  # type: ignore[arg-type]
    walk(agent, gateway, EXAMPLES[2])  # type: ignore[arg-type]
    gateway.accept_data_channel()
    walk(agent, gateway, p.Start(conn, "web", "203.0.113.9:4711"))
    return agent, gateway


@pytest.mark.parametrize("first", [s.Side.AGENT, s.Side.GATEWAY], ids=lambda v: v.value)
def test_a_data_channel_finished_both_ways_is_pooled_and_started_again(first: s.Side) -> None:
    """After a clean end each side sends Finished for the connection, in either order; once
    a side has sent its own and received the peer's, the channel is pooled and takes the
    next Start, and then the next connection's Finished."""
    agent, gateway = started(7)
    one, other = (agent, gateway) if first is s.Side.AGENT else (gateway, agent)
    other.receive(one.send(p.Finished(7)))
    assert one.state is s.State.FINISHING and other.state is s.State.PEER_FINISHED
    one.receive(other.send(p.Finished(7)))
    assert agent.state is gateway.state is s.State.POOLED
    walk(agent, gateway, p.Ping(3))  # the idle check, as for a new channel
    walk(agent, gateway, p.Pong(3))
    walk(agent, gateway, p.Start(8, "web", "203.0.113.9:4712"))
    assert agent.state is gateway.state is s.State.STARTED and agent.conn == gateway.conn == 8
    walk(agent, gateway, p.Finished(8))
    walk(agent, gateway, p.Finished(8))
    assert agent.state is gateway.state is s.State.POOLED


def test_no_start_can_overtake_the_peers_finished() -> None:
    """Reuse is safe by construction: the gateway cannot send the next Start before it has
    the agent's Finished for the last connection (after which the agent sends nothing more
    for it), and an agent that gets a Start before the gateway's Finished rejects it."""
    agent, gateway = started(1)
    gateway.send(p.Finished(1))
    with pytest.raises(LocalProtocolError, match="cannot send start while finishing"):
        gateway.send(p.Start(2, "web", "203.0.113.9:4712"))
    with pytest.raises(RemoteProtocolError, match="unexpected start frame while started"):
        agent.receive(p.Start(2, "web", "203.0.113.9:4712"))
    agent, gateway = started(1)
    agent.send(p.Finished(1))
    with pytest.raises(RemoteProtocolError, match="unexpected start frame while finishing"):
        agent.receive(p.Start(2, "web", "203.0.113.9:4712"))


def test_a_finished_must_name_the_connection_the_channel_carries() -> None:
    """A Finished for another connection (a stale or forged one) is the peer's protocol
    error, and this side cannot send one by mistake; the state does not move."""
    agent, gateway = started(5)
    with pytest.raises(RemoteProtocolError, match="finished for conn 4 while carrying conn 5"):
        gateway.receive(p.Finished(4))
    assert gateway.state is s.State.STARTED
    with pytest.raises(LocalProtocolError, match="finished for conn 6 while carrying conn 5"):
        agent.send(p.Finished(6))
    assert agent.state is s.State.STARTED


def test_a_channel_never_carries_the_same_connection_twice() -> None:
    """A Start naming the connection the channel just carried (a replay) is refused; an
    older one is not (a client that waited for a channel may get one that carried a later
    client), and then its Finished must name it."""
    agent, gateway = started(5)
    walk(agent, gateway, p.Finished(5))
    walk(agent, gateway, p.Finished(5))
    with pytest.raises(RemoteProtocolError, match="start of conn 5 again"):
        agent.receive(p.Start(5, "web", "203.0.113.9:4712"))
    with pytest.raises(LocalProtocolError, match="start of conn 5 again"):
        gateway.send(p.Start(5, "web", "203.0.113.9:4712"))
    assert agent.state is gateway.state is s.State.POOLED
    walk(agent, gateway, p.Start(3, "web", "203.0.113.9:4712"))
    with pytest.raises(RemoteProtocolError, match="finished for conn 5 while carrying conn 3"):
        gateway.receive(p.Finished(5))


def test_only_an_authenticating_gateway_pools_a_data_channel() -> None:
    """Pooling a channel that has not said Hello is a bug, not a state change."""
    with pytest.raises(LocalProtocolError, match="cannot pool"):
        s.Conversation(s.Side.GATEWAY, s.State.AWAIT_HELLO).accept_data_channel()
    with pytest.raises(LocalProtocolError, match="cannot pool"):
        s.Conversation(s.Side.AGENT, s.State.AUTHENTICATING).accept_data_channel()


def test_a_probe_is_accepted_pinged_measured_both_ways_and_ended() -> None:
    """A probe channel: Hello, accepted unanswered, Pings answered, a sink (the agent's
    DATA then END) and a source (the gateway's) each answered by Measured, then Bye."""
    agent, gateway = s.Conversation(s.Side.AGENT), s.Conversation(s.Side.GATEWAY)
    walk(agent, gateway, EXAMPLES[0])  # type: ignore[arg-type]
    walk(agent, gateway, p.Hello(p.PROTOCOL_VERSION, "probe", "site-a", bytes(32)))
    assert agent.state is s.State.PROBE and gateway.state is s.State.AUTHENTICATING
    gateway.accept_probe()
    walk(agent, gateway, p.Ping(0))
    walk(agent, gateway, p.Pong(0))
    walk(agent, gateway, p.Measure("sink", 1.0))
    assert agent.state is gateway.state is s.State.SINKING
    for frame in (p.Data(memoryview(b"x")), p.End()):  # sent outside the conversation
        gateway.receive(frame)
    walk(agent, gateway, p.Measured(1, 1.0))
    walk(agent, gateway, p.Measure("source", 1.0))
    assert agent.state is gateway.state is s.State.SOURCING
    for frame in (p.Data(memoryview(b"x")), p.End()):
        agent.receive(frame)
    walk(agent, gateway, p.Measured(1, 1.0))
    assert agent.state is gateway.state is s.State.PROBE
    walk(agent, gateway, p.Bye("done"))
    assert agent.state is gateway.state is s.State.CLOSED


def test_a_probe_is_refused_and_never_reaches_a_session() -> None:
    """A wrong token: the agent, probing already, receives Refused and may send nothing
    more; a probe cannot Register, be Started, or pool, and measures one way at a time."""
    agent = s.Conversation(s.Side.AGENT, s.State.PROBE)
    agent.receive(p.Refused("auth", "bad token"))
    assert agent.state is s.State.CLOSED
    with pytest.raises(LocalProtocolError):
        agent.send(p.Ping(1))
    gateway = s.Conversation(s.Side.GATEWAY, s.State.PROBE)
    for message in (p.Register([]), p.PoolRelease(1), p.Data(memoryview(b"x"))):
        with pytest.raises(RemoteProtocolError):
            gateway.receive(message)
    with pytest.raises(LocalProtocolError):
        gateway.send(p.Start(1, "web", "203.0.113.9:4711"))
    sinking = s.Conversation(s.Side.GATEWAY, s.State.SINKING)
    with pytest.raises(RemoteProtocolError):
        sinking.receive(p.Measure("source", 1.0))
    with pytest.raises(LocalProtocolError, match="cannot accept a probe"):
        s.Conversation(s.Side.GATEWAY, s.State.AWAIT_HELLO).accept_probe()


def hello_with(token: bytes, agent: str = "site-a", role: str = "control") -> p.Hello:
    proof = credentials.proof_for(token, NONCE, role, agent, "")
    return p.Hello(p.PROTOCOL_VERSION, role, agent, proof)  # type: ignore[arg-type]


STORED = credentials.derive(TOKEN, "site-a").stored_key


def test_authenticate_admits_the_first_policy_whose_key_matches() -> None:
    """The proof made with the token matches its stored key, under its policy."""
    other = credentials.derive(b"another-token-entirely-different", "site-a").stored_key
    candidates = [s.Candidate("first", [other]), s.Candidate("second", [other, STORED])]
    assert s.authenticate(hello_with(TOKEN), NONCE, candidates) == s.Admitted(
        "second", STORED, NONCE
    )


def test_authenticate_refuses_a_wrong_token_and_says_only_what() -> None:
    """A wrong token is refused, and the agent is told which credential, not why."""
    hello = hello_with(b"not-the-token-at-all-0123456789")
    verdict = s.authenticate(hello, NONCE, [s.Candidate("policy", [STORED])])
    assert verdict == "token is wrong"
    reason = s.auth_refusal_reason(hello, verdict)
    assert reason == "the gateway does not accept this token for agent 'site-a'"


def test_authenticate_checks_the_certificate_name_first() -> None:
    """With a certificate required, it must name the agent, whatever the token;
    a policy with no keys then admits by the certificate alone."""
    hello = hello_with(TOKEN)
    refused = s.authenticate(hello, NONCE, [s.Candidate("p", [STORED])], frozenset({"site-b"}))
    assert refused == "certificate is for site-b, not this agent"
    assert s.authenticate(hello, NONCE, [], frozenset()) == (
        "certificate is for no name, not this agent"
    )
    admitted = s.authenticate(hello, NONCE, [s.Candidate("p", [])], frozenset({"site-a"}))
    assert admitted == s.Admitted("p", b"", NONCE)


def test_authenticate_binds_the_proof_to_role_nonce_and_name() -> None:
    """A proof made for another role, nonce or agent name does not pass."""
    candidates = [s.Candidate("p", [STORED])]
    control = hello_with(TOKEN)
    assert isinstance(s.authenticate(control, NONCE, candidates), s.Admitted)
    for changed in (
        p.Hello(control.version, "data", control.agent, control.proof),
        p.Hello(control.version, "control", "site-b", control.proof),
        p.Hello(control.version, "control", control.agent, control.proof, "s1"),
    ):
        assert s.authenticate(changed, NONCE, candidates) == "token is wrong"
    assert s.authenticate(control, bytes(p.NONCE_SIZE), candidates) == "token is wrong"
