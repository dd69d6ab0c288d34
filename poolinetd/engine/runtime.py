"""What the engine tracks: listeners, instances, service generations and their counters.

Pure records (no I/O; the sockets they hold are owned by the engine). Shared
by the engine and the dispatchers, so neither imports the other's module.

    ServiceRuntime  one generation of one service (a reload that changes a
                    service starts a new one; counters and admission state
                    carry over, see engine.reload)
    Listener        one listening or bound socket of a generation
    Instance        one connection or loan being served
    Pending         one connection in the preamble stage
    ServiceStats    the counters behind status and metrics
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Hashable
from dataclasses import InitVar, dataclass, field

from poolinetd.admission.policy import Admission
from poolinetd.config.spec import AtLimit, Service, SocketType
from poolinetd.net import preamble as pre
from poolinetd.observe import metrics
from poolinetd.ops import listeners


@dataclass(slots=True, eq=False)
class Listener:
    """One listening (or bound datagram) socket of a service; the engine owns ``sock``."""

    sock: socket.socket
    rt: ServiceRuntime
    bound: listeners.Bound
    polled: bool = False
    lent: int = 0  # the instance id of the loan holding it; 0 = not lent


@dataclass(slots=True, eq=False)
class Instance:
    """A connection or loan being served, counted until the dispatcher says it ended."""

    iid: int
    rt: ServiceRuntime
    source: Hashable  # its admission key (the source's network), or "" for none
    started: float
    listener: Listener | None = None  # set for loans
    program_pid: int = 0


@dataclass(slots=True, eq=False)
class Pending:
    """A connection in the preamble stage; the engine owns ``sock`` until it moves on."""

    sock: socket.socket
    rt: ServiceRuntime  # the generation that accepted it (a reload may move the listener)
    peer: tuple[str, int] | None
    source: Hashable  # the connection's own source (the proxy's, for a PROXY header)
    reader: pre.Preamble
    deadline: float
    got: bytes = b""  # preamble bytes already taken off the socket


@dataclass(slots=True, eq=False)
class ServiceStats:
    """Counters of one service that live as long as the master, across reload generations
    (a Prometheus counter must never go back)."""

    accepted: int = 0
    refused: int = 0
    refused_by: dict[str, int] = field(default_factory=dict)
    builtin_bytes_in: int = 0
    builtin_bytes_out: int = 0
    program_exits: dict[str, int] = field(default_factory=dict)
    handoff: metrics.Histogram = field(
        default_factory=lambda: metrics.Histogram(metrics.HANDOFF_BUCKETS))
    program_run: metrics.Histogram = field(
        default_factory=lambda: metrics.Histogram(metrics.RUN_TIME_BUCKETS))

    def program_exit(self, code: int, seconds: float) -> None:
        """Count a program's exit: its exit code, or the signal's name (negative code)."""
        key = str(code) if code >= 0 else _signal_name(-code)
        self.program_exits[key] = self.program_exits.get(key, 0) + 1
        self.program_run.observe(seconds)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


@dataclass(slots=True, eq=False)
class ServiceRuntime:
    """Everything the engine tracks for one generation of one service."""

    service: Service
    listeners: list[Listener] = field(default_factory=list)
    instances: int = 0  # connections and loans being served
    programs: int = 0  # of those, how many a program serves
    pending: int = 0  # connections in the preamble stage
    pending_by: dict[Hashable, int] = field(default_factory=dict)  # ... per source
    admission: Admission = field(init=False)
    paused_until: float = 0.0  # EMFILE rest
    retired: bool = False  # removed or replaced by a reload: takes nothing new
    predecessors: list[ServiceRuntime] = field(default_factory=list)  # older, still busy
    successor: ServiceRuntime | None = None  # the generation that replaced this one
    preamble: Callable[[], pre.Preamble] | None = None  # a reader per connection, if any
    # A one-shot built-in (daytime, time) answered by the engine itself: its reply.
    reply: Callable[[], bytes] | None = None
    engine_served: bool = False  # no dispatcher behind it (tcpmux, or an engine reply)
    counts_active: bool = field(init=False)
    is_program: bool = field(init=False)
    is_unix: bool = field(init=False)  # its peers have no address; it may use the closer
    stats: ServiceStats = field(default_factory=ServiceStats)
    last_error: str = ""
    share_cap: InitVar[int | None] = None  # the mode's per-source share (Admission)

    def __post_init__(self, share_cap: int | None) -> None:
        self.admission = Admission(self.service, share_cap=share_cap)
        # Whether its instances count against the global caps (a datagram built-in's
        # loan is not a connection), and as programs; fixed per generation.
        self.counts_active = not (self.lends and self.service.internal is not None)
        self.is_program = self.service.program is not None
        self.is_unix = self.service.spec.protocol.is_unix

    @property
    def name(self) -> str:
        return self.service.name

    @property
    def lends(self) -> bool:
        """Whether its listeners are lent (wait services, datagram built-ins), not accepted on."""
        return self.service.wait or self.service.socket_type is SocketType.DGRAM

    @property
    def resting_until(self) -> float:
        """Until when its listeners rest (EMFILE pause, or the looping rule)."""
        return max(self.paused_until, self.admission.paused_until)

    def refuses_at_max_child(self) -> bool:
        """Whether a connection past max_child is accepted and refused ("instances", as
        xinetd does for its services) rather than left in the backlog (inetd's rule)."""
        return self.service.spec.at_limit is AtLimit.REFUSE and not self.service.wait

    def at_max_child(self) -> bool:
        limit = self.service.limits.max_child
        if not limit:
            return False
        # Instances of older generations (before a reload changed the service)
        # still run and still count.
        running = self.instances + sum(p.instances for p in self.predecessors)
        return running >= limit
