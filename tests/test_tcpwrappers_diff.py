"""Differential tests: poolinetd's hosts_access(5) against the real ``tcpdmatch``.

Hypothesis writes a hosts.allow and a hosts.deny from the grammar libwrap
reads (daemon lists, ``daemon@host``, client patterns, nested EXCEPT,
options allow/deny and others, comments, continuations, a missing final
newline) and asks both ``tcpdmatch -d DAEMON CLIENT`` (run in the files'
directory) and ``tcpwrappers.decide`` about a few clients: the answers must
be the same every time.

The clients avoid the DNS: tcpdmatch looks up no name for a client given as
an address (its name is ``unknown``), and ``localhost`` comes from /etc/hosts
(127.0.0.1). ``/file`` patterns name a file the test writes.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tests.hypothesis_profiles  # noqa: F401  (applies the profile)
from poolinetd.admission import tcpwrappers as tw
from poolinetd.admission.tcpwrappers_files import pattern_tokens

TCPDMATCH = shutil.which("tcpdmatch") or "/usr/sbin/tcpdmatch"
pytestmark = pytest.mark.skipif(not os.access(TCPDMATCH, os.X_OK),
                                reason="tcpdmatch (package tcpd) is not installed")

V4 = ["10.0.0.1", "10.0.1.2", "10.1.2.3", "192.168.1.10", "127.0.0.1", "127.0.0.2",
      "172.16.5.4", "8.8.4.4"]
V6 = ["::1", "2001:db8::1", "2001:db8:1::5", "2001:db8::ff00:1"]
DAEMONS = ["in.fingerd", "echo", "daytime", "in.tftpd"]
SERVERS = ["127.0.0.1", "10.0.0.1", "192.168.1.1"]
BAD_MASKS = ["x", "", "255.255.255.255", "1.2.3", "8x", "+8", "-8", "08", "0x8", "8.5",
             "4294967304", "0", "33"]


def _localhost_ok() -> bool:
    try:
        return socket.gethostbyname("localhost") == "127.0.0.1"
    except OSError:
        return False


def _v4_pattern(draw: st.DrawFn) -> str:
    addr = draw(st.sampled_from(V4 + SERVERS))
    octets = addr.split(".")
    kind = draw(st.sampled_from(["exact", "prefix", "mask", "len", "suffix", "wild",
                                 "octal", "badmask"]))
    if kind == "exact":
        return addr
    if kind == "prefix":
        return ".".join(octets[:draw(st.integers(1, 3))]) + "."
    if kind in ("mask", "len", "badmask"):
        bits = draw(st.integers(0, 33))
        value = int(ipaddress.IPv4Address(addr))
        mask = (0xFFFFFFFF << (32 - min(bits, 32))) & 0xFFFFFFFF
        net = value & mask if draw(st.booleans()) else value
        net_s = str(ipaddress.IPv4Address(net))
        if kind == "len":
            return f"{net_s}/{bits}"
        if kind == "badmask":
            return f"{net_s}/{draw(st.sampled_from(BAD_MASKS))}"
        return f"{net_s}/{ipaddress.IPv4Address(mask)}"
    if kind == "suffix":
        return "." + ".".join(octets[draw(st.integers(1, 3)):])
    if kind == "octal":
        return ".".join(f"0{int(o):o}" if draw(st.booleans()) else o for o in octets)
    chars = list(addr)
    for _ in range(draw(st.integers(1, 3))):
        chars[draw(st.integers(0, len(chars) - 1))] = draw(st.sampled_from("*?"))
    return "".join(chars)


def _v6_pattern(draw: st.DrawFn) -> str:
    addr = draw(st.sampled_from(V6))
    if draw(st.booleans()):
        return f"[{addr}]"
    bits = draw(st.integers(0, 129))
    value = int(ipaddress.IPv6Address(addr))
    net = value & ~((1 << (128 - min(bits, 128))) - 1) if draw(st.booleans()) else value
    return f"[{ipaddress.IPv6Address(net)}]/{bits}"


@st.composite
def client_pattern(draw: st.DrawFn, file_path: str) -> str:
    kind = draw(st.sampled_from(["v4", "v4", "v4", "v6", "word", "name", "file", "user"]))
    if kind == "v4":
        return _v4_pattern(draw)
    if kind == "v6":
        return _v6_pattern(draw)
    if kind == "word":
        return draw(st.sampled_from(["ALL", "LOCAL", "KNOWN", "UNKNOWN", "PARANOID", "all",
                                     "unknown", "@netgroup"]))
    if kind == "name":
        return draw(st.sampled_from(["localhost", "LOCALHOST", ".localhost", "local*",
                                     "l?calhost", "localhost.", "loc.", ".host", "example.org",
                                     "*"]))
    if kind == "file":
        return file_path
    return f"{draw(st.sampled_from(['ALL', 'KNOWN', 'unknown', 'root']))}@" + draw(
        st.sampled_from(["ALL", "127.0.0.1", "10.0.0.", "LOCAL"]))


@st.composite
def daemon_pattern(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from([*DAEMONS, "ALL", "in.", "in.*", "*d", "?cho", "ECHO",
                                 ".fingerd", "KNOWN", "tcpd"]))
    if draw(st.integers(0, 4)) == 0:
        base += "@" + draw(st.sampled_from(["127.0.0.1", "127.0.0.", "10.0.0.0/255.0.0.0",
                                            "ALL", "192.168.1.1"]))
    return base


def _list(draw: st.DrawFn, item: st.SearchStrategy[str]) -> str:
    words = draw(st.lists(item, min_size=1, max_size=4))
    while draw(st.integers(0, 3)) == 0:
        words += ["EXCEPT", *draw(st.lists(item, min_size=1, max_size=3))]
    seps = [draw(st.sampled_from([" ", ", ", ",", "\t", " ,  "])) for _ in words]
    return "".join(w + s for w, s in zip(words, seps, strict=True)).rstrip(" ,\t")


OPTIONS = ["", ": allow", ": deny", ": severity auth.info : deny", ": spawn echo %a %h",
           ": setenv X %d : allow", ": bogus", ": allow : deny", ": severity nope",
           ": twist /bin/echo %a", ": deny\\: x", ":", ": keepalive : allow"]


@st.composite
def rule_file(draw: st.DrawFn, file_path: str) -> str:
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            lines.append(draw(st.sampled_from(["# a comment: ALL", "", "   ", "ALL",
                                               " # indented: ALL"])))
            continue
        daemons = _list(draw, daemon_pattern())
        clients = _list(draw, client_pattern(file_path))
        line = f"{daemons}: {clients}{draw(st.sampled_from(OPTIONS))}"
        if kind == 1 and " " in line:  # a continuation at a blank
            cut = line.index(" ")
            line = line[:cut] + "\\\n" + line[cut:]
        lines.append(line)
    text = "\n".join(lines)
    return text + ("\n" if draw(st.integers(0, 7)) else "")


@st.composite
def query(draw: st.DrawFn) -> tuple[str, str]:
    daemon = draw(st.sampled_from([*DAEMONS, "ECHO"]))
    if draw(st.integers(0, 3)) == 0:
        daemon += "@" + draw(st.sampled_from(SERVERS))
    client = draw(st.sampled_from(V4 + V6 + ["localhost"]))
    return daemon, client


def tcpdmatch(cwd: str, daemon: str, client: str) -> str:
    """tcpdmatch's verdict: "granted", "denied" or "delegated" (twist)."""
    out = subprocess.run([TCPDMATCH, "-d", daemon, client], cwd=cwd, capture_output=True,
                         text=True, timeout=30)
    verdicts = [line.split()[-1] for line in out.stdout.splitlines()
                if line.startswith("access:")]
    assert len(verdicts) == 1, (out.stdout, out.stderr)
    assert verdicts[0] in ("granted", "denied", "delegated"), out.stdout
    return verdicts[0]


