"""xinetd files (tests/corpus/xinetd, SOURCES.md) load with no error, with the warnings
listed here; ``poolinetd check`` reads them; a reload re-reads the tree.

Debian's package files are real; ``patterns/`` are files of our own in the shapes
real deployments use (SOURCES.md names where those shapes were seen).
"""

from __future__ import annotations

import dataclasses
import io
import socket
from pathlib import Path

import orjson
import pytest
from config_fakes import SERVICES, fake_lookups

from poolinetd.check import run_check
from poolinetd.config.lookups import Lookups, UserEntry
from poolinetd.config.resolve import LoadedConfig, load_file, load_text

CORPUS = Path(__file__).resolve().parent / "corpus" / "xinetd"
DEBIAN = CORPUS / "debian"

# Which attributes each file is warned about (the token of each warning), in order.
EXPECTED_WARNINGS: dict[str, list[str]] = {
    "patterns/monitoring-agent": ["log_on_success"],
    "patterns/ctf-chroot": ["banner_fail", "per_source", "rlimit_cpu"],
    "patterns/ctf-stray-brace": ["}"],
    "patterns/tftp-ipv4": [],
    "patterns/ctf-commented": [],
    "patterns/plugins-prefix": ["log_on_failure", "only_from", "only_from"],
    "patterns/tftp-cps": [],
    "patterns/haproxy-clustercheck": ["log_on_failure"],
    "patterns/ctf-python": ["per_source"],
    "patterns/ctf-env": ["banner_fail", "per_source", "rlimit_cpu"],
    # Debian ships every built-in disabled; two of them name no user, and the -udp files
    # repeat the dgram half of the two-service files (the same id, so one is a duplicate).
    "debian/xinetd.conf": ["id", "id", "id", "id", "user", "user", "id"],
}


def permissive_lookups() -> Lookups:
    """Every user and group exists and every program is executable (the corpus names
    accounts and programs this host has not); ports from the fakes, else /etc/services."""

    def servbyname(name: str, proto: str) -> int:
        ports = SERVICES.get(name)
        if ports is not None and ports[0 if proto == "tcp" else 1] is not None:
            return ports[0 if proto == "tcp" else 1]  # type: ignore[return-value]
        return socket.getservbyname(name, proto)

    return dataclasses.replace(
        fake_lookups(all_programs=True), getservbyname=servbyname,
        getpwnam=lambda name: UserEntry(name, 1000, 1000, "/"), getgrnam=lambda name: 1000)


def load_corpus(name: str) -> LoadedConfig:
    """One corpus file; Debian's xinetd.conf with its includedir pointed at the corpus."""
    path = CORPUS / name
    text = path.read_text()
    if name == "debian/xinetd.conf":
        text = text.replace("includedir /etc/xinetd.d", f"includedir {DEBIAN / 'xinetd.d'}")
    return load_text(text, str(path), lookups=permissive_lookups())


def corpus_files() -> list[str]:
    found = sorted(str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*")
                   if p.is_file() and p.name != "SOURCES.md")
    return [f for f in found if not f.startswith("debian/xinetd.d/")] + ["debian/xinetd.conf"]


def test_every_corpus_file_is_listed() -> None:
    assert sorted(set(corpus_files())) == sorted(EXPECTED_WARNINGS)


@pytest.mark.parametrize("name", sorted(EXPECTED_WARNINGS))
def test_corpus_file_loads_without_error(name: str) -> None:
    loaded = load_corpus(name)
    assert loaded.errors == (), [str(d) for d in loaded.errors]
    assert [d.token for d in loaded.warnings] == EXPECTED_WARNINGS[name], [
        str(d) for d in loaded.warnings]
    for diag in loaded.diagnostics:
        assert diag.lineno > 0 and diag.token and Path(diag.source).exists(), str(diag)


def test_corpus_meaning() -> None:
    """What the real files come to, as xinetd would serve them."""
    mysqlchk = load_corpus("patterns/haproxy-clustercheck").services[0]
    assert mysqlchk.program == "/usr/bin/clustercheck" and mysqlchk.argv == ("clustercheck",)
    assert mysqlchk.key.endpoints[0].port == 9200 and "max_child_per_ip" in (
        mysqlchk.limits.unlimited)
    assert [str(n) for n in mysqlchk.only_from.networks] == ["0.0.0.0/0"]
    agent = load_corpus("patterns/monitoring-agent").services[0]
    assert agent.limits.max_child_per_ip == 3 and agent.key.endpoints[0].port == 6556
    jail = load_corpus("patterns/ctf-chroot").services[0]
    assert jail.argv[:2] == ("chroot", "--userspec=1000:1000")
    assert not jail.limits.given("max_child") and jail.limits.safe_default
    tftp = load_corpus("patterns/tftp-ipv4").services[0]
    assert tftp.wait and tftp.key.endpoints[0].port == 69 and tftp.key.is_udp
    assert load_corpus("patterns/plugins-prefix").services == ()  # serves nobody
    assert load_corpus("debian/xinetd.conf").services == ()  # all disabled


def test_check_reads_xinetd_files_and_says_so_in_json(tmp_path: Path) -> None:
    conf = tmp_path / "xinetd.conf"
    conf.write_text((CORPUS / "patterns" / "ctf-commented").read_text().replace(
        "user = ctf", "user = root").replace("/home/ctf/start.sh", "/bin/cat").replace(
        "port = 31337", "port = 31337\n\tcps = 10 3"))
    out, err = io.StringIO(), io.StringIO()
    assert run_check(str(conf), True, out, err) == 0, err.getvalue()
    doc = orjson.loads(out.getvalue())
    [svc] = doc["services"]
    assert svc["program"] == "/bin/cat" and svc["endpoints"][0]["port"] == 31337
    assert svc["line"] == 1 and svc["source"] == str(conf)
    assert (svc["limits"]["max_spawn_per_min"], svc["spawn_window"], svc["spawn_pause"]) == (
        10, 1.0, 3.0)
    bad = tmp_path / "bad.conf"
    bad.write_text("service x\n{\n\tsocket_type = stream\n\tredirect = 10.0.0.1 80\n}\n")
    out, err = io.StringIO(), io.StringIO()
    assert run_check(str(bad), True, out, err) != 0
    diags = orjson.loads(out.getvalue())["diagnostics"]
    assert {"line": 4, "token": "redirect"}.items() <= next(
        d for d in diags if d["token"] == "redirect").items()


def test_a_reload_reads_the_include_directory_again(tmp_path: Path) -> None:
    """What a reload calls (load_file) sees files added to and removed from includedir."""
    (tmp_path / "xinetd.conf").write_text("includedir xinetd.d\n")
    d = tmp_path / "xinetd.d"
    d.mkdir()
    body = ("service {n}\n{{\n\ttype = INTERNAL UNLISTED\n\tport = {p}\n\tsocket_type = stream"
            "\n\twait = no\n\tuser = root\n}}\n")
    (d / "echo").write_text(body.format(n="echo", p=7001))
    lookups = fake_lookups()

    def ports() -> list[int]:
        loaded = load_file(str(tmp_path / "xinetd.conf"), lookups=lookups)
        assert loaded.errors == ()
        return [s.key.endpoints[0].port for s in loaded.services]

    assert ports() == [7001]
    (d / "discard").write_text(body.format(n="discard", p=7002))
    assert ports() == [7002, 7001]  # C-locale order: discard before echo
    (d / "echo").unlink()
    assert ports() == [7002]
