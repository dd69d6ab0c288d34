"""``poolinetd check``: exit status, diagnostics format, JSON; and the tests/corpus files.

Corpus: tests/corpus/valid/NNN-name.conf has NNN-name.json beside it (the
``check --json`` document with sources shown as the file's basename);
tests/corpus/invalid/NNN-name.conf has NNN-name.err (the diagnostic lines,
same basename rule). Both resolve against config_fakes. Regenerate after a
deliberate change with POOLINETD_REGEN_CORPUS=1 and review the diff.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from config_fakes import fake_lookups

from poolinetd.check import diagnostic_to_dict, run_check, service_to_dict
from poolinetd.config.resolve import load_file
from poolinetd.config.spec import Options

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parent / "corpus"
REGEN = os.environ.get("POOLINETD_REGEN_CORPUS") == "1"

GOOD = "echo stream tcp nowait root internal\ndaytime dgram udp wait root internal\n"
BAD = "echo stream tcp nowait root internal\necho stream tcpx nowait root internal\n#@ x\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inetd.conf"
    path.write_text(text)
    return path


def test_run_check_ok(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    path = write(tmp_path, GOOD)
    assert run_check(str(path), False, out, err) == 0
    assert out.getvalue() == ""
    assert err.getvalue() == f"{path}: OK: 2 service(s), 0 error(s), 0 warning(s)\n"


def test_run_check_errors_exit_78(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    path = write(tmp_path, BAD)
    assert run_check(str(path), False, out, err) == 78
    assert err.getvalue().splitlines() == [
        f"{path}:2: field 3 'tcpx': unknown protocol 'tcpx' "
        "(use one of tcp, tcp4, tcp6, tcp46, udp, udp4, udp6, udp46, unix)",
        f"{path}:3: '#@ x': warning: IPsec policy line ignored "
        "(poolinetd applies no IPsec policy; the entries below it still load)",
        f"{path}: FAILED: 1 service(s), 1 error(s), 1 warning(s)",
    ]


def test_run_check_json(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    path = write(tmp_path, GOOD)
    assert run_check(str(path), True, out, err, Options(pool_max=3)) == 0
    doc = orjson.loads(out.getvalue())
    assert [(s["name"], s["source"], s["line"]) for s in doc["services"]] == [
        ("echo/tcp", str(path), 1), ("daytime/udp", str(path), 2),
    ]  # fmt: skip
    echo = doc["services"][0]
    assert echo["endpoints"] == [
        {"family": "inet", "address": "0.0.0.0", "port": 7, "v6only": True}
    ]
    assert echo["pool"]["pool_max"] == 3 and echo["internal"] == "echo" and echo["uid"] == 0


def test_run_check_unreadable(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run_check(str(tmp_path / "nope.conf"), True, out, err) == 78
    assert "cannot read the file" in err.getvalue()
    assert orjson.loads(out.getvalue())["services"] == []


def test_run_check_survives_undecodable_bytes(tmp_path: Path) -> None:
    path = tmp_path / "bytes.conf"
    path.write_bytes(
        b"x\xff stream tcp nowait root internal\n7007 stream tcp nowait root /bin/cat cat \xff\n"
    )
    out, err = io.StringIO(), io.StringIO()
    assert run_check(str(path), True, out, err) == 78
    text = err.getvalue()
    assert ":1: field 1 " in text and ":2: field 8 " in text and "not UTF-8" in text
    assert "\\udc" not in text  # nothing undecodable reaches the output
    doc = orjson.loads(out.getvalue())
    assert doc["services"] == [] and len(doc["diagnostics"]) == 2


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "poolinetd", "check", *args],
        capture_output=True, text=True, timeout=60, env=env, cwd=REPO, check=False,
    )  # fmt: skip


def test_cli_check_ok_and_json(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    done = run_cli("-c", str(path))
    assert done.returncode == 0, done.stderr
    assert "OK: 2 service(s)" in done.stderr
    done = run_cli("-c", str(path), "--json")
    assert done.returncode == 0, done.stderr
    assert [s["name"] for s in orjson.loads(done.stdout)["services"]] == ["echo/tcp", "daytime/udp"]


def test_cli_check_bad_config_exits_78(tmp_path: Path) -> None:
    done = run_cli("-c", str(write(tmp_path, BAD)))
    assert done.returncode == 78
    assert ":2: field 3 'tcpx': unknown protocol" in done.stderr


# -- corpus --------------------------------------------------------------------------------


def corpus(kind: str) -> list[Path]:
    return sorted((CORPUS / kind).glob("*.conf"))


def relative_doc(path: Path) -> tuple[bytes, str]:
    loaded = load_file(str(path), Options(), fake_lookups())
    name = path.name
    services = []
    for svc in loaded.services:
        entry = service_to_dict(svc)
        entry["source"] = name
        services.append(entry)
    diags = [replace(d, source=name) for d in loaded.diagnostics]
    doc = {
        "source": name,
        "max_connections": loaded.max_connections,
        "max_programs": loaded.max_programs,
        "services": services,
        "diagnostics": [diagnostic_to_dict(d) for d in diags],
    }
    # Messages may name another entry's file (duplicates): show it relative too.
    prefix = str(path.parent) + os.sep
    err_text = "".join(str(d) + "\n" for d in diags).replace(prefix, "")
    data = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode().replace(prefix, "")
    return data.encode() + b"\n", err_text


@pytest.mark.parametrize("path", corpus("valid"), ids=lambda p: p.name)
def test_corpus_valid(path: Path) -> None:
    doc, err_text = relative_doc(path)
    expected = path.with_suffix(".json")
    if REGEN:
        expected.write_bytes(doc)
    assert "error" not in [d["severity"] for d in orjson.loads(doc)["diagnostics"]], err_text
    assert doc == expected.read_bytes()


@pytest.mark.parametrize("path", corpus("invalid"), ids=lambda p: p.name)
def test_corpus_invalid(path: Path) -> None:
    _, err_text = relative_doc(path)
    expected = path.with_suffix(".err")
    if REGEN:
        expected.write_text(err_text)
    assert err_text == expected.read_text()
    assert any(" warning: " not in line for line in err_text.splitlines())


def test_corpus_is_not_empty() -> None:
    assert len(corpus("valid")) >= 5 and len(corpus("invalid")) >= 5


def test_cli_check_json_shows_the_effective_access_and_limit_values(tmp_path: Path) -> None:
    path = write(tmp_path, (
        "defaults on max_connections=5000, source_v4_prefix=24, block_time=10;\n"
        "127.0.0.1:7007 on protocol=tcp, user=root, args=echo, only_from=127.0.0.0/8,\n"
        "    no_access=127.0.0.2, reuseport=yes, proxy_protocol=yes, proxy_from=127.0.0.1;\n"
        "127.0.0.1:7009 stream tcp nowait/0/0/0 root internal discard\n"
        "127.0.0.1:tcpmux stream tcp nowait root internal\n"
        "tcpmux/+Echo stream tcp nowait root internal\n"))
    done = run_cli("-c", str(path), "--json")
    assert done.returncode == 0, done.stderr
    doc = orjson.loads(done.stdout)
    assert (doc["max_connections"], doc["max_programs"]) == (5000, None)
    echo, discard, mux, sub = doc["services"]
    assert echo["only_from"] == ["127.0.0.0/8"] and echo["no_access"] == ["127.0.0.2/32"]
    assert (echo["source_v4_prefix"], echo["source_v6_prefix"]) == (24, 64)
    assert echo["block_time"] == 10.0
    assert (echo["reuseport"], echo["proxy_protocol"], echo["proxy_from"]) == (
        True, True, ["127.0.0.1/32"])
    assert echo["limits"]["max_child_per_ip"] == 16 * 256 // 4  # the safe default
    assert discard["limits"]["max_child_per_ip"] is None
    assert discard["limits"]["unlimited"] == ["max_child", "max_child_per_ip", "max_cpm_per_ip"]
    assert (mux["internal"], mux["endpoints"][0]["port"]) == ("tcpmux", 1)
    assert (sub["name"], sub["tcpmux_name"], sub["tcpmux_plus"], sub["endpoints"]) == (
        "tcpmux/echo", "echo", True, [])
