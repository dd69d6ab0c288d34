"""A fake OS seam and a rig that drives a real Engine turn by turn (for tests/test_engine.py).

``FakeSystem`` stands in for poolinetd.system.System: a settable clock, a
fork that starts nothing (it keeps a copy of the first fd the child would
keep: a worker's channel end, or a classic child's connection; and of the
second, a worker's upward pipe), a queue of exits for waitpid, a record of
kills, and a settable unread count.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from conftest import TEST_USER

from poolinetd import cli
from poolinetd.config import resolve
from poolinetd.config.spec import Service
from poolinetd.engine.ledger import Caps
from poolinetd.engine.loop import Engine, Listener
from poolinetd.engine.reloadplan import NewConfig
from poolinetd.pool import wire


class FakeSystem:
    def __init__(self) -> None:
        self.now = 1000.0
        self.next_pid = 50_000
        self.forked: list[tuple[int, int]] = []  # (pid, copy of the child's first kept fd)
        self.second_fd: dict[int, int] = {}  # pid -> copy of its second kept fd (pool: the pipe)
        self.alive: set[int] = set()
        self.exits: collections.deque[tuple[int, int]] = collections.deque()
        self.killed: list[tuple[int, int]] = []
        self.unread_bytes = 0
        self.identities: dict[int, tuple[int, int]] = {}  # pid -> (parent, start time)

    def clock(self) -> float:
        return self.now

    def fork(self, body: Callable[[], int], keep: Iterable[int]) -> int:
        pid = self.next_pid
        self.next_pid += 1
        kept = list(keep)
        self.forked.append((pid, os.dup(kept[0])))
        if len(kept) > 1:
            self.second_fd[pid] = os.dup(kept[1])
        self.alive.add(pid)
        return pid

    def exit(self, pid: int, code: int) -> None:
        """Make ``pid`` reapable with exit status ``code``."""
        self.exits.append((pid, code << 8))

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        for i, (dead, status) in enumerate(self.exits):
            if pid in (-1, dead):
                del self.exits[i]
                self.alive.discard(dead)
                return dead, status
        if not self.alive and not self.exits:
            raise ChildProcessError
        return 0, 0

    def kill(self, pid: int, sig: int) -> None:
        self.killed.append((pid, sig))

    def exists(self, pid: int) -> bool:
        return pid in self.alive

    def identity(self, pid: int) -> tuple[int, int] | None:
        return self.identities.get(pid)

    def unread(self, sock: socket.socket) -> int:
        return self.unread_bytes


@dataclass
class FakeWorker:
    """The test's side of a worker: its channel end (messages down) and the write end
    of its upward pipe (``send``).

    ``receive`` gives one connection at a time: a CONN that carries several
    is split into one message per connection (``ident`` = its conn_id).
    """

    pid: int
    channel: socket.socket
    upward: wire.UpWriter
    queued: list[tuple[wire.Message, int | None]] = field(default_factory=list)

    def receive(self, timeout: float = 5.0) -> tuple[wire.Message, int | None]:
        if not self.queued:
            self.channel.settimeout(timeout)
            data, fds = wire.recv(self.channel)
            self._split(wire.decode(data), fds)
        return self.queued.pop(0)

    def receive_nowait(self) -> tuple[wire.Message, int | None] | None:
        if not self.queued:
            self.channel.setblocking(False)
            got = wire.receive(self.channel)
            self.channel.setblocking(True)
            if got is None:
                return None
            self._split(*got)
        return self.queued.pop(0)

    def _split(self, msg: wire.Message, fds: list[int]) -> None:
        if msg.kind != wire.CONN:
            self.queued.append((msg, fds[0] if fds else None))
            return
        for info, fd in zip(msg.conns, fds, strict=True):
            self.queued.append((wire.Message(wire.CONN, info.conn_id, conns=(info,)), fd))

    def send(self, payload: bytes) -> None:
        self.upward.send(payload)

    def close(self) -> None:
        self.channel.close()
        self.upward.close()


def services_from(text: str) -> tuple[Service, ...]:
    return config_from(text).services


def config_from(text: str) -> NewConfig:
    """What cli's reload_config makes of ``text``: its services and its global caps."""
    loaded = resolve.load_text(text.format(user=TEST_USER), "<test>")
    assert not loaded.errors, [str(d) for d in loaded.errors]
    return NewConfig(loaded.services, (), Caps(loaded.max_connections, loaded.max_programs))


@dataclass
class Rig:
    engine: Engine
    system: FakeSystem
    conf: list[str]
    workers: list[FakeWorker] = field(default_factory=list)
    clients: list[socket.socket] = field(default_factory=list)

    def turn(self, times: int = 1) -> None:
        for _ in range(times):
            self.engine.run_once(max_wait=0.05)

    def boot_worker(self) -> FakeWorker:
        """Let the pool fork its next worker, and have that worker say READY."""
        taken = {w.pid for w in self.workers}
        for _ in range(3):
            fresh = [(pid, fd) for pid, fd in self.system.forked if pid not in taken]
            if fresh:
                break
            self.turn()
        assert fresh, "the pool started no worker"
        pid, fd = fresh[0]
        worker = FakeWorker(pid, socket.socket(fileno=fd),
                            wire.UpWriter(self.system.second_fd.pop(pid)))
        self.workers.append(worker)
        worker.send(wire.encode_ready(pid))
        self.turn(2)
        return worker

    def listener(self) -> Listener:
        for rt in self.engine.runtimes:
            if not rt.retired and rt.listeners:
                return rt.listeners[0]
        raise AssertionError("no listener")

    def connect(self) -> socket.socket:
        port = self.listener().bound.port
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.clients.append(sock)
        return sock

    def wait_backlog(self, lst: Listener, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` connections wait in ``lst``'s accept queue (TCP_INFO on a
        listener: tcpi_unacked is the queue's length)."""
        deadline = time.monotonic() + timeout
        while True:
            info = lst.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            if struct.unpack_from("I", info, 24)[0] >= count:
                return
            assert time.monotonic() < deadline, f"{count} connections never queued"
            time.sleep(0.01)

    def reload(self, text: str) -> None:
        self.conf[0] = text
        assert self.engine.reload()

    def signal_child(self) -> None:
        """What SIGCHLD makes the engine do."""
        self.engine.reaper.reap()
        self.turn()

    def close(self) -> None:
        self.engine.dispatcher.close()
        self.engine._close_all()
        for worker in self.workers:
            worker.close()
        for client in self.clients:
            client.close()
        taken = {w.pid for w in self.workers}
        for pid, fd in self.system.forked:
            if pid not in taken:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for fd in self.system.second_fd.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def make_rig(conf: str, dispatcher_cls: type, **engine_kw: object) -> Rig:
    system = FakeSystem()
    holder = [conf]

    def load() -> NewConfig:
        return config_from(holder[0])

    first = config_from(conf)
    opened = [(s, cli._open_sockets(s)) for s in first.services]
    engine_kw.setdefault("caps", first.caps)
    engine = Engine(opened, dispatcher_cls(system), system=system,  # type: ignore[arg-type]
                    load_config=load, open_sockets=cli._open_sockets, **engine_kw)  # type: ignore[arg-type]
    rig = Rig(engine, system, holder)
    rig.turn()
    return rig
