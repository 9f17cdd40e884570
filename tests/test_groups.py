"""How a group picks the member for each client (pure: no sockets), and the group settings in
the gateway's and the agent's files."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tunnelgate import config as c
from tunnelgate import credentials
from tunnelgate.errors import ConfigError
from tunnelgate.gateway.groups import Group

TOKEN = "t" * 32


@dataclass
class FakeMember:
    """A member as a group sees it: it takes a client unless ``full``."""

    agent: str
    serving: bool = True
    active: int = 0
    full: bool = False
    taken: list[str] = field(default_factory=list)

    def admit(self, stream: Any, client: str, server: str) -> bool:
        if not self.full:
            self.taken.append(client)
        return not self.full


class FakeStream:
    aborted = False

    def abort(self) -> None:
        self.aborted = True


def picks(group: Group, count: int) -> list[str]:
    chosen = [group.pick() for _ in range(count)]
    return [m.agent if m is not None else "-" for m in chosen]


def test_round_robin_takes_the_serving_members_in_turn() -> None:
    a, b, c_ = FakeMember("a"), FakeMember("b"), FakeMember("c")
    group = Group("web", "round_robin", members=[a, b, c_])
    assert picks(group, 6) == ["a", "b", "c", "a", "b", "c"]
    b.serving = False  # unhealthy, or draining: skipped at once
    assert Counter(picks(group, 4)) == {"a": 2, "c": 2}
    a.serving = c_.serving = False
    assert picks(group, 2) == ["-", "-"]


def test_least_connections_takes_the_fewest_and_turns_among_the_tied() -> None:
    a, b, c_ = FakeMember("a", active=3), FakeMember("b", active=1), FakeMember("c", active=1)
    group = Group("web", "least_connections", members=[a, b, c_])
    assert sorted(picks(group, 2)) == ["b", "c"]
    b.active = 5
    assert picks(group, 3) == ["c", "c", "c"]
    c_.serving = False
    assert picks(group, 1) == ["a"]


def test_an_empty_group_picks_nobody() -> None:
    assert Group("web", "round_robin").pick() is None


def test_a_member_that_refuses_passes_the_client_to_the_next_one() -> None:
    """The picked member at its limit (or refusing by its access rules): the others that serve
    are asked in turn; only when none takes it is the client reset."""
    a, b, c_ = FakeMember("a", full=True), FakeMember("b", serving=False), FakeMember("c")
    group = Group("web", "round_robin", members=[a, b, c_])
    stream = FakeStream()
    group._handle(stream, "client-1")  # type: ignore[arg-type]
    assert (c_.taken, stream.aborted, group.refused) == (["client-1"], False, 0)
    c_.full = True
    group._handle(stream, "client-2")  # type: ignore[arg-type]
    assert (stream.aborted, group.refused) == (True, 1)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_gateway_groups_with_secrets_hashes_and_balance(tmp_path: Path) -> None:
    stored = credentials.hash_line(b"k" * 32)
    text = (
        f'token = "{TOKEN}"\n'
        f'[[groups]]\nname = "web"\nsecret = "{"s" * 20}"\n'
        f'[[groups]]\nname = "db"\nsecret_hash = ["{stored}"]\nbalance = "least_connections"\n'
    )
    config, _ = c.load_gateway_config(write(tmp_path, text), {})
    web, db = config.groups["web"], config.groups["db"]
    assert (web.secrets, web.stored_keys, web.balance) == ((b"s" * 20,), (), "round_robin")
    assert (db.secrets, db.stored_keys, db.balance) == ((), (b"k" * 32,), "least_connections")


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ('[[groups]]\nsecret = "' + "s" * 20 + '"\n', "groups[0].name", "missing"),
        ('[[groups]]\nname = "web"\n', "groups[0].secret", "missing"),
        ('[[groups]]\nname = "web"\nsecret = "short"\n', "groups[0].secret", "too short"),
        ('[[groups]]\nname = "web"\nsecret = "' + "s" * 20 + '"\nbalance = "random"\n',
         "groups[0].balance", "expected one of"),
        ('[[groups]]\nname = "web"\nsecret = "' + "s" * 20 + '"\n'
         '[[groups]]\nname = "web"\nsecret = "' + "s" * 20 + '"\n', "groups[1].name",
         "listed more than once"),
        (f'[[agents]]\nname = "a"\ntoken = "{TOKEN}"\nallow_groups = ["ghost"]\n',
         "agents[a].allow_groups", "no group 'ghost'"),
    ],
)  # fmt: skip
def test_gateway_groups_that_do_not_make_sense_are_refused(
    tmp_path: Path, text: str, key: str, message: str
) -> None:
    prefix = "" if text.startswith("[[agents]]") else f'token = "{TOKEN}"\n'
    with pytest.raises(ConfigError) as caught:
        c.load_gateway_config(write(tmp_path, prefix + text), {})
    assert [(p.key, message in p.message) for p in caught.value.problems] == [(key, True)]


def test_agent_group_settings_from_flags_and_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(c.GROUP_SECRET_ENV, "g" * 20)
    text = (
        '[[services]]\nlocal = "127.0.0.1:80"\ngroup = "web"\nhealth_check = "http"\n'
        'health_path = "/healthz"\nhealth_status = 204\nhealth_interval = 2\n'
        '[[services]]\nlocal = "127.0.0.1:81"\n'
    )
    flags = {"gateway": "gw:1", "token": TOKEN, "expose": ["0:127.0.0.1:82"], "group": "api"}
    config, _ = c.load_agent_config(write(tmp_path, text), flags)
    by_local = {s.local.port: s for s in config.services}
    assert (by_local[82].group, by_local[82].group_secret) == ("api", b"g" * 20)
    web = by_local[80]
    assert (web.group, web.health_check, web.health_path, web.health_status) == (
        "web", "http", "/healthz", 204)  # fmt: skip
    assert web.health_interval == 2.0
    assert by_local[81].group == "api", "the top-level group is every service's default"


def test_agent_group_without_a_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(c.GROUP_SECRET_ENV, raising=False)
    flags = {"gateway": "gw:1", "token": TOKEN, "expose": ["0:127.0.0.1:82"], "group": "api"}
    with pytest.raises(ConfigError) as caught:
        c.load_agent_config(None, flags)
    [problem] = caught.value.problems
    assert problem.key == "--group-secret-file" and "secret" in problem.message
