"""The accept stage: accept batch -> admission -> preamble -> routing -> hand-off.

Touches the OS: accept and close on listeners, one non-blocking send for an
engine-answered built-in, datagram peeks for lent listeners. The same for
both modes; how a connection is served is the dispatcher's business.

In order, for a readable listener:

1. accept, in bounded batches, only while the service has room (instances
   below max_child, the global caps, the dispatcher able to take one):
   backpressure, so clients wait in the kernel backlog and a connection is
   never accepted without somewhere to go;
2. admission (``admission.policy``, pure), on the admission key computed
   once per connection: a refused client is closed at once; then, for a
   service under tcp_wrappers, hosts.allow/hosts.deny (``wrappers_stage``:
   a connection whose rules need the client's host name waits there for it);
3. the preamble stage (``preamble_stage``), only where the service reads
   one; it comes back through ``route`` (admission again, on the address
   the header gave, or the tcpmux sub-service's) and ``deliver``;
4. an engine-answered reply (daytime, time), or ``Dispatcher.hand_off``,
   then ``Dispatcher.flush`` once per batch (pool mode: what the batch gave
   one worker travels in one message).

A ``wait`` service or a datagram built-in is not accepted on: its listener
is *lent* (``lend``) and unpolled until the loan ends.

fd ownership: an accepted fd is this stage's until it is released (refused,
answered: ``release``, which never blocks) or given to the preamble stage
or to ``hand_off`` (the dispatcher's from then on, on every path). A lent
listener stays the service table's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import traceback
from collections.abc import Callable, Hashable
from typing import Protocol

from poolinetd.admission import readers
from poolinetd.admission.tcpwrappers_options import Severity
from poolinetd.builtins import internal
from poolinetd.config.spec import SocketType
from poolinetd.engine.banners import send_banner
from poolinetd.engine.dispatch import Dispatcher
from poolinetd.engine.ledger import Ledger
from poolinetd.engine.preamble_stage import Peer, PreambleStage
from poolinetd.engine.refusals import INSTANCES, NO_ROOM, Refusals
from poolinetd.engine.runtime import Listener, Pending, ServiceRuntime
from poolinetd.engine.services import ServiceTable
from poolinetd.engine.wrappers_stage import WrappersStage
from poolinetd.launch.closer import RIGHTS_SPACE, passed_fds
from poolinetd.net import preamble as pre
from poolinetd.observe import log, stagetrace

ACCEPT_BATCH = 64  # connections accepted per readable event before other work runs
# For programs, fewer: each launch costs its worker an exec, and connections left
# in the kernel's FIFO backlog are served more fairly than ones queued in a
# worker (measured: /bin/cat at c=64, p99 80 -> 62-68 ms, 1,840 -> 2,100 conn/s).
ACCEPT_BATCH_PROGRAM = 4
EMFILE_PAUSE = 1.0  # seconds a listener rests after running out of fds (inetd sleeps 1 s too)
DGRAM_JUDGE_BATCH = 64  # datagrams judged (and refused) per event before other work runs
# A datagram wait service whose rules need the next datagram's source name rests this
# long between two looks (the resolver usually answers in well under that).
DGRAM_NAME_RETRY = 0.05
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# Room for every descriptor one unix datagram can carry (SCM_MAX_FD): see _drop_datagram.


class Host(Protocol):
    """What the accept stage asks of the engine."""

    def has_room(self, rt: ServiceRuntime, now: float, draining: bool = False) -> bool:
        """Whether one more instance of ``rt`` may start now."""

    def rest(self, rt: ServiceRuntime, why: str, now: float | None = None) -> None:
        """Out of a resource: ``rt``'s listeners rest a moment."""

    def finishes_preambles(self) -> bool:
        """Whether a connection that finishes its preamble now may still be served."""


