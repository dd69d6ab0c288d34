"""Every log event the code can emit is documented in docs/events.md, with its keys and level.

The source is read with ``ast``: a call ``log.debug/info/warning/error(NAME, **keys)``
or ``log.event(LEVEL, NAME, **keys)`` on the name ``log`` anywhere under
poolinetd/ is an event. NAME must be a string literal (so it can be looked up
here and grepped for); docs/events.md must have a ``### `NAME``` heading whose
section names every keyword key in backquotes and, for the fixed-level calls,
the level in bold.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO

DOC = REPO / "docs" / "events.md"
LEVEL_CALLS = {"debug", "info", "warning", "error", "critical"}


@dataclass
class Event:
    levels: set[str] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)
    where: list[str] = field(default_factory=list)


def _events_in(path: Path, events: dict[str, Event], problems: list[str]) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "log"):
            continue
        kind = node.func.attr
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        if kind in LEVEL_CALLS:
            name_arg = node.args[0] if node.args else None
            level = kind
        elif kind in ("event", "event_pri"):  # event_pri: with its own syslog priority
            name_arg = node.args[1] if len(node.args) > 1 else None
            level = ""  # computed at run time (e.g. info for status 0, else warning)
        else:
            continue
        if not (isinstance(name_arg, ast.Constant) and isinstance(name_arg.value, str)):
            problems.append(f"{where}: the event name is not a string literal")
            continue
        event = events.setdefault(name_arg.value, Event())
        if level:
            event.levels.add(level)
        event.keys |= {kw.arg for kw in node.keywords if kw.arg is not None}
        event.where.append(where)


def source_events() -> tuple[dict[str, Event], list[str]]:
    events: dict[str, Event] = {}
    problems: list[str] = []
    for path in sorted((REPO / "poolinetd").rglob("*.py")):
        _events_in(path, events, problems)
    return events, problems


def doc_sections() -> dict[str, str]:
    """``### `name``` heading -> the text up to the next heading."""
    sections: dict[str, str] = {}
    current = None
    for line in DOC.read_text().splitlines():
        heading = re.fullmatch(r"### `([a-z0-9_]+)`\s*", line)
        if heading:
            current = heading.group(1)
            sections[current] = ""
        elif line.startswith("#"):
            current = None
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def test_the_source_scan_finds_the_known_events() -> None:
    """The scanner itself works: events of every call form are found, with their keys."""
    events, _ = source_events()
    assert {"listening", "reloaded", "program_exit", "conn_end", "config_diagnostic"} <= set(events)
    assert {"added", "changed", "removed", "unchanged"} <= events["reloaded"].keys
    assert "message" in events["config_diagnostic"].keys  # a log.event(...) call


def test_every_event_name_is_a_literal() -> None:
    _, problems = source_events()
    assert not problems, "\n".join(problems)


def test_every_event_is_documented_with_its_keys_and_level() -> None:
    events, _ = source_events()
    sections = doc_sections()
    missing = [f"{name} (logged at {', '.join(e.where)})" for name, e in sorted(events.items())
               if name not in sections]
    assert not missing, ("events not documented in docs/events.md (add a '### `name`' "
                         "section: level, keys, what the operator should do):\n"
                         + "\n".join(missing))
    gaps = []
    for name, event in sorted(events.items()):
        text = sections[name]
        gaps += [f"{name}: key `{key}` ({', '.join(event.where)})"
                 for key in sorted(event.keys) if f"`{key}`" not in text
                 and f"`{key}=" not in text]
        gaps += [f"{name}: level **{level}**" for level in sorted(event.levels)
                 if f"**{level}**" not in text]
    assert not gaps, "docs/events.md misses:\n" + "\n".join(gaps)


@pytest.mark.parametrize("name", sorted(doc_sections()))
def test_every_documented_event_states_its_level_and_keys(name: str) -> None:
    text = doc_sections()[name]
    assert re.search(r"\*\*(debug|info|warning|error)\*\*", text), f"{name}: no level"
    assert "Keys:" in text or "No keys." in text, f"{name}: no keys"
