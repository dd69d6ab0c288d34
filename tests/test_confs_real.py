"""Every real-world file in ../shared/confs/: the services it gives and the errors, stated per file.

Skipped, with the reason, when ../shared/confs is not beside the checkout.

Resolved against the fake world of config_fakes (BSD program paths do not
exist here, so every absolute path counts as executable); a second test runs
``check`` with the real system lookups and only demands actionable output.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from config_fakes import fake_lookups

from poolinetd.check import run_check
from poolinetd.config.resolve import load_file
from poolinetd.config.spec import Options


def confs_dir() -> Path:
    """The corpus directory; skips the test when it is not beside the checkout.

    The files are kept outside the repository (``../shared/confs``, with their
    origins in SOURCES.md), so a fresh clone skips these tests with the reason.
    Naming a directory in ``POOLINETD_SHARED_CONFS`` makes its absence a failure.
    """
    env = os.environ.get("POOLINETD_SHARED_CONFS")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "confs"
    if not path.is_dir():
        if env:
            pytest.fail(f"POOLINETD_SHARED_CONFS={env} is not a directory")
        pytest.skip(f"real inetd.conf corpus not found at {path} (it lives outside the "
                    "repository); set POOLINETD_SHARED_CONFS to run these tests")
    return path


SMALL_TCP = ["echo/tcp", "discard/tcp", "chargen/tcp", "daytime/tcp", "time/tcp"]
SMALL_UDP = ["echo/udp", "discard/udp", "chargen/udp", "daytime/udp", "time/udp"]

# file -> (service names in file order, errors as (line, message start))
EXPECTED: dict[str, tuple[list[str], list[tuple[int, str]]]] = {
    "4.4bsd-csrg-etc-inetd.conf": (
        ["ftp/tcp", "telnet/tcp", "shell/tcp", "login/tcp", "exec/tcp", "finger/tcp",
         "comsat/udp", "talk/udp", "ntalk/udp", "tcpmux/tcp", *SMALL_TCP, *SMALL_UDP,
         "klogin/tcp", "eklogin/tcp", "kshell/tcp"],
        [],  # line 18 is the tcpmux listener (RFC 1078), a built-in since issue 11
    ),
    "busybox-examples-inetd.conf": (
        ["echo/tcp", "echo/udp", "daytime/tcp", "daytime/udp", "time/tcp", "time/udp"], [],
    ),
    "debian12-inetutils-inetd-default.conf": ([], []),
    "debian12-openbsd-inetd-default.conf": ([], []),
    "dragonflybsd-etc-inetd.conf": ([], []),
    "freebsd-src-usr.sbin-inetd-inetd.conf": ([], []),
    "minix-etc-inetd.conf": ([], []),
    "netbsd-src-etc-inetd.conf-v1.36-2000.conf": ([], []),
    "openbsd-src-etc-inetd.conf": (
        ["comsat/udp", "comsat/udp6", "daytime/tcp", "daytime/tcp6"], [],
    ),
    "pfsense-etc-inetd.conf": (["tftp-proxy/udp"], []),
    "sls-1.02-linux-etc-inetd.conf": (
        ["telnet/tcp", "ntalk/udp", "ftp/tcp", "finger/tcp", "shell/tcp", "login/tcp", "tftp/udp",
         "echo/tcp", "echo/udp", "discard/tcp", "discard/udp", "daytime/tcp", "daytime/udp",
         "chargen/tcp", "chargen/udp"],
        [],
    ),
    "synopsys-buildroot-fs-overlay-etc-inetd.conf": (["ftp/tcp", "telnet/tcp"], []),
}  # fmt: skip


def test_every_file_has_an_expectation() -> None:
    present = {p.name for p in confs_dir().glob("*.conf")}
    assert present == set(EXPECTED), (
        "new or missing files in shared/confs: state their expectations"
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_file(name: str) -> None:
    path = confs_dir() / name
    loaded = load_file(str(path), Options(), fake_lookups(all_programs=True))
    names, expected_errors = EXPECTED[name]
    assert [s.name for s in loaded.services] == names
    got = [(d.lineno, d.message) for d in loaded.errors]
    assert len(got) == len(expected_errors), [str(d) for d in loaded.errors]
    for (line, message), (want_line, want) in zip(got, expected_errors, strict=True):
        assert line == want_line and message.startswith(want)
    assert all(d.source == str(path) for d in loaded.diagnostics)


def test_openbsd_addresses_and_details() -> None:
    loaded = load_file(str(confs_dir() / "openbsd-src-etc-inetd.conf"), Options(),
                       fake_lookups(all_programs=True))  # fmt: skip
    comsat4, comsat6, *_ = loaded.services
    assert [(e.address, e.port) for e in comsat4.key.endpoints] == [("127.0.0.1", 512)]
    assert [(e.address, e.port) for e in comsat6.key.endpoints] == [("::1", 512)]
    assert comsat4.wait and comsat4.argv == ("comsat",)


LINE = re.compile(r"^(?P<src>[^:]+):(?P<line>\d+): (field \d+ '.*': |'.*': )?(warning: )?.+$")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_check_with_real_lookups_gives_actionable_output(name: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    status = run_check(str(confs_dir() / name), False, out, err)
    lines = err.getvalue().splitlines()
    assert status in (0, 78)
    assert lines[-1].startswith(str(confs_dir() / name))  # the summary
    for line in lines[:-1]:
        assert LINE.match(line), line
        assert "(" in line  # every diagnostic carries a hint
    assert (status == 78) == any(" warning: " not in line for line in lines[:-1])
