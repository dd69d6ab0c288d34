"""The shipped systemd units: `systemd-analyze verify` finds nothing to say about them, they say
what the deployment needs (Type=notify, validate-then-signal reload, sandbox that keeps the
privilege drop), and the .socket unit's sockets are adopted by conf/example.conf's services."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from poolinetd.config.resolve import load_file
from poolinetd.ops import activation
from poolinetd.ops.activation import PassedSocket, WantedSocket

CONF = REPO / "conf"
UNITS = ("poolinetd.service", "poolinetd.socket", "poolinetd-activated.service")
ANALYZE = shutil.which("systemd-analyze")
INSTALLED = "/usr/local/bin/poolinetd"


def unit_lines(name: str) -> list[str]:
    return [line.strip() for line in (CONF / name).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def values(name: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit_lines(name) if line.split("=", 1)[0] == key]


def verify(directory: Path, names: tuple[str, ...]) -> str:
    """`systemd-analyze verify` output for ``names`` in ``directory`` ('' = nothing to say).

    verify exits 0 even for unknown keys and bad values (it only warns), so the
    output is what counts. It refuses an ExecStart= binary that does not exist:
    the copies point at a real executable instead of /usr/local/bin/poolinetd.
    """
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, "verify", "--man=no", *(str(directory / n) for n in names)],
                            capture_output=True, text=True, timeout=120, cwd=directory)
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else
                                                      f"\n(exit {result.returncode})")


@pytest.fixture
def unit_copies(tmp_path: Path) -> Path:
    stub = tmp_path / "poolinetd"
    stub.write_text(f"#!/bin/sh\nexec {sys.executable} -m poolinetd \"$@\"\n")
    stub.chmod(0o755)
    for name in UNITS:
        text = (CONF / name).read_text()
        (tmp_path / name).write_text(text.replace(INSTALLED, str(stub)))
    return tmp_path


needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


@needs_analyze
def test_systemd_analyze_verify_is_silent_on_the_shipped_units(unit_copies: Path) -> None:
    assert verify(unit_copies, UNITS) == ""


@needs_analyze
def test_systemd_analyze_verify_would_catch_a_broken_unit(unit_copies: Path) -> None:
    broken = unit_copies / "poolinetd-activated.service"
    broken.write_text(broken.read_text().replace("Type=notify", "Type=notifyy\nBogusKey=1"))
    output = verify(unit_copies, ("poolinetd.socket", "poolinetd-activated.service"))
    assert "notifyy" in output
    assert "BogusKey" in output


def test_both_services_are_type_notify_heard_from_the_main_process_only() -> None:
    for name in ("poolinetd.service", "poolinetd-activated.service"):
        assert values(name, "Type") == ["notify"], name
        assert values(name, "NotifyAccess") == ["main"], name
        assert values(name, "ExecStart") == [f"{INSTALLED} -c /etc/inetd.conf"], name


def test_reload_validates_before_it_signals() -> None:
    for name in ("poolinetd.service", "poolinetd-activated.service"):
        # systemd runs ExecReload= lines in order and stops at the first that fails.
        assert values(name, "ExecReload") == [f"{INSTALLED} check -c /etc/inetd.conf",
                                              "/bin/kill -HUP $MAINPID"], name


def test_the_sandbox_keeps_what_dropping_privileges_needs() -> None:
    name = "poolinetd-activated.service"
    caps = set(values(name, "CapabilityBoundingSet")[0].split())
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_NET_BIND_SERVICE"} <= caps
    assert "CAP_SYS_ADMIN" not in caps
    families = set(values(name, "RestrictAddressFamilies")[0].split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families
    assert values(name, "ProtectSystem") == ["strict"]
    assert values(name, "ReadWritePaths") == ["/run"]  # the control socket lives there
    assert values(name, "NoNewPrivileges") == ["yes"]


def test_the_socket_unit_activates_the_activated_service() -> None:
    assert values("poolinetd.socket", "Service") == ["poolinetd-activated.service"]
    assert values("poolinetd.socket", "Accept") == ["no"]
    assert values("poolinetd-activated.service", "Requires") == ["poolinetd.socket"]
    assert "poolinetd.service" in values("poolinetd-activated.service", "Conflicts")


def passed_from_listen_lines() -> list[PassedSocket]:
    """What systemd would pass for the .socket unit's Listen lines (fds 3..)."""
    v6only = values("poolinetd.socket", "BindIPv6Only") == ["ipv6-only"]
    result = []
    lines = [(k, v) for line in unit_lines("poolinetd.socket")
             for k, _, v in [line.partition("=")] if k in ("ListenStream", "ListenDatagram")]
    for i, (key, value) in enumerate(lines):
        kind = socket.SOCK_STREAM if key == "ListenStream" else socket.SOCK_DGRAM
        host, _, port = value.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        result.append(PassedSocket(fd=3 + i, name="poolinetd", family=family, socket_type=kind,
                                   listening=kind == socket.SOCK_STREAM, address=host,
                                   port=int(port), v6only=v6only or family == socket.AF_INET))
    return result


def test_every_socket_of_the_socket_unit_is_adopted_by_example_conf() -> None:
    loaded = load_file(str(CONF / "example.conf"))
    assert loaded.services
    wanted = [WantedSocket(key=(svc.name, ep), family=ep.family,
                           socket_type=activation.SOCKET_TYPES[svc.key.socket_type.value],
                           address=ep.address, port=ep.port, v6only=ep.v6only)
              for svc in loaded.services for ep in svc.key.endpoints]
    passed = passed_from_listen_lines()
    assignment, unmatched = activation.match(passed, wanted)
    assert unmatched == []
    # And every service of the example gets its sockets from systemd (none binds its own).
    assert len(assignment) == len(wanted) == len(passed)
