"""The master's side of a worker's own log lines (LOG messages on its upward pipe).

Pure but for the log. A worker holds no descriptor of the master's log
(docs/security.md): it sends each line up, and the master writes it as the worker's, after
checking it is an event a worker logs at all, with ``service`` (and ``pid``)
set by the master, its text made safe, and within the worker's budget
(``WorkerHandle.may_log``); what a flooding worker loses is counted and told
in ``worker_log_dropped``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from poolinetd.config.spec import StderrRoute
from poolinetd.observe import log
from poolinetd.pool import wire, worker
from poolinetd.pool.handles import WorkerHandle


def reemit(handle: WorkerHandle, msg: wire.Message, now: float) -> None:
    """Write one of the worker's own lines, as the worker: only events a worker logs,
    ``service`` (and, but for program_exit, ``pid``) set by the master, text made
    safe (``log.worker_text``), within its budget (``WorkerHandle.may_log``)."""
    if msg.text not in worker.LOGGED_EVENTS:
        handle.log_dropped += 1
        return
    if not handle.may_log(now):
        return
    said = dict(msg.fields)
    # ``pid`` is the worker's own, but program_exit's names its program (reaped by
    # that worker); the text form's bracketed pid always says who wrote it.
    pid = said.get("pid") if msg.text == "program_exit" else handle.pid
    fields: dict[str, object] = {"service": handle.rt.name, "pid": pid}
    fields.update((k, v) for k, v in said.items() if k not in fields)
    log.reemit(log.Level(msg.level), msg.text, handle.pid, fields)


def tell_drops(handle: WorkerHandle, now: float, final: bool = False) -> None:
    """worker_log_dropped, at most once per LOG_DROP_REPORT per worker (and when it is
    gone, for what was still untold)."""
    if final:
        handle.log_drop_told = float("-inf")
    dropped = handle.log_drops_due(now)
    if dropped:
        log.warning("worker_log_dropped", service=handle.rt.name, pid=handle.pid,
                    lines=dropped)


def hand_reopened_log(workers: Iterable[WorkerHandle]) -> None:
    """Hand the reopened log file (SIGUSR1) to the workers of stderr=log services: the only
    ones that hold it, for their programs' stderr; they cannot open it as their user."""
    fd = log.log_fd()
    if fd <= 2:
        return  # logging to stderr: nothing was reopened
    for handle in workers:
        if handle.open and handle.rt.service.stderr is StderrRoute.LOG:
            with contextlib.suppress(OSError):
                wire.send(handle.channel, wire.encode_logfd(), fd)
