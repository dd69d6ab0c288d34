"""Pool mode: pre-forked, privilege-dropped workers per service.

Owns the pool dispatcher (the master's side: ``dispatcher``; its records of
workers, ``handles``, and of instances, ``instances`` and ``orphans``),
per-service pool bookkeeping (``bookkeeping``: sizes, spares, backoff), the
worker process and its loop (``worker``), the master<->worker wire
(``wire``: SCM_RIGHTS over SOCK_SEQPACKET) and the worker's epoll registry
(``poller``).

May import: every layer up to engine (its ``dispatch`` and ``runtime``).
"""
