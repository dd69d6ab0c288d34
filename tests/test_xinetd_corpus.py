"""xinetd files (tests/corpus/xinetd, SOURCES.md) load with the errors and warnings
listed here; ``poolinetd check`` reads them; a reload re-reads the tree; and the real
xinetd, run on each file, says the same about them.

``debian/`` is Debian's xinetd package, ``public/`` real files from public projects
(byte for byte as found; repository, path, commit and licence in SOURCES.md),
``patterns/`` files of our own in the shapes of others.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from config_fakes import SERVICES, fake_lookups

from poolinetd.check import run_check
from poolinetd.config.lookups import Lookups, UserEntry
from poolinetd.config.resolve import LoadedConfig, load_file, load_text
from poolinetd.config.spec import AtLimit

CORPUS = Path(__file__).resolve().parent / "corpus" / "xinetd"
DEBIAN = CORPUS / "debian"
# Where each main file's ``includedir /etc/xinetd.d`` is pointed for the test.
INCLUDEDIRS = {
    "debian/xinetd.conf": DEBIAN / "xinetd.d",
    "public/xinetd-upstream/xinetd.conf": CORPUS / "public" / "xinetd-upstream" / "xinetd.d",
    "public/daas/xinetd.conf.tpl": DEBIAN / "xinetd.d",
}
# Files read through an includedir, not loaded alone.
INCLUDED = ("debian/xinetd.d/", "public/xinetd-upstream/xinetd.d/")

# Which attributes each file is warned about (the token of each warning), in order.
EXPECTED_WARNINGS: dict[str, list[str]] = {
    "patterns/monitoring-agent": [],
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
    # flags written twice: xinetd warns "attribute already set" and keeps the first.
    "public/amanda/xinetd.amandaclient": ["flags"],
    "public/amanda/xinetd.amandaserver": ["flags"],
    "public/checkmk/xinetd.conf": [],
    "public/checkmk/xinetd_caching.conf": [],
    "public/cobbler/tftpd.template": [],
    # Disabled templates with @VARIABLES@ left in: read, warned, not served.
    "public/cups/cups-lpd.xinetd.in": ["server"],
    "public/ndoutils/default-xinetd.in": ["port", "server", "log_on_failure"],
    "public/nrpe/default-xinetd.in": ["port", "server"],
    "public/nsca/nsca.xinetd.in": ["log_on_failure"],
    "public/daas/xinetd.conf.tpl": ["log_type", "id", "id", "id", "id", "user", "user", "id"],
    "public/distcc/distcc": [],
    # "# ..." after a value: xinetd counts the words and ignores both attributes;
    # /etc/banner_fail does not exist here.
    "public/docker-jail-template/ctf.xinetd": ["banner_fail", "per_source", "rlimit_cpu"],
    "public/solidctf/ctf.xinetd": ["per_source"],
    "public/openlaunchd/auth": [],
    "public/openlaunchd/bootps": [],
    "public/openlaunchd/comsat": [],
    "public/openlaunchd/finger": [],
    "public/openlaunchd/ftp": [],
    "public/openlaunchd/telnet": [],
    "public/openlaunchd/tftp": [],
    "public/percona-xtradb-cluster/mysqlchk.sh": ["log_on_failure"],
    "public/rsync/rsync.xinetd": ["log_on_failure"],
    "public/xinetd-upstream/xinetd.conf": ["log_type"],
}
# The errors a file has, where xinetd refuses the service too: (token, why).
EXPECTED_ERRORS: dict[str, list[tuple[str, str]]] = {
    # A cobbler template with its $variables left in: xinetd says "Server $binary is not
    # executable ... DISABLING SERVICE" (and "Unknown user: $user").
    "public/cobbler/tftpd.template": [("server", "is not an absolute path")],
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


def corpus_text(name: str) -> str:
    """A corpus file's text, its ``includedir /etc/xinetd.d`` pointed into the corpus."""
    text = (CORPUS / name).read_text()
    if name in INCLUDEDIRS:
        text = text.replace("includedir /etc/xinetd.d", f"includedir {INCLUDEDIRS[name]}")
    return text


def load_corpus(name: str) -> LoadedConfig:
    return load_text(corpus_text(name), str(CORPUS / name), lookups=permissive_lookups())


def corpus_files() -> list[str]:
    return sorted(str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*")
                  if p.is_file() and p.name != "SOURCES.md"
                  and not str(p.relative_to(CORPUS)).startswith(INCLUDED))


