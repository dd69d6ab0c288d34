"""The master's records of its workers: what it asked of each, and whether each keeps reading.

Pure apart from reading a worker's upward pipe and closing its channel and
pipe (``WorkerHandle.read``, ``close_channel``). A worker's life in the
master has two independent parts, each an enum with named transitions that refuse impossible moves:

* ``Phase``: what the master has asked of it, a one-way ladder
  SERVING -> STOP_QUEUED -> STOPPING -> KILLED (a rung may be skipped,
  never climbed down);
* ``Liveness``: whether it reads what it is sent (SIOCOUTQ of its
  channel): CLEAR <-> WATCHED -> STALLED -> CLEAR.

Whether it is booting, ready or draining is the pool's (``bookkeeping``);
whether its channel is still open is the channel's own (``WorkerHandle.open``);
the programs it has still to launch are counted by its pool slot, not here.

fd ownership: a handle owns the master's end of its worker's channel (shut
for reading: only the master sends on it) and the read end of its upward
pipe (the only way a worker talks to the master; a pipe carries no fds) from
the fork until ``close_channel`` (EOF seen on the pipe, a protocol error, or
the dispatcher closes); the connections in its outbox are the dispatcher's
until they are sent.
"""

from __future__ import annotations

import enum
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from poolinetd.engine.runtime import ServiceRuntime
from poolinetd.pool import wire

STALL_CHECK = 1.0  # how often a worker with unread messages is looked at
STALL_TIMEOUT = 2.0  # unread messages not going down this long: stalled
STALL_KILL = 3.0  # then killed this much later if still stalled
# A worker's own log lines (LOG) are written by the master: at most this many per
# second per worker (a bucket of this size), the rest dropped and counted, so a
# flooding worker cannot turn the master into its log writer.
LOG_RATE = 1000.0
LOG_DROP_REPORT = 10.0  # seconds between worker_log_dropped lines of one worker
# Upward messages the master decodes per second for one service's workers together (a
# bucket of this size). Decoding costs the master's one thread microseconds a message
# and a worker can write thousands of tiny frames per read: past this, the worker that
# read it is not read again until the bucket holds a read's worth (its writes wait).
READ_RATE = 20_000.0


class TransitionError(RuntimeError):
    """A move the state machine does not have (a bug in the caller, never input)."""


class Phase(enum.Enum):
    """What the master has asked of a worker (one way: never back down the ladder)."""

    SERVING = "serving"  # nothing: it takes work as its pool slot says (booting, ready)
    STOP_QUEUED = "stop_queued"  # STOP is due but its channel was full: sent when it next reports
    STOPPING = "stopping"  # STOP sent: it finishes what it serves, then exits
    KILLED = "killed"  # SIGKILL sent: nothing more is sent or signalled; its reap is awaited


class Liveness(enum.Enum):
    """Whether a worker reads its channel, as far as the master can tell."""

    CLEAR = "clear"  # everything sent to it was read (or nothing was sent)
    WATCHED = "watched"  # sent something: its unread queue is looked at every STALL_CHECK
    STALLED = "stalled"  # that queue did not go down for STALL_TIMEOUT: killed after STALL_KILL


class StallStep(enum.Enum):
    """What ``WorkerHandle.look`` found, for the dispatcher to act on."""

    NOTHING = "nothing"  # still watched; look again in STALL_CHECK
    CLEARED = "cleared"  # it read everything: no longer watched
    STALLED = "stalled"  # just stalled: take it out of rotation (STOP), start a replacement
    KILL = "kill"  # stalled for STALL_KILL more: SIGKILL it


@dataclass(slots=True, eq=False)
class ReadBudget:
    """The upward messages one service's workers may still have decoded now."""

    tokens: float = READ_RATE
    refilled: float = 0.0

    def spend(self, count: int, now: float) -> float:
        """Count ``count`` messages decoded at ``now``; 0, or for how long the worker
        that sent them should not be read (until the bucket is back to a quarter)."""
        self.tokens = min(READ_RATE, self.tokens + (now - self.refilled) * READ_RATE)
        self.refilled = now
        self.tokens -= count
        if self.tokens > 0:
            return 0.0
        return (READ_RATE / 4 - self.tokens) / READ_RATE


