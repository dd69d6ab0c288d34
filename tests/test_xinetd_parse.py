"""xinetd.conf(5) files: statements, what each attribute maps to or why not, defaults,
includes, and the format told from the content (poolinetd.config.xinetd_*)."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import pytest
from config_fakes import fake_lookups
from config_helpers import errors, load, only, warnings

from poolinetd.admission.policy import Admission
from poolinetd.config import includes, xinetd_attrs, xinetd_lexer, xinetd_map
from poolinetd.config.resolve import load_file
from poolinetd.config.spec import RLIM_UNLIMITED, Protocol, Severity, SocketType
from poolinetd.config.xinetd_lexer import Block, Directive, lex, looks_like_xinetd
from poolinetd.net import netmatch

ECHO = """service echo
{
\ttype = INTERNAL
\tid = echo-stream
\tsocket_type = stream
\tprotocol = tcp
\tuser = root
\twait = no
}
"""


def block(body: str, name: str = "mysqlchk", head: str = "") -> str:
    """A service block around ``body`` (one attribute per line)."""
    return f"{head}service {name}\n{{\n{body}}}\n"


PROGRAM = """\tsocket_type = stream
\tport = 9200
\ttype = UNLISTED
\twait = no
\tuser = nobody
\tserver = /bin/cat
"""


# -- statements ----------------------------------------------------------------------------


def test_lex_blocks_and_directives_in_order() -> None:
    text = "# c\ndefaults\n{\n  instances = 60\n}\n\n" + ECHO + "includedir /etc/xinetd.d\n"
    lexed = lex(text, "x.conf")
    assert lexed.diagnostics == ()
    kinds = [(type(i).__name__, getattr(i, "kind", "")) for i in lexed.items]
    assert kinds == [("Block", "defaults"), ("Block", "service"), ("Directive", "includedir")]
    echo = lexed.items[1]
    assert isinstance(echo, Block) and echo.name == "echo" and echo.lineno == 7
    assert [(a.name, a.op, a.values) for a in echo.attrs][:2] == [
        ("type", "=", ("INTERNAL",)), ("id", "=", ("echo-stream",))]
    directive = lexed.items[2]
    assert isinstance(directive, Directive) and directive.path == "/etc/xinetd.d"


def test_lex_operators_and_unspaced_equals() -> None:
    lexed = lex("service a\n{\nonly_from+=10.0.0.1\nno_access -= 1.2.3.4 5.6.7.8\n"
                "disable=yes\n}\n", "x")
    attrs = lexed.items[0].attrs  # type: ignore[union-attr]
    assert [(a.name, a.op, a.values) for a in attrs] == [
        ("only_from", "+=", ("10.0.0.1",)), ("no_access", "-=", ("1.2.3.4", "5.6.7.8")),
        ("disable", "=", ("yes",))]


@pytest.mark.parametrize("text,message", [
    ("service a\n{\nwait = no\n", "x:1: 'service a': service a is not closed: the file ends"),
    ("service a\nwait = no\n", "x:1: 'service a': service a is not followed by {"),
    ("wait = no\n", "x:1: 'wait': expected service NAME, defaults, include or includedir"),
    ("service a\n{\nwait no\n}\n", "x:3: 'wait': expected ATTRIBUTE = VALUE inside service a"),
    ("service\n{\n}\n", "x:1: 'service': service takes one name"),
    ("include\n", "x:1: 'include': include takes one path"),
    ("service a\n{\nservice b\n{\n}\n", "x:1: 'service a': service a is not closed before "
     "line 3"),
])
def test_lex_errors_name_file_line_and_what(text: str, message: str) -> None:
    shown = [str(d) for d in lex(text, "x").diagnostics]
    assert any(s.startswith(message) for s in shown), shown


def test_brace_on_the_head_line_is_read_with_a_warning() -> None:
    lexed = lex("service a {\nwait = no\n}\n", "x")
    assert len(lexed.items) == 1
    assert [d.severity for d in lexed.diagnostics] == [Severity.WARNING]


def test_a_block_with_a_bad_line_yields_nothing() -> None:
    lexed = lex("service a\n{\n?? what\n}\n" + ECHO, "x")
    assert [i.name for i in lexed.items if isinstance(i, Block)] == ["echo"]


@pytest.mark.parametrize("text,xinetd", [
    (ECHO, True),
    ("# comment\n\n  defaults\n{\n}\n", True),
    ("includedir /etc/xinetd.d\n", True),
    ("include /etc/xinetd.conf.local\n", True),
    ("service a {\n}\n", True),
    ("echo stream tcp nowait root internal\n", False),
    ("defaults on max_child=5;\n", False),
    ("127.0.0.1:\n", False),
    (".include inetd.d/*.conf\n", False),
    ("", False),
    ("service echo stream tcp nowait root internal\n", False),
])
def test_format_is_told_from_the_first_statement(text: str, xinetd: bool) -> None:
    assert looks_like_xinetd(text) is xinetd


# -- attributes ----------------------------------------------------------------------------


def test_debian_echo_internal_maps_to_the_builtins() -> None:
    svc = only(ECHO)
    assert svc.internal == "echo" and svc.name == "echo/tcp" and not svc.wait
    assert svc.spec.socket_type is SocketType.STREAM and svc.spec.protocol is Protocol.TCP


def test_program_service_unlisted_port_argv_and_limits() -> None:
    svc = only(block(PROGRAM + "\tserver_args = -u x\n\tgroup = nogroup\n\tinstances = 7\n"
                             "\tper_source = 2\n\tbind = 127.0.0.1\n\tenv = A=1 B=two\n"))
    assert svc.program == "/bin/cat" and svc.argv == ("cat", "-u", "x")
    assert [(e.address, e.port) for e in svc.key.endpoints] == [("127.0.0.1", 9200)]
    assert svc.limits.max_child == 7 and svc.limits.max_child_per_ip == 2
    assert svc.gid == 65534 and dict(svc.env)["B"] == "two"


def test_nameinargs_takes_argv_from_server_args() -> None:
    svc = only(block(PROGRAM + "\tflags = NAMEINARGS REUSE\n\tserver_args = in.x -l\n"))
    assert svc.argv == ("in.x", "-l")


@pytest.mark.parametrize("extra,protocol", [
    ("", Protocol.TCP),
    ("\tflags = IPv4\n", Protocol.TCP),
    ("\tflags = IPv6\n", Protocol.TCP46),
    ("\tflags = IPv6\n\tv6only = yes\n", Protocol.TCP6),
    ("\tbind = ::1\n", Protocol.TCP46),
])
def test_family_from_flags_bind_and_v6only(extra: str, protocol: Protocol) -> None:
    assert only(block(PROGRAM + extra)).spec.protocol is protocol


@pytest.mark.parametrize("word,networks", [
    ("10.0.0.0", ["10.0.0.0/8"]),
    ("192.168.1.0", ["192.168.1.0/24"]),
    ("0.0.0.0", ["0.0.0.0/0"]),
    ("127.0.0.1", ["127.0.0.1/32"]),
    ("10.0.{1,2,3}", ["10.0.1.0/24", "10.0.2.0/24", "10.0.3.0/24"]),
    ("10.{7}", ["10.7.0.0/16"]),
    ("1.2.3.{4,5}", ["1.2.3.4/32", "1.2.3.5/32"]),
    ("10.1.2.3/8", ["10.0.0.0/8"]),
    ("2001:db8::/32", ["2001:db8::/32"]),
    ("::1", ["::1/128"]),
])
def test_xinetd_address_forms(word: str, networks: list[str]) -> None:
    got = xinetd_attrs.xinetd_networks(word)
    assert not isinstance(got, str)
    assert [str(n) for n in got] == networks


@pytest.mark.parametrize("word,hostname", [
    ("localhost", True), (".example.com", True), ("host-1.example.com", True),
    ("10.0.{1,300}", False), ("1.2.3.4.{5}", False), ("10.0.0.1/40", False), ("a b", False),
])
def test_xinetd_address_errors(word: str, hostname: bool) -> None:
    got = xinetd_attrs.xinetd_networks(word)
    assert isinstance(got, str) and (got == "") is hostname


def test_factorized_with_blanks_inside_the_braces() -> None:
    svc = only(block(PROGRAM + "\tonly_from = 10.0.{1, 2} 127.0.0.1\n"))
    assert [str(n) for n in svc.only_from.networks] == [
        "10.0.1.0/24", "10.0.2.0/24", "127.0.0.1/32"]


def test_access_lists_both_matching_refuse_as_xinetd_2_3_does() -> None:
    svc = only(block(PROGRAM + "\tonly_from = 127.0.0.2\n\tno_access = 127.0.0.0\n"))
    assert not netmatch.decide(svc.only_from, svc.no_access, "127.0.0.2")
    assert any("allow nobody" in w for w in warnings(
        block(PROGRAM + "\tonly_from = 127.0.0.2 10.0.0.1\n\tno_access = 127.0.0.0\n")))


def test_only_from_without_value_serves_nobody() -> None:
    loaded = load(block(PROGRAM + "\tonly_from =\n"))
    assert loaded.errors == () and loaded.services == ()
    assert any("serves nobody" in str(w) for w in loaded.warnings)


def test_host_names_warn_in_only_from_and_fail_in_no_access() -> None:
    text = block(PROGRAM + "\tonly_from = 127.0.0.1 trusted.example.com\n")
    assert [str(n) for n in only(text).only_from.networks] == ["127.0.0.1/32"]
    assert any("host names are not matched" in w for w in warnings(text))
    assert any("host names cannot be matched" in e for e in errors(
        block(PROGRAM + "\tno_access = evil.example.com\n")))
    assert any("names no address" in e for e in errors(
        block(PROGRAM + "\tonly_from = trusted.example.com\n")))


def test_cps_is_a_rate_per_second_with_its_own_rest() -> None:
    svc = only(block(PROGRAM + "\tcps = 25 30\n"))
    assert svc.limits.max_spawn_per_min == 25
    assert (svc.spec.spawn_window, svc.spec.spawn_pause) == (1.0, 30.0)
    inherited = only("defaults\n{\n\tcps = 5 2\n}\n" + block(PROGRAM))
    assert (inherited.limits.max_spawn_per_min, inherited.spec.spawn_pause) == (5, 2.0)
    # Neither sets cps: xinetd 2.3.15's implicit cps = 50 10 (confparse.c service_fill).
    plain = only(block(PROGRAM))
    assert plain.limits.max_spawn_per_min == 50
    assert (plain.spec.spawn_window, plain.spec.spawn_pause) == (1.0, 10.0)
    # A rate of 0 turns the check off, in a service or in defaults.
    for text in (block(PROGRAM + "\tcps = 0 0\n"), "defaults\n{\n\tcps = 0 5\n}\n" +
                 block(PROGRAM)):
        off = only(text)
        assert off.limits.max_spawn_per_min is None and off.spec.spawn_window is None


def test_cps_in_admission_counts_a_second_and_rests_m_seconds() -> None:
    admission = Admission(only(block(PROGRAM + "\tcps = 2 5\n")))
    assert [admission.check_start(t) for t in (0.0, 0.1)] == ["", ""]
    assert admission.check_start(0.2) == "max_spawn_per_min" and admission.looping
    assert admission.paused_until == pytest.approx(5.2)
    assert admission.check_start(5.1) == "max_spawn_per_min"  # still resting
    assert admission.check_start(5.3) == ""
    assert admission.check_start(6.4) == "" and admission.check_start(6.5) == ""
    # The inetd rule is unchanged: per minute, a 60 s rest.
    inetd = Admission(only("9200 stream tcp nowait nobody /bin/cat cat\n"))
    assert inetd.spawn_window == 60.0 and inetd.spawn_pause == 60.0


def test_unlimited_limits_are_lifted() -> None:
    svc = only(block(PROGRAM + "\tinstances = UNLIMITED\n\tper_source = UNLIMITED\n"))
    assert svc.limits.max_child is None and svc.limits.max_child_per_ip is None
    assert {"max_child", "max_child_per_ip"} <= svc.limits.unlimited


@pytest.mark.parametrize("extra,message", [
    ("\tredirect = 10.0.0.1 80\n", "redirect is not supported"),
    ("\taccess_times = 2:00-8:59\n", "access_times is not supported"),
    ("\tflags = SENSOR\n", "SENSOR"),
    ("\tflags = FROB\n", "unknown flag 'FROB'"),
    ("\ttype = RPC\n", "RPC services are not supported"),
    ("\tfrobnicate = 1\n", "unknown attribute 'frobnicate'"),
    ("\tinstances += 3\n", "instances takes '=' only"),
    ("\tinstances = many\n", "instances must be a number or UNLIMITED"),
    ("\tinstances = 0\n", "instances = 0 serves nobody"),
    ("\tcps = 10\n", "cps takes a rate and a pause"),
    ("\tport = 70000\n", "bad port '70000'"),
    ("\tprotocol = icmp\n", "protocol 'icmp' is not supported"),
    ("\tenv = =x\n", "bad environment entry"),
    ("\tenv -= A\n", "env does not take '-='"),
    ("\twait = maybe\n", "wait must be yes or no"),
    ("\tdisabled = a\n", "disabled belongs in defaults"),
])
def test_attributes_poolinetd_refuses(extra: str, message: str) -> None:
    name = extra.split()[0]
    base = PROGRAM if name == "user" else "".join(
        line for line in PROGRAM.splitlines(True) if line.split()[0] != name)
    shown = errors(block(base + extra))
    assert any(message in e for e in shown), shown
    # Every one names the attribute and its line.
    assert all(re.match(r"/etc/t.conf:\d+: '", e) for e in shown), shown


def test_an_attribute_set_twice_keeps_the_first_with_a_warning() -> None:
    """As xinetd 2.3.15 ("attribute already set", the first value kept): Amanda's example
    files write ``flags = IPv4`` then ``flags = IPv6``."""
    text = block(PROGRAM + "\tuser = root\n\tflags = IPv4\n\tflags = IPv6\n")
    assert errors(text) == []
    shown = warnings(text)
    assert any("'user'" in w and "the first (line" in w for w in shown), shown
    assert any("'flags'" in w for w in shown), shown
    svc = only(text)
    assert svc.spec.user == "nobody" and svc.spec.protocol is Protocol.TCP, svc


@pytest.mark.parametrize("attr", ["log_type = SYSLOG daemon info", "log_on_success += TRAFFIC",
                                  "log_on_failure += USERID", "log_on_failure = FROB",
                                  "passenv = 9BAD", "banner = /x",
                                  "banner_success = /x", "banner_fail = /x", "max_load = 2.5",
                                  "deny_time = 60", "libwrap = svc", "mdns = no",
                                  "groups = no", "flags = INTERCEPT"])
def test_attributes_read_with_a_warning(attr: str) -> None:
    text = block(PROGRAM + f"\t{attr}\n")
    name = attr.split()[0]
    assert errors(text) == []
    shown = warnings(text)
    assert any(f"'{name}'" in w for w in shown), shown


def test_process_and_socket_controls_map_onto_poolinetd_keys() -> None:
    svc = only(block(PROGRAM + "\trlimit_as = 8M\n\trlimit_cpu = 20\n\trlimit_files = 64\n"
                             "\trlimit_stack = UNLIMITED\n\tnice = -5\n\tumask = 027\n"
                             "\tflags = NODELAY KEEPALIVE\n"))
    assert dict(svc.process.rlimits) == {"rlimit_as": 8 << 20, "rlimit_cpu": 20,
                                         "rlimit_files": 64, "rlimit_stack": RLIM_UNLIMITED}
    assert (svc.process.nice, svc.process.umask) == (-5, 0o27)
    assert svc.sockopts.nodelay and svc.sockopts.keepalive
    inherited = only("defaults\n{\n\tumask = 077\n}\n" + block(PROGRAM))
    assert inherited.process.umask == 0o77
    shown = errors(block(PROGRAM + "\tnice = 40\n\trlimit_as = lots\n"))
    assert any("bad nice value '40'" in e for e in shown), shown
    assert any("bad rlimit_as value 'lots'" in e for e in shown), shown
    # A built-in runs no program: resolve says the process controls do not apply.
    assert any("rlimit_cpu ignored: a built-in runs no program" in w
               for w in warnings(ECHO.replace("}", "\trlimit_cpu = 5\n}")))


def test_tcp_wrappers_as_xinetd_applies_libwrap() -> None:
    """Debian's xinetd consults hosts.allow/deny unless NOLIBWRAP, under the program's
    basename or the built-in's name: poolinetd judges stream nowait services so."""
    assert only(block(PROGRAM)).tcp_wrappers == "cat"
    assert only(ECHO).tcp_wrappers == "echo"
    assert only(block(PROGRAM + "\tflags = NOLIBWRAP\n")).tcp_wrappers is None
    dgram = PROGRAM.replace("stream", "dgram").replace("wait = no", "wait = yes")
    assert only(block(dgram)).tcp_wrappers is None
    text = block(PROGRAM + "\tlibwrap = other\n")
    assert only(text).tcp_wrappers is None
    assert any("'libwrap'" in w and "not judged by tcp_wrappers" in w for w in warnings(text))


