"""Process controls for launched programs (xinetd's rlimit_*, nice, umask): parsing, check
--json, and what a real program gets from a running server in both modes."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess

import orjson
import pytest
from conftest import TEST_USER, tcp_exchange, wait_until

from poolinetd.check import run_check
from poolinetd.config.inetdconf import parse
from poolinetd.config.spec import RLIM_UNLIMITED, Options

U = TEST_USER
# /proc/PID/limits rows the test reads, by rlimit_* key.
_ROWS = {
    "rlimit_as": "Max address space",
    "rlimit_cpu": "Max cpu time",
    "rlimit_data": "Max data size",
    "rlimit_rss": "Max resident set",
    "rlimit_stack": "Max stack size",
    "rlimit_files": "Max open files",
    "rlimit_nproc": "Max processes",
    "rlimit_core": "Max core file size",
}


def errors(text: str) -> list[str]:
    return [str(d) for d in parse(text, "t.conf").errors]


def test_values_parse_with_k_m_g_and_unlimited() -> None:
    spec = parse(f"x on protocol=tcp, user={U}, exec=/bin/true, wait=no, rlimit_as=512M, "
                 "rlimit_cpu=60, rlimit_data=1G, rlimit_rss=64k, rlimit_stack=8M, "
                 "rlimit_files=1024, rlimit_nproc=unlimited, rlimit_core=0, nice=-5, "
                 "umask=027;", "t.conf").specs[0]
    o = spec.options
    assert (o.rlimit_as, o.rlimit_cpu, o.rlimit_data, o.rlimit_rss) == (
        512 << 20, 60, 1 << 30, 64 << 10)
    assert (o.rlimit_stack, o.rlimit_files, o.rlimit_nproc, o.rlimit_core) == (
        8 << 20, 1024, RLIM_UNLIMITED, 0)
    assert (o.nice, o.umask) == (-5, 0o27)


def test_defaults_carry_process_controls() -> None:
    parsed = parse("defaults on rlimit_core=0, nice=10, umask=077;", "t.conf")
    assert parsed.defaults == Options(rlimit_core=0, nice=10, umask=0o77)


@pytest.mark.parametrize(("opt", "message"), [
    ("rlimit_as=12X", "rlimit_as must be N, NK, NM or NG, or unlimited, not '12X'"),
    ("rlimit_cpu=-1", "rlimit_cpu must be N, NK, NM or NG, or unlimited, not '-1'"),
    ("rlimit_files=99999999999999999999G", "rlimit_files must be"),
    ("nice=20", "nice must be an integer from -20 to 19, not '20'"),
    ("nice=x", "nice must be an integer from -20 to 19"),
    ("umask=0o22", "umask must be an octal umask from 000 to 777, not '0o22'"),
    ("umask=8", "umask must be an octal umask"),
])
def test_bad_values_are_errors_at_the_field(opt: str, message: str) -> None:
    got = errors(f"x on protocol=tcp, user={U}, exec=/bin/true, wait=no, {opt};")
    assert len(got) == 1 and got[0].startswith(f"t.conf:1: field 7 '{opt}': {message}"), got


def test_check_json_shows_them(tmp_path) -> None:
    conf = tmp_path / "p.conf"
    conf.write_text("defaults on rlimit_core=0;\n"
                    f"127.0.0.1:0 on protocol=tcp, user={U}, exec=/bin/true, args=true, "
                    "wait=no, rlimit_as=unlimited, nice=3, umask=002;\n")
    out = io.StringIO()
    assert run_check(str(conf), True, out, io.StringIO()) == 0
    process = orjson.loads(out.getvalue())["services"][0]["process"]
    assert process["rlimit_as"] == "unlimited" and process["rlimit_core"] == 0
    assert process["rlimit_cpu"] is None
    assert (process["nice"], process["umask"]) == (3, "002")


def test_a_builtin_warns_that_they_do_nothing(tmp_path) -> None:
    conf = tmp_path / "b.conf"
    conf.write_text(f"127.0.0.1:0 on protocol=tcp, user={U}, args=echo, nice=5;\n")
    err = io.StringIO()
    assert run_check(str(conf), False, io.StringIO(), err) == 0
    assert "nice ignored: a built-in runs no program" in err.getvalue()


# -- a real program through a running server ---------------------------------------------

# The program prints its pid, its own limits, umask and nice value at once; then, after a
# line from the client, its limits again.
_REPORT = ("echo pid=$$; cat /proc/$$/limits; echo umask=$(umask); echo nice=$(nice); "
           "read line; echo after; cat /proc/$$/limits")
_WANT = {
    "rlimit_as": "unlimited", "rlimit_cpu": "30", "rlimit_data": str(1 << 30),
    "rlimit_rss": str(100 << 20), "rlimit_stack": str(4 << 20), "rlimit_files": "64",
    "rlimit_nproc": "4096", "rlimit_core": "0",
}


def _limits(text: str) -> dict[str, tuple[str, str]]:
    """rlimit_* key -> (soft, hard) as /proc/PID/limits writes them."""
    got: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        for key, row in _ROWS.items():
            if line.startswith(row):
                soft, hard = line[len(row):].split()[:2]
                got[key] = (soft, hard)
    return got


def _value(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name + "="):
            return line[len(name) + 1:]
    raise AssertionError(f"no {name}= in {text!r}")


def _converse(port: int, want: dict[str, str]) -> tuple[str, str]:
    """What the program says before and after the client's line. The line is sent once its
    hard limits are ``want`` (pool mode lowers them by prlimit just after the exec)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(10)
        first = b""
        while b"nice=" not in first or not first.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, first
            first += chunk
        pid = int(_value(first.decode(), "pid"))
        soft = {key: got[0] for key, got in _limits(first.decode()).items()}

        hard: dict[str, str] = {}

        def hard_in_place() -> bool:
            with open(f"/proc/{pid}/limits") as f:
                hard.update((key, got[1]) for key, got in _limits(f.read()).items())
            return all(hard[key] == value for key, value in want.items())

        try:
            wait_until(hard_in_place, 20, "the program's hard limits")
        except BaseException:
            raise AssertionError(f"soft {soft}, hard {hard}") from None
        sock.sendall(b"go\n")
        sock.shutdown(socket.SHUT_WR)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    return first.decode(), rest.decode()


