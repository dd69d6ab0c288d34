"""Deployment integration against the real things: a notify socket the test reads, the real
systemd-socket-activate with poolinetd as nobody on a port below 1024, an upgrade under load,
and Prometheus metrics checked with the official parser."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, TEST_USER, Server, refused, tcp_exchange, wait_until

from poolinetd.ops import control

U = TEST_USER
MODES = ["pool", "classic"]
ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
SETPRIV = shutil.which("setpriv")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------- sd_notify


class NotifyListener:
    """A notify socket like systemd's: one datagram per notification."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.seen: list[dict[str, str]] = []

    def poll(self) -> None:
        with contextlib.suppress(TimeoutError, BlockingIOError):
            while True:
                data = self.sock.recv(4096)
                fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
                self.seen.append(fields)

    def wait_for(self, key: str, after: int = 0, timeout: float = 20.0) -> dict[str, str]:
        def found() -> dict[str, str] | None:
            self.poll()
            return next((m for m in self.seen[after:] if key in m), None)

        got = wait_until(found, timeout, f"{key} on the notify socket")
        assert isinstance(got, dict)
        return got


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_reload_stop_and_watchdog(serve, tmp_path: Path, monkeypatch, mode: str,
                                               abstract: bool) -> None:
    address = f"@poolinetd-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(
        tmp_path / "notify.sock")
    listener = NotifyListener(address)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        monkeypatch.setenv("WATCHDOG_USEC", "400000")
        server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n", mode=mode)
        ready = listener.wait_for("READY")
        assert "services" in ready.get("STATUS", "")
        listener.wait_for("WATCHDOG")
        mark = len(listener.seen)
        server.send_signal(signal.SIGHUP)
        reloading = listener.wait_for("RELOADING", after=mark)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        listener.wait_for("READY", after=mark + 1)
        mark = len(listener.seen)
        server.stop()
        listener.wait_for("STOPPING", after=mark)
    finally:
        listener.sock.close()


@pytest.mark.process
def test_no_worker_or_program_inherits_the_systemd_variables(serve, staged_programs: Path,
                                                             tmp_path: Path, monkeypatch) -> None:
    listener = NotifyListener(str(tmp_path / "n.sock"))
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
        monkeypatch.setenv("WATCHDOG_USEC", "5000000")
        server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} {staged_programs}/report.sh "
                               "report.sh\n")
        out = tcp_exchange(server.port(), timeout=20).decode()
        assert "uid" in out.lower()
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID"):
            assert name not in out
    finally:
        listener.sock.close()


# ---------------------------------------------------------------- socket activation


def _privileged_free_port() -> int:
    for port in range(989, 900, -1):
        with contextlib.suppress(OSError), socket.socket() as probe:
            probe.bind(("127.0.0.1", port))
            return port
    pytest.skip("no free port below 1024")


@pytest.mark.process
@pytest.mark.root
@pytest.mark.skipif(not os.access(ACTIVATE, os.X_OK), reason="systemd-socket-activate missing")
def test_systemd_socket_activation_as_nobody_on_a_privileged_port(
        nobody_python: tuple[str, Path]) -> None:
    python, stage = nobody_python
    port = _privileged_free_port()
    spare = _privileged_free_port() - 1  # passed, but no service wants it
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        own_port = probe.getsockname()[1]
    conf = stage / f"activated-{time.monotonic_ns()}.conf"
    conf.write_text(f"127.0.0.1:{port} stream tcp nowait nobody internal echo\n"
                    f"127.0.0.1:{own_port} stream tcp nowait nobody internal echo\n")
    conf.chmod(0o644)
    err = stage / f"err-{time.monotonic_ns()}"
    with err.open("wb") as errf:
        proc = subprocess.Popen(
            [ACTIVATE, "-l", f"127.0.0.1:{port}", "-l", f"127.0.0.1:{spare}", "--fdname=echo:spare",
             "-E", f"PYTHONPATH={stage}",
             SETPRIV or "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             "--inh-caps=-all", "--bounding-set=-all",
             python, "-s", "-m", "poolinetd", "run", "-c", str(conf), "--no-control"],
            stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, cwd="/",
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(stage)})
    try:
        wait_until(lambda: err.read_text().count("Listening on") >= 2 or proc.poll() is not None,
                   20, "systemd-socket-activate listening")
        # The first connection makes systemd-socket-activate start poolinetd, which adopts it.
        assert tcp_exchange(port, b"via systemd", timeout=30) == b"via systemd"
        wait_until(lambda: "ready" in err.read_text(), 30, "poolinetd ready")
        assert tcp_exchange(own_port, b"own socket", timeout=30) == b"own socket"
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
        assert uid_line.split()[1] != "0"
        cap_eff = next(ln for ln in status.splitlines() if ln.startswith("CapEff:"))
        assert int(cap_eff.split()[1], 16) == 0
        log = err.read_text()
        assert "passed_socket_unused" in log and str(spare) in log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.unlink(missing_ok=True)
        conf.unlink(missing_ok=True)


# ---------------------------------------------------------------- upgrade


