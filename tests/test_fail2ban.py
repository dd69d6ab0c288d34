"""conf/fail2ban: the real fail2ban-regex on logs a real poolinetd wrote, as its text log and
as syslog lines a real rsyslogd wrote (RSYSLOG_TraditionalFileFormat); the jail parses.

The filter must match refusals (with the client's address) and nothing about served
clients. Needs the Debian packages fail2ban and rsyslog (.ci/install-distro-programs);
neither daemon is started: fail2ban-regex and fail2ban-client -d read files only, and
rsyslogd runs in the foreground on a private socket and config, as this test's child.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TEST_USER, tcp_exchange, wait_until

U = TEST_USER
REPO = Path(__file__).resolve().parents[1]
F2B = REPO / "conf" / "fail2ban"
REFUSAL = re.compile(r"warning conn_refused service=\S+ peer=(\S+) reason=(\w+)")

pytestmark = pytest.mark.skipif(
    shutil.which("fail2ban-regex") is None or not Path("/etc/fail2ban").is_dir(),
    reason="needs fail2ban (.ci/install-distro-programs)")


@pytest.fixture
def f2b_conf(tmp_path: Path) -> Path:
    """/etc/fail2ban with our filter and jail installed, in a private copy."""
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    shutil.copy(F2B / "filter.d" / "poolinetd.conf", conf / "filter.d" / "poolinetd.conf")
    shutil.copy(F2B / "jail.d" / "poolinetd.conf", conf / "jail.d" / "poolinetd.conf")
    return conf


def _regex(conf: Path, logfile: Path, out: str) -> list[str]:
    """fail2ban-regex's ``-o out`` lines for ``logfile`` with the poolinetd filter."""
    done = subprocess.run(["fail2ban-regex", "-c", str(conf), "-o", out, str(logfile),
                           "poolinetd"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line.strip()]


def _has_ipv6() -> bool:
    """Whether ::1 is there (the kernel lists it in if_inet6 once lo has it)."""
    try:
        return any(line.startswith("0" * 31 + "1 ")
                   for line in Path("/proc/net/if_inet6").read_text().splitlines())
    except OSError:
        return False


def _generate(server_ports: list[int], v6_port: int | None) -> None:
    """Served clients, then refusals of three kinds (one line each: refusals are logged
    once per 10 s per source and reason)."""
    echo, daytime_only, limited, program = server_ports
    assert tcp_exchange(echo, b"served") == b"served"
    tcp_exchange(program)
    assert tcp_exchange(limited) != b""  # the first is served ...
    assert tcp_exchange(limited) == b""  # ... the second is over max_cpm_per_ip
    assert tcp_exchange(daytime_only) == b""  # only_from
    if v6_port is not None:
        assert tcp_exchange(v6_port, host="::1") == b""  # no_access


def _conf(v6: bool) -> str:
    return (f"127.0.0.1:0 stream tcp nowait {U} internal echo\n"
            f"127.0.0.1:0 on protocol=tcp, user={U}, args=daytime, only_from=192.0.2.0/24;\n"
            f"127.0.0.1:0 on protocol=tcp, user={U}, args=time, max_cpm_per_ip=1;\n"
            f"127.0.0.1:0 stream tcp nowait {U} /bin/echo hello served\n"
            + (f"[::1]:0 on protocol=tcp6, user={U}, args=chargen, no_access=::1;\n" if v6
               else ""))


def _expected(text: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in REFUSAL.finditer(text)]


def test_filter_on_the_text_log(serve, f2b_conf: Path, tmp_path: Path) -> None:
    v6 = _has_ipv6()
    server = serve(_conf(v6), "--log-connections")
    _generate([server.port(i) for i in range(4)], server.port(4) if v6 else None)
    want = [("127.0.0.1", "max_cpm_per_ip"), ("127.0.0.1", "only_from")]
    if v6:
        want.append(("::1", "no_access"))
    wait_until(lambda: len(_expected(server.log())) == len(want), 20, "the refusals logged")
    server.stop()
    logfile = tmp_path / "poolinetd.log"
    logfile.write_text(server.log())
    assert sorted(_expected(logfile.read_text())) == sorted(want)
    served = [line for line in logfile.read_text().splitlines()
              if " conn_end " in line or " program_exit " in line]
    assert served, "served clients are logged too (--log-connections)"
    matched = _regex(f2b_conf, logfile, "msg")
    assert sorted(_expected("\n".join(matched))) == sorted(want), matched
    assert not any(" conn_end " in m or " program_exit " in m for m in matched)
    assert sorted(_regex(f2b_conf, logfile, "ip")) == sorted(ip for ip, _ in want)


@pytest.fixture
def rsyslogd(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A real rsyslogd in the foreground: (its socket, the file it writes in the
    traditional format). Never the system's: its own config, socket and work directory."""
    binary = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
    if not os.access(binary, os.X_OK):
        pytest.skip("needs rsyslog (.ci/install-distro-programs)")
    work = tmp_path / "rsyslog"
    work.mkdir()
    work.chmod(0o755)
    sock, out = work / "log.sock", work / "messages"
    conf = work / "rsyslog.conf"
    conf.write_text(
        f'global(workDirectory="{work}")\n'
        'module(load="imuxsock" SysSock.Use="off")\n'
        f'input(type="imuxsock" Socket="{sock}" CreatePath="on" RateLimit.Interval="0")\n'
        f'*.* action(type="omfile" file="{out}" template="RSYSLOG_TraditionalFileFormat")\n')
    errors = work / "stderr"
    with open(errors, "wb") as err:
        proc = subprocess.Popen([binary, "-n", "-f", str(conf), "-i", str(work / "pid")],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, 30, "rsyslogd's socket")
        if proc.poll() is not None:
            pytest.fail(f"rsyslogd exited: {errors.read_text()}")
        sock.chmod(0o666)
        yield sock, out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_filter_on_syslog_lines_rsyslog_wrote(serve, f2b_conf: Path, rsyslogd) -> None:
    sock, out = rsyslogd
    v6 = _has_ipv6()
    server = serve(_conf(v6), "--log-connections", "--syslog", "--syslog-socket", str(sock))
    _generate([server.port(i) for i in range(4)], server.port(4) if v6 else None)
    want = [("127.0.0.1", "max_cpm_per_ip"), ("127.0.0.1", "only_from")]
    if v6:
        want.append(("::1", "no_access"))

    def written() -> bool:
        text = out.read_text() if out.exists() else ""
        return len(_expected(text)) == len(want) and " program_exit " in text

    wait_until(written, 30, "rsyslogd's file")
    text = out.read_text()
    # RSYSLOG_TraditionalFileFormat: "Mmm dd hh:mm:ss HOST poolinetd[PID]: MESSAGE".
    line = next(line for line in text.splitlines() if "conn_refused" in line)
    assert re.match(r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ poolinetd\[\d+\]: warning "
                    r"conn_refused ", line), line
    matched = _regex(f2b_conf, out, "msg")
    assert sorted(_expected("\n".join(matched))) == sorted(want), matched
    assert sorted(_regex(f2b_conf, out, "ip")) == sorted(ip for ip, _ in want)


def test_the_jail_parses_with_the_filter(f2b_conf: Path, tmp_path: Path) -> None:
    """fail2ban-client -d (dump the configuration; no server) reads the jail enabled."""
    jail = f2b_conf / "jail.d" / "poolinetd.conf"
    logfile = tmp_path / "daemon.log"
    logfile.write_text("")
    text = jail.read_text().replace("enabled  = false", "enabled  = true")
    jail.write_text(re.sub(r"(?m)^logpath  = .*$", f"logpath  = {logfile}", text))
    done = subprocess.run(["fail2ban-client", "-c", str(f2b_conf), "-d"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    dump = done.stdout
    assert "['add', 'poolinetd', 'auto']" in dump
    assert "conn_refused" in dump and "['set', 'poolinetd', 'maxretry', 3]" in dump
    assert str(logfile) in dump
