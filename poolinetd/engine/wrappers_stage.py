"""The tcp_wrappers stage: hosts.allow/hosts.deny judge a wrapped service's connections.

Touches the OS: getsockname on a connection (only when a rule names the
local address, ``daemon@host``), close of refused connections (through the
accept stage's ``release_fd``), and the resolver child's channel
(launch/resolver.py). The rules are ``admission.tcpwrappers`` (pure) over
``admission.tcpwrappers_files`` (re-read when the files change).

A connection is judged on the address admission uses (the PROXY client
when the service reads a header). Most decisions need no name and are made
at once. When the walk reaches a pattern that needs the client's host name,
the connection waits here (owned here, unpolled) while the resolver looks
the name up; it is decided when the answer arrives, or with the name
``unknown`` at its deadline (LOOKUP_DEADLINE; libwrap's answer when the
lookup fails). At most MAX_WAITING connections wait, MAX_WAITING_PER_SOURCE
from one source; past that a connection is refused (``tcp_wrappers_busy``).
Answers are cached for CACHE_TTL seconds, so a client that comes back soon
is decided at once.

Options: ``allow``/``deny`` decide; ``twist`` refuses (poolinetd runs no
twist command: the client is not served by the program); ``spawn``,
``setenv``, ``severity`` and libwrap's other options are not applied (a
load-time warning says so: docs/configuration.md).

fd ownership: ``judge`` takes the connection on every path: delivered
(``deliver`` takes it), refused (released here) or waiting (owned here until
decided, expired or ``close_all``).
"""

from __future__ import annotations

import collections
import itertools
import socket
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Protocol

from poolinetd.admission import tcpwrappers as tw
from poolinetd.admission.tcpwrappers_files import RuleFiles
from poolinetd.engine.refusals import NO_ROOM, Refusals
from poolinetd.engine.runtime import ServiceRuntime
from poolinetd.launch.resolver import Fork, Resolver, Unwatch, Watch

TCP_WRAPPERS = "tcp_wrappers"  # refused by hosts.allow/hosts.deny (refusal reason)
TCP_WRAPPERS_BUSY = "tcp_wrappers_busy"  # too many connections already wait for a name
LOOKUP_DEADLINE = 10.0  # seconds a connection waits for its client's name
MAX_WAITING = 1024  # connections waiting for a name, over every service
MAX_WAITING_PER_SOURCE = 32  # ... from one source (admission key)
CACHE_TTL = 60.0  # seconds a looked-up name is reused
CACHE_SIZE = 4096  # names cached at most (emptied when full)

Peer = tuple[str, int] | None
# deliver(rt, fd, family, key, peer, accepted_at, local): takes fd on every path.
Deliver = Callable[[ServiceRuntime, int, int, Hashable, Peer, float, Peer], None]


class Host(Protocol):
    """What the stage asks of the engine once a wait is over."""

    def has_room(self, rt: ServiceRuntime, now: float, draining: bool = False) -> bool:
        """Whether one more instance of ``rt`` may start now."""

    def finishes_preambles(self) -> bool:
        """Whether a connection that waited may still be served (not stopping)."""


@dataclass(slots=True, eq=False)
class Waiting:
    """A connection waiting for its client's host name."""

    rt: ServiceRuntime
    fd: int
    family: int
    key: Hashable
    peer: Peer
    accepted: float
    local: Peer
    addr: str
    deadline: float
    done: bool = False


