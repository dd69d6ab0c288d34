"""The shipped sample files stay valid."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_example_conf_checks_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "poolinetd", "check", "-c",
                             str(REPO / "conf" / "example.conf")], capture_output=True, text=True,
                            timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "OK: 7 service(s), 0 error(s), 0 warning(s)" in result.stderr + result.stdout


def test_systemd_unit_runs_the_check_before_starting() -> None:
    unit = (REPO / "conf" / "poolinetd.service").read_text()
    assert "ExecStartPre=/usr/local/bin/poolinetd check -c /etc/inetd.conf" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
