"""tcp_wrappers' options beyond allow/deny: what a verdict asks (pure), how the engine
stage applies it (fake fork, fake resolver), the wire's setenv text, and the command
child itself (a real fork and privilege drop).
"""

from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path
from typing import Any

import pytest
from conftest import IS_ROOT, TEST_USER, wait_until
from test_tcpwrappers_stage import FakeRt, stage

from poolinetd.admission import tcpwrappers as tw
from poolinetd.admission import tcpwrappers_options as two
from poolinetd.engine import wrappers_commands as wc
from poolinetd.engine import wrappers_stage as ws
from poolinetd.launch import spawn, wrapcmd
from poolinetd.pool import wire


def verdict(rule: str, allowed: bool = True, name: str | None = "host.example") -> tw.Verdict:
    table = tw.parse(f"ALL: ALL: {rule}\n", "hosts.allow")
    got = tw.decide(table, tw.Table(), tw.Request("echo", "10.0.0.1", "", name))
    assert isinstance(got, tw.Verdict)
    return got


# -- pure: the options ------------------------------------------------------------------
def test_actions_in_rule_order_with_expansions() -> None:
    got = two.actions(verdict("spawn echo %a: setenv A 1 %d: spawn echo two: "
                              "severity auth.notice: setenv A  x  y : setenv B: twist cat %h"))
    assert got.spawn == ("echo 10.0.0.1", "echo two")
    assert got.twist == "cat host.example"
    assert got.env == (("A", "x  y"), ("B", ""))  # the later A wins; B without a value
    assert got.severity == two.Severity(4, 5) and got.error == ""
    assert two.actions(verdict("allow")) is two.NONE


@pytest.mark.parametrize(("text", "want"), [
    ("info", (None, 6)), ("LOCAL3.Notice", (19, 5)), ("auth.emerg", (4, 0)),
    ("security.warn", (4, 4)), ("mark.debug", (24, 7)), ("panic", (None, 0)),
    ("nope", None), ("daemon.nope", None), ("bogus.info", None)])
def test_severity_parse(text: str, want: tuple[int | None, int] | None) -> None:
    got = two.parse_severity(text)
    assert (None if got is None else (got.facility, got.level)) == want


def test_severity_levels_map_to_log_levels() -> None:
    names = [two.Severity(None, n).log_level.name for n in range(8)]
    assert names == ["ERROR"] * 4 + ["WARNING", "INFO", "INFO", "DEBUG"]


def test_setenv_bounds_and_bad_names() -> None:
    name = "h" * 250  # the line is short; its expansions are not
    got = two.actions(verdict("setenv A " + "%h" * 10 + ": spawn echo hi", name=name))
    assert got.error and got.env == ()
    assert two.actions(verdict("setenv A " + "%h" * 8, name=name)).env == (("A", name * 8),)
    table = tw.parse("ALL: ALL: setenv A=B c\n", "hosts.allow")
    assert any("bad variable name" in d.message for d in table.diagnostics)
    got_v = tw.decide(table, tw.Table(), tw.Request("echo", "10.0.0.1"))
    assert isinstance(got_v, tw.Verdict) and not got_v.allowed  # an option error denies


def test_applied_options_are_no_longer_warned() -> None:
    table = tw.parse("ALL: ALL: spawn x: setenv A b: severity info: twist y\n"
                     "ALL: ALL: nice: allow\n", "hosts.allow")
    assert [d.message for d in table.diagnostics] == ['option "nice" is not applied by '
                                                      "poolinetd"]


# -- the wire's setenv text -------------------------------------------------------------
def test_conn_env_round_trip_and_bounds() -> None:
    info = wire.ConnInfo(7, socket.AF_INET, "10.0.0.1 5", "", (("A", "x y"), ("B", "")))
    msg = wire.decode(wire.encode_conns([info]))
    assert msg.conns == (info,)
    with pytest.raises(ValueError):
        wire.encode_conns([wire.ConnInfo(1, 2, "", "", (("A", "x" * wire.MAX_ENV_TEXT),))])
    with pytest.raises(ValueError):
        wire.encode_conns([wire.ConnInfo(1, 2, "", "", (("A=B", "x"),))])
    lend = wire.decode(wire.encode_lend(9, (("A", "b=c"),)))
    assert (lend.kind, lend.ident, lend.env) == (wire.LEND, 9, (("A", "b=c"),))
    assert wire.decode(wire.encode_lend(9)).env == ()
    with pytest.raises(wire.ProtocolError):
        wire.decode(wire.encode_lend(9) + b"no equals sign")