def test_banner_fail_is_read_at_load_and_attached(tmp_path: Path) -> None:
    banner = tmp_path / "banner"
    banner.write_bytes(b"go away\r\n")
    conf = tmp_path / "x.conf"
    conf.write_text(block(PROGRAM + "\tbanner_fail = banner\n\tonly_from = 10.0.0.1\n"))
    loaded = load_file(str(conf), lookups=fake_lookups())
    assert loaded.errors == () and loaded.warnings == ()
    assert loaded.services[0].spec.banner_fail == b"go away\r\n"
    big = xinetd_map.build(lex(block(PROGRAM + "\tbanner_fail = /big\n"), "x").items,
                           lambda path: b"x" * (xinetd_map.BANNER_MAX + 5))
    assert big.specs[0].banner_fail == b"x" * xinetd_map.BANNER_MAX
    assert any("cut to" in str(d) for d in big.warnings)
    missing = xinetd_map.build(lex(block(PROGRAM + "\tbanner_fail = /nope\n"), "x").items,
                               lambda path: "No such file or directory")
    assert missing.specs[0].banner_fail is None
    assert any("nothing is sent" in str(d) for d in missing.warnings)
    dgram = PROGRAM.replace("stream", "dgram").replace("wait = no", "wait = yes")
    shown = xinetd_map.build(lex(block(dgram + "\tbanner_fail = /b\n"), "x").items,
                             lambda path: b"b")
    assert shown.specs[0].banner_fail is None
    assert any("datagram" in str(d) for d in shown.warnings)


