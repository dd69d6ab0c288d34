"""preload=python under attack: defects found by a hostile review, against a running server.

Each test reproduced one defect (all fixed): rlimit_nproc not applied to the
preloader's forks, a connection served twice when the preloader died between
its fork and SPAWNED, out-of-range reports crashing the worker, FAILED after
READY leaking instances, an oversized connection message hanging its client,
a preloader that ends its channel but lives hanging its worker. The scripts are written into a
0755 directory (``public_dir``) so that ``nobody`` can run them; a hostile
module stands in for what the service's user (or the OOM killer) can do to
the preloader, as the preloader runs the script's imports as that user.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import IS_ROOT, tcp_exchange, wait_until

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="services run as nobody: needs root")
SYSTEM_PYTHON = "/usr/bin/python3"
if not os.access(SYSTEM_PYTHON, os.X_OK):  # pragma: no cover - Debian has it
    pytestmark = pytest.mark.skip(reason=f"needs {SYSTEM_PYTHON}")


def _script(folder: Path, name: str, body: str, shebang: bool = True) -> Path:
    path = folder / name
    path.write_text((f"#!{SYSTEM_PYTHON}\n" if shebang else "") + body)
    path.chmod(0o755)
    return path


def _entry(program: Path, extra: str = "") -> str:
    return (f"127.0.0.1:0 on protocol=tcp, wait=no, user=nobody, exec={program}, args=svc, "
            f"pool_min=1, pool_max=1, preload=python{extra};\n")


def _active(server) -> int:  # type: ignore[no-untyped-def]
    (svc,) = server.status()["services"]
    return int(svc["active"])


# A module the script imports: it runs in the preloader (as the service's user) and
# wraps the preloader's report function (a global of its __main__), as any import may.
# ``FORGE`` is the body run on each report's fields ``f`` before it is sent.
_HOSTILE_MODULE = """
import __main__, os, signal
_orig = getattr(__main__, "_send", None)
def _send(chan, **f):
{forge}
    return _orig(chan, **f)
if _orig is not None:  # in the preloader (an exec'd program has no _send)
    __main__._send = _send
