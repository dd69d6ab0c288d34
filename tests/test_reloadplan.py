"""reloadplan: the pure diff of a reload, and ``prepare``'s all-or-nothing contract."""

from __future__ import annotations

import socket

from engine_fakes import services_from
from hypothesis import given
from hypothesis import strategies as st

from poolinetd.config.spec import Diagnostic, Service, Severity
from poolinetd.engine import reloadplan
from poolinetd.engine.ledger import Caps
from poolinetd.engine.reloadplan import NewConfig, plan
from poolinetd.ops import listeners

ECHO = "127.0.0.1:7107 stream tcp nowait {user} internal echo\n"
ECHO_SLOW = "127.0.0.1:7107 on socktype=stream, user={user}, args=echo, conn_timeout=9;\n"
DISCARD = "127.0.0.1:7109 stream tcp nowait {user} internal discard\n"
DAYTIME = "127.0.0.1:7113 stream tcp nowait {user} internal daytime\n"


def running(text: str) -> dict[object, tuple[str, Service]]:
    """What an engine running ``text`` would pass: key -> (a record, its service).

    The records are named by the built-in each service runs."""
    return {s.key: (f"rec:{s.internal}", s) for s in services_from(text)}


def test_identical_configs_change_nothing() -> None:
    diff = plan(running(ECHO + DISCARD), services_from(ECHO + DISCARD))
    assert (diff.added, diff.removed, diff.changed, diff.unchanged) == ((), (), (), 2)


def test_added_removed_and_changed_by_identity() -> None:
    diff = plan(running(ECHO + DISCARD), services_from(ECHO_SLOW + DAYTIME))
    assert [s.internal for s in diff.added] == ["daytime"]
    assert diff.removed == ("rec:discard",)
    ((record, service),) = diff.changed
    assert record == "rec:echo" and service.conn_timeout == 9
    assert diff.unchanged == 0


def test_the_records_are_whatever_the_caller_keeps() -> None:
    """The plan hands back the caller's own records for removed and changed services."""
    marker = object()
    (service,) = services_from(ECHO)
    diff = plan({service.key: (marker, service)}, ())
    assert diff.removed == (marker,)


@given(st.sets(st.sampled_from([ECHO, DISCARD, DAYTIME])),
       st.sets(st.sampled_from([ECHO, ECHO_SLOW, DISCARD, DAYTIME])))
def test_every_wanted_service_is_added_changed_or_unchanged(before: set[str],
                                                           after: set[str]) -> None:
    if ECHO in after and ECHO_SLOW in after:
        after.discard(ECHO_SLOW)  # one service per endpoint
    wanted = services_from("".join(sorted(after)))
    diff = plan(running("".join(sorted(before))), wanted)
    assert len(diff.added) + len(diff.changed) + diff.unchanged == len(wanted)
    kept = {s.key for s in wanted}
    assert len(diff.removed) == len([k for k in running("".join(sorted(before)))
                                     if k not in kept])


def _opener(opened: list[socket.socket], fail_on: str = ""):  # type: ignore[no-untyped-def]
    def open_sockets(service: Service) -> list[socket.socket]:
        if service.internal == fail_on:
            raise listeners.ListenError(f"{service.name}: address in use")
        sock = socket.socket()
        opened.append(sock)
        return [sock]
    return open_sockets


def test_prepare_opens_what_is_added_and_carries_the_caps() -> None:
    opened: list[socket.socket] = []
    new = NewConfig(services_from(ECHO + DAYTIME), (), Caps(10, 2))
    try:
        prepared = reloadplan.prepare(lambda: new, running(ECHO), _opener(opened))
        assert prepared is not None
        assert [s.internal for s, _ in prepared.opened] == ["daytime"]
        assert prepared.caps == Caps(10, 2)
        assert [s.internal for s in prepared.services] == ["echo", "daytime"]
    finally:
        for sock in opened:
            sock.close()


def test_prepare_with_a_config_error_opens_nothing() -> None:
    opened: list[socket.socket] = []
    error = Diagnostic("<t>", 1, 1, "x", "bad", severity=Severity.ERROR)
    new = NewConfig(services_from(ECHO + DAYTIME), (error,))
    assert reloadplan.prepare(lambda: new, running(ECHO), _opener(opened)) is None
    assert opened == []


def test_prepare_closes_what_it_opened_when_a_later_listener_fails() -> None:
    opened: list[socket.socket] = []
    new = NewConfig(services_from(ECHO + DISCARD + DAYTIME), ())
    assert reloadplan.prepare(lambda: new, running(ECHO), _opener(opened, "daytime")) is None
    assert [s.fileno() for s in opened] == [-1]  # discard's socket was opened, then closed
