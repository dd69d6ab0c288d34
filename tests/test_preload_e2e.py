"""preload=python against a running server: the contract, failures, reloads, hostile scripts.

The scripts are tests/programs/preload_*.py, staged where ``nobody`` can run
them, with ``#!`` lines naming the system's interpreter (/usr/bin/python3,
directly or through env), while poolinetd itself runs from the test
interpreter (a venv): the preloader is poolinetd's own program run by the
script's Python. The main check is differential: the same report script runs
exec'd and preloaded, side by side in one server, and what each connection's
process finds (fds, argv, environment, ids, umask, nice, rlimits, signal
dispositions and mask, session, standard streams, cwd, sys.path[0]) must be
the same.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT, children_of, tcp_exchange, wait_until

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="services run as nobody: needs root")
SYSTEM_PYTHON = "/usr/bin/python3"
if not os.access(SYSTEM_PYTHON, os.X_OK):  # pragma: no cover - Debian has it
    pytestmark = pytest.mark.skip(reason=f"needs {SYSTEM_PYTHON}")


def _report(port: int, line: bytes = b"hello\n") -> tuple[dict[str, object], bytes]:
    out = tcp_exchange(port, line, timeout=20.0)
    first, _, rest = out.partition(b"\n")
    return json.loads(first), rest


def _line(port: int, line: bytes, timeout: float = 20.0) -> bytes:
    return tcp_exchange(port, line, timeout=timeout)


def _entry(port_name: str, argv0: str, program: str, extra: str = "", pool_max: int = 2) -> str:
    return (f"127.0.0.1:0 on protocol=tcp, wait=no, user=nobody, exec={program}, "
            f"args={argv0} A 'b c', pool_min=1, pool_max={pool_max}{extra};  # {port_name}\n")


def test_a_preloaded_script_finds_what_an_exec_d_one_finds(serve, staged_programs: Path) -> None:
    script = staged_programs / "preload_report.py"
    controls = ", rlimit_files=300, rlimit_core=0, umask=027, nice=3, env=\"LC_X=1\""
    conf = (_entry("exec", "report-exec", str(script), controls)
            + _entry("preload", "report-pre", str(script), controls + ", preload=python"))
    server = serve(conf, "--log-connections")
    exec_port, pre_port = server.port(0), server.port(1)
    wait_until(lambda: "preload_ready" in server.log(), 30, "the preloader says ready")
    exec_report, exec_rest = _report(exec_port)
    pre_report, pre_rest = _report(pre_port)
    # What only the process identity can tell apart:
    assert pre_report["executable"] == exec_report["executable"] == SYSTEM_PYTHON
    for report in (exec_report, pre_report):
        assert report["line"] == "hello\n"
        assert report["argv"] == [str(script), "A", "b c"]
        assert report["orig_argv"] == ["python3", str(script), "A", "b c"]  # env's argv[0]
        assert report["fds"] == [0, 1, 2, 3]  # 3: the listing's own
        assert report["env"]["LC_X"] == "1"
        assert report["umask"] == 0o027
        assert report["nice"] == 3
        assert report["limits"]["RLIMIT_NOFILE"] == [300, 300]
        assert report["session_leader"] is True
        assert report["counter"] == 1
    assert sorted(set(pre_report["env"].items()) ^ set(exec_report["env"].items())) == []
    assert pre_report == exec_report
    assert exec_rest == pre_rest == b"atexit ran\n"  # flushed and run at exit
    wait_until(lambda: server.log().count("program_exit") >= 2, 20, "both exits logged")
    assert re.search(r'program_exit service=report-pre\S* pid=\d+ peer="127\.0\.0\.1 \d+" '
                     r"status=0 duration=", server.log()), server.log()


def test_module_state_is_never_shared_between_connections(serve, staged_programs: Path) -> None:
    script = staged_programs / "preload_report.py"
    server = serve(_entry("preload", "report", str(script), ", preload=python", pool_max=1))
    port = server.port(0)
    wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    counters = [_report(port)[0]["counter"] for _ in range(5)]
    assert counters == [1] * 5


def test_interpreter_form_with_options_and_preload_modules(serve, staged_programs: Path) -> None:
    script = staged_programs / "preload_report.py"
    conf = (f"127.0.0.1:0 on protocol=tcp, wait=no, user=nobody, exec={SYSTEM_PYTHON}, "
            f"args=python3 -u {script} X, preload=python, preload_modules=email.mime.text;\n"
            f"127.0.0.1:0 on protocol=tcp, wait=no, user=nobody, exec={SYSTEM_PYTHON}, "
            f"args=python3-exec -u {script} X;\n")
    server = serve(conf)
    wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    pre, _ = _report(server.port(0))
    exe, _ = _report(server.port(1))
    assert pre["argv"] == exe["argv"] == [str(script), "X"]
    assert pre["stdout"][3] is True  # -u: written through, as exec'd
    assert pre["stdout"] == exe["stdout"] and pre["stderr"] == exe["stderr"]
    assert pre["orig_argv"] == ["python3", "-u", str(script), "X"]
    assert exe["orig_argv"] == ["python3-exec", "-u", str(script), "X"]
    assert re.search(r"preload_ready service=\S+ pid=\d+ preloader=\d+ modules=\d+", server.log())


def test_exit_status_and_an_uncaught_exception_as_python_reports_them(
        serve, staged_programs: Path) -> None:
    script = staged_programs / "preload_hostile.py"
    server = serve(_entry("p", "hostile", str(script), ", preload=python"), "--log-connections")
    port = server.port(0)
    wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    out = _line(port, b"crash\n").decode()
    assert out.startswith("Traceback (most recent call last):\n  File \"" + str(script)), out
    assert "RuntimeError: boom on purpose" in out and "preloader" not in out
    assert _line(port, b"exit3\n") == b""
    wait_until(lambda: re.search(r"warning program_exit .* status=3 ", server.log()), 20,
               "status 3 logged")
    assert re.search(r"warning program_exit .* status=1 ", server.log())


@pytest.mark.parametrize("mode", ["pool", "classic"])
def test_exit_as_python_exits(serve, staged_programs: Path, public_dir: Path, mode: str) -> None:
    """What the interpreter does at exit, preloaded (pool) as exec'd (classic): a file left
    open is flushed, sys.exit(str) prints it and exits 1, an uncaught KeyboardInterrupt
    ends the process by SIGINT."""
    script = staged_programs / "preload_hostile.py"
    server = serve(_entry("p", "hostile", str(script), ", preload=python"), "--log-connections",
                   mode=mode)
    port = server.port(0)
    if mode == "pool":
        wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    target = public_dir / f"unclosed-{mode}.txt"
    target.touch()
    target.chmod(0o666)
    assert _line(port, f"unclosed {target}\n".encode()) == f"wrote {target}\n".encode()
    wait_until(lambda: target.read_text() == "flushed at exit\n", 20, "the file flushed")
    assert _line(port, b"exit-message\n") == b"a message for stderr\n"
    assert _line(port, b"interrupt\n").endswith(b"KeyboardInterrupt\n")
    wait_until(lambda: re.search(r"program_exit .* status=-2 ", server.log()), 20, "SIGINT exit")
    assert re.search(r"program_exit .* status=1 ", server.log())


def test_a_script_that_cannot_be_preloaded_is_logged_and_exec_d(serve,
                                                                staged_programs: Path) -> None:
    script = staged_programs / "preload_broken.py"
    server = serve(_entry("p", "broken", str(script), ", preload=python", pool_max=1))
    wait_until(lambda: "preload_failed" in server.log(), 30, "preload_failed")
    assert re.search(rf"error preload_failed service=\S+ pid=\d+ file={re.escape(str(script))} "
                     r"line=10 error=\"ModuleNotFoundError: No module named "
                     r"'no_such_module_at_line_10'\"", server.log()), server.log()
    assert "no_such_module_guarded" not in server.log()
    # Exec'd instead: the client gets what the interpreter says, at once.
    out = _line(server.port(0), b"")
    assert b"ModuleNotFoundError: No module named 'no_such_module_at_line_10'" in out


def test_an_import_that_hangs_leaves_no_client_waiting(serve, staged_programs: Path) -> None:
    """Connections queue for a booting preloader only for a moment, then are exec'd."""
    script = staged_programs / "preload_slow.py"
    server = serve(_entry("p", "slow", str(script), ", preload=python", pool_max=1))
    started = time.monotonic()
    assert _line(server.port(0), b"", timeout=30) == b"served\n"
    assert time.monotonic() - started < 20
    assert "preload_ready" not in server.log()