class AcceptStage:
    """Everything between a readable listener and a dispatcher, for every service."""

    def __init__(self, host: Host, sel: selectors.BaseSelector, table: ServiceTable,
                 ledger: Ledger, dispatcher: Dispatcher, refusals: Refusals,
                 clock: Callable[[], float], log_connections: bool,
                 dispose: Callable[[int], None], tcp_wrappers_dir: str = "/etc") -> None:
        """``dispose(fd)`` closes a unix connection without ever blocking (the closer);
        ``tcp_wrappers_dir`` holds the hosts.allow/hosts.deny wrapped services obey."""
        self.host = host
        self.dispose = dispose
        self.table = table
        self.ledger = ledger
        self.dispatcher = dispatcher
        self.refusals = refusals
        self.clock = clock
        self.log_connections = log_connections
        self.caught_up: set[Listener] = set()  # accepted from by catch_up this turn
        self.preambles = PreambleStage(sel, table, refusals, clock, self._route, self._deliver,
                                       self.release, dispose)
        self.wrappers = WrappersStage(
            host, refusals, clock, self._serve, self.release_fd,
            lambda sock, handler: sel.register(sock, selectors.EVENT_READ, handler),
            sel.unregister, tcp_wrappers_dir, log_connections=log_connections)

    def on_listener(self, lst: Listener) -> None:
        """``lst`` is readable: accept a batch, or lend it."""
        if not lst.polled:  # a stale event: a stop or reload unpolled it earlier this turn
            return
        if lst.rt.lends:
            self.lend(lst)
        else:
            self.accept_batch(lst)
        self.table.dirty.add(lst.rt)

    # -- accept ---------------------------------------------------------------------
    def catch_up(self, lst: Listener) -> bool:
        """Accept from unpolled ``lst`` now, if it accepts and has not this turn: True if
        it did (its service is then re-decided: dirty). The engine asks when room came
        back (a launch ended) while clients may wait in the backlog: taking them at
        once, instead of polling the listener and coming back next turn, saves a turn
        and two epoll_ctl per launched program under load. An empty backlog costs one
        EAGAIN. The engine clears ``caught_up`` once a turn."""
        if lst.rt.lends or lst in self.caught_up:
            return False
        self.caught_up.add(lst)
        self.table.dirty.add(lst.rt)
        try:
            self.accept_batch(lst)
        except Exception:  # as for a readiness event: one bug must not end the turn
            log.error("internal_error", traceback=traceback.format_exc())
        return True

    def accept_batch(self, lst: Listener) -> None:
        """Accept what the backlog holds, up to a batch and while the service has room."""
        rt = lst.rt
        batch = ACCEPT_BATCH if rt.service.internal is not None else ACCEPT_BATCH_PROGRAM
        # _accept() gives the bare fd: no socket object per connection, the
        # engine only forwards it and closes it.
        accept = lst.sock._accept  # type: ignore[attr-defined]
        family = lst.sock.family
        now = self.clock()  # one reading per batch: the batch takes microseconds
        for _ in range(batch):
            if not self.host.has_room(rt, now):
                break
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self.host.rest(rt, f"accept: {exc.strerror}", now)
                    log.error("accept_failed", service=rt.name, error=exc.strerror,
                              pause=EMFILE_PAUSE)
                    break
                continue  # ECONNABORTED, EPROTO...: that client is gone, the next one is not
            # (one call per connection: its admission, routing and delivery)
            if not self._accepted(lst, fd, family, addr if isinstance(addr, tuple) else None,
                                  now) and rt.admission.looping:
                break
        # What the batch gave each worker goes in one message (wire.MAX_CONN_BATCH).
        self.dispatcher.flush()

    def _accepted(self, lst: Listener, fd: int, family: int, peer: Peer, now: float) -> bool:
        """Admit and route one accepted connection (``fd`` taken); False if refused."""
        rt = lst.rt
        if rt.service.spec.banner:  # xinetd's banner: to every client, before anything else
            send_banner(fd, family, rt.service.spec.banner)
        ip = peer[0] if peer else ""
        key = rt.admission.source(ip)  # the one admission key of this connection
        if rt.service.proxy_protocol:
            # Only a trusted proxy may say who the client is; the client's own
            # limits are judged once the header has said it. (On a unix socket
            # the file's mode says who may connect: there is no address to trust.)
            trusted = peer is None or rt.service.proxy_from.matches(ip)
            why = "" if trusted else readers.PROXY_UNTRUSTED
        else:
            why = rt.admission.check(key, ip, now)
        if not why and rt.preamble is not None and not self.preambles.make_room(rt, key):
            why = "preamble_busy"  # one source may not fill the stage (slowloris)
        if not why and rt.refuses_at_max_child() and rt.at_max_child():
            why = INSTANCES  # xinetd's instances: refused at once, not left in the backlog
        if why:
            self._refuse(rt, fd, family, ip, why, now)
            return False
        if rt.preamble is not None:
            self.preambles.begin(lst, fd, family, peer, key, now)
        elif rt.service.tcp_wrappers is not None:  # hosts.allow/deny, maybe after a lookup
            return self.wrappers.judge(rt, fd, family, key, peer, now, None)
        elif rt.reply is not None:  # (``_serve``, inlined: this is the hot path)
            self._answer(rt, fd, family, peer, now)
        else:
            self._hand_off(rt, fd, family, key, wire_peer(peer), now, "")
        return True

    def _deliver(self, rt: ServiceRuntime, fd: int, family: int, key: Hashable, peer: Peer,
                 accepted: float, local: Peer) -> None:
        """Serve admitted connection ``fd`` after its preamble (taken on every path); a
        wrapped service's rules judge it first (``_route`` refused sure denials before
        anything was answered; one that needs the client's name waits for it here)."""
        if rt.service.tcp_wrappers is not None:
            self.wrappers.judge(rt, fd, family, key, peer, accepted, local)
        else:
            self._serve(rt, fd, family, key, peer, accepted, local)

    def _serve(self, rt: ServiceRuntime, fd: int, family: int, key: Hashable, peer: Peer,
               accepted: float, local: Peer, env: tuple[tuple[str, str], ...] = ()) -> None:
        """Serve admitted connection ``fd`` (taken on every path); ``env``: tcp_wrappers'
        setenv pairs for its program."""
        if rt.refuses_at_max_child() and rt.at_max_child():  # filled up while it waited
            self._refuse(rt, fd, family, peer[0] if peer else "", INSTANCES, accepted)
            return
        if rt.reply is not None:
            self._answer(rt, fd, family, peer, accepted)
        else:
            self._hand_off(rt, fd, family, key, wire_peer(peer), accepted, wire_peer(local),
                           env)

    def _refuse(self, rt: ServiceRuntime, fd: int, family: int, ip: str, why: str,
                now: float) -> None:
        """Refuse connection ``fd`` (taken) for ``why``: xinetd's banner_fail first, then
        the close, counted and logged."""
        if rt.service.spec.banner_fail:
            send_banner(fd, family, rt.service.spec.banner_fail)
        self.release_fd(fd, family)
        self.refusals.refused(rt, ip, why, now)

    def _hand_off(self, rt: ServiceRuntime, fd: int, family: int, key: Hashable, peer: str,
                  now: float, local: str, env: tuple[tuple[str, str], ...] = ()) -> None:
        """Give fd to the dispatcher and count the instance; closes ``fd`` on every path."""
        if rt.service.spec.banner_success:  # xinetd's: served, before its server runs
            send_banner(fd, family, rt.service.spec.banner_success)
        # Counted first: the dispatcher may report on it (program_started) at once.
        iid = self.ledger.open(rt, key, now)
        if stagetrace.enabled:
            stagetrace.stamp("accepted", iid, now, f"peer={peer.replace(' ', ':')}")
        rt.admission.started(key)  # before: hand_off may already report it lost
        handed = False
        try:
            handed = self.dispatcher.hand_off(rt, fd, family, peer, iid, local,
                                              env)  # takes fd
        finally:
            if not handed:
                rt.admission.ended(key)
                self.ledger.close(iid)
        if not handed:
            self.refusals.count(rt, NO_ROOM)
            return
        rt.stats.accepted += 1
        rt.stats.handoff.observe(self.clock() - now)  # ``now``: when it was accepted

    def _answer(self, rt: ServiceRuntime, fd: int, family: int, peer: Peer,
                now: float) -> None:
        """Send a one-shot built-in's reply from here and close ``fd`` (on every path).

        Admission has already passed. Never blocks: one non-blocking send of a
        few bytes into an empty send buffer; what does not fit (a client that
        is already gone) is dropped. The connection starts and ends in this
        call, so it counts as accepted and in the per-source counts for no time.
        (Why the root master may write this reply: docs/security.md.)
        """
        kind = socket.SOCK_SEQPACKET if rt.service.socket_type is SocketType.SEQPACKET else (
            socket.SOCK_STREAM)
        if rt.service.spec.banner_success:  # xinetd's: before the built-in's reply
            send_banner(fd, family, rt.service.spec.banner_success)
        sock = socket.socket(family, kind, 0, fileno=fd)
        sent = 0
        try:
            assert rt.reply is not None
            sent = sock.send(rt.reply(), socket.MSG_DONTWAIT)
        except OSError:
            pass  # reset, or no room: the reply is dropped, the connection closed
        finally:
            # ``family`` is known: sock.family would build an enum per connection.
            if family == socket.AF_UNIX:
                self.dispose(sock.detach())  # a client may have passed fds on it
            else:
                sock.close()
        stats = rt.stats
        stats.accepted += 1
        stats.builtin_bytes_out += sent
        if self.log_connections:
            log.info("conn_end", service=rt.name, pid=os.getpid(), peer=wire_peer(peer),
                     status="ok", duration=round(self.clock() - now, 6), bytes_in=0,
                     bytes_out=sent)

    # -- closing what is not handed off --------------------------------------------
    def release_fd(self, fd: int, family: int) -> None:
        """Close accepted connection ``fd`` here, never blocking.

        A unix connection's receive queue may hold descriptors its client
        passed (SCM_RIGHTS), which closing it would release in the master,
        where one with a linger time blocks: it goes to the closer instead
        (launch/closer.py). A TCP connection carries none.
        """
        if family == socket.AF_UNIX:
            self.dispose(fd)
        else:
            os.close(fd)

    def release(self, sock: socket.socket) -> None:
        """``release_fd`` for a socket object (detached: the fd is disposed of, once)."""
        if sock.fileno() >= 0:
            self.release_fd(sock.detach(), sock.family)

    # -- after the preamble ---------------------------------------------------------
    def _route(self, item: Pending, result: pre.Proceed, peer: Peer
               ) -> tuple[ServiceRuntime, Hashable] | None:
        """Where a connection whose preamble is done goes, and its admission key; None
        if refused (counted here). Decided before anything is answered or consumed."""
        rt = item.rt
        ip = peer[0] if peer else ""
        now = self.clock()
        if result.route is not None:  # tcpmux: the sub-service takes it, with its limits
            target = self.table.tcpmux_routes.get(result.route)
            if target is None:
                self.refusals.refused(rt, ip, readers.TCPMUX_UNKNOWN, now)
                return None
            rt.stats.accepted += 1
            rt = target
        while rt.retired and rt.successor is not None:  # a reload changed the service meanwhile
            rt = rt.successor
        # The key computed at accept still holds unless the header named another
        # client or another service groups sources differently.
        same = result.peer is None and rt.admission.groups_like(item.rt.admission)
        key = item.source if same else rt.admission.source(ip)
        why = rt.admission.check(key, ip, now)
        if not why and rt.service.tcp_wrappers is not None:  # on the client the header named
            why = self.wrappers.refusal_now(rt, peer, result.local, item.sock.fileno(),
                                            item.sock.family)
        if why:
            self.refusals.refused(rt, ip, why, now)
            return None
        if (rt.retired or not self.host.finishes_preambles()
                or not self.host.has_room(rt, now, draining=True)):
            self.refusals.count(rt, NO_ROOM)
            return None
        return rt, key

    # -- loans ----------------------------------------------------------------------
    def lend(self, lst: Listener) -> None:
        """Lend ``lst`` (a wait program gets it on fd 0; a datagram built-in answers on it).

        Each program start is admitted like a connection. For a datagram
        ``wait`` program that means the datagram that would start it: its
        source is peeked, and a refused one is dropped unanswered (as NetBSD's
        inetd does); later datagrams are read by the program itself and cannot
        be filtered here. A stream ``wait`` program accepts its own
        connections, so only the service-wide rate applies to it.
        """
        rt = lst.rt
        now = self.clock()
        if lst.lent or not self.host.has_room(rt, now):
            return
        key: Hashable = ""
        env: tuple[tuple[str, str], ...] = ()  # tcp_wrappers' setenv for the wait program
        if rt.service.internal is not None and self.dispatcher.lends_per_burst:
            # A datagram built-in served by a child per burst (classic): refused
            # datagrams are dropped here, so they cost no fork.
            if self._admit_datagram(lst, now, builtin=True) is None:
                return
        elif rt.service.internal is None:
            if rt.service.socket_type is SocketType.DGRAM:
                admitted = self._admit_datagram(lst, now)
                if admitted is None:
                    return
                key, env = admitted
            else:
                why = rt.admission.check_start(now)
                if why:
                    self.refusals.refused(rt, "", why, now)
                    return
        iid = self.ledger.open(rt, key, now, listener=lst)
        if not self.dispatcher.lend(rt, lst, iid, env):
            self.ledger.close(iid)
            return
        rt.admission.started(key)
        lst.lent = iid
        self.table.set_polled(lst, False)
        if rt.service.internal is None:
            rt.stats.accepted += 1  # a wait program started; a built-in's loan is not a connection

    def _admit_datagram(self, lst: Listener, now: float, builtin: bool = False
                        ) -> tuple[Hashable, tuple[tuple[str, str], ...]] | None:
        """The admission key of the first queued datagram's source, dropping refused ones,
        with the setenv pairs tcp_wrappers give its program.

        None when nothing admissible is queued (bounded: a flood of refused
        datagrams is judged 64 at a time, between other events). ``builtin``:
        judge by the access lists and the loop guard only (a built-in answers
        each datagram on its own; rates are for program starts).
        """
        rt = lst.rt
        for _ in range(DGRAM_JUDGE_BATCH):
            try:
                _, addr = lst.sock.recvfrom(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:  # an error queued on the socket (ICMP): now cleared
                continue
            ip = addr[0] if isinstance(addr, tuple) else ""
            key = rt.admission.source(ip)
            severity: Severity | None = None
            env: tuple[tuple[str, str], ...] = ()
            if builtin:
                guard = (internal.loop_guard(addr[1], self.table.internal_ports)
                         if isinstance(addr, tuple) else None)
                why = rt.admission.check_lists(ip) or guard or ""
            else:
                why = rt.admission.check(key, ip, now)
                if not why and rt.service.tcp_wrappers is not None:
                    judged = self.wrappers.judge_datagram(
                        rt, addr if isinstance(addr, tuple) else None, now)
                    if judged is None:  # its source's name is being looked up: soon again
                        rt.paused_until = max(rt.paused_until, now + DGRAM_NAME_RETRY)
                        self.refusals.wake_at(rt.paused_until)
                        return None
                    why, severity = judged.why, judged.actions.severity
                    env = judged.actions.env
            if not why:
                return key, env
            self._drop_datagram(lst.sock)
            if builtin:
                self.refusals.dgram_refused(rt, addr, why, now)
                continue
            self.refusals.refused(rt, ip, why, now, severity)
            if rt.admission.looping:
                return None
        return None

    def _drop_datagram(self, sock: socket.socket) -> None:
        """Read and discard the first queued datagram, unanswered, never blocking.

        A unix datagram may carry descriptors (SCM_RIGHTS): read without room
        for them, the kernel would release them here, in the root master, where
        one with a linger time blocks. They are received and go to the closer.
        """
        with contextlib.suppress(OSError):
            if sock.family != socket.AF_UNIX:
                sock.recv(1, socket.MSG_DONTWAIT)
                return
            _, anc, _, _ = sock.recvmsg(1, RIGHTS_SPACE,
                                        socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            for fd in passed_fds(anc):
                self.dispose(fd)


def wire_peer(peer: Peer) -> str:
    """The peer as the wire and the environment carry it: "HOST PORT" ("" for unix/none)."""
    return f"{peer[0]} {peer[1]}" if peer else ""
