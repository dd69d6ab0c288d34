"""The OS seam's /proc reading: a process's parent and start time, and when it is gone."""

from __future__ import annotations

import os
import subprocess
import sys

from poolinetd.launch import system


def test_parse_stat_reads_parent_and_start_time() -> None:
    # comm may hold spaces and parentheses: fields are counted after the last ")"
    line = b"4242 (a (b) c) S 77 4242 4242 0 -1 4194560 " + b"0 " * 12 + b"987654 0 0\n"
    assert system.parse_stat(line) == (77, 987654)


def test_a_process_being_released_is_gone() -> None:
    """Its parent is reaping it this instant: /proc shows parent 0. Not someone else's
    child (a worker's SPAWNED for a program that had already exited was refused so)."""
    line = b"4242 (cat) X 0 0 0 0 -1 4194560 " + b"0 " * 12 + b"987654 0 0\n"
    assert system.parse_stat(line) is None


def test_parse_stat_refuses_garbage() -> None:
    assert system.parse_stat(b"") is None
    assert system.parse_stat(b"12 (x) S notanumber") is None


def test_identity_of_a_live_child_and_of_a_reaped_one() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        ident = system.System().identity(child.pid)
        assert ident is not None and ident[0] == os.getpid() and ident[1] > 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert system.System().identity(child.pid) is None