def test_every_corpus_file_is_listed_and_recorded() -> None:
    assert corpus_files() == sorted(EXPECTED_WARNINGS)
    sources = (CORPUS / "SOURCES.md").read_text()
    public = [f for f in corpus_files() if f.startswith("public/")]
    for name in public:  # each public file's row names it, its repository and commit
        assert f"`{name.removeprefix('public/')}`" in sources, name
    repos = set(re.findall(r"github\.com/([\w.-]+/[\w.-]+)", sources))
    files = [p for p in (CORPUS / "public").rglob("*") if p.is_file()]
    assert len(files) >= 25 and len(repos) >= 15, (len(files), sorted(repos))


@pytest.mark.parametrize("name", sorted(EXPECTED_WARNINGS))
def test_corpus_file_loads_as_expected(name: str) -> None:
    loaded = load_corpus(name)
    assert _match_errors(loaded, EXPECTED_ERRORS.get(name, [])), [
        str(d) for d in loaded.errors]
    assert [d.token for d in loaded.warnings] == EXPECTED_WARNINGS[name], [
        str(d) for d in loaded.warnings]
    for diag in loaded.diagnostics:
        assert diag.lineno > 0 and diag.token and Path(diag.source).exists(), str(diag)


def _match_errors(loaded: LoadedConfig, expected: list[tuple[str, str]]) -> bool:
    return len(loaded.errors) == len(expected) and all(
        d.token == token and why in d.message for d, (token, why) in zip(
            loaded.errors, expected, strict=True))


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


def test_public_corpus_meaning() -> None:
    """What some of the public files come to."""
    percona = load_corpus("public/percona-xtradb-cluster/mysqlchk.sh").services[0]
    assert (percona.program, percona.key.endpoints[0].port) == ("/usr/bin/clustercheck", 9200)
    assert "max_child_per_ip" in percona.limits.unlimited
    assert percona.limits.max_spawn_per_min == 50  # xinetd's implicit cps = 50 10
    assert (percona.spec.spawn_window, percona.spec.spawn_pause) == (1.0, 10.0)
    assert percona.spec.at_limit is AtLimit.REFUSE
    amanda = load_corpus("public/amanda/xinetd.amandaserver").services[0]
    assert amanda.spec.protocol.value == "tcp"  # the first flags (IPv4), as xinetd keeps it
    assert amanda.argv == ("amandad", "-auth=bsdtcp", "amdump", "amindexd", "amidxtaped")
    ctf = load_corpus("public/solidctf/ctf.xinetd").services[0]
    assert ctf.spec.addresses == ("0.0.0.0",) and ctf.key.endpoints[0].port == 20000
    agent = load_corpus("public/checkmk/xinetd.conf").services[0]
    assert agent.key.endpoints[0].port == 6556 and agent.user_name == "root"
    nsca = load_corpus("public/nsca/nsca.xinetd.in").services[0]
    assert [str(n) for n in nsca.only_from.networks] == ["127.0.0.1/32"]
    for name in ("public/openlaunchd/tftp", "public/rsync/rsync.xinetd",
                 "public/xinetd-upstream/xinetd.conf"):
        assert load_corpus(name).services == (), name  # shipped disabled


def check_errors(path: str) -> list[tuple[int, str]]:
    """(line, message) of each error ``poolinetd check`` reports in the file at ``path``
    (with this host's accounts and programs)."""
    out, err = io.StringIO(), io.StringIO()
    run_check(path, False, out, err)
    return [(int(n), msg) for n, msg in re.findall(
        r"^" + re.escape(path) + r":(\d+): '[^']*': (?!warning)(.*)$", err.getvalue(), re.M)]


@pytest.mark.parametrize("name", sorted(EXPECTED_WARNINGS))
def test_poolinetd_check_on_each_file(tmp_path: Path, name: str) -> None:
    """``poolinetd check -c FILE`` on each file as it is (its includedir pointed into the
    corpus): its only errors are the file's expected ones and what this host lacks (a
    user, a group or a program the file names: xinetd refuses those too, checked below)."""
    path = tmp_path / "xinetd.conf"
    path.write_text(corpus_text(name))
    expected = EXPECTED_ERRORS.get(name, [])
    for lineno, message in check_errors(str(path)):
        assert _HOST_CHECK.search(message) or any(
            why in message for _, why in expected), (lineno, message)


# -- the same files under the real xinetd -------------------------------------------------

XINETD = shutil.which("xinetd") or "/usr/sbin/xinetd"
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
# What xinetd says because this host lacks the file's accounts and programs (which the
# poolinetd side stands in for with permissive lookups): not about the file itself.
_HOST_ONLY = re.compile(r"Unknown (user|group)|is not executable|Must specify a server|"
                        r"Error parsing attribute (user|group|server) - DISABLING")
