"""hosts_access(5) rules (admission/tcpwrappers.py): parsing, decisions, expansions.

The decisions are checked against the real tcpdmatch in test_tcpwrappers_diff.py;
here: diagnostics, name lookups asked for only when needed, options, %
expansions, and a fuzzed parser that never raises.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import tests.hypothesis_profiles  # noqa: F401  (applies the profile)
from poolinetd.admission import tcpwrappers as tw


def decide(allow: str, deny: str = "", daemon: str = "in.fingerd", addr: str = "10.0.0.1",
           name: str | None = None, server: str = "") -> tw.Verdict | str:
    return tw.decide(tw.parse(allow, "/etc/hosts.allow"), tw.parse(deny, "/etc/hosts.deny"),
                     tw.Request(daemon, addr, server, name, {}, pid=42))


def test_default_is_allow_and_first_match_wins() -> None:
    assert decide("") == tw.Verdict(True)
    got = decide("in.fingerd: 10.0.0.1\n", "ALL: ALL\n")
    assert isinstance(got, tw.Verdict) and got.allowed and got.where == "/etc/hosts.allow:1"
    got = decide("echo: ALL\n", "ALL: ALL\n")
    assert isinstance(got, tw.Verdict) and not got.allowed and got.where == "/etc/hosts.deny:1"


def test_name_is_asked_for_only_when_a_pattern_needs_it() -> None:
    # an address pattern matches first: no lookup
    assert isinstance(decide("ALL: 10.0.0.1 .example.org\n"), tw.Verdict)
    assert decide("ALL: 10.0.0.2 .example.org\n") == tw.NEED_NAME
    assert decide("ALL: KNOWN\n") == tw.NEED_NAME
    assert decide("echo: KNOWN\n") != tw.NEED_NAME  # the daemon list fails first
    got = decide("ALL: .example.org\n", "ALL: ALL\n", name="host.example.org")
    assert isinstance(got, tw.Verdict) and got.allowed
    got = decide("ALL: .example.org\n", "ALL: ALL\n", name=tw.UNKNOWN)
    assert isinstance(got, tw.Verdict) and not got.allowed
    got = decide("ALL: PARANOID\n", "", name=tw.PARANOID)
    assert isinstance(got, tw.Verdict) and got.where.endswith(":1")
    got = decide("ALL: KNOWN\n", "ALL: ALL\n", name=tw.PARANOID)
    assert isinstance(got, tw.Verdict) and not got.allowed


def test_diagnostics_carry_file_and_line() -> None:
    table = tw.parse("ok: ALL\nno separator here\nx: y: bogus\nlast: ALL", "/h.allow")
    where = [(d.where, d.message.split(":")[0]) for d in table.diagnostics]
    assert ("/h.allow:2", 'missing "') in where
    assert any(d.where == "/h.allow:3" and "bogus" in d.message for d in table.diagnostics)
    assert any(d.where == "/h.allow:4" and "newline" in d.message for d in table.diagnostics)
    # a continuation: the rule's line is where it starts
    table = tw.parse("\n\\\nin.fingerd: \\\n ALL\n", "/h.allow")
    assert [r.where for r in table.rules] == ["/h.allow:2"]


def test_options_and_expansions() -> None:
    got = decide("ALL: ALL: severity auth.notice: setenv WHO %a-%d: spawn echo %h %n %p "
                 "%u %s %%: deny\n")
    assert isinstance(got, tw.Verdict) and not got.allowed
    assert got.options == (
        tw.Option("severity", "auth.notice"), tw.Option("setenv", "WHO 10.0.0.1-in.fingerd"),
        tw.Option("spawn", "echo 10.0.0.1 unknown 42 unknown in.fingerd@unknown %"))
    got = decide("ALL: ALL: twist /bin/echo %n\n", name="a;b$(rm).example")
    assert isinstance(got, tw.Verdict)
    assert got.options == (tw.Option("twist", "/bin/echo a_b__rm_.example"),)  # no shell


def test_option_errors_deny() -> None:
    for options in ("allow: deny", "bogus", "setenv", "severity nope", "allow yes",
                    "twist x: spawn y"):
        got = decide(f"ALL: ALL: {options}\n")
        assert isinstance(got, tw.Verdict) and not got.allowed and got.error, options


def test_file_patterns() -> None:
    table = tw.parse("ALL: /etc/friends root@/etc/more\n", "/h.allow")
    assert table.file_patterns() == {"/etc/friends", "/etc/more"}
    files = {"/etc/friends": ("192.168.", "[::1]")}
    for addr, allowed in (("192.168.4.4", True), ("::1", True), ("10.0.0.1", False)):
        got = tw.decide(table, tw.parse("ALL: ALL\n", "/h.deny"),
                        tw.Request("x", addr, "", "unknown", files))
        assert isinstance(got, tw.Verdict) and got.allowed is allowed, addr


def test_mapped_clients_are_ipv4() -> None:
    got = decide("ALL: 10.0.0.0/255.0.0.0\n", "ALL: ALL\n", addr="::ffff:10.0.0.1")
    assert isinstance(got, tw.Verdict) and got.allowed


def test_bounded() -> None:
    big = "ALL: " + "x" * 3000 + "\n"
    table = tw.parse(big, "/h")
    assert table.rules[0].broken
    huge = "# x\n" * (tw.MAX_FILE_BYTES // 4 + 1)
    assert [r.broken for r in tw.parse(huge, "/h").rules] == [True]  # denies, as libwrap
    deep = "ALL: " + " EXCEPT ".join(["ALL"] * 500) + "\n"
    assert isinstance(decide(deep, name="x"), tw.Verdict)


WORDS = ["KNOWN", "LOCAL", "UNKNOWN", "PARANOID", "allow", "deny", "spawn", "twist", "\0",
         "\xff", "10.0.0.1", "[::1]/64"]
TEXT = st.lists(st.sampled_from([*"ALLEXCEPT:,.@/[]\\#*? \t\n\r%=10xabf", *WORDS]),
                max_size=120).map("".join) | st.text(max_size=200)


@given(allow=TEXT, deny=TEXT, addr=st.sampled_from(["10.0.0.1", "::1", "", "unknown",
                                                    "::ffff:1.2.3.4"]),
       name=st.sampled_from([None, "unknown", "paranoid", "a.b", "x"]),
       daemon=st.text(max_size=10))
def test_fuzzed_rules_never_raise(allow: str, deny: str, addr: str, name: str | None,
                                  daemon: str) -> None:
    a, d = tw.parse(allow, "/a"), tw.parse(deny, "/d")
    for diag in a.diagnostics + d.diagnostics:
        assert diag.where.startswith(("/a:", "/d:")) and diag.message
    got = tw.decide(a, d, tw.Request(daemon, addr, "", name, {}))
    assert got == tw.NEED_NAME if name is None and got == tw.NEED_NAME else True
    if name is not None:
        assert isinstance(got, tw.Verdict)