def test_banner_and_banner_success_are_attached(tmp_path: Path) -> None:
    for name, data in (("hello", b"welcome\r\n"), ("ok", b"granted\r\n")):
        (tmp_path / name).write_bytes(data)
    conf = tmp_path / "x.conf"
    conf.write_text(block(PROGRAM + "\tbanner = hello\n\tbanner_success = " +
                          str(tmp_path / "ok") + "\n"))
    loaded = load_file(str(conf), lookups=fake_lookups())
    assert loaded.errors == () and loaded.warnings == ()
    spec = loaded.services[0].spec
    assert (spec.banner, spec.banner_success, spec.banner_fail) == (
        b"welcome\r\n", b"granted\r\n", None)


def test_a_banner_path_cannot_reach_what_root_alone_may_read(tmp_path: Path) -> None:
    """The master reads banners as root for any client: no symbolic link anywhere on the
    path, no '..', a regular file readable by everyone (xinetd_banner)."""
    from poolinetd.config import xinetd_banner

    secret = tmp_path / "secret"
    secret.write_bytes(b"root only\n")
    secret.chmod(0o600)
    public = tmp_path / "pub"
    public.mkdir()
    (public / "motd").write_bytes(b"hi\n")
    (public / "motd").chmod(0o644)
    (tmp_path / "link").symlink_to(secret)
    (tmp_path / "dirlink").symlink_to(public, target_is_directory=True)
    os.mkfifo(tmp_path / "fifo", 0o644)
    base = str(tmp_path)
    assert xinetd_banner.read("pub/motd", base, 100) == b"hi\n"
    assert xinetd_banner.read(str(public / "motd"), "/elsewhere", 100) == b"hi\n"
    refused = {
        "secret": "not readable by everyone",
        "link": "symbolic link",
        "dirlink/motd": "symbolic link",
        "pub/../pub/motd": "'..'",
        "fifo": "not a regular file",  # (O_NONBLOCK: never waited on)
        "pub": "not a regular file",
        "nope": "No such file",
        "a\0b": "not a usable path",
    }
    for path, why in refused.items():
        got = xinetd_banner.read(path, base, 100)
        assert isinstance(got, str) and why in got, (path, got)
    assert xinetd_banner.read("pub/motd", base, 1) == b"hi"  # at most limit + 1 bytes
    conf = tmp_path / "x.conf"
    conf.write_text(block(PROGRAM + "\tbanner = link\n"))
    loaded = load_file(str(conf), lookups=fake_lookups())
    assert loaded.services[0].spec.banner is None
    assert [d.token for d in loaded.warnings] == ["banner"], loaded.warnings


