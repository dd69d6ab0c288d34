"""Hostile configs (issue 13 items 5, 6, 7): odd files, include bombs, non-UTF-8 bytes, big shapes.

No timing assertions: a hang shows as a subprocess timeout (generous), a
blow-up as the wrong result; speed is measured in benchmarks/bench_load.py.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from config_fakes import fake_lookups
from conftest import REPO, TEST_USER, tcp_exchange, wait_until

from poolinetd.check import run_check
from poolinetd.config import includes, overlap, resolve
from poolinetd.config.spec import Endpoint, Options
from poolinetd.observe import log

ECHO = f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal echo\n"
HANG_GUARD = 60.0  # seconds; the old code never returned at all


def check_cli(conf: Path | str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "poolinetd", "check", "-c", str(conf)],
                          capture_output=True, text=True, timeout=HANG_GUARD, env=env, cwd=REPO,
                          check=False)


# -- item 6: includes of things that are not regular files -----------------------------------


@pytest.mark.parametrize("kind", ["fifo", "zero", "directory", "socket", "fifo-glob"])
def test_include_of_a_non_regular_file_is_an_error_at_the_include_line(tmp_path: Path,
                                                                       kind: str) -> None:
    target: str
    if kind.startswith("fifo"):
        os.mkfifo(tmp_path / "pipe.conf")
        target = "pipe.conf" if kind == "fifo" else "*.conf"
    elif kind == "zero":
        target = "/dev/zero"
    elif kind == "directory":
        (tmp_path / "d.conf").mkdir()
        target = "d.conf"
    else:
        import socket

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_path / "s.conf"))
        sock.close()
        target = "s.conf"
    main = tmp_path / "main.cf"
    main.write_text(f"echo stream tcp nowait root internal\n.include {target}\n")
    result = check_cli(main)
    assert result.returncode == 78
    assert f"{main}:2: field 2 " in result.stderr and "not a regular file" in result.stderr


@pytest.mark.process
def test_fifo_given_as_the_config_does_not_hang_check_or_the_master(tmp_path: Path) -> None:
    fifo = tmp_path / "inetd.conf"
    os.mkfifo(fifo)
    result = check_cli(fifo)
    assert result.returncode == 78 and "a FIFO, not a regular file" in result.stderr
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "poolinetd", "run", "-c", str(fifo),
                          "--no-control"], capture_output=True, text=True, timeout=HANG_GUARD,
                         env=env, cwd=REPO, check=False)
    assert run.returncode == 78 and "a FIFO" in run.stderr


def test_oversized_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "big.conf"
    with open(big, "wb") as fh:
        fh.truncate(includes.DEFAULT_LIMITS.file_bytes + 1)  # sparse: costs no disk
    main = tmp_path / "main.cf"
    main.write_text(".include big.conf\n")
    loaded = resolve.load_file(str(main), Options(), fake_lookups())
    (err,) = loaded.errors
    assert (err.source, err.lineno) == (str(main), 1) and "larger than" in err.message
    direct = resolve.load_file(str(big), Options(), fake_lookups())
    assert "larger than" in direct.errors[0].message


@pytest.mark.process
@pytest.mark.parametrize("mode", ["pool", "classic"])
def test_reload_onto_a_fifo_include_keeps_serving(tmp_path: Path, serve, mode: str) -> None:
    server = serve(ECHO, mode=mode)
    port = server.port()
    os.mkfifo(tmp_path / "pipe.conf")
    server.conf.write_text(ECHO + f".include {tmp_path / 'pipe.conf'}\n")
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload_failed" in server.log(), timeout=30, what="reload refused")
    assert "a FIFO" in server.log()
    assert tcp_exchange(port, b"still here") == b"still here"
    assert server.status()["ok"] is True


# -- item 7: include fan-out and work bounds -------------------------------------------------


def _fan_out(tmp_path: Path, depth: int, width: int) -> Path:
    for level in range(depth):
        lines = [f"{7000 + level} stream tcp nowait root internal echo"]
        if level + 1 < depth:
            lines += [f".include f{level + 1}.conf"] * width
        (tmp_path / f"f{level}.conf").write_text("\n".join(lines) + "\n")
    return tmp_path / "f0.conf"


def test_exponential_include_fan_out_reads_each_file_once(tmp_path: Path) -> None:
    main = _fan_out(tmp_path, depth=6, width=10)
    loaded = resolve.load_file(str(main), Options(), fake_lookups())
    assert loaded.ok
    assert sorted(s.key.endpoints[0].port for s in loaded.services) == list(range(7000, 7006))
    repeats = [w for w in loaded.warnings if "already included" in w.message]
    assert len(repeats) == 5 * 9  # every repeat named, at its own .include line
    assert check_cli(main).returncode == 0


def test_include_cycle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text(".include b.conf\n")
    (tmp_path / "b.conf").write_text(".include a.conf\necho stream tcp nowait root internal\n")
    loaded = resolve.load_file(str(tmp_path / "a.conf"), Options(), fake_lookups())
    (err,) = loaded.errors
    assert err.source == str(tmp_path / "b.conf") and "include cycle" in err.message


def test_too_many_included_files_is_an_error(tmp_path: Path) -> None:
    limit = includes.DEFAULT_LIMITS.files
    d = tmp_path / "d"
    d.mkdir()
    for i in range(limit + 1):
        (d / f"{i:05d}.conf").write_text("# nothing\n")
    main = tmp_path / "main.cf"
    main.write_text('.include "d/*.conf"\n')
    loaded = resolve.load_file(str(main), Options(), fake_lookups())
    (err,) = loaded.errors
    assert err.lineno == 1 and f"more than {limit} files" in err.message


def test_deep_nesting_is_an_error(tmp_path: Path) -> None:
    depth = includes.DEFAULT_LIMITS.depth + 3
    for level in range(depth):
        (tmp_path / f"n{level}.conf").write_text(f".include n{level + 1}.conf\n")
    (tmp_path / f"n{depth}.conf").write_text("echo stream tcp nowait root internal\n")
    loaded = resolve.load_file(str(tmp_path / "n0.conf"), Options(), fake_lookups())
    assert any("nesting too deep" in e.message for e in loaded.errors)


def test_entry_and_byte_bounds(tmp_path: Path) -> None:
    (tmp_path / "many.conf").write_text(
        "".join(f"{7000 + i} stream tcp nowait root internal echo\n" for i in range(20)))
    main = tmp_path / "main.cf"
    main.write_text("echo stream tcp nowait root internal\n.include many.conf\n")
    parsed = includes.load_path(str(main), includes.LoadLimits(entries=10))
    assert [d.message for d in parsed.errors] == ["more than 10 entries in all"]
    assert parsed.errors[0].lineno == 2
    parsed = includes.load_path(str(main), includes.LoadLimits(total_bytes=100))
    assert any("exceed 100 bytes in all" in d.message for d in parsed.errors)
    parsed = includes.load_path(str(tmp_path / "many.conf"), includes.LoadLimits(entries=5))
    (err,) = parsed.errors
    assert err.lineno == 6 and not parsed.specs


def test_100000_env_values_in_one_entry() -> None:
    n = 100_000
    env = " ".join(f"V{i}=x{i}" for i in range(n))
    text = f"7000 on protocol=tcp, wait=no, user=root, exec=/bin/cat, args=cat, env={env};\n"
    loaded = resolve.load_text(text, "env.conf", Options(), fake_lookups())
    assert loaded.ok
    (svc,) = loaded.services
    assert len(svc.env) == n and svc.env[-1] == (f"V{n - 1}", f"x{n - 1}")
    twice = resolve.load_text(text.replace("V1=x1 ", "V1=x1 V1=y "), "env.conf", Options(),
                              fake_lookups())
    assert [e.message for e in twice.errors] == ["environment variable V1 set twice"]


def test_total_environment_is_bounded() -> None:
    env = " ".join(f"V{i}=x" for i in range(50_000))
    lines = [f"defaults on env={env};"]
    lines += [f"{7000 + i} stream tcp nowait root internal echo" for i in range(60)]
    loaded = resolve.load_text("\n".join(lines) + "\n", "big.conf", Options(), fake_lookups())
    assert any("environments add up to more than" in e.message for e in loaded.errors)


def test_5000_entries_on_one_port_with_different_addresses() -> None:
    # (The load time against the size, up to 20,000 entries, is benchmarks/bench_load.py.)
    n = 5_000
    lines = [f"127.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:7000 stream tcp nowait root "
             "internal echo" for i in range(1, n + 1)]
    lines.append("127.0.0.77:7000 stream tcp nowait root internal echo")  # a duplicate
    lines.append("7000 dgram udp wait root internal echo")  # other transport: no clash
    loaded = resolve.load_text("\n".join(lines) + "\n", "many.conf", Options(), fake_lookups())
    (err,) = loaded.errors
    assert err.lineno == n + 1 and "many.conf:77" in err.message
    assert len(loaded.services) == n + 1


def _naive_duplicates(eps: list[tuple[str, Endpoint]]) -> list[int]:
    """The obvious quadratic rule: index of every endpoint overlapping an earlier kept one."""
    kept: list[tuple[str, Endpoint]] = []
    dropped = []
    for i, (transport, ep) in enumerate(eps):
        if ep.port != 0 and any(t == transport and o.port == ep.port and overlap.overlap(ep, o)
                                for t, o in kept):
            dropped.append(i)
        else:
            kept.append((transport, ep))
    return dropped


def test_v4_mapped_address_overlaps_its_ipv4_address() -> None:
    text = ("127.0.0.2:7 stream tcp nowait root internal echo\n"
            "[::ffff:127.0.0.2]:7 stream tcp46 nowait root internal echo\n"
            "[::ffff:127.0.0.3]:7 stream tcp6 nowait root internal echo\n"
            "127.0.0.3:7 stream tcp nowait root internal echo\n")
    loaded = resolve.load_text(text, "m.conf", Options(), fake_lookups())
    (err,) = loaded.errors  # a v6only socket does not take the IPv4 address
    assert err.lineno == 2 and "m.conf:1" in err.message


def test_indexed_overlap_agrees_with_the_pairwise_rule() -> None:
    rng = random.Random(13)
    addrs4 = ["0.0.0.0", "127.0.0.1", "127.0.0.2"]
    addrs6 = ["::", "::1", "::ffff:127.0.0.1", "::ffff:127.0.0.2"]
    for _ in range(300):
        lines = []
        eps = []
        for _ in range(rng.randint(1, 8)):
            port = rng.choice([0, 7, 9])
            transport = rng.choice(["tcp", "udp"])
            if rng.random() < 0.5:
                addr = rng.choice(addrs4)
                proto = transport
                ep = Endpoint(2, addr, port)
                prefix = addr
            else:
                addr = rng.choice(addrs6)
                dual = rng.random() < 0.5
                proto = transport + ("46" if dual else "6")
                ep = Endpoint(10, addr, port, not dual)
                prefix = f"[{addr}]"
            kind = "stream" if transport == "tcp" else "dgram"
            lines.append(f"{prefix}:{port} {kind} {proto} nowait root /bin/cat c{len(lines)}")
            eps.append((transport, ep))
        loaded = resolve.load_text("\n".join(lines) + "\n", "r.conf", Options(), fake_lookups())
        got = sorted(e.lineno - 1 for e in loaded.errors)
        assert got == _naive_duplicates(eps), lines


# -- item 5: bytes that are not UTF-8 --------------------------------------------------------


LATIN1_ARGV0 = b"7 stream tcp nowait %s /bin/cat caf\xe9\n"


def test_non_utf8_is_rejected_by_check_with_file_line_field(tmp_path: Path) -> None:
    conf = tmp_path / "l1.conf"
    conf.write_bytes(b"# caf\xe9 comments are fine\n" + LATIN1_ARGV0 % TEST_USER.encode())
    out, err = io.StringIO(), io.StringIO()
    assert run_check(str(conf), True, out, err) == 78
    assert f"{conf}:2: field 7 " in err.getvalue() and "0xe9" in err.getvalue()
    assert orjson.loads(out.getvalue())["services"] == []


@pytest.mark.process
@pytest.mark.parametrize("mode", ["pool", "classic"])
def test_master_refuses_non_utf8_at_start_and_on_reload(tmp_path: Path, serve,
                                                        mode: str) -> None:
    bad = (LATIN1_ARGV0 % TEST_USER.encode()).replace(b"7 stream", b"127.0.0.1:0 stream")
    conf = tmp_path / "bad.conf"
    conf.write_bytes(bad)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rfd, wfd = os.pipe()
    try:
        run = subprocess.run([sys.executable, "-m", "poolinetd", "run", "-c", str(conf),
                              "--mode", mode, "--no-control", "--log-format", "json",
                              "--ready-fd", str(wfd)], pass_fds=(wfd,), capture_output=True,
                             text=True, timeout=HANG_GUARD, env=env, cwd=REPO, check=False)
    finally:
        os.close(rfd)
        os.close(wfd)
    assert run.returncode == 78, run.stderr
    lines = [orjson.loads(line) for line in run.stderr.splitlines()]  # every line valid JSON
    assert any("not UTF-8" in str(doc.get("message")) for doc in lines)

    server = serve(ECHO, "--log-format", "json", mode=mode)
    port = server.port()
    server.conf.write_bytes(ECHO.encode() + bad.replace(b"127.0.0.1:0", b"127.0.0.1:1"))
    server.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload_failed" in server.log(), timeout=30, what="reload refused")
    assert tcp_exchange(port, b"ok") == b"ok"
    status = server.status()
    assert status["ok"] is True
    for line in server.log().splitlines():
        orjson.loads(line)


def test_json_log_never_raises_on_any_str() -> None:
    stream = io.StringIO()
    log.setup("json", 10, stream=stream)
    try:
        log.info("odd", service="x\udcff/tcp", lone="\ud800", nested={"k\udce9": ["\udfff"]},
                 big=2**80, obj=object())
        log.setup("text", 10, stream=stream)
        log.info("odd", service="x\udcff/tcp")
    finally:
        log.setup("text", 20)
    first, second = stream.getvalue().splitlines()
    doc = orjson.loads(first)
    assert doc["service"] == "x\\xff/tcp" and doc["lone"] == "\\ud800"
    assert doc["nested"] == {"k\\xe9": ["\\udfff"]} and doc["big"] == str(2**80)
    assert "service=x\\xff/tcp" in second
    assert orjson.loads(log.json_bytes({"a": "\udc80"})) == {"a": "\\x80"}