class Hammer:
    """Clients doing echo exchanges in a loop; every failure is kept."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.stop = False
        self.ok = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                got = tcp_exchange(self.port, b"hammer", timeout=20)
            except OSError as exc:
                self.failures.append(repr(exc))
                continue
            if got == b"hammer":
                self.ok += 1
            else:
                self.failures.append(f"got {got!r}")

    def finish(self) -> None:
        self.stop = True
        for t in self.threads:
            t.join(60)


def _new_master_pid(server: Server) -> int:
    for line in server.log().splitlines():
        if "upgrade_ready" in line:
            return int(line.split("new_pid=")[1].split()[0])
    return 0


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_upgrade_under_load_refuses_nothing(serve, tmp_path: Path, mode: str) -> None:
    pidfile = tmp_path / "poolinetd.pid"
    server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n",
                           "--pidfile", str(pidfile), mode=mode)
    port = server.port()
    new_pid = 0
    hammer = Hammer(port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as long:
            long.sendall(b"before")
            assert long.recv(6) == b"before"
            wait_until(lambda: hammer.ok > 50, 30, "load before the upgrade")
            assert control.request(str(server.control), "upgrade") == {"ok": True}
            new_pid = wait_until(lambda: _new_master_pid(server), 60, "the new master ready")
            assert isinstance(new_pid, int)
            served = hammer.ok
            wait_until(lambda: hammer.ok > served + 50, 30, "load after the hand-over")
            long.sendall(b"after")  # the old master's worker or child still serves it
            assert long.recv(5) == b"after"
        assert server.proc.wait(30) == 0  # the old master drained and exited
        served = hammer.ok
        wait_until(lambda: hammer.ok > served + 50, 30, "load on the new master alone")
        hammer.finish()
        assert hammer.failures == []
        assert pidfile.read_text().strip() == str(new_pid)
        doc = control.request(str(server.control), "status")
        assert doc["pid"] == new_pid and doc["mode"] == mode
    finally:
        hammer.finish()
        if new_pid and _alive(new_pid):
            os.kill(new_pid, signal.SIGTERM)
            wait_until(lambda: not _alive(new_pid), 30, "the new master to stop")
    assert not pidfile.exists()  # removed by the master that wrote it


@pytest.mark.process
def test_a_failed_upgrade_keeps_the_old_master_serving(serve) -> None:
    server: Server = serve(f"127.0.0.1:0 stream tcp nowait {U} internal echo\n")
    server.conf.write_text("this is not an inetd.conf line\n")  # the new master exits 78
    assert control.request(str(server.control), "upgrade") == {"ok": True}
    wait_until(lambda: "upgrade_failed" in server.log(), 60, "the failed upgrade")
    assert "status 78" in server.log()
    assert tcp_exchange(server.port(), b"still here") == b"still here"
    assert control.request(str(server.control), "status")["upgrading"] == 0
    answer = control.request(str(server.control), "upgrade")  # can be tried again
    assert answer == {"ok": True}
    wait_until(lambda: server.log().count("upgrade_failed") == 2, 60, "the second failure")
    server.send_signal(signal.SIGUSR2)  # the signal does the same
    wait_until(lambda: server.log().count("upgrade_failed") == 3, 60, "the third failure")


# ---------------------------------------------------------------- metrics


def _families(text: str) -> dict[str, object]:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as resp:
        return str(resp.read().decode())


def _value(families: dict[str, object], name: str, **labels: str) -> float:
    """The sample of metric ``name`` (counters: its ``_total``) with these labels."""
    wanted = (name, name + "_total", name.removesuffix("_count") + "_count")
    family = families.get(name) or families[name.removesuffix("_count")]
    for sample in family.samples:  # type: ignore[attr-defined]
        if sample.name in wanted and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    raise KeyError((name, labels))


@pytest.mark.process
@pytest.mark.parametrize("mode", MODES)
def test_metrics_match_the_traffic_and_parse(serve, mode: str) -> None:
    server: Server = serve(f"127.0.0.1:0 on socktype=stream, user={U}, args=echo, "
                           "max_cpm_per_ip=3;\n"
                           f"127.0.0.1:0 stream tcp nowait {U} /bin/sh sh -c 'exit 3'\n",
                           "--metrics", "127.0.0.1:0", mode=mode)
    name = server.listeners[0]["service"]
    program = server.listeners[1]["service"]
    for _ in range(2):
        tcp_exchange(server.port(1), timeout=20)
    wait_until(lambda: server.service_status(program)["active"] == 0, 20, "the programs to end")
    metrics_port = server.info["metrics"]["port"]  # type: ignore[index]
    for _ in range(3):
        assert tcp_exchange(server.port(), b"12345") == b"12345"
    for _ in range(2):
        assert refused(server.port())
    wait_until(lambda: server.service_status(name)["active"] == 0, 20, "connections to end")
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=20) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    families = _families(text)
    assert _value(families, "poolinetd_connections_accepted", service=name) == 3
    assert _value(families, "poolinetd_connections_refused", service=name,
                  reason="max_cpm_per_ip") == 2
    assert _value(families, "poolinetd_connections_active", service=name) == 0
    assert _value(families, "poolinetd_handoff_seconds_count", service=name) == 3
    assert _value(families, "poolinetd_program_exits", service=program, status="3") == 2
    assert _value(families, "poolinetd_program_run_seconds_count", service=program) == 2
    if mode == "pool":  # (a classic child reports its bytes in its conn_end line only)
        wait_until(lambda: _value(_families(_scrape(metrics_port)),
                                  "poolinetd_builtin_received_bytes", service=name) == 15,
                   20, "the workers' byte counts")
        assert _value(_families(_scrape(metrics_port)), "poolinetd_builtin_sent_bytes",
                      service=name) == 15
    assert "poolinetd_loop_turn_seconds" in families
    assert _value(families, "poolinetd_open_fds") > 3
    out = subprocess.run([sys.executable, "-m", "poolinetd", "metrics", "--control",
                          str(server.control)], capture_output=True, text=True, timeout=30,
                         cwd=REPO)
    assert out.returncode == 0
    assert _value(_families(out.stdout), "poolinetd_connections_accepted", service=name) == 3
