"""The seam between the engine and a mode: what a dispatcher must do, what it may ask back.

Pure (protocols only). The engine knows services, listeners and instances;
a dispatcher knows how an instance is served (pool: a pre-forked worker;
fork: a child per connection). An *instance* is one accepted connection or
one loan of a listener (a ``wait`` service's program, a datagram built-in),
identified by an id the engine chooses; the dispatcher tells the engine when
it ended, and the engine does all the counting (max_child, per-source
limits, status).

fd ownership across the seam: ``hand_off`` takes the connection fd on
every path (the dispatcher closes it once a worker or child has its own
copy, or when it cannot be served); ``lend`` never takes the listener: it
stays the engine's and is not polled until the instance ends. A dispatcher
may hold what ``hand_off`` gave it until ``flush``, which the engine calls
at the end of every accept batch and loop turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from poolinetd.engine.runtime import Listener, ServiceRuntime


class Watchable(Protocol):
    """What the engine's selector can watch: anything with a file descriptor."""

    def fileno(self) -> int: ...


class Hooks(Protocol):
    """What a dispatcher may ask of the engine."""

    @property
    def internal_ports(self) -> frozenset[int]:
        """Ports of the built-ins (the datagram loop guard)."""

    log_connections: bool
    stopping: bool

    def watch(self, fileobj: Watchable, handler: Callable[[int], None]) -> None:
        """Call ``handler(mask)`` from the loop whenever ``fileobj`` is readable.

        The dispatcher keeps owning ``fileobj``; it must ``unwatch`` it before closing it.
        """

    def unwatch(self, fileobj: Watchable) -> None:
        """Stop watching ``fileobj`` (no-op if it is not watched)."""

    def release(self, fd: int, family: int) -> None:
        """Close connection ``fd`` that nothing else holds (taken), never blocking: a
        unix one may carry descriptors its client passed (launch/closer.py)."""

    def ended(self, iid: int) -> None:
        """Instance ``iid`` is over (connection closed, program exited, loan returned)."""

    def lost(self, iid: int) -> None:
        """Instance ``iid`` was handed off but could not be delivered (closed unserved)."""

    def program_started(self, iid: int, pid: int) -> None:
        """Instance ``iid`` is served by program ``pid`` (for status and the stop pass)."""

    def refresh(self, rt: ServiceRuntime) -> None:
        """``rt``'s capacity may have changed: re-decide polling at the end of this turn."""

    def wake_at(self, when: float) -> None:
        """Call ``Dispatcher.sweep`` no later than ``when``."""

    def rest(self, rt: ServiceRuntime, why: str, now: float | None = None) -> None:
        """Out of a resource (fork failed): ``rt``'s listeners rest a moment."""

    def forked(self, pid: int) -> bool:
        """Whether the engine forked ``pid`` itself (a new master, a tcp_wrappers command,
        the resolver, the closer): one of its children that is never a program."""


class Dispatcher(Protocol):
    """A mode. Every method is called from the engine's one thread."""

    mode: str
    lends_per_burst: bool  # a datagram built-in's loan ends after each burst (classic)
    # At most this many instances per source where max_child_per_ip is the safe
    # default (not written): what the mode can start quickly. None: as configured.
    source_share_cap: int | None

    def attach(self, hooks: Hooks) -> None:
        """Called once, before anything else."""

    def add(self, rt: ServiceRuntime) -> None:
        """A new service generation starts (at start or by a reload)."""

    def retire(self, rt: ServiceRuntime) -> None:
        """``rt`` takes no new instances; what it serves finishes on its own."""

    def holds(self, rt: ServiceRuntime) -> bool:
        """Whether anything of ``rt`` still runs here (workers, children)."""

    def maintain(self, rt: ServiceRuntime, now: float) -> None:
        """Start what ``rt`` needs to take connections (pool: workers up to its minimum)."""

    def can_take(self, rt: ServiceRuntime) -> bool:
        """Whether one more instance of ``rt`` has somewhere to go right now."""

    def ready(self, rt: ServiceRuntime) -> bool:
        """Whether ``rt`` is ready to serve (for the ready report); a failing pool counts."""

    def hand_off(self, rt: ServiceRuntime, fd: int, family: int, peer: str, iid: int,
                 local: str = "", env: tuple[tuple[str, str], ...] = ()) -> bool:
        """Serve connection ``fd`` (taken: closed by the dispatcher). False if it could not.

        ``peer``/``local`` are "HOST PORT" ("" for unix); ``local`` is given only when a
        PROXY header named the address the client connected to (else the socket's own).
        ``env``: tcp_wrappers' setenv pairs, added to its program's environment.
        """

    def flush(self) -> None:
        """Deliver what ``hand_off`` queued (the end of an accept batch)."""

    def lend(self, rt: ServiceRuntime, lst: Listener, iid: int,
             env: tuple[tuple[str, str], ...] = ()) -> bool:
        """Serve on the listener itself until instance ``iid`` ends. False if it could not.
        ``env``: tcp_wrappers' setenv pairs for the wait program it starts."""

    def child_exited(self, pid: int, code: int) -> bool:
        """A child was reaped by the engine; False if it was not this dispatcher's."""

    def dgram_log_due(self, rt: ServiceRuntime, now: float) -> int | None:
        """A datagram for ``rt`` was refused by the engine: may a line be logged (the
        throttle its datagram servers keep)? None to hold it back."""

    def sweep(self, now: float) -> None:
        """Deadline housekeeping (idle retirement, backoff ends, stalled workers)."""

    def report(self, rt: ServiceRuntime, now: float) -> dict[str, object]:
        """``rt``'s part of the status document: workers, pool sizes, restarts, failures."""

    def failing(self, rt: ServiceRuntime) -> bool:
        """Whether ``rt`` cannot start what serves it (boot failures, in backoff)."""

    def begin_stop(self, fast: bool) -> None:
        """Tell everything running to finish (``fast``: SIGTERM it now)."""

    def kill_remaining(self) -> None:
        """Past the stop deadline: SIGKILL whatever still runs."""

    def busy(self) -> bool:
        """Whether anything still runs (the engine's stop waits for False)."""

    def abandon(self) -> list[int]:
        """Forget everything still awaited (a stop that cannot finish); returns the pids."""

    def reopen_log(self) -> None:
        """The log file was reopened (SIGUSR1): pass it on where it is needed."""

    def resize(self, rt: ServiceRuntime, delta: int) -> int | None:
        """SIGTTIN/SIGTTOU: change ``rt``'s pool minimum; the new value, or None if no pools."""

    def close(self) -> None:
        """The engine is done: release what is left (channels)."""