# -- the stage ----------------------------------------------------------------------------
class FakeFork:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[int, ...]]] = []
        self.next_pid = 1000

    def __call__(self, body: Any, keep: tuple[int, ...]) -> int:
        self.calls.append((body, keep))
        self.next_pid += 1
        return self.next_pid


class Service:
    tcp_wrappers = "echo"
    name = "echo/tcp"
    uid = gid = os.getuid()
    groups = ()
    home = "/"
    user_name = "u"
    env = ()

    class spec:  # the shape connection_env and a refusal read
        banner_fail = b""

        class protocol:
            is_unix = False
            is_udp = False


class Stats:
    accepted = 0


class Rt(FakeRt):
    service = Service()  # type: ignore[assignment]
    name = "echo/tcp"

    def __init__(self) -> None:
        self.stats = Stats()
        self.paused_until = 0.0


def staged(tmp_path: Path, allow: str, deny: str = "") -> tuple[Any, ...]:
    st, clock, delivered, released, refusals, _host = stage(tmp_path, allow, deny)
    fork = FakeFork()
    st.commands = wc.Commands(fork, clock, False)
    return st, fork, delivered, released, refusals


def test_stage_spawns_and_delivers_with_setenv(tmp_path: Path) -> None:
    st, fork, delivered, released, refusals = staged(
        tmp_path, "echo: 10.0.0.1: spawn echo %a: setenv WHO %a\n", "echo: ALL: spawn b\n")
    rt = Rt()
    assert st.judge(rt, 5, socket.AF_INET, "k", ("10.0.0.1", 9), 0.0, None)
    assert delivered == [5] and len(fork.calls) == 1 and fork.calls[0][1] == ()
    assert not st.judge(rt, 6, socket.AF_INET, "k", ("10.0.0.2", 9), 0.0, None)
    assert released == [6] and refusals.refused == [ws.TCP_WRAPPERS]
    assert len(fork.calls) == 2 and len(st.commands) == 2  # spawned for the refused one too
    assert st.commands.child_exited(1001, 0) and not st.commands.child_exited(1001, 0)
    assert len(st.commands) == 1


def test_stage_twist_takes_the_connection(tmp_path: Path) -> None:
    st, fork, delivered, released, refusals = staged(
        tmp_path, "echo: 10.0.0.1: twist echo hi\n", "echo: ALL: twist echo no\n")
    rt = Rt()
    assert st.judge(rt, 5, socket.AF_INET, "k", ("10.0.0.1", 9), 0.0, None)
    assert delivered == [] and released == [5] and fork.calls[0][1] == (5,)
    assert rt.stats.accepted == 1 and refusals.refused == []
    assert not st.judge(rt, 6, socket.AF_INET, "k", ("10.0.0.2", 9), 0.0, None)
    assert fork.calls[1][1] == (6,) and refusals.refused == [ws.TCP_WRAPPERS]


def test_stage_caps_commands_per_service(tmp_path: Path) -> None:
    st, fork, _, released, refusals = staged(tmp_path, "echo: ALL: twist sleep 9\n")
    rt = Rt()
    for fd in range(wc.MAX_PER_SERVICE):  # from as many sources (each may hold 4)
        assert st.judge(rt, 100 + fd, socket.AF_INET, "k", (f"10.0.1.{fd}", 9), 0.0, None)
    assert not st.judge(rt, 5, socket.AF_INET, "k", ("10.0.0.1", 9), 0.0, None)
    assert len(fork.calls) == wc.MAX_PER_SERVICE and released[-1] == 5
    assert refusals.refused == [ws.TCP_WRAPPERS_BUSY]
    st.commands.child_exited(1001, 0)  # one ended: room for one more
    assert st.judge(rt, 6, socket.AF_INET, "k", ("10.0.0.1", 9), 0.0, None)