def test_passenv_passes_the_masters_variables_and_env_wins() -> None:
    text = block(PROGRAM + "\tpassenv = PATH NOPE TZ\n\tenv = TZ=Europe/Paris A=1\n")
    mapped = xinetd_map.build(lex(text, "x").items, environ={"PATH": "/usr/bin", "TZ": "UTC"})
    assert mapped.diagnostics == ()
    assert dict(mapped.specs[0].options.env) == {
        "PATH": "/usr/bin", "TZ": "Europe/Paris", "A": "1"}
    empty = xinetd_map.build(lex(block(PROGRAM + "\tpassenv =\n"), "x").items,
                             environ={"PATH": "/usr/bin"})
    assert empty.diagnostics == () and empty.specs[0].options.env == ()


def test_log_fields_poolinetd_logs_pass_silently_and_defaults_warn_once() -> None:
    quiet = block(PROGRAM + "\tlog_on_success = PID HOST EXIT DURATION\n"
                  "\tlog_on_failure += HOST ATTEMPT\n")
    assert errors(quiet) == [] and warnings(quiet) == []
    two = ("defaults\n{\n\tlog_on_failure = HOST USERID\n}\n" + block(PROGRAM, "a") +
           block(PROGRAM.replace("9200", "9201"), "b"))
    shown = warnings(two)
    assert len(shown) == 1 and "USERID is not logged" in shown[0], shown


