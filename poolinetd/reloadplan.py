"""What a reload changes: the diff of running services against a new config, by identity.

Pure. A service's identity is its ServiceKey (socket type and endpoints):
same key and equal Service = unchanged (listener and workers untouched);
same key, different Service = changed (keeps its listener, new workers);
key only in the new config = added; key only in the running one = removed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from poolinetd.spec import Service, ServiceKey

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ReloadPlan(Generic[T]):
    """``T`` is whatever the caller keeps per running service (its runtime record)."""

    added: tuple[Service, ...]
    removed: tuple[T, ...]
    changed: tuple[tuple[T, Service], ...]
    unchanged: int


def plan(running: Mapping[ServiceKey, tuple[T, Service]], wanted: Sequence[Service]
         ) -> ReloadPlan[T]:
    """Diff ``running`` (key -> (record, service)) against the ``wanted`` services."""
    by_key = {s.key: s for s in wanted}
    added = tuple(s for k, s in by_key.items() if k not in running)
    removed = tuple(rec for k, (rec, _) in running.items() if k not in by_key)
    changed = tuple((running[k][0], s) for k, s in by_key.items()
                    if k in running and running[k][1] != s)
    unchanged = len(by_key) - len(added) - len(changed)
    return ReloadPlan(added, removed, changed, unchanged)
