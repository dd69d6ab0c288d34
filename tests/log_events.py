"""A fixture that records every event poolinetd logs in this process: (level, name, fields).

Import it into a test module (``from log_events import events``) to use it
there; the poolinetd logger gets its own handler and level back afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from poolinetd.observe import log

Event = tuple[int, str, dict[str, object]]


@pytest.fixture
def events() -> Iterator[list[Event]]:
    got: list[Event] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append((record.levelno, str(record.msg), dict(getattr(record, "fields", {}))))

    handler = Keep()
    level = log.LOGGER.level
    log.LOGGER.addHandler(handler)
    log.LOGGER.setLevel(logging.DEBUG)
    yield got
    log.LOGGER.removeHandler(handler)
    log.LOGGER.setLevel(level)


def named(events: list[Event], name: str) -> list[dict[str, object]]:
    """The fields of every ``name`` event, in order."""
    return [fields for _level, got, fields in events if got == name]
