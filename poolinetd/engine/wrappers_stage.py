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

Options (``tcpwrappers_options.actions``), applied once per connection when
it is decided: ``allow``/``deny`` decide; each ``spawn`` command is started
(whatever the verdict) and ``twist`` replaces the service's program for the
connection (``wrappers_commands``: children as the service's user, capped);
``setenv`` pairs travel with the connection to its program (``deliver``'s
``env``); ``severity`` sets the refusal line's level and syslog priority,
and an allowed connection whose rule sets it gets a ``wrappers_connect``
line at it (tcpd's connect line). libwrap's other options are not applied
(a load-time warning says so: docs/configuration.md). A twist in a denying
rule counts and logs a ``tcp_wrappers`` refusal, and the command answers the
client (tcpd does the same: the real program does not run).

Datagram ``wait`` services are judged on the first queued datagram's
source (``judge_datagram``, for the accept stage's loan): a name lookup is
asked for and the loan waits (the caller retries) until the answer, or the
deadline decides with ``unknown``.

fd ownership: ``judge`` takes the connection on every path: delivered
(``deliver`` takes it), refused or twisted (released here: a twist command
has its own copy) or waiting (owned here until decided, expired or
``close_all``).
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
from poolinetd.admission.tcpwrappers_options import NONE, Actions, actions
from poolinetd.engine.banners import send_banner
from poolinetd.engine.refusals import NO_ROOM, Refusals
from poolinetd.engine.runtime import ServiceRuntime
from poolinetd.engine.wrappers_commands import Commands
from poolinetd.launch import program, spawn, wrapcmd
from poolinetd.launch.resolver import Fork, Resolver, Unwatch, Watch
from poolinetd.observe import log

TCP_WRAPPERS = "tcp_wrappers"  # refused by hosts.allow/hosts.deny (refusal reason)
TCP_WRAPPERS_BUSY = "tcp_wrappers_busy"  # too many connections already wait for a name
LOOKUP_DEADLINE = 10.0  # seconds a connection waits for its client's name
MAX_WAITING = 1024  # connections waiting for a name, over every service
MAX_WAITING_PER_SOURCE = 32  # ... from one source (admission key)
CACHE_TTL = 60.0  # seconds a looked-up name is reused
CACHE_SIZE = 4096  # names cached at most (emptied when full)
MAX_DGRAM_LOOKUPS = 1024  # datagram sources whose name is being looked up at once

Peer = tuple[str, int] | None
Env = tuple[tuple[str, str], ...]


class Deliver(Protocol):
    """deliver(rt, fd, family, key, peer, accepted_at, local, env): takes fd on every path;
    ``env``: the rule's setenv pairs for the program."""

    def __call__(self, rt: ServiceRuntime, fd: int, family: int, key: Hashable, peer: Peer,
                 accepted: float, local: Peer, env: Env = ()) -> None: ...


@dataclass(frozen=True, slots=True)
class Judged:
    """A decision: ``why`` "" to serve or the refusal reason; what the rule asks besides."""

    why: str
    actions: Actions = NONE


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
                 fork: Fork | None = None, log_connections: bool = False) -> None:
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
        self.dgram_lookups: dict[str, float] = {}  # datagram source -> when to stop waiting
        # ... and the datagram services resting until its answer: woken when it comes
        self.dgram_waiters: dict[str, list[ServiceRuntime]] = {}
        self.commands = Commands(fork or spawn.fork_child, clock, log_connections)

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
        return self._conclude(rt, fd, family, key, peer, accepted, local, addr, got, now)

    def refusal_now(self, rt: ServiceRuntime, peer: Peer, local: Peer, fd: int,
                    family: int) -> str:
        """The refusal reason when the rules deny ``peer`` without needing its name and
        ask nothing else (no spawn, twist, severity), else "" (after a preamble, before
        anything is answered: ``judge`` follows at delivery and applies the options)."""
        now = self.clock()
        addr = _unmapped(peer[0]) if peer else ""
        if local is None and self.files.current(now).server_patterns:
            local = _local_address(fd, family)
        got = self._decide(rt, addr, local, self._cached(addr, now))
        if got is None or got.actions != NONE:
            return ""
        return got.why

    def _decide(self, rt: ServiceRuntime, addr: str, local: Peer, name: str | None
                ) -> Judged | None:
        """The decision, or None: the client's name is needed."""
        rules = self.files.current()
        daemon = rt.service.tcp_wrappers or ""
        got = tw.decide(rules.allow, rules.deny,
                        tw.Request(daemon, addr, local[0] if local else "", name, rules.files))
        if not isinstance(got, tw.Verdict):
            return None
        acts = actions(got)
        if acts.error:  # as libwrap's option errors: denied, nothing run
            return Judged(TCP_WRAPPERS, Actions(severity=acts.severity))
        return Judged("" if got.allowed else TCP_WRAPPERS, acts)

    def _conclude(self, rt: ServiceRuntime, fd: int, family: int, key: Hashable, peer: Peer,
                  accepted: float, local: Peer, addr: str, got: Judged, now: float) -> bool:
        """Apply decision ``got`` to connection ``fd`` (taken); True if it is served."""
        acts = got.actions
        peer_text, local_text = _text(peer), _text(local)
        if acts.spawn or acts.twist is not None:
            # A command's TCPLOCALIP/TCPLOCALPORT: the PROXY header's destination, else
            # the socket's own address (asked only when a command runs).
            local_text = local_text or _own_address(fd, family)
            env = wrapcmd.environment(rt.service, peer_text, local_text, acts.env)
            for command in acts.spawn:
                self.commands.start(wrapcmd.Kind.SPAWN, rt.name, rt.service, command, env,
                                    peer_text)
            if acts.twist is not None:
                return self._twist(rt, fd, family, addr, got, env, peer_text, now)
        if got.why:
            self._refuse(rt, fd, family)
            self.refusals.refused(rt, addr, got.why, now, acts.severity)
            return False
        self._connect_line(rt, addr, acts)
        self.deliver(rt, fd, family, key, peer, accepted, local, acts.env)
        return True

    def _twist(self, rt: ServiceRuntime, fd: int, family: int, addr: str, got: Judged,
               env: dict[str, str], peer_text: str, now: float) -> bool:
        """The twist command serves connection ``fd`` (taken) instead of the program."""
        assert got.actions.twist is not None
        started = self.commands.start(wrapcmd.Kind.TWIST, rt.name, rt.service,
                                      got.actions.twist, env, peer_text, conn_fd=fd)
        self.release_fd(fd, family)  # the command has its own copy
        if got.why or not started:
            self.refusals.refused(rt, addr, got.why or TCP_WRAPPERS_BUSY, now,
                                  got.actions.severity)
            return False
        rt.stats.accepted += 1
        self._connect_line(rt, addr, got.actions)
        return True

    def _refuse(self, rt: ServiceRuntime, fd: int, family: int) -> None:
        """Let a refused connection go: xinetd's banner_fail first (xinetd sends it when
        libwrap refuses, too), then the release."""
        if rt.service.spec.banner_fail:
            send_banner(fd, family, rt.service.spec.banner_fail)
        self.release_fd(fd, family)

    @staticmethod
    def _connect_line(rt: ServiceRuntime, addr: str, acts: Actions) -> None:
        """tcpd's connect line, at the rule's severity, when the rule sets one."""
        sev = acts.severity
        if sev is not None:
            log.event_pri(sev.log_level, "wrappers_connect", (sev.facility, sev.level),
                          service=rt.name, peer=addr, twist=acts.twist is not None)

    # -- datagram wait services -----------------------------------------------------------
    def judge_datagram(self, rt: ServiceRuntime, peer: Peer, now: float) -> Judged | None:
        """Judge a datagram ``wait`` service's next datagram, from ``peer``.

        ``why`` "" to lend the socket, else the refusal reason (the caller drops the
        datagram and counts it, at the rule's severity); None while the client's name
        is being looked up (the caller leaves the datagram queued and asks again soon;
        at LOOKUP_DEADLINE the name is ``unknown``). At most MAX_DGRAM_LOOKUPS sources
        wait for a name; past that one is judged as ``unknown`` at once.

        spawn commands run here; a twist is not run for a datagram (its command would
        have to take the socket over): the datagram is refused, and the service's
        program does not run for it. The rule's setenv pairs (``actions.env``) go to the
        program the loan starts."""
        addr = _unmapped(peer[0]) if peer else ""
        name = self._cached(addr, now)
        if name is None:
            until = self.dgram_lookups.get(addr)
            if until is not None and until <= now:
                self._forget_dgram_lookup(addr)
                name = tw.UNKNOWN
        got = self._decide(rt, addr, None, name)
        if got is None:
            if addr not in self.dgram_lookups and not self._ask_dgram(addr, now):
                got = self._decide(rt, addr, None, tw.UNKNOWN)
            if got is None:
                waiters = self.dgram_waiters.setdefault(addr, [])
                if not any(w is rt for w in waiters):
                    waiters.append(rt)
                return None
        self._forget_dgram_lookup(addr)
        acts = got.actions
        peer_text = _text(peer)
        if acts.spawn:
            env = wrapcmd.environment(rt.service, peer_text, "", acts.env)
            for command in acts.spawn:
                self.commands.start(wrapcmd.Kind.SPAWN, rt.name, rt.service, command, env,
                                    peer_text)
        if acts.twist is not None and not got.why:
            return Judged(TCP_WRAPPERS, acts)
        if not got.why:
            self._connect_line(rt, addr, acts)
        return got

    def _ask_dgram(self, addr: str, now: float) -> bool:
        """Ask the resolver about a datagram's source; False if it cannot be asked."""
        if len(self.dgram_lookups) >= MAX_DGRAM_LOOKUPS:
            # Full: drop the lookups past their deadline (a source whose datagram
            # something else consumed is never asked about again), then look again.
            for stale in [a for a, until in self.dgram_lookups.items() if until <= now]:
                self._forget_dgram_lookup(stale)
            if len(self.dgram_lookups) >= MAX_DGRAM_LOOKUPS:
                return False
        if addr not in self.by_addr:
            ident = next(self.ids)
            if not self.resolver.ask(ident, addr):
                return False
            self.asked[ident] = addr
            self.by_addr[addr] = []
        self.dgram_lookups[addr] = now + LOOKUP_DEADLINE
        return True

    def _forget_dgram_lookup(self, addr: str) -> None:
        self.dgram_waiters.pop(addr, None)
        if self.dgram_lookups.pop(addr, None) is not None and self.by_addr.get(addr) == []:
            del self.by_addr[addr]  # nothing else waits for it: a late answer is dropped

    def _wake_dgram(self, addr: str, now: float) -> None:
        """The name of a datagram source some services rest for has come: they are polled
        again at once (not at the end of their DGRAM_NAME_RETRY rest: a burst of new
        sources would otherwise cost each one that rest, in front of every datagram
        queued behind it)."""
        for rt in self.dgram_waiters.pop(addr, []):
            if rt.paused_until > now:
                rt.paused_until = now
        self.refusals.wake_at(now)

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
            self._refuse(rt, fd, family)
            self.refusals.refused(rt, addr, TCP_WRAPPERS_BUSY, now)
            return False
        item = Waiting(rt, fd, family, key, peer, accepted, local, addr, now + LOOKUP_DEADLINE)
        if addr not in self.by_addr:
            ident = next(self.ids)
            if not self.resolver.ask(ident, addr):
                # No resolver (cannot start, channel full): as a failed lookup in libwrap.
                return self._finish(item, tw.UNKNOWN, now)
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
        if addr in self.dgram_waiters:
            self._wake_dgram(addr, now)
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
        for addr in list(self.dgram_lookups):  # their next datagram: judged as unknown
            self.dgram_lookups[addr] = now
            self._wake_dgram(addr, now)

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

    def _finish(self, item: Waiting, name: str, now: float) -> bool:
        """Decide ``item`` with its client's name; serve it if it still may be. True if
        served."""
        rt = item.rt
        while rt.retired and rt.successor is not None:  # a reload changed the service
            rt = rt.successor
        got: Judged | None = Judged("")  # a reload lifted tcp_wrappers meanwhile
        if rt.service.tcp_wrappers is not None:
            got = self._decide(rt, item.addr, item.local, name)
        if got is None:  # cannot happen with a name; refuse rather than loop
            got = Judged(TCP_WRAPPERS)
        if not got.why and (rt.retired or not self.host.finishes_preambles()
                            or not self.host.has_room(rt, now, draining=True)):
            self.release_fd(item.fd, item.family)
            self.refusals.count(rt, NO_ROOM)
            return False
        return self._conclude(rt, item.fd, item.family, item.key, item.peer, item.accepted,
                              item.local, item.addr, got, now)

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


def _own_address(fd: int, family: int) -> str:
    """Connection ``fd``'s local address as "HOST PORT" ("" for unix, or when the kernel
    cannot say: the client already reset it); ``fd`` stays the caller's."""
    try:
        sock = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
    except OSError:
        return ""
    try:
        return program.format_addr(sock.getsockname())
    except OSError:
        return ""
    finally:
        sock.detach()


def _text(peer: Peer) -> str:
    """An address as the wire and the environment carry it: "HOST PORT" ("" for none)."""
    return f"{peer[0]} {peer[1]}" if peer else ""


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
