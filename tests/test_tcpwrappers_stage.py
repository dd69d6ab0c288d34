"""tcp_wrappers around the pure rules: which services are judged (config), the rule files
kept current, the resolver child, and the engine stage where connections wait for a name.

The stage runs here with a fake clock, fake resolver channel and fake delivery: each
path (decided at once, waiting, answered, expired, refused as busy, resolver lost)
is checked for who owns the descriptor at the end.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import pytest
from config_fakes import fake_lookups

from poolinetd.admission import tcpwrappers_files as twf
from poolinetd.config import resolve
from poolinetd.config.spec import Options
from poolinetd.engine import wrappers_stage as ws
from poolinetd.launch import resolver

# -- config: which services are judged, under which name ------------------------------


def load(text: str, flag: bool = False) -> resolve.LoadedConfig:
    return resolve.load_text(text, "t.conf", Options(tcp_wrappers=True if flag else None),
                             fake_lookups(all_programs=True))


def test_debian_tcpd_line_runs_the_real_program_and_is_judged() -> None:
    got = load("finger stream tcp nowait nobody /usr/sbin/tcpd /usr/sbin/in.fingerd\n"
               "telnet stream tcp nowait root /usr/sbin/tcpd in.telnetd -h\n")
    assert not got.errors, [str(d) for d in got.diagnostics]
    finger, telnet = got.services
    assert (finger.program, finger.argv, finger.tcp_wrappers) == (
        "/usr/sbin/in.fingerd", ("/usr/sbin/in.fingerd",), "in.fingerd")
    assert (telnet.program, telnet.argv, telnet.tcp_wrappers) == (
        "/usr/sbin/in.telnetd", ("in.telnetd", "-h"), "in.telnetd")


def test_tcpd_line_that_cannot_be_judged_keeps_tcpd() -> None:
    got = load("tftp dgram udp wait nobody /usr/sbin/tcpd /usr/sbin/in.tftpd\n")
    (tftp,) = got.services  # a datagram wait program: judged natively, as tcpd would
    assert (tftp.program, tftp.tcp_wrappers) == ("/usr/sbin/in.tftpd", "in.tftpd")
    assert not got.warnings
    got = load("\n143 stream tcp wait nobody /usr/sbin/tcpd /usr/sbin/imapd\n"
               "/run/x.sock stream unix nowait nobody /usr/sbin/tcpd /usr/sbin/in.fingerd\n")
    assert [(s.program, s.tcp_wrappers) for s in got.services] == [
        ("/usr/sbin/tcpd", None), ("/usr/sbin/tcpd", None)]  # neither can be judged
    warned = [(d.lineno, d.message) for d in got.warnings]
    assert [n for n, _ in warned] == [2, 3], warned
    assert "accepts its own connections" in warned[0][1]
    assert "unix socket" in warned[1][1]
    got = load("finger on protocol=tcp, wait=no, user=nobody, exec=/usr/sbin/tcpd, "
               "args=/usr/sbin/in.fingerd, tcp_wrappers=no;\n")
    assert got.services[0].program == "/usr/sbin/tcpd"  # tcp_wrappers=no: as written


def test_flag_names_builtins_and_programs_and_no_lifts_it() -> None:
    got = load("echo stream tcp nowait nobody internal\n"
               "127.0.0.1:7007 stream tcp nowait nobody internal daytime\n"
               "finger stream tcp nowait nobody /usr/sbin/in.fingerd in.fingerd\n"
               "discard on protocol=tcp, user=nobody, tcp_wrappers=no;\n"
               "echo dgram udp wait nobody internal\n", flag=True)
    names = [(s.name, s.tcp_wrappers) for s in got.services]
    assert names == [("echo/tcp", "echo"), ("daytime:7007/tcp", "daytime"),
                     ("finger/tcp", "in.fingerd"), ("discard/tcp", None), ("echo/udp", None)]
    warned = [d for d in got.warnings if "tcp_wrappers not applied" in d.message]
    assert len(warned) == 1 and warned[0].lineno == 5


def test_key_without_flag_and_bad_value() -> None:
    got = load("echo on protocol=tcp, user=nobody, tcp_wrappers=yes;\n")
    assert got.services[0].tcp_wrappers == "echo"
    got = load("echo on protocol=tcp, user=nobody, tcp_wrappers=maybe;\n")
    assert got.errors and "tcp_wrappers" in str(got.errors[0])


# -- the rule files -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_files_are_stated_once_a_second_and_reread_on_change(tmp_path: Path) -> None:
    clock = Clock()
    files = twf.RuleFiles(str(tmp_path), clock)
    assert files.current().allow.rules == ()  # absent files: no rules
    (tmp_path / "hosts.allow").write_text("ALL: 10.0.0.1\n")
    assert files.current().allow.rules == ()  # not stat'ed again within the second
    clock.now += twf.CHECK_INTERVAL
    assert len(files.current().allow.rules) == 1
    loads = files.loads
    clock.now += twf.CHECK_INTERVAL
    files.current()
    assert files.loads == loads  # unchanged: not re-read


def test_file_patterns_are_read_and_watched(tmp_path: Path) -> None:
    clock = Clock()
    listed = tmp_path / "friends"
    (tmp_path / "hosts.allow").write_text(f"ALL: {listed}\n")
    files = twf.RuleFiles(str(tmp_path), clock)
    assert files.current().files == {}
    listed.write_text("10.0.0.1 # 10.0.0.2\n192.168.\n")
    clock.now += twf.CHECK_INTERVAL
    assert files.current().files == {str(listed): ("10.0.0.1", "#", "10.0.0.2", "192.168.")}


def test_unreadable_or_huge_file_denies(tmp_path: Path, caplog: Any) -> None:
    (tmp_path / "hosts.deny").mkdir()
    rules = twf.RuleFiles(str(tmp_path), Clock()).current()
    assert [r.broken for r in rules.deny.rules] == [True]
    (tmp_path / "hosts.deny").rmdir()
    (tmp_path / "hosts.deny").write_text("#" * (twf.tw.MAX_FILE_BYTES + 1))
    rules = twf.RuleFiles(str(tmp_path), Clock()).current()
    assert [r.broken for r in rules.deny.rules] == [True]


def test_a_fifo_never_blocks(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "hosts.allow")
    text, why = twf.read_text(str(tmp_path / "hosts.allow"))
    assert text is None and why == "not a regular file"


# -- the resolver child -------------------------------------------------------------


def test_host_name_from_etc_hosts() -> None:
    try:
        if socket.gethostbyaddr("127.0.0.1")[0] != "localhost":
            pytest.skip("127.0.0.1 is not localhost here")
    except OSError:
        pytest.skip("no name for 127.0.0.1")
    assert resolver.host_name("127.0.0.1") == "localhost"
    assert resolver.host_name("not an address") == resolver.UNKNOWN


def test_resolver_child_answers_and_its_loss_is_seen() -> None:
    answers: list[tuple[int, str]] = []
    lost: list[bool] = []
    watched: dict[socket.socket, Callable[[int], None]] = {}
    res = resolver.Resolver(lambda i, n: answers.append((i, n)), lambda: lost.append(True),
                            lambda s, h: watched.__setitem__(s, h), watched.pop)
    try:
        assert res.ask(7, "127.0.0.1") and res.pid
        (sock,) = watched
        assert select.select([sock], [], [], 30)[0], "no answer in 30 s"
        res.on_readable()
        assert answers and answers[0][0] == 7 and answers[0][1] and not lost
    finally:
        pid = res.pid
        res.close()
        if pid:
            os.waitpid(pid, 0)  # exits at EOF
    assert res.child_exited(pid) and not lost  # reaped after a close: no loss reported


def test_the_resolver_child_can_send_no_descriptor_and_no_runaway_line() -> None:
    """Its answers come up a pipe (no SCM_RIGHTS: a child taken over through a hostile
    DNS answer cannot make the master release a lingering socket) and its end of the
    socketpair cannot send; a line longer than MAX_MESSAGE drops the child."""
    kept: list[int] = []

    def fork(body: Callable[[], int], keep: tuple[int, ...]) -> int:
        kept.extend(os.dup(fd) for fd in keep)
        return 424242

    lost: list[bool] = []
    watched: dict[object, Callable[[int], None]] = {}
    res = resolver.Resolver(lambda i, n: None, lambda: lost.append(True),
                            lambda s, h: watched.__setitem__(s, h), watched.pop, fork)
    try:
        assert res.ask(1, "127.0.0.1")
        theirs = socket.socket(fileno=kept[0])
        with pytest.raises(BrokenPipeError):
            theirs.send(b"1 forged")
        theirs.close()
        os.write(kept[1], b"9" * (resolver.MAX_MESSAGE + 10))
        res.on_readable()
        assert lost == [True] and not watched
    finally:
        os.close(kept[1])
        res.close()


# -- the engine stage --------------------------------------------------------------


class FakeResolver:
    def __init__(self, ok: bool = True) -> None:
        self.asked: list[tuple[int, str]] = []
        self.ok = ok

    def ask(self, ident: int, addr: str) -> bool:
        self.asked.append((ident, addr))
        return self.ok

    def child_exited(self, pid: int) -> bool:
        return False

    def close(self) -> None:
        pass


class FakeRefusals:
    def __init__(self) -> None:
        self.refused: list[str] = []
        self.counted: list[str] = []

    def refused_fn(self, rt: object, ip: str, why: str, now: float,
                   severity: object = None) -> None:
        self.refused.append(why)

    def count(self, rt: object, why: str) -> None:
        self.counted.append(why)


class FakeService:
    tcp_wrappers = "echo"

    class spec:  # what a refusal reads (an xinetd service's banner_fail)
        banner_fail = b""


class FakeRt:
    service = FakeService()
    retired = False
    successor = None


class Host:
    def __init__(self) -> None:
        self.room = True

    def has_room(self, rt: object, now: float, draining: bool = False) -> bool:
        return self.room

    def finishes_preambles(self) -> bool:
        return True


def stage(tmp_path: Path, allow: str, deny: str = "ALL: ALL\n", resolver_ok: bool = True
          ) -> tuple[ws.WrappersStage, Clock, list[int], list[int], FakeRefusals, Host]:
    (tmp_path / "hosts.allow").write_text(allow)
    (tmp_path / "hosts.deny").write_text(deny)
    clock = Clock()
    delivered: list[int] = []
    released: list[int] = []
    refusals = FakeRefusals()
    host = Host()

    def deliver(rt: Any, fd: int, family: int, key: Hashable, peer: Any, accepted: float,
                local: Any, env: tuple[tuple[str, str], ...] = ()) -> None:
        delivered.append(fd)

    st = ws.WrappersStage(host, refusals, clock, deliver,  # type: ignore[arg-type]
                          lambda fd, family: released.append(fd), lambda s, h: None,
                          lambda s: None, str(tmp_path))
    refusals.refused = []  # the stage calls refusals.refused(...)
    st.refusals = type("R", (), {"refused": refusals.refused_fn, "count": refusals.count,
                                 "wake_at": lambda self, when: None})()  # type: ignore[assignment]
    st.resolver = FakeResolver(resolver_ok)  # type: ignore[assignment]
    return st, clock, delivered, released, refusals, host


def judge(st: ws.WrappersStage, fd: int, addr: str, key: Hashable = "k") -> bool:
    return st.judge(FakeRt(), fd, socket.AF_INET, key, (addr, 4000), 0.0,  # type: ignore[arg-type]
                    ("127.0.0.1", 79))


def test_stage_decides_at_once_without_a_name(tmp_path: Path) -> None:
    st, _, delivered, released, refusals, _ = stage(tmp_path, "echo: 10.0.0.1\n")
    assert judge(st, 5, "10.0.0.1") and delivered == [5]
    assert not judge(st, 6, "10.0.0.2") and released == [6]
    assert refusals.refused == [ws.TCP_WRAPPERS] and len(st) == 0


def test_stage_waits_for_the_name_and_caches_it(tmp_path: Path) -> None:
    st, clock, delivered, released, _refusals, _ = stage(tmp_path, "echo: .example.org\n")
    assert judge(st, 5, "10.0.0.1") and judge(st, 6, "10.0.0.1")
    assert len(st) == 2 and st.resolver.asked == [(1, "10.0.0.1")]  # type: ignore[attr-defined]
    assert st.next_deadline() == clock.now + ws.LOOKUP_DEADLINE
    st._on_answer(1, "host.example.org")
    assert delivered == [5, 6] and len(st) == 0 and st.next_deadline() is None
    assert judge(st, 7, "10.0.0.1") and delivered == [5, 6, 7]  # cached: no new lookup
    assert len(st.resolver.asked) == 1  # type: ignore[attr-defined]
    st._on_answer(99, "late.example.org")  # unknown id: ignored
    assert released == []


def test_stage_deadline_decides_as_unknown(tmp_path: Path) -> None:
    st, clock, delivered, released, _refusals, _ = stage(tmp_path, "echo: UNKNOWN\n",
                                                        "echo: ALL\n")
    assert judge(st, 5, "10.0.0.1")
    clock.now += ws.LOOKUP_DEADLINE
    st.expire(clock.now)
    assert delivered == [5] and len(st) == 0  # UNKNOWN matched: allowed
    st._on_answer(1, "late.example.org")  # cached for later, nobody waits
    assert delivered == [5] and released == []


def test_stage_refuses_when_busy_and_when_the_resolver_is_lost(tmp_path: Path) -> None:
    st, _, delivered, released, refusals, _ = stage(tmp_path, "echo: KNOWN\n")
    for fd in range(ws.MAX_WAITING_PER_SOURCE):
        assert judge(st, 100 + fd, f"10.0.{fd}.1")
    assert not judge(st, 5, "10.9.9.9") and released == [5]
    assert refusals.refused == [ws.TCP_WRAPPERS_BUSY]
    assert judge(st, 6, "10.9.9.9", key="other")  # another source still may wait
    st._on_lost()  # every waiting one decided as a failed lookup: not KNOWN, denied
    assert len(st) == 0 and delivered == []
    assert sorted(released) == [5, 6, *range(100, 100 + ws.MAX_WAITING_PER_SOURCE)]


def test_stage_without_a_resolver_decides_as_unknown(tmp_path: Path) -> None:
    st, _, delivered, _released, _, _ = stage(tmp_path, "echo: UNKNOWN\n", resolver_ok=False)
    assert judge(st, 5, "10.0.0.1") and delivered == [5] and len(st) == 0


def test_stage_checks_room_after_waiting_and_closes_all(tmp_path: Path) -> None:
    st, _, delivered, released, refusals, host = stage(tmp_path, "echo: KNOWN\n", "")
    assert judge(st, 5, "10.0.0.1") and judge(st, 6, "10.0.0.2")
    host.room = False
    st._on_answer(1, "a.example.org")
    assert released == [5] and refusals.counted == ["no_room"]
    st.close_all()
    assert released == [5, 6] and len(st) == 0 and delivered == []