def test_instances_refuse_at_the_limit_where_inetd_queues() -> None:
    from poolinetd.config.spec import AtLimit

    assert only(block(PROGRAM + "\tinstances = 2\n")).spec.at_limit is AtLimit.REFUSE
    assert only("9200 stream tcp nowait/2 nobody /bin/cat cat\n").spec.at_limit is (
        AtLimit.BACKLOG)


def test_required_attributes() -> None:
    shown = errors(block("\tserver = /bin/cat\n"))
    for name in ("socket_type", "wait", "user"):
        assert any(f"{name} is required" in e for e in shown), shown
    assert any("server is required" in e for e in errors(block("\tsocket_type = stream\n"
                                                               "\twait = no\n\tuser = root\n")))
    assert any("UNLISTED service needs port" in e for e in errors(
        block(PROGRAM.replace("\tport = 9200\n", ""))))


def test_every_attribute_of_the_man_page_is_classified() -> None:
    """Each attribute xinetd.conf(5) lists is mapped, warned about, refused or defaults-only."""
    listed = {"id", "type", "flags", "socket_type", "protocol", "wait", "user", "group",
              "instances", "nice", "server", "server_args", "libwrap", "only_from",
              "no_access", "access_times", "log_type", "log_on_success", "log_on_failure",
              "rpc_version", "rpc_number", "env", "passenv", "port", "redirect", "bind",
              "interface", "banner", "banner_success", "banner_fail", "per_source", "cps",
              "max_load", "groups", "mdns", "umask", "enabled", "disabled", "rlimit_as",
              "rlimit_files", "rlimit_cpu", "rlimit_data", "rlimit_rss", "rlimit_stack",
              "deny_time", "v6only", "disable"}
    assert all(xinetd_attrs.known(name) for name in listed)