class WrappersStage:
    """Judges wrapped services' connections; holds those waiting for a name."""

    def __init__(self, host: Host, refusals: Refusals, clock: Callable[[], float],
                 deliver: Deliver, release_fd: Callable[[int, int], None],
                 watch: Watch, unwatch: Unwatch, directory: str = "/etc",
                 fork: Fork | None = None) -> None:
        self.host = host
        self.refusals = refusals
        self.clock = clock
        self.deliver = deliver
        self.release_fd = release_fd
        self.files = RuleFiles(directory, clock)
        self.resolver = Resolver(self._on_answer, self._on_lost, watch, unwatch, fork)
        self.order: collections.deque[Waiting] = collections.deque()  # by deadline
        self.by_addr: dict[str, list[Waiting]] = {}  # waiting for the answer about addr
        self.asked: dict[int, str] = {}  # request id -> address
        self.per_source: dict[Hashable, int] = {}
        self.ids = itertools.count(1)
        self.cache: dict[str, tuple[str, float]] = {}  # addr -> (name, expires)
        self.waiting = 0

    def __len__(self) -> int:
        return self.waiting

    # -- deciding ---------------------------------------------------------------------
    def judge(self, rt: ServiceRuntime, fd: int, family: int, key: Hashable, peer: Peer,
              accepted: float, local: Peer) -> bool:
        """Decide admitted connection ``fd`` (taken on every path); False if refused now."""
        now = self.clock()
        addr = _unmapped(peer[0]) if peer else ""
        if local is None and self.files.current(now).server_patterns:
            local = _local_address(fd, family)
        got = self._decide(rt, addr, local, self._cached(addr, now))
        if got is None:
            return self._wait(rt, fd, family, key, peer, accepted, local, addr, now)
        if got:
            self.release_fd(fd, family)
            self.refusals.refused(rt, addr, got, now)
            return False
        self.deliver(rt, fd, family, key, peer, accepted, local)
        return True

    def refusal_now(self, rt: ServiceRuntime, peer: Peer, local: Peer, fd: int,
                    family: int) -> str:
        """The refusal reason when the rules deny ``peer`` without needing its name, else ""
        (after a preamble, before anything is answered: ``judge`` follows at delivery)."""
        now = self.clock()
        addr = _unmapped(peer[0]) if peer else ""
        if local is None and self.files.current(now).server_patterns:
            local = _local_address(fd, family)
        return self._decide(rt, addr, local, self._cached(addr, now)) or ""

    def _decide(self, rt: ServiceRuntime, addr: str, local: Peer, name: str | None
                ) -> str | None:
        """"" to serve, a refusal reason, or None: the client's name is needed."""
        rules = self.files.current()
        daemon = rt.service.tcp_wrappers or ""
        got = tw.decide(rules.allow, rules.deny,
                        tw.Request(daemon, addr, local[0] if local else "", name, rules.files))
        if not isinstance(got, tw.Verdict):
            return None
        if not got.allowed or any(opt.name == "twist" for opt in got.options):
            return TCP_WRAPPERS
        return ""

    def _cached(self, addr: str, now: float) -> str | None:
        hit = self.cache.get(addr)
        if hit is None:
            return None
        if hit[1] <= now:
            del self.cache[addr]
            return None
        return hit[0]

    # -- waiting for a name ------------------------------------------------------------
    def _wait(self, rt: ServiceRuntime, fd: int, family: int, key: Hashable, peer: Peer,
              accepted: float, local: Peer, addr: str, now: float) -> bool:
        held = self.per_source.get(key, 0)
        if self.waiting >= MAX_WAITING or held >= MAX_WAITING_PER_SOURCE:
            self.release_fd(fd, family)
            self.refusals.refused(rt, addr, TCP_WRAPPERS_BUSY, now)
            return False
        item = Waiting(rt, fd, family, key, peer, accepted, local, addr, now + LOOKUP_DEADLINE)
        if addr not in self.by_addr:
            ident = next(self.ids)
            if not self.resolver.ask(ident, addr):
                # No resolver (cannot start, channel full): as a failed lookup in libwrap.
                self._finish(item, tw.UNKNOWN, now)
                return True
            self.asked[ident] = addr
            self.by_addr[addr] = []
        self.by_addr[addr].append(item)
        self.order.append(item)
        self.per_source[key] = held + 1
        self.waiting += 1
        return True

    def _on_answer(self, ident: int, name: str) -> None:
        addr = self.asked.pop(ident, None)
        if addr is None:
            return
        now = self.clock()
        if len(self.cache) >= CACHE_SIZE:
            self.cache.clear()
        self.cache[addr] = (name, now + CACHE_TTL)
        for item in self.by_addr.pop(addr, []):
            self._settle(item, name, now)

    def _on_lost(self) -> None:
        """The resolver died: what waits is decided as a failed lookup."""
        now = self.clock()
        self.asked.clear()
        for items in list(self.by_addr.values()):
            for item in items:
                self._settle(item, tw.UNKNOWN, now)
        self.by_addr.clear()

    def _settle(self, item: Waiting, name: str, now: float) -> None:
        if item.done:
            return
        item.done = True
        self.waiting -= 1
        left = self.per_source.get(item.key, 0) - 1
        if left > 0:
            self.per_source[item.key] = left
        else:
            self.per_source.pop(item.key, None)
        self._finish(item, name, now)

    def _finish(self, item: Waiting, name: str, now: float) -> None:
        """Decide ``item`` with its client's name; serve it if it still may be."""
        rt = item.rt
        while rt.retired and rt.successor is not None:  # a reload changed the service
            rt = rt.successor
        if rt.service.tcp_wrappers is None:
            why: str | None = ""  # a reload lifted tcp_wrappers meanwhile
        else:
            why = self._decide(rt, item.addr, item.local, name)
        if why is None:  # cannot happen with a name; refuse rather than loop
            why = TCP_WRAPPERS
        if why:
            self.release_fd(item.fd, item.family)
            self.refusals.refused(rt, item.addr, why, now)
            return
        if (rt.retired or not self.host.finishes_preambles()
                or not self.host.has_room(rt, now, draining=True)):
            self.release_fd(item.fd, item.family)
            self.refusals.count(rt, NO_ROOM)
            return
        self.deliver(rt, item.fd, item.family, item.key, item.peer, item.accepted, item.local)

    def next_deadline(self) -> float | None:
        while self.order and self.order[0].done:
            self.order.popleft()
        return self.order[0].deadline if self.order else None

    def expire(self, now: float) -> None:
        """Decide what waited past its deadline as a failed lookup (name ``unknown``)."""
        while self.order and (self.order[0].done or self.order[0].deadline <= now):
            item = self.order.popleft()
            if item.done:
                continue
            waiters = self.by_addr.get(item.addr)
            if waiters is not None:
                waiters.remove(item)
                if not waiters:
                    del self.by_addr[item.addr]  # a late answer is only cached
            self._settle(item, tw.UNKNOWN, now)

    def child_exited(self, pid: int) -> bool:
        """Whether reaped ``pid`` was the resolver."""
        return self.resolver.child_exited(pid)

    def close_all(self) -> None:
        """Close what waits (a stop), unanswered and uncounted; close the resolver."""
        for item in self.order:
            if not item.done:
                item.done = True
                self.release_fd(item.fd, item.family)
        self.order.clear()
        self.by_addr.clear()
        self.asked.clear()
        self.per_source.clear()
        self.waiting = 0
        self.resolver.close()


def _unmapped(addr: str) -> str:
    """An IPv4-mapped address (a dual-stack listener's IPv4 client) as plain IPv4: the
    name lookup and the rules then see what an IPv4 listener would."""
    if addr[:7].lower() == "::ffff:" and "." in addr:
        return addr[7:]
    return addr


def _local_address(fd: int, family: int) -> Peer:
    """The connection's local address (for ``daemon@host``), or None."""
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    sock = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        got = sock.getsockname()
    except OSError:
        return None
    finally:
        sock.detach()
    return (str(got[0]), int(got[1]))
