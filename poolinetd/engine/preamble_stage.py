"""The preamble stage: connections whose first bytes say more (PROXY header, tcpmux name).

Touches the OS: non-blocking peeks and reads on accepted connections, and
the engine's selector. Only services that read a preamble use it; for the
others it costs nothing.

Each connection gets a reader (``admission.readers``) that is fed what has
arrived so far, peeked, never consumed beyond what it says is preamble; it
answers NeedMore, Refuse or Proceed (``net.preamble``). On Proceed the
accept stage decides where the connection goes (``route``: the real
client's admission, the tcpmux sub-service) *before* anything is consumed or
answered, so a client that will be refused is never told "+Go"; then
exactly the rest of the preamble is read and the connection is delivered.

fd ownership: a connection in the stage is owned here (``Pending.sock``)
until it is refused or timed out (released here: ``release``) or delivered
(detached and given to ``deliver``, which takes it on every path). Descriptors
a unix client attached to its preamble bytes are received when those bytes are
read and go to the closer at once (``take``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import selectors
import socket
from collections.abc import Callable, Hashable

from poolinetd.admission import readers
from poolinetd.engine.refusals import Refusals
from poolinetd.engine.runtime import Listener, Pending, ServiceRuntime
from poolinetd.engine.services import ServiceTable
from poolinetd.launch.closer import RIGHTS_SPACE, passed_fds
from poolinetd.net import preamble as pre

Peer = tuple[str, int] | None
# route(item, result, peer) -> (service, admission key) to deliver to, or None:
# refused (route counted it).
Route = Callable[[Pending, pre.Proceed, Peer], tuple[ServiceRuntime, Hashable] | None]
# deliver(rt, fd, family, key, peer, accepted_at, local): takes fd on every path.
Deliver = Callable[[ServiceRuntime, int, int, Hashable, Peer, float, Peer], None]
# Room for every descriptor one unix message can carry (SCM_MAX_FD): none is left for
# the kernel to release in the master (see ``PreambleStage.take``).


class PreambleStage:
    """The connections reading their preamble, by fd and by deadline."""

    def __init__(self, sel: selectors.BaseSelector, table: ServiceTable, refusals: Refusals,
                 clock: Callable[[], float], route: Route, deliver: Deliver,
                 release: Callable[[socket.socket], None],
                 dispose: Callable[[int], None]) -> None:
        """``release(sock)`` closes a connection the stage is done with, ``dispose(fd)``
        any descriptor (both never blocking: a unix one goes to the closer,
        launch/closer.py)."""
        self.sel = sel
        self.release = release
        self.dispose = dispose
        self.table = table
        self.refusals = refusals
        self.clock = clock
        self.route = route
        self.deliver = deliver
        self.pending: dict[int, Pending] = {}  # by fd
        self.order: collections.deque[Pending] = collections.deque()  # by deadline
        # Each service's and source's connections in the stage, oldest first (by fd):
        # an eviction finds its victim at once. (``order`` keeps every connection until
        # its deadline, gone or not: scanning it cost each eviction more than the last.)
        self.by_source: dict[tuple[ServiceRuntime, Hashable], dict[int, Pending]] = {}

    def __len__(self) -> int:
        return len(self.pending)

    def make_room(self, rt: ServiceRuntime, source: Hashable) -> bool:
        """Whether ``source`` may start one more preamble on ``rt`` now (slowloris guard).

        One source holds at most MAX_PENDING_PER_SOURCE places. When ``rt``'s
        stage is full, a newcomer takes the place of the oldest connection of
        the source holding the most, unless that is its own source: a few
        sources (four at a quarter each) can then never fill the stage for
        everyone else (issue 21).
        """
        held = rt.pending_by.get(source, 0)
        if held >= pre.MAX_PENDING_PER_SOURCE:
            return False
        if rt.pending < pre.MAX_PENDING:
            return True
        heaviest = max(rt.pending_by, key=rt.pending_by.__getitem__)
        if rt.pending_by[heaviest] <= held:
            return False
        self._evict_oldest(rt, heaviest)
        return True

    def _evict_oldest(self, rt: ServiceRuntime, source: Hashable) -> None:
        items = self.by_source.get((rt, source))
        if items:
            self.drop(next(iter(items.values())), "preamble_evicted")

    def begin(self, lst: Listener, fd: int, family: int, peer: Peer, source: Hashable,
              now: float) -> None:
        """Take accepted connection ``fd`` (owned here from now on) into the stage."""
        rt = lst.rt
        assert rt.preamble is not None
        sock = socket.socket(family, lst.sock.type, 0, fileno=fd)
        item = Pending(sock, rt, peer, source, rt.preamble(), now + pre.DEADLINE)
        rt.pending_by[source] = rt.pending_by.get(source, 0) + 1
        self.pending[fd] = item
        self.order.append(item)
        self.by_source.setdefault((rt, source), {})[fd] = item
        rt.pending += 1
        self.on_readable(item)  # the header is usually there already
        if fd in self.pending:
            self.sel.register(sock, selectors.EVENT_READ, lambda _mask: self.on_readable(item))

    def on_readable(self, item: Pending) -> None:
        """Peek at what arrived and let the reader decide; never blocks, never over-reads.

        Bytes the reader said were all preamble (NeedMore) are taken off the
        socket for real, so a level-triggered selector does not wake the loop
        again for bytes it has already seen.
        """
        room = item.reader.limit - len(item.got)
        try:
            data = item.sock.recv(room, socket.MSG_PEEK | socket.MSG_DONTWAIT) if room else b""
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(item, "preamble_reset")
            return
        result = item.reader.feed(item.got + data, eof=not data)
        if isinstance(result, pre.NeedMore):
            self._need_more(item, data)
        elif isinstance(result, pre.Refuse):
            self._refuse(item, result, len(data))
        else:
            self._proceed(item, result)

    def _need_more(self, item: Pending, data: bytes) -> None:
        if not data:  # EOF (or the limit) before a verdict
            self.drop(item, "preamble_incomplete")
            return
        try:
            item.got += self.take(item.sock, len(data))
        except OSError:
            self.drop(item, "preamble_reset")

    def _refuse(self, item: Pending, result: pre.Refuse, peeked: int) -> None:
        if result.reply:
            with contextlib.suppress(OSError):
                # Read what was peeked first: closing with unread bytes would send a
                # reset, which can destroy the reply before the client reads it.
                self.take(item.sock, peeked)
                item.sock.send(result.reply, socket.MSG_DONTWAIT)  # best-effort
        if result.reason in readers.ANSWERED:  # e.g. tcpmux HELP: served, not refused
            self.forget(item)
            self.release(item.sock)
            return
        self.drop(item, result.reason)

    def _proceed(self, item: Pending, result: pre.Proceed) -> None:
        peer = result.peer or item.peer
        self.forget(item)
        target = self.route(item, result, peer)  # decided before "+Go" or any consumption
        if target is None:
            self.release(item.sock)
            return
        rt, key = target
        # Consume exactly the rest of the preamble: it was peeked, so recv returns all of it.
        need = max(0, result.consumed - len(item.got))
        try:
            got = self.take(item.sock, need) if need else b""
            if len(got) == need and result.reply:
                item.sock.send(result.reply, socket.MSG_DONTWAIT)
        except OSError:
            self.release(item.sock)
            self.refusals.count(rt, "preamble_reset")
            return
        if len(got) != need:
            self.release(item.sock)
            self.refusals.count(rt, "preamble_incomplete")
            return
        fd = item.sock.detach()
        self.deliver(rt, fd, item.sock.family, key, peer, item.deadline - pre.DEADLINE,
                     result.local)

    def take(self, sock: socket.socket, size: int) -> bytes:
        """Read (consume) up to ``size`` bytes of preamble off ``sock``, never blocking.

        On a unix connection the bytes may carry descriptors (SCM_RIGHTS). Reading
        them without room would make the kernel release those descriptors here, in
        the root master, and one with a linger time blocks that release (a TCP
        socket with SO_LINGER and unsent data): so they are received, handed to the
        closer, and OSError is raised (a client that sends descriptors with its
        preamble is refused).
        """
        if sock.family != socket.AF_UNIX:
            return sock.recv(size, socket.MSG_DONTWAIT)
        data, anc, flags, _ = sock.recvmsg(size, RIGHTS_SPACE,
                                           socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        passed = passed_fds(anc)
        for fd in passed:
            self.dispose(fd)
        if passed or flags & socket.MSG_CTRUNC:
            raise OSError(errno.EBADMSG, "descriptors passed with the preamble")
        return data

    def forget(self, item: Pending) -> None:
        """Take ``item`` out of the stage (its socket stays open: the caller's now)."""
        fd = item.sock.fileno()
        if self.pending.pop(fd, None) is None:
            return
        rt = item.rt
        mine = self.by_source.get((rt, item.source))
        if mine is not None:
            mine.pop(fd, None)
            if not mine:
                del self.by_source[(rt, item.source)]
        rt.pending -= 1
        left = rt.pending_by.get(item.source, 0) - 1
        if left > 0:
            rt.pending_by[item.source] = left
        else:
            rt.pending_by.pop(item.source, None)
        self.table.dirty.add(rt.successor or rt)
        with contextlib.suppress(KeyError, ValueError):  # not registered if decided at once
            self.sel.unregister(item.sock)

    def drop(self, item: Pending, why: str) -> None:
        """Refuse ``item`` for ``why``: closed, counted and logged."""
        self.forget(item)
        item.got = b""  # it waits in ``order`` until its deadline: keep it small
        self.release(item.sock)
        self.refusals.refused(item.rt, item.peer[0] if item.peer else "", why, self.clock())

    def next_deadline(self) -> float | None:
        return self.order[0].deadline if self.order else None

    def expire(self, now: float) -> None:
        """Refuse what has not finished its preamble by its deadline."""
        while self.order and self.order[0].deadline <= now:
            item = self.order.popleft()
            if self.pending.get(item.sock.fileno()) is item:
                self.drop(item, "preamble_timeout")

    def close_all(self) -> None:
        """Close every connection still in the stage (a stop), unanswered and uncounted."""
        for item in list(self.pending.values()):
            self.forget(item)
            self.release(item.sock)
        self.order.clear()