# -- defaults and disabling ------------------------------------------------------------


def test_defaults_lists_accumulate_and_a_service_adds_or_replaces() -> None:
    head = ("defaults\n{\n\tonly_from = 10.0.0.1\n\tonly_from = 10.0.0.2\n"
            "\tinstances = 5\n\tper_source = 3\n}\n")
    inherited = only(head + block(PROGRAM))
    assert [str(n) for n in inherited.only_from.networks] == ["10.0.0.1/32", "10.0.0.2/32"]
    assert inherited.limits.max_child == 5 and inherited.limits.max_child_per_ip == 3
    added = only(head + block(PROGRAM + "\tonly_from += 127.0.0.1\n\tinstances = 9\n"))
    assert len(added.only_from) == 3 and added.limits.max_child == 9
    removed = only(head + block(PROGRAM + "\tonly_from -= 10.0.0.1\n"))
    assert [str(n) for n in removed.only_from.networks] == ["10.0.0.2/32"]
    replaced = only(head + block(PROGRAM + "\tonly_from = 127.0.0.1\n"))
    assert [str(n) for n in replaced.only_from.networks] == ["127.0.0.1/32"]


def test_disable_disabled_and_enabled() -> None:
    two = block(PROGRAM, "a") + block(PROGRAM.replace("9200", "9201"), "b")
    assert [s.spec.service for s in load(two).services] == ["9200", "9201"]
    assert [s.spec.service for s in load(block(PROGRAM + "\tdisable = yes\n", "a")
                                         + block(PROGRAM.replace("9200", "9201"), "b")
                                         ).services] == ["9201"]
    off = "defaults\n{\n\tdisabled = a\n}\n" + two
    assert [s.spec.service for s in load(off).services] == ["9201"]
    on = "defaults\n{\n\tenabled = b\n}\n" + two
    assert [s.spec.service for s in load(on).services] == ["9201"]