def test_one_source_holds_at_most_max_per_source_commands(tmp_path: Path) -> None:
    st, _, _, _, _ = staged(tmp_path, "echo: ALL: twist sleep 9\n")
    rt = Rt()
    for fd in range(wc.MAX_PER_SOURCE):
        assert st.judge(rt, 100 + fd, socket.AF_INET, "k", ("10.0.0.1", fd), 0.0, None)
    assert not st.judge(rt, 5, socket.AF_INET, "k", ("10.0.0.1", 99), 0.0, None)
    assert st.judge(rt, 6, socket.AF_INET, "k", ("10.0.0.2", 1), 0.0, None)  # another source
    st.commands.child_exited(1001, 0)  # one of 10.0.0.1's ended
    assert st.judge(rt, 7, socket.AF_INET, "k", ("10.0.0.1", 7), 0.0, None)


def test_commands_are_rate_bounded_per_service() -> None:
    class Clock:
        now = 50.0

        def __call__(self) -> float:
            return self.now

    clock, fork = Clock(), FakeFork()
    cmds = wc.Commands(fork, clock, False)
    svc: Any = Service()
    for _ in range(wc.MAX_STARTS_PER_SECOND):  # each ends at once: only the rate binds
        assert cmds.start(wrapcmd.Kind.SPAWN, "a", svc, "true", {}, "")
        assert cmds.child_exited(fork.next_pid, 0)
    assert not cmds.start(wrapcmd.Kind.SPAWN, "a", svc, "true", {}, "")
    assert cmds.start(wrapcmd.Kind.SPAWN, "b", svc, "true", {}, "")  # another service
    clock.now += 1.0
    assert cmds.start(wrapcmd.Kind.SPAWN, "a", svc, "true", {}, "")


def test_stage_judges_datagrams_waiting_for_a_name(tmp_path: Path) -> None:
    st, fork, _, _, _ = staged(tmp_path, "echo: .example.org: spawn x\n", "echo: ALL\n")
    rt = Rt()
    now = st.clock()
    assert st.judge_datagram(rt, ("10.0.0.1", 69), now) is None  # asked, not yet known
    assert st.judge_datagram(rt, ("10.0.0.1", 69), now) is None
    assert st.resolver.asked == [(1, "10.0.0.1")]  # asked once
    st._on_answer(1, "a.example.org")
    got = st.judge_datagram(rt, ("10.0.0.1", 69), now)
    assert got is not None and got.why == "" and len(fork.calls) == 1
    # another source whose lookup never answers: decided as unknown at the deadline
    assert st.judge_datagram(rt, ("10.0.0.2", 69), now) is None
    got = st.judge_datagram(rt, ("10.0.0.2", 69), now + ws.LOOKUP_DEADLINE)
    assert got is not None and got.why == ws.TCP_WRAPPERS
    assert not st.dgram_lookups and "10.0.0.2" not in st.by_addr
    # bounded: a full table drops lookups past their deadline before refusing to ask
    for i in range(ws.MAX_DGRAM_LOOKUPS):
        assert st.judge_datagram(rt, (f"10.1.{i // 256}.{i % 256}", 69), now) is None
    got = st.judge_datagram(rt, ("10.2.0.1", 69), now)  # full: decided as unknown
    assert got is not None and got.why == ws.TCP_WRAPPERS
    assert st.judge_datagram(rt, ("10.2.0.1", 69), now + ws.LOOKUP_DEADLINE) is None
    assert len(st.dgram_lookups) == 1  # the stale ones were dropped, this one asked


# -- the command child: a real fork, a real drop --------------------------------------
def test_spawn_child_runs_as_the_service_user(public_dir: Path) -> None:
    from poolinetd.config import resolve
    from poolinetd.config.spec import Options

    out = public_dir / "out"
    out.mkdir()
    out.chmod(0o777)
    loaded = resolve.load_text(f"127.0.0.1:7 stream tcp nowait {TEST_USER} internal echo\n",
                               "t.conf", Options())
    service = loaded.services[0]
    env = wrapcmd.environment(service, "10.0.0.1 5", "", (("WHO", "me"),))
    pid = wrapcmd.run(spawn.fork_child, wrapcmd.Kind.SPAWN, service,
                      f"(id -u; echo $WHO; readlink /proc/self/fd/0) > {out}/r.t && "
                      f"mv {out}/r.t {out}/r", env)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    uid = pwd.getpwnam(TEST_USER).pw_uid
    wait_until((out / "r").exists, 10, "the report")
    assert (out / "r").read_text().split() == [str(uid), "me", "/dev/null"]
    if IS_ROOT:
        assert uid != 0