_HOST_CHECK = re.compile(r"unknown (user|group)|not found or not executable")
_LINE = re.compile(r"^\S+ xinetd\[\d+\]: (\w+): (.*?)(?: \[file=(.*)\] \[line=(\d+)\])?$")


def xinetd_says(tmp_path: Path, name: str) -> list[tuple[str, str, str, int]]:
    """(level, message, file, line) of what xinetd logs reading corpus file ``name``, in a
    network namespace of its own (nothing it binds is reachable; it stops at once)."""
    conf = tmp_path / "xinetd.conf"
    conf.write_text(corpus_text(name))
    log = tmp_path / "xinetd.log"
    log.write_text("")
    proc = subprocess.Popen(
        [UNSHARE, "--net", XINETD, "-dontfork", "-f", str(conf), "-pidfile",
         str(tmp_path / "pid"), "-filelog", str(log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30.0
        while "Started working" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(30)
    found = []
    for line in log.read_text().splitlines():
        got = _LINE.match(line)
        assert got is not None, line
        level, message, where, lineno = got.groups()
        if level in ("ERROR", "WARNING"):
            found.append((level, message, where or "", int(lineno or 0)))
    return found


@pytest.mark.skipif(not (os.path.exists(XINETD) and os.path.exists(UNSHARE)
                         and os.geteuid() == 0),
                    reason="needs xinetd, unshare and root (a network namespace)")
@pytest.mark.parametrize("name", sorted(EXPECTED_WARNINGS))
def test_xinetd_itself_says_the_same_of_each_file(tmp_path: Path, name: str) -> None:
    """Where poolinetd loads a file without error, xinetd reports nothing wrong with it
    (but what this host lacks); where poolinetd ignores an attribute with too many values
    or written twice, xinetd warns on the same line; where poolinetd refuses a service,
    xinetd disables it on the same line."""
    said = xinetd_says(tmp_path, name)
    loaded = load_corpus(name)
    main = str(tmp_path / "xinetd.conf")

    def lines(pattern: str) -> set[int]:
        return {lineno for _, msg, where, lineno in said
                if re.search(pattern, msg) and where == main}

    about_file = [s for s in said if s[2] and not _HOST_ONLY.search(s[1])]
    # A "}" outside a block: xinetd logs an error and reads on; poolinetd warns.
    braces = {d.lineno for d in loaded.warnings if d.token == "}"}
    assert lines("missing service keyword") == braces, said
    about_file = [s for s in about_file if "missing service keyword" not in s[1]]
    if name.startswith("patterns/plugins-prefix"):  # "failed to parse 127.0.0."
        about_file = [s for s in about_file if "127.0.0." not in s[1]]
    errors = [s for s in about_file if s[0] == "ERROR"]
    assert errors == [] or loaded.errors, said
    ours = [d for d in loaded.warnings if d.source == str(CORPUS / name)]
    assert {d.lineno for d in ours if "takes one value" in d.message} == lines(
        r"expects 1 values"), (said, ours)
    assert {d.lineno for d in ours if "set twice" in d.message} == lines(
        r"attribute already set"), (said, ours)
    refused = lines(r"DISABLING SERVICE|not executable")
    for diag in loaded.errors:
        assert diag.lineno in refused, (str(diag), said)
    # ``poolinetd check`` on the same file, with this host's accounts and programs: it
    # refuses a service xinetd disables here, on the lines xinetd names (a missing user,
    # group or program), and nothing else beyond what the file itself is refused for.
    checked = check_errors(main)
    host = {n for n, msg in checked if _HOST_CHECK.search(msg)}
    if loaded.services and not loaded.errors:  # (xinetd also checks disabled ones, in part)
        theirs = lines(r"Unknown (user|group)|is not executable")
        # (poolinetd names no group once the user is unknown: a subset, never empty alone)
        assert host <= theirs and bool(host) == bool(theirs), (checked, said)


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
    assert svc["at_limit"] == "refuse" and "banner_bytes" not in svc
    banner = tmp_path / "hello"
    banner.write_bytes(b"hello\r\n")
    conf.write_text(conf.read_text().replace("port = 31337", "port = 31337\n\tbanner = hello"))
    out, err = io.StringIO(), io.StringIO()
    assert run_check(str(conf), True, out, err) == 0, err.getvalue()
    [svc] = orjson.loads(out.getvalue())["services"]
    assert svc["banner_bytes"] == {"banner": 7}
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