def test_a_shebang_without_python_falls_back_to_exec(serve, public_dir: Path) -> None:
    script = public_dir / "shell.py"
    script.write_text("#!/bin/sh\necho shell-ran\n")
    script.chmod(0o755)
    server = serve(_entry("p", "sh", str(script), ", preload=python", pool_max=1))
    wait_until(lambda: "preload_failed" in server.log(), 30, "preload_failed")
    assert "line=1 error=\"the script's #! line names /bin/sh, not a Python interpreter\"" \
        in server.log()
    assert _line(server.port(0), b"") == b"shell-ran\n"


def test_a_reload_picks_up_a_changed_script(serve, public_dir: Path) -> None:
    script = public_dir / "version.py"
    script.write_text("#!/usr/bin/python3\nprint('v1')\n")
    script.chmod(0o755)
    server = serve(_entry("p", "version", str(script), ", preload=python"))
    port = server.port(0)
    wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    assert _line(port, b"") == b"v1\n"
    script.write_text("#!/usr/bin/python3\nprint('v2, longer')\n")
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: _line(port, b"") == b"v2, longer\n", 30, "the new script served")


def _ok(port: int) -> bool:
    return _line(port, b"ok\n").startswith(b"ok ")


@pytest.mark.parametrize("mode", ["kill-parent", "crash", "stall", "flood", "fork", "threads"])
def test_a_hostile_script_harms_only_its_own_connection(serve, staged_programs: Path,
                                                        mode: str) -> None:
    script = staged_programs / "preload_hostile.py"
    server = serve(_entry("p", "hostile", str(script), ", preload=python", pool_max=1))
    port = server.port(0)
    wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    assert _ok(port)
    hostile = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        hostile.sendall(mode.encode() + b"\n")
        if mode == "flood":
            assert len(hostile.recv(65536)) > 0  # it writes; we never read more
        elif mode == "kill-parent":
            assert hostile.recv(100).startswith(b"killing")
            wait_until(lambda: "preload_exit" in server.log(), 20, "preload_exit logged")
        # Others are served meanwhile, by the preloader or (while it restarts) by exec.
        results: list[bool] = []
        threads = [threading.Thread(target=lambda: results.append(_ok(port))) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert results == [True] * 8
    finally:
        hostile.close()
    if mode == "kill-parent":
        wait_until(lambda: server.log().count("preload_ready") >= 2, 30, "a new preloader")
    assert server.proc.poll() is None
    assert _ok(port)
    assert "worker_error" not in server.log() and "Traceback" not in server.log()


def test_a_stopped_preloader_is_found_and_replaced(serve, staged_programs: Path) -> None:
    """A process of the service's user may SIGSTOP the preloader: a connection it holds is
    exec'd once a ping goes unanswered, and a new preloader serves the next ones."""
    script = staged_programs / "preload_hostile.py"
    server = serve(_entry("p", "hostile", str(script), ", preload=python", pool_max=1))
    port = server.port(0)
    wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    (worker,) = server.workers()
    (first,) = children_of(worker)
    os.kill(first, signal.SIGSTOP)
    try:
        started = time.monotonic()
        out = _line(port, b"ok\n", timeout=40).split()
        assert out[0] == b"ok" and int(out[2]) == worker  # exec'd by the worker itself
        assert time.monotonic() - started < 30
        assert "preload_stalled" in server.log()
        wait_until(lambda: server.log().count("preload_ready") >= 2, 30, "a new preloader")
        assert int(_line(port, b"ok\n").split()[2]) != worker
    finally:
        if os.path.exists(f"/proc/{first}"):
            os.kill(first, signal.SIGCONT)


def test_the_preloader_runs_under_its_worker_as_the_service_user(serve,
                                                                 staged_programs: Path) -> None:
    import pwd

    script = staged_programs / "preload_hostile.py"
    server = serve(_entry("p", "hostile", str(script), ", preload=python", pool_max=1))
    wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    (worker,) = server.workers()
    (preloader,) = children_of(worker)
    assert os.stat(f"/proc/{preloader}").st_uid == pwd.getpwnam("nobody").pw_uid
    cmdline = Path(f"/proc/{preloader}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0] == SYSTEM_PYTHON.encode() and cmdline[-2] == str(script).encode()
    fds = sorted(os.listdir(f"/proc/{preloader}/fd"), key=int)
    assert len(fds) == 6  # /dev/null x2, fd 2, the channel, its wakeup pipe
    out = _line(server.port(0), b"ok\n").split()
    assert int(out[2]) == preloader  # the program's parent
    # A stop is clean: the worker reaps its preloader.
    assert server.stop() == 0
    wait_until(lambda: not os.path.exists(f"/proc/{preloader}"), 20, "preloader gone")


def test_classic_mode_execs_a_preloaded_service(serve, staged_programs: Path) -> None:
    script = staged_programs / "preload_report.py"
    server = serve(_entry("p", "report", str(script), ", preload=python"), mode="classic")
    report, rest = _report(server.port(0))
    assert report["argv"] == [str(script), "A", "b c"] and rest == b"atexit ran\n"
    assert "preload" not in server.log()


def test_a_stop_waits_for_a_preloaded_program(serve, staged_programs: Path) -> None:
    script = staged_programs / "preload_hostile.py"
    server = serve(_entry("p", "hostile", str(script), ", preload=python", pool_max=1))
    port = server.port(0)
    wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    slow = socket.create_connection(("127.0.0.1", port), timeout=20)
    slow.sendall(b"threads\n")  # answers once its threads (0.5 s) are done
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert slow.recv(100) == b"threads started\n"
    slow.close()
    assert server.proc.wait(30) == 0
    assert time.monotonic() - started < 30
