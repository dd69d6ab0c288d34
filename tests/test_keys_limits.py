"""Limits: what each notation's 0 means, ``unlimited``, limits in ``defaults``, the safe
per-source default, and the global caps (issue 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
from config_fakes import fake_lookups
from config_helpers import NO_OPTIONS, errors, load, only

from poolinetd.config.inetdconf import format_spec, parse
from poolinetd.config.resolve import load_file
from poolinetd.config.spec import (
    DEFAULT_POOL_MAX,
    DEFAULT_WORKER_CONNECTIONS_INTERNAL,
    DEFAULT_WORKER_CONNECTIONS_PROGRAM,
    Limits,
    Options,
)

SAFE_BUILTIN = DEFAULT_POOL_MAX * DEFAULT_WORKER_CONNECTIONS_INTERNAL // 4  # 1024
SAFE_PROGRAM = DEFAULT_POOL_MAX * DEFAULT_WORKER_CONNECTIONS_PROGRAM // 4  # 256


# -- each notation's 0 -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wait", "expected"),
    [
        # FreeBSD: /0 is "no limit" in every position.
        ("nowait/0/0/0", (None, None, None, None)),
        ("nowait/10/0/3", (10, None, 3, None)),
        # GNU/BusyBox .0: no per-service limit; NetBSD :0: nothing is started.
        ("nowait.0", (None, None, SAFE_BUILTIN, None)),
        ("nowait:0", (None, None, SAFE_BUILTIN, 0)),
        ("nowait.40", (None, None, SAFE_BUILTIN, 40)),
    ],
)
def test_positional_zero_keeps_its_dialects_meaning(
    wait: str, expected: tuple[int | None, ...]
) -> None:
    lim = only(f"echo stream tcp {wait} root internal").limits
    assert (lim.max_child, lim.max_cpm_per_ip, lim.max_child_per_ip,
            lim.max_spawn_per_min) == expected  # fmt: skip


def test_netbsd_keys_zero_means_nothing_allowed() -> None:
    lim = only("echo on protocol=tcp, user=root, service_max=0, ip_max=0;").limits
    assert (lim.max_spawn_per_min, lim.max_cpm_per_ip) == (0, 0)


@pytest.mark.parametrize("key", ["max_cpm_per_ip", "max_child_per_ip", "max_spawn_per_min"])
def test_poolinetd_keys_zero_means_nothing_allowed(key: str) -> None:
    assert getattr(only(f"echo on protocol=tcp, user=root, {key}=0;").limits, key) == 0


def test_max_child_zero_means_no_limit_in_both_notations() -> None:
    assert only("echo on protocol=tcp, user=root, max_child=0;").limits.max_child is None
    assert only("echo stream tcp nowait/0 root internal").limits.max_child is None


@pytest.mark.parametrize("key", ["max_child", "max_cpm_per_ip", "max_child_per_ip",
                                 "max_spawn_per_min", "ip_max", "service_max"])
def test_unlimited_lifts_every_limit(key: str) -> None:
    svc = only(f"echo on protocol=tcp, user=root, {key}=unlimited;")
    canonical = {"ip_max": "max_cpm_per_ip", "service_max": "max_spawn_per_min"}.get(key, key)
    assert getattr(svc.limits, canonical) is None
    assert canonical in svc.limits.unlimited


def test_a_bad_limit_value_names_the_field_and_both_meanings() -> None:
    assert errors("echo on protocol=tcp, user=root, max_child_per_ip=-1;") == [
        "/etc/t.conf:1: field 5 'max_child_per_ip=-1': max_child_per_ip must be an integer "
        "from 0 to 2147483647 or unlimited, not '-1' (0 means nothing allowed; write "
        "max_child_per_ip=unlimited for no limit)"
    ]
    assert "0 means no limit" in errors("echo on protocol=tcp, user=root, max_child=x;")[0]


def test_the_formatter_keeps_each_meaning() -> None:
    for line in ("echo stream tcp nowait/0/5 root internal",
                 "echo stream tcp nowait:0 root internal",
                 "echo stream tcp nowait.0 root internal",
                 "echo on protocol=tcp, user=root, max_cpm_per_ip=0, max_child_per_ip=unlimited;"):
        (spec,) = parse(line + "\n", "t.conf").specs
        assert parse(format_spec(spec) + "\n", "t.conf").specs == (spec,), format_spec(spec)
    (spec,) = parse("echo on protocol=tcp, user=root, max_cpm_per_ip=0;\n", "t.conf").specs
    assert "max_cpm_per_ip=0" in format_spec(spec)  # never the FreeBSD /0 (= no limit)


# -- the safe default ------------------------------------------------------------------------


def test_safe_default_is_a_quarter_of_the_services_capacity() -> None:
    assert only("echo stream tcp nowait root internal").limits.max_child_per_ip == SAFE_BUILTIN
    prog = only("finger stream tcp nowait nobody /usr/sbin/in.fingerd in.fingerd")
    assert prog.limits.max_child_per_ip == SAFE_PROGRAM
    sized = only("echo on protocol=tcp, user=root, pool_max=2, worker_connections=10;")
    assert sized.limits.max_child_per_ip == 5
    assert only("echo stream tcp nowait/40 root internal").limits.max_child_per_ip == 10
    assert only("echo stream tcp nowait/3 root internal").limits.max_child_per_ip == 1
    tiny = only("echo on protocol=tcp, user=root, pool_max=1, worker_connections=1;")
    assert tiny.limits.max_child_per_ip == 1  # never 0: that would refuse everyone


def test_safe_default_follows_command_line_pool_sizes() -> None:
    svc = only("echo stream tcp nowait root internal", Options(pool_max=4))
    assert svc.limits.max_child_per_ip == 4 * DEFAULT_WORKER_CONNECTIONS_INTERNAL // 4


def test_a_written_limit_or_unlimited_replaces_the_safe_default() -> None:
    assert only("echo stream tcp nowait/0/0/7 root internal").limits.max_child_per_ip == 7
    assert only("echo stream tcp nowait/0/0/0 root internal").limits.max_child_per_ip is None
    svc = only("echo on protocol=tcp, user=root, max_child_per_ip=unlimited;")
    assert svc.limits.max_child_per_ip is None
    svc = only("defaults on max_child_per_ip=unlimited;\necho stream tcp nowait root internal")
    assert svc.limits.max_child_per_ip is None
    svc = only("defaults on max_child_per_ip=9;\necho stream tcp nowait root internal")
    assert svc.limits.max_child_per_ip == 9


@pytest.mark.parametrize(
    "line",
    [
        "echo dgram udp wait root internal",  # no connections to hold
        "7010 stream tcp wait nobody /bin/cat cat",  # one program serves everyone
        "/run/echo stream unix nowait root internal",  # unix peers all look alike
    ],
)
def test_no_safe_default_where_a_source_holds_nothing(line: str) -> None:
    assert only(line).limits.max_child_per_ip is None


# -- limits in defaults ----------------------------------------------------------------------


def test_defaults_limits_apply_limit_by_limit() -> None:
    loaded = load("defaults on max_cpm_per_ip=60, max_spawn_per_min=unlimited, max_child=50;\n"
                  "echo stream tcp nowait/10 root internal\n"
                  "discard on protocol=tcp, user=root, ip_max=0;\n")  # fmt: skip
    assert loaded.errors == ()
    echo, discard = (s.limits for s in loaded.services)
    assert (echo.max_child, echo.max_cpm_per_ip, echo.max_child_per_ip) == (10, 60, 2)
    assert echo.max_spawn_per_min is None and "max_spawn_per_min" in echo.unlimited
    assert (discard.max_child, discard.max_cpm_per_ip, discard.max_child_per_ip) == (50, 0, 12)


def test_command_line_limits_come_after_defaults() -> None:
    cli = Options(limits=Limits(max_cpm_per_ip=5, max_child_per_ip=2))
    svc = only("defaults on max_cpm_per_ip=60;\necho stream tcp nowait root internal", cli)
    assert (svc.limits.max_cpm_per_ip, svc.limits.max_child_per_ip) == (60, 2)


def test_defaults_set_a_limit_twice_is_an_error() -> None:
    (err,) = errors("defaults on max_cpm_per_ip=1;\ndefaults on max_cpm_per_ip=unlimited;\n")
    assert "field 3 'max_cpm_per_ip=unlimited': defaults set max_cpm_per_ip twice" in err


def test_per_source_defaults_skip_unix_services_and_the_entrys_own_warn() -> None:
    svc = only("defaults on max_cpm_per_ip=5;\n/run/echo stream unix nowait root internal")
    assert svc.limits.max_cpm_per_ip is None
    loaded = load("/run/echo stream unix nowait/0/5 root internal")
    assert loaded.errors == () and loaded.services[0].limits.max_cpm_per_ip == 5
    (warn,) = loaded.warnings
    assert "counts all clients as one source" in warn.message and warn.field == 4


def test_included_defaults_fill_limits_the_main_file_left_unset(tmp_path: Path) -> None:
    (tmp_path / "inetd.d").mkdir()
    (tmp_path / "inetd.d" / "a.conf").write_text(
        "defaults on max_cpm_per_ip=1, max_child_per_ip=unlimited;\n")
    main = tmp_path / "inetd.conf"
    main.write_text('defaults on max_cpm_per_ip=30;\n.include "inetd.d/*.conf"\n'
                    "echo stream tcp nowait root internal\n")  # fmt: skip
    loaded = load_file(str(main), NO_OPTIONS, fake_lookups())
    assert loaded.errors == ()
    lim = loaded.services[0].limits
    assert (lim.max_cpm_per_ip, lim.max_child_per_ip) == (30, None)


# -- global caps -----------------------------------------------------------------------------


def test_global_caps_from_defaults_and_the_command_line() -> None:
    text = ("defaults on max_connections=1000, max_programs=50;\n"
            "echo stream tcp nowait root internal")
    loaded = load(text)
    assert (loaded.max_connections, loaded.max_programs) == (1000, 50)
    loaded = load(text, Options(max_connections=10))
    assert (loaded.max_connections, loaded.max_programs) == (10, 50)  # the command line wins
    loaded = load(text, Options(max_programs=0))  # 0 from the command line lifts the file's
    assert (loaded.max_connections, loaded.max_programs) == (1000, None)
    loaded = load("echo stream tcp nowait root internal")
    assert (loaded.max_connections, loaded.max_programs) == (None, None)
    loaded = load("defaults on max_connections=unlimited;\n")
    assert loaded.errors == () and loaded.max_connections is None


def test_global_caps_are_not_service_keys() -> None:
    (err,) = errors("echo on protocol=tcp, user=root, max_programs=5;")
    assert err == ("/etc/t.conf:1: field 5 'max_programs=5': max_programs is a global cap, not a "
                   "per-service key (set it in defaults (defaults on max_programs=N;) or with "
                   "--max-programs)")


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5"])
def test_a_global_cap_is_at_least_one(value: str) -> None:
    (err,) = errors(f"defaults on max_connections={value};")
    assert "max_connections must be an integer >= 1 or unlimited" in err