@pytest.fixture(params=["pool", "classic"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_program_gets_its_limits_nice_and_umask(serve, mode: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("raising hard limits needs root")
    conf = (
        "defaults on rlimit_core=0, umask=027;\n"
        f"127.0.0.1:0 on protocol=tcp, user={U}, wait=no, exec=/bin/sh, "
        f'args=sh -c "{_REPORT}", rlimit_files=64, rlimit_cpu=30, rlimit_as=unlimited, '
        "rlimit_data=1G, rlimit_stack=4M, rlimit_nproc=4096, rlimit_rss=100M, nice=7;\n"
        f"127.0.0.1:0 on protocol=tcp, user={U}, wait=no, exec=/bin/sh, "
        f'args=small -c "{_REPORT}", rlimit_as=16M;\n'
    )
    server = serve(conf, mode=mode)
    for _ in range(3):  # each launch alike: the worker puts its own soft limits back
        first, after = _converse(server.port(0), _WANT)
        # Soft limits from the program's first instruction; both once it has read a line.
        assert {k: v[0] for k, v in _limits(first).items()} == _WANT, first
        assert _limits(after) == {k: (v, v) for k, v in _WANT.items()}, after
        assert _value(first, "umask") == "0027" and _value(first, "nice") == "7", first
    # An address-space limit below what a Python worker maps still reaches the program
    # (pool mode: through prlimit just after its exec), and the program runs.
    first, after = _converse(server.port(1), {"rlimit_as": str(16 << 20), "rlimit_core": "0"})
    assert _limits(after)["rlimit_as"] == (str(16 << 20), str(16 << 20)), after
    assert _value(first, "umask") == "0027" and _value(first, "nice") == "0", first
    if mode == "pool":  # the workers keep their own CPU and fd limits
        for pid in server.workers():
            with open(f"/proc/{pid}/limits") as f:
                mine = _limits(f.read())
            assert mine["rlimit_cpu"][0] == "unlimited", mine
            assert mine["rlimit_files"][0] != "64", mine


def test_nproc_refuses_the_launch_when_the_user_is_at_it(serve, mode: str) -> None:
    """rlimit_nproc=1 while the service's user already runs two processes: the launch
    fails with EAGAIN in both modes (pool: the worker's spawn; classic: the execve)."""
    if os.geteuid() != 0 or U != "nobody" or shutil.which("setpriv") is None:
        pytest.skip("needs root, setpriv and nobody as the service user")
    # Two: the classic child's setuid counts the user's processes without itself.
    holders = [subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup",
                                 "--clear-groups", "sleep", "120"]) for _ in range(2)]
    try:
        conf = (f"127.0.0.1:0 on protocol=tcp, user={U}, wait=no, exec=/bin/echo, "
                "args=echo launched, rlimit_nproc=1;\n")
        server = serve(conf, mode=mode)
        assert tcp_exchange(server.port(0)) == b""
        wait_until(lambda: "exec_failed" in server.log() and "errno=EAGAIN" in server.log(),
                   20, "exec_failed errno=EAGAIN")
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