def test_a_disabled_service_problems_are_warnings() -> None:
    loaded = load(block("\tdisable = yes\n\tserver = /bin/cat\n"))
    assert loaded.errors == () and loaded.services == ()
    assert any("user is required" in str(w) and "disabled" in str(w) for w in loaded.warnings)


def test_duplicate_ids() -> None:
    assert any("service id 'mysqlchk' is already used" in e
               for e in errors(block(PROGRAM) + block(PROGRAM)))
    ok = load(block(PROGRAM + "\tid = one\n") + block(PROGRAM.replace("9200", "9201")
                                                       + "\tid = two\n"))
    assert ok.errors == () and len(ok.services) == 2


def test_tcpmux_services() -> None:
    text = (block("\ttype = INTERNAL\n\tsocket_type = stream\n\twait = no\n\tuser = root\n",
                  "tcpmux")
            + block("\ttype = TCPMUXPLUS\n\tsocket_type = stream\n\twait = no\n\tuser = root\n"
                    "\tserver = /bin/cat\n", "catmux"))
    loaded = load(text)
    assert loaded.errors == (), [str(d) for d in loaded.errors]
    mux = [s for s in loaded.services if s.tcpmux_name is not None]
    assert [(s.tcpmux_name, s.tcpmux_plus) for s in mux] == [("catmux", True)]


# -- includes ----------------------------------------------------------------------------


def _tree(tmp_path: Path) -> Path:
    conf = tmp_path / "xinetd.conf"
    conf.write_text("defaults\n{\n\tinstances = 4\n}\nincludedir xinetd.d\n")
    d = tmp_path / "xinetd.d"
    d.mkdir()
    for name, port in (("b", 9002), ("a", 9001), ("c.dpkg-old", 9003), ("d~", 9004),
                       ("e.rpmsave", 9005)):
        (d / name).write_text(block(PROGRAM.replace("9200", str(port)), name.split(".")[0]
                                    .rstrip("~")))
    (d / "sub").mkdir()
    return conf