@dataclass(slots=True, eq=False)
class WorkerHandle:
    """The dispatcher's record of one worker process; dropped only when it is reaped."""

    pid: int
    channel: socket.socket  # the master's end, shut for reading (see the module docstring)
    upward: wire.UpReader  # the read end of its upward pipe
    rt: ServiceRuntime
    phase: Phase = Phase.SERVING
    liveness: Liveness = Liveness.CLEAR
    boot_error: str = ""  # why it could not get ready (BOOT_FAILED)
    unread: int = 0  # bytes of the channel it had not read at the last look
    unread_since: float = 0.0  # since when that number has not gone down
    stalled_at: float = 0.0  # when it was seen STALLED
    last_heard: float = 0.0  # when it last sent anything
    loans: int = 0  # lent sockets it holds (nothing else may be sent to it for a long time)
    # Connections counted on it but not sent yet (until the next flush), and their fds.
    outbox: list[wire.ConnInfo] = field(default_factory=list)
    outbox_fds: list[int] = field(default_factory=list)
    log_budget: float = LOG_RATE  # LOG lines it may still have written now
    log_refilled: float = 0.0  # when the budget was last topped up
    log_dropped: int = 0  # LOG lines dropped since the last worker_log_dropped
    log_drop_told: float = float("-inf")  # when worker_log_dropped was last logged
    paused_until: float = 0.0  # > 0: its pipe is not read until then (its service's ReadBudget)

    # -- the channel ------------------------------------------------------------
    @property
    def open(self) -> bool:
        """Whether its channel is still open (the socket itself is the one record of it)."""
        return self.channel.fileno() >= 0

    def close_channel(self, unwatch: Callable[[wire.UpReader], None]) -> bool:
        """Stop watching the pipe, close it and the channel; False if they already were
        (safe to call twice).

        Neither close can block: the pipe carries no fds, and nothing can have
        been queued to the channel's end (shut for reading). Liveness goes back
        to CLEAR: nothing more can be sent, so nothing can stall.
        """
        if not self.open:
            return False
        unwatch(self.upward)
        self.upward.close()
        self.channel.close()
        self.liveness = Liveness.CLEAR
        return True

    def read(self, now: float) -> tuple[list[wire.Message], str]:
        """What its upward pipe holds now (a bounded read), and "" or why it broke the
        protocol (then nothing more can be trusted from it: the caller kills it).
        The list ends with EOF if it is gone."""
        msgs, error = self.upward.read()
        if msgs:
            self.last_heard = now
        return msgs, error

    def may_log(self, now: float) -> bool:
        """Whether one more LOG line of this worker may be written now (its budget); a
        refused one is counted in ``log_dropped``."""
        self.log_budget = min(LOG_RATE, self.log_budget + (now - self.log_refilled) * LOG_RATE)
        self.log_refilled = now
        if self.log_budget >= 1.0:
            self.log_budget -= 1.0
            return True
        self.log_dropped += 1
        return False

    def log_drops_due(self, now: float) -> int:
        """How many LOG lines were dropped, when a worker_log_dropped line is due (at most
        one per LOG_DROP_REPORT); 0 otherwise. The count restarts once told."""
        if not self.log_dropped or now - self.log_drop_told < LOG_DROP_REPORT:
            return 0
        dropped, self.log_dropped = self.log_dropped, 0
        self.log_drop_told = now
        return dropped

    def take_outbox(self) -> tuple[list[wire.ConnInfo], list[int]]:
        """What is queued for it (the caller now owns those fds), leaving it empty."""
        taken = self.outbox, self.outbox_fds
        self.outbox, self.outbox_fds = [], []
        return taken

    # -- Phase transitions --------------------------------------------------------
    @property
    def stop_due(self) -> bool:
        """Whether a STOP may (still) be sent: its channel is open and none was sent."""
        return self.open and self.phase in (Phase.SERVING, Phase.STOP_QUEUED)

    @property
    def told_to_stop(self) -> bool:
        """Whether the master made it end (STOP sent, or killed): its exit is expected."""
        return self.phase in (Phase.STOPPING, Phase.KILLED)

    def stop_sent(self) -> None:
        """SERVING or STOP_QUEUED -> STOPPING."""
        self._move({Phase.SERVING, Phase.STOP_QUEUED}, Phase.STOPPING)

    def stop_queued(self) -> None:
        """SERVING -> STOP_QUEUED (or stays there: a retry that found the channel full again)."""
        self._move({Phase.SERVING, Phase.STOP_QUEUED}, Phase.STOP_QUEUED)

    def killed(self) -> None:
        """Any phase but KILLED -> KILLED (a pid is sent SIGKILL once)."""
        self._move({Phase.SERVING, Phase.STOP_QUEUED, Phase.STOPPING}, Phase.KILLED)

    def _move(self, sources: set[Phase], target: Phase) -> None:
        if self.phase not in sources:
            raise TransitionError(f"worker {self.pid}: {self.phase.value} -> {target.value}")
        self.phase = target

    # -- Liveness transitions -------------------------------------------------------
    def watch_queue(self, now: float) -> bool:
        """CLEAR -> WATCHED: something was just sent. False if it was already watched
        (the caller schedules a look STALL_CHECK from now only on True)."""
        if self.liveness is not Liveness.CLEAR or not self.open:
            return False
        self.liveness = Liveness.WATCHED
        self.unread_since = now
        self.unread = 0
        return True

    def look(self, unread: int, now: float) -> StallStep:
        """Judge its channel's unread byte count (-1: the kernel cannot say) at ``now``.

        WATCHED or STALLED -> CLEAR when all is read (or unknown: assume
        progress); WATCHED -> STALLED when the count has not gone down (and it
        said nothing) for STALL_TIMEOUT; a STALLED worker is due for SIGKILL
        STALL_KILL after that. Progress while STALLED only postpones the kill
        by one look: a worker that stalled once has been replaced already.
        """
        if self.liveness is Liveness.CLEAR:
            raise TransitionError(f"worker {self.pid} is not watched")
        if unread <= 0:
            self.liveness = Liveness.CLEAR
            self.unread = 0
            self.unread_since = self.stalled_at = 0.0
            return StallStep.CLEARED
        if unread < self.unread or not self.unread or self.last_heard >= self.unread_since:
            self.unread = unread  # it read or said something: progress
            self.unread_since = now
        elif self.liveness is Liveness.WATCHED and now - self.unread_since >= STALL_TIMEOUT:
            self.liveness = Liveness.STALLED
            self.stalled_at = now
            return StallStep.STALLED
        elif (self.liveness is Liveness.STALLED and now - self.stalled_at >= STALL_KILL
              and self.phase is not Phase.KILLED):
            return StallStep.KILL
        return StallStep.NOTHING


@dataclass(slots=True, eq=False)
class ConnRecord:
    """A connection or loan handed to a worker, until DONE or its program is reaped.

    Whether its program is still to be launched is not kept here: the pool
    slot of its worker counts that (``bookkeeping.WorkerSlot.launches``).
    """

    worker_pid: int
    program_pid: int = 0  # as its worker said (SPAWNED): checked before it is acted on
    loan: bool = False
