"""pool.handles: a worker handle's Phase and Liveness move only along their transitions."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from engine_fakes import services_from

from poolinetd.engine.runtime import ServiceRuntime
from poolinetd.pool import wire
from poolinetd.pool.handles import (
    LOG_DROP_REPORT,
    LOG_RATE,
    STALL_KILL,
    STALL_TIMEOUT,
    Liveness,
    Phase,
    StallStep,
    TransitionError,
    WorkerHandle,
)


@pytest.fixture
def handle() -> Iterator[WorkerHandle]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    up_read, up_write = wire.upward_pipe()
    rt = ServiceRuntime(services_from("127.0.0.1:0 stream tcp nowait {user} internal echo\n")[0])
    made = WorkerHandle(4242, ours, wire.UpReader(up_read), rt)
    yield made
    made.close_channel(lambda _up: None)
    theirs.close()
    os.close(up_write)


def test_the_stop_ladder_goes_one_way(handle: WorkerHandle) -> None:
    assert handle.phase is Phase.SERVING and handle.stop_due and not handle.told_to_stop
    handle.stop_queued()
    handle.stop_queued()  # a retry that found the channel full again
    assert handle.phase is Phase.STOP_QUEUED and handle.stop_due
    handle.stop_sent()
    assert handle.phase is Phase.STOPPING and not handle.stop_due and handle.told_to_stop
    with pytest.raises(TransitionError):
        handle.stop_queued()
    handle.killed()
    assert handle.phase is Phase.KILLED
    for move in (handle.killed, handle.stop_sent, handle.stop_queued):
        with pytest.raises(TransitionError):
            move()


def test_a_closed_channel_takes_no_stop_and_is_closed_once(handle: WorkerHandle) -> None:
    unwatched: list[wire.UpReader] = []
    assert handle.open and handle.watch_queue(1.0)
    assert handle.close_channel(unwatched.append)
    assert not handle.close_channel(unwatched.append)
    assert len(unwatched) == 1 and not handle.open and not handle.stop_due
    assert handle.liveness is Liveness.CLEAR  # nothing can stall on a closed channel
    assert not handle.watch_queue(2.0)


def test_a_worker_that_stops_reading_stalls_then_is_due_for_kill(handle: WorkerHandle) -> None:
    with pytest.raises(TransitionError):
        handle.look(100, 0.0)  # not watched
    assert handle.watch_queue(10.0) and not handle.watch_queue(10.5)
    assert handle.look(100, 11.0) is StallStep.NOTHING  # first count seen: progress
    assert handle.look(100, 11.0 + STALL_TIMEOUT - 0.1) is StallStep.NOTHING
    assert handle.look(100, 11.0 + STALL_TIMEOUT) is StallStep.STALLED
    assert handle.liveness is Liveness.STALLED
    stalled = 11.0 + STALL_TIMEOUT
    assert handle.look(100, stalled + STALL_KILL - 0.1) is StallStep.NOTHING
    assert handle.look(100, stalled + STALL_KILL) is StallStep.KILL
    handle.killed()
    assert handle.look(100, stalled + STALL_KILL + 1) is StallStep.NOTHING  # killed once
    assert handle.look(0, stalled + STALL_KILL + 2) is StallStep.CLEARED
    assert handle.liveness is Liveness.CLEAR and handle.stalled_at == 0.0


def test_reading_or_talking_is_progress(handle: WorkerHandle) -> None:
    handle.watch_queue(0.0)
    handle.look(300, 1.0)
    assert handle.look(200, 1.0 + STALL_TIMEOUT) is StallStep.NOTHING  # it read some
    handle.last_heard = 2.0 + STALL_TIMEOUT
    assert handle.look(200, 2.0 + STALL_TIMEOUT) is StallStep.NOTHING  # it said something
    assert handle.look(-1, 9.0) is StallStep.CLEARED  # the kernel cannot say: assume progress


def test_a_workers_log_lines_are_bounded_per_second_and_drops_told_rarely(
        handle: WorkerHandle) -> None:
    now = 100.0
    written = sum(handle.may_log(now) for _ in range(int(LOG_RATE) * 3))
    assert written == LOG_RATE and handle.log_dropped == 2 * LOG_RATE
    assert handle.log_drops_due(now) == 2 * LOG_RATE  # told once...
    assert not handle.may_log(now)
    assert handle.log_drops_due(now + 1.0) == 0  # ...then not again for a while
    assert handle.may_log(now + 0.5)  # the budget refills with time
    assert handle.log_drops_due(now + LOG_DROP_REPORT) == 1
