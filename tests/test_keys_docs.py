"""docs/configuration.md keeps up with the parser: every key has a row in the key table,
every defaults key is listed under `defaults`, and each dialect's 0 is stated."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from poolinetd.config.inetdconf import DEFAULTS_KEYS, ENTRY_KEYS

DOC = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()


def _section(title: str) -> str:
    start = DOC.index(f"\n{title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end >= 0 else len(DOC)]


@pytest.mark.parametrize("key", ENTRY_KEYS)
def test_every_key_has_a_row_in_the_key_table(key: str) -> None:
    table = _section("## Key-values definitions")
    assert re.search(rf"^\|[^|\n]*`{key}=", table, re.MULTILINE), key


@pytest.mark.parametrize("key", DEFAULTS_KEYS)
def test_every_defaults_key_is_listed_under_defaults(key: str) -> None:
    assert f"`{key}`" in _section("### `defaults`"), key


def test_the_limits_section_states_each_notations_zero() -> None:
    limits = _section("## Limits")
    for notation in ("FreeBSD `nowait/A/B/C`", "`nowait.N`", "NetBSD `nowait:N`, `service_max=N`, "
                     "`ip_max=N`", "poolinetd `max_child=`"):
        assert notation in limits, notation
    assert "max_child_per_ip = max(1, capacity // 4)" in limits
    assert "max_child_per_ip=unlimited" in limits