def ours(allow: str, deny: str, daemon: str, client: str, files: dict[str, str]) -> str:
    """Our verdict in tcpdmatch's words."""
    process, _, server = daemon.partition("@")
    name: str = tw.UNKNOWN
    if client == "localhost":
        client, name = "127.0.0.1", "localhost"
    table_files = {path: pattern_tokens(text) for path, text in files.items()}
    got = tw.decide(tw.parse(allow, "hosts.allow"), tw.parse(deny, "hosts.deny"),
                    tw.Request(process, client, server, name, table_files))
    assert isinstance(got, tw.Verdict)
    if not got.error and any(opt.name == "twist" for opt in got.options):
        return "delegated"
    return "granted" if got.allowed else "denied"


@pytest.fixture(scope="module")
def workdir() -> str:
    with tempfile.TemporaryDirectory(prefix="tcpw-diff-") as d:
        yield d  # type: ignore[misc]


FILE_TEXT = st.lists(st.sampled_from(["10.0.0.1", "127.0.0.", "# 10.1.2.3", "#10.0.0.1",
                                      "localhost", "[::1]", "192.168.0.0/255.255.0.0", "LOCAL",
                                      "10.0.1.2,10.1.2.3", "EXCEPT 10.0.0.1", "\t.0.1 "]),
                     max_size=4).map(lambda xs: "".join(x + "\n" for x in xs))


