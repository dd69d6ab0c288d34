"""The benchmark-only stage trace: off by default, and with it on every stage of a
connection is recorded by the process that saw it (master and worker)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from poolinetd.observe import stagetrace
from tests.conftest import Server, tcp_exchange


@pytest.fixture
def fresh_trace() -> Iterator[None]:
    """Run a test against the module's state and put it back (off) afterwards."""
    yield
    if stagetrace._fd >= 0:
        os.close(stagetrace._fd)
    stagetrace._fd = -1
    stagetrace.enabled = False
    stagetrace._buf.clear()


def test_off_without_the_variable(monkeypatch: pytest.MonkeyPatch, fresh_trace: None) -> None:
    monkeypatch.delenv(stagetrace.ENV, raising=False)
    stagetrace.open_from_env()
    assert not stagetrace.enabled and stagetrace.fd() == -1
    stagetrace.flush()  # a no-op, never raises


def test_a_symlink_is_not_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   fresh_trace: None) -> None:
    target = tmp_path / "target"
    target.write_text("keep\n")
    (tmp_path / "link").symlink_to(target)
    monkeypatch.setenv(stagetrace.ENV, str(tmp_path / "link"))
    stagetrace.open_from_env()
    assert not stagetrace.enabled  # refused: tracing is off, serving is not affected
    assert target.read_text() == "keep\n"


def test_records_are_appended_in_whole_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             fresh_trace: None) -> None:
    path = tmp_path / "trace"
    monkeypatch.setenv(stagetrace.ENV, str(path))
    stagetrace.open_from_env()
    assert stagetrace.enabled
    stagetrace.stamp("accepted", 7, 1.5, "peer=127.0.0.1:9")
    assert path.read_text() == ""  # buffered
    stagetrace.flush()
    assert path.read_text() == f"{os.getpid()} 7 accepted 1.500000 peer=127.0.0.1:9\n"
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_running_pool_traces_every_stage(tmp_path: Path, serve: Callable[..., Server],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stages.txt"
    monkeypatch.setenv(stagetrace.ENV, str(path))
    server = serve("127.0.0.1:0 stream tcp nowait nobody internal echo\n"
                   "127.0.0.1:0 stream tcp nowait nobody /bin/cat cat\n")
    assert tcp_exchange(server.port(0), b"one") == b"one"
    assert tcp_exchange(server.port(1), b"two") == b"two"
    assert server.stop(signal.SIGTERM) == 0
    stages: dict[int, dict[str, int]] = {}
    for line in path.read_text().splitlines():
        pid, iid, stage, _when, *_ = line.split()
        stages.setdefault(int(iid), {})[stage] = int(pid)
    assert len(stages) == 2
    builtin, program = (stages[i] for i in sorted(stages))
    assert set(builtin) == {"accepted", "handed", "received", "finished", "closed"}
    assert set(program) == {"accepted", "handed", "received", "spawned", "exited", "closed"}
    for rec in (builtin, program):
        assert rec["accepted"] == rec["handed"] == rec["closed"] == server.pid  # the master
        assert rec["received"] != server.pid  # a worker