"""


def _hostile(folder: Path, forge: str, program: str) -> Path:
    module = folder / "hostile_mod.py"
    body = "\n".join("    " + line for line in forge.strip().splitlines())
    module.write_text(_HOSTILE_MODULE.format(forge=body))
    module.chmod(0o644)
    return _script(folder, "svc.py", "import hostile_mod\n" + program)


def test_rlimit_nproc_limits_preloaded_launches(serve, public_dir: Path) -> None:
    script = _script(public_dir, "sleeper.py",
                     "import os, time\nprint('up', os.getpid(), flush=True)\ntime.sleep(8)\n")
    server = serve(_entry(script, ", rlimit_nproc=4, max_child=50"))
    wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    held = []
    try:
        for _ in range(8):
            conn = socket.create_connection(("127.0.0.1", server.port(0)), timeout=10)
            held.append(conn)
        up = sum(1 for conn in held if conn.recv(100).startswith(b"up "))
    finally:
        for conn in held:
            conn.close()
    # nobody runs the worker, the preloader and the programs: 4 in all at most (exec'd,
    # the same service answers 3 of the 8 and logs exec_failed EAGAIN for the rest).
    assert up <= 4, f"{up} programs running as nobody under rlimit_nproc=4"


def test_a_preloader_killed_after_its_fork_serves_the_connection_once(
        serve, public_dir: Path) -> None:
    script = _hostile(public_dir, (
        "if f.get('t') == 'spawned':  # forked, not yet reported: killed here\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"),
        "import os, sys\nprint('served by', os.getpid(), flush=True)\n")
    server = serve(_entry(script))
    wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    out = tcp_exchange(server.port(0), b"", timeout=20)
    assert out.count(b"served by") == 1, out


@pytest.mark.parametrize("forge", [
    "if f.get('t') == 'spawned':\n    f['pid'] = 2**40",
    "if f.get('t') == 'exit':\n    f['usec'] = -1",
    "if f.get('t') == 'exit':\n    f['status'] = 999",
], ids=["pid-over-int32", "negative-usec", "status-999"])
def test_an_out_of_range_report_ends_the_preloader_not_the_worker(
        serve, public_dir: Path, forge: str) -> None:
    script = _hostile(public_dir, forge, "import os\nprint('ok', flush=True)\n")
    server = serve(_entry(script))
    wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    (worker,) = server.workers()
    # A forged report ends the preloader: the connection it held is exec'd (a hostile
    # preloader may have let its own child serve it too: the service's own code).
    assert tcp_exchange(server.port(0), b"", timeout=20).startswith(b"ok\n")
    time.sleep(1.0)
    log = server.log()
    assert "worker_error" not in log and "worker_killed" not in log, log
    assert server.workers() == [worker]


def test_a_failed_report_after_ready_leaves_no_instance_counted(
        serve, public_dir: Path) -> None:
    script = _hostile(public_dir, (
        "if f.get('t') == 'spawned':\n"
        "    _orig(chan, **f)\n"
        "    f = dict(t='failed', file='forged', line=1, error='forged after ready')\n"),
        "import time\nprint('ok', flush=True)\ntime.sleep(0.5)\n")
    server = serve(_entry(script))
    wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    # Killed for the forged report before it opened its child's gate, the preloader's
    # child never serves (its client gets nothing); killed after, it serves: either way,
    # once at most, and the instance is not counted for ever.
    assert tcp_exchange(server.port(0), b"", timeout=20) in (b"ok\n", b"")
    # FAILED is said once, at boot: after READY it is a preloader not to be trusted.
    wait_until(lambda: "preload_exit" in server.log(), 10, "preload_exit")
    assert "preload_failed" not in server.log()
    started = time.monotonic()
    while _active(server) and time.monotonic() - started < 8:
        time.sleep(0.2)
    assert _active(server) == 0


def test_a_conn_message_too_big_for_the_preloader_is_still_served(
        serve, public_dir: Path) -> None:
    import json

    from poolinetd.config.resolve import load_text
    from poolinetd.launch import preloader, program

    script = _script(public_dir, "envsize.py",
                     "import os\nprint('ok', len(os.environ['BIG']), flush=True)\n")

    def sizes(n: int) -> tuple[int, int]:
        """The preloader's configuration message and a connection's, as launch.preload
        builds them, with a BIG of ``n`` bytes."""
        loaded = load_text(_entry(script, f", env=\"BIG={'a' * n}\""), "/etc/t.conf")
        (service,) = loaded.services
        pre = service.preload
        config = {"script": pre.script, "argv": list(pre.argv), "modules": [],
                  "stderr_socket": True, "rlimits": [], "env": program.preloader_env(service)}
        env = program.connection_env(service, "127.0.0.1 65535", "127.0.0.1 65535")
        return len(json.dumps(config)), len(json.dumps({"id": 9999999, "env": env}))

    config_size, conn_size = sizes(0)
    big = preloader.MAX_MESSAGE - config_size  # the configuration just fits
    assert big + conn_size > preloader.MAX_MESSAGE  # a connection's does not
    server = serve(_entry(script, f", env=\"BIG={'a' * big}\""))
    wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
    try:
        answer = tcp_exchange(server.port(0), b"", timeout=15)
    except TimeoutError:  # (longer than a ping and its timeout: not a stopped preloader)
        answer = b"(no answer in 15 s)"
    assert answer == f"ok {big}\n".encode()


def test_a_preloader_that_ends_its_channel_but_lives_does_not_hang_the_worker(
        serve, public_dir: Path) -> None:
    module = public_dir / "eof_mod.py"
    module.write_text(
        "import os, socket, sys, threading, time\n"
        "def later():\n"
        "    time.sleep(1.0)\n"
        "    chan = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, os.dup(3))\n"
        "    chan.shutdown(socket.SHUT_RDWR)  # the worker reads EOF; this process lives on\n"
        "    time.sleep(30)\n"
        "if hasattr(sys.modules['__main__'], '_send'):  # in the preloader only\n"
        "    threading.Thread(target=later).start()  # non-daemon: keeps the process\n")
    module.chmod(0o644)
    script = _script(public_dir, "svc.py", "import eof_mod\nprint('ok', flush=True)\n")
    server = serve(_entry(script))
    try:
        wait_until(lambda: "preload_ready" in server.log(), 30, "ready")
        time.sleep(2.0)  # the channel has ended
        assert tcp_exchange(server.port(0), b"", timeout=15) == b"ok\n"
        assert "worker_stalled" not in server.log()
    finally:
        for entry in os.listdir("/proc"):  # preloaders a killed worker left behind
            if entry.isdigit():
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                if str(script).encode() in cmdline and b"poolinetd preloader" in cmdline:
                    os.kill(int(entry), signal.SIGKILL)