def test_includedir_reads_names_without_dot_or_tilde_in_order(tmp_path: Path) -> None:
    conf = _tree(tmp_path)
    loaded = load_file(str(conf), lookups=fake_lookups())
    assert loaded.errors == (), [str(d) for d in loaded.errors]
    assert [s.spec.service for s in loaded.services] == ["9001", "9002"]
    assert all(s.limits.max_child == 4 for s in loaded.services)


def test_include_cycle_depth_missing_and_twice(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("include b\n" + block(PROGRAM))
    (tmp_path / "b").write_text("include a\n")
    shown = [str(d) for d in includes.load_path(str(tmp_path / "a")).diagnostics]
    assert any("include cycle" in s for s in shown), shown
    (tmp_path / "c").write_text("include nowhere\nincludedir nodir\ninclude d\ninclude d\n")
    (tmp_path / "d").write_text(block(PROGRAM))
    parsed = includes.load_path(str(tmp_path / "c"))
    shown = [str(d) for d in parsed.diagnostics]
    assert any("c:1: 'nowhere': include:" in s and "cannot include" in s for s in shown)
    assert any("c:2: 'nodir': includedir: cannot read directory" in s for s in shown)
    assert any("already included" in s for s in shown)
    assert len(parsed.specs) == 1


def test_include_bounds(tmp_path: Path) -> None:
    for i in range(30):
        (tmp_path / f"f{i}").write_text(f"include f{i + 1}\n")
    limits = includes.LoadLimits(depth=5)
    shown = [str(d) for d in includes.load_path(str(tmp_path / "f0"), limits).diagnostics]
    assert any("nesting too deep" in s for s in shown), shown
    many = tmp_path / "many"
    many.write_text("".join(block(PROGRAM, f"s{i}") for i in range(5)))
    shown = [str(d) for d in includes.load_path(str(many),
                                                includes.LoadLimits(entries=3)).diagnostics]
    assert any("more than 3 services" in s for s in shown), shown


def test_a_fifo_in_includedir_is_never_waited_on(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.mkfifo(d / "pipe")
    (tmp_path / "x").write_text("includedir d\n")
    parsed = includes.load_path(str(tmp_path / "x"))
    assert parsed.errors == () and parsed.specs == ()


def test_not_utf8_line_drops_its_block(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(block(PROGRAM + "\tserver_args = \xff\n").encode("latin-1")
                     + block(PROGRAM.replace("9200", "9201"), "ok").encode())
    parsed = includes.load_path(str(path))
    assert [s.service for s in parsed.specs] == ["9201"]
    assert any("not UTF-8" in str(d) for d in parsed.errors)


def test_lex_and_map_are_total_on_a_pathological_text() -> None:
    text = "service \x00\n{\n" + "a" * 100_000 + " = {{{\n}\n" + "\ud800 = 1\n"
    lexed = xinetd_lexer.lex(text, "x")
    blocks = [i for i in lexed.items if isinstance(i, Block)]
    xinetd_map.build(blocks)


def test_debian_man_page_attributes_when_available() -> None:
    """Every attribute and flag Debian's xinetd.conf(5) describes is classified (when the
    package is installed: .ci/install-distro-programs installs it)."""
    man = Path("/usr/share/man/man5/xinetd.conf.5.gz")
    if not man.exists():
        pytest.skip("xinetd's man page is not installed")
    text = gzip.decompress(man.read_bytes()).decode("utf-8", "replace")
    names = set(re.findall(r"^\.TP[^\n]*\n\.B\s+(\w+)", text, re.M))
    attrs = {n for n in names if n.islower() and len(n) > 1} - {"include", "includedir"}
    assert len(attrs) > 40, attrs
    assert {n for n in attrs if not xinetd_attrs.known(n)} == set()
    log_words = {"ATTEMPT", "DURATION", "EXIT", "FILE", "HOST", "PID", "SYSLOG", "TRAFFIC",
                 "USERID"}
    flags = {n for n in names if not n.islower() and len(n) > 1} - log_words
    known = set(xinetd_attrs.TYPES) | set(xinetd_attrs.FLAGS_DONE) | set(
        xinetd_attrs.FLAGS_SOCKOPTS) | set(
        xinetd_attrs.FLAGS_WARNED) | set(xinetd_attrs.FLAGS_REFUSED)
    assert flags - known == set()