@pytest.mark.skipif(not _localhost_ok(), reason="localhost is not 127.0.0.1 here")
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_decisions_match_tcpdmatch(workdir: str, data: st.DataObject) -> None:
    file_path = os.path.join(workdir, "clients.list")
    allow = data.draw(rule_file(file_path), "hosts.allow")
    deny = data.draw(rule_file(file_path), "hosts.deny")
    listed = data.draw(FILE_TEXT, "clients.list")
    Path(workdir, "hosts.allow").write_text(allow, encoding="latin-1")
    Path(workdir, "hosts.deny").write_text(deny, encoding="latin-1")
    Path(file_path).write_text(listed)
    for daemon, client in data.draw(st.lists(query(), min_size=1, max_size=6), "queries"):
        want = tcpdmatch(workdir, daemon, client)
        got = ours(allow, deny, daemon, client, {file_path: listed})
        assert got == want, (daemon, client, allow, deny, listed)


@pytest.mark.parametrize(("allow", "deny", "daemon", "client", "granted"), [
    ("in.fingerd: ALL", "ALL: ALL\n", "in.fingerd", "10.0.0.1", "denied"),  # no final newline
    ("", "echo: ALL", "in.fingerd", "10.0.0.1", "denied"),  # hosts.deny broken: denied
    ("", "in.fingerd: ALL: twist /bin/echo %a\n", "in.fingerd", "10.0.0.1", "delegated"),
    ("in.fingerd: 10.0.0.2 # 10.0.0.1\n", "ALL: ALL\n", "in.fingerd", "10.0.0.1", "granted"),
    ("in.fingerd: 10.0.0.1/8\n", "ALL: ALL\n", "in.fingerd", "10.0.0.1", "denied"),
    ("in.fingerd: 10.0.0.0/8\n", "ALL: ALL\n", "in.fingerd", "10.0.0.1", "granted"),
    ("in.fingerd: 0.0.0.0/0\n", "ALL: ALL\n", "in.fingerd", "10.0.0.1", "denied"),
    ("in.fingerd: ::1\n", "ALL: ALL\n", "in.fingerd", "::1", "denied"),  # ":" splits fields
    ("in.fingerd: [::1]\n", "ALL: ALL\n", "in.fingerd", "0::1", "granted"),
    ("# c \\\nin.fingerd: ALL\n", "ALL: ALL\n", "in.fingerd", "10.0.0.1", "denied"),
    ("in.fingerd: ALL: allow: deny\n", "", "in.fingerd", "10.0.0.1", "denied"),
    ("in.fingerd: ALL EXCEPT 10.0.0. EXCEPT 10.0.0.1\n", "ALL: ALL\n", "in.fingerd",
     "10.0.0.1", "granted"),
    ("in.fingerd: UNKNOWN\n", "ALL: ALL\n", "in.fingerd", "10.0.0.1", "granted"),
    ("in.fingerd: KNOWN\n", "ALL: ALL\n", "in.fingerd", "localhost", "granted"),
    ("?CHO: ALL\n", "ALL: ALL\n", "echo", "10.0.0.1", "granted"),  # wildcards ignore case
    ("ALL: 0.0.0.0/1.2.3\n", "ALL: ALL\n", "echo", "10.0.0.1", "granted"),  # /1, the rest
    ("ALL: 10.0.0.0/4294967304\n", "ALL: ALL\n", "echo", "10.0.0.1", "granted"),  # an int
])
def test_known_cases(workdir: str, allow: str, deny: str, daemon: str, client: str,
                     granted: str) -> None:
    Path(workdir, "hosts.allow").write_text(allow)
    Path(workdir, "hosts.deny").write_text(deny)
    assert tcpdmatch(workdir, daemon, client) == granted
    assert ours(allow, deny, daemon, client, {}) == granted
