"""ONC RPC entries in the config: ``PROGRAM/LOW-HIGH dgram rpc/udp wait ...`` as the BSD inetds
and Debian's packages write them, the /etc/rpc reader, and every mistake at FILE:LINE: field N."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from config_helpers import errors, load, only, parse_errors, parse_one

from poolinetd.config import rpcnames
from poolinetd.config.inetdconf import format_spec, parse
from poolinetd.config.spec import Endpoint, Protocol, RpcProgram, RpcSpec, SocketType

DEBIAN_RSTATD = "rstatd/1-5\tdgram\trpc/udp\twait\tnobody\t/usr/sbin/tcpd\t/usr/sbin/rpc.rstatd\n"
CAT = "/bin/cat"  # an executable program in config_fakes' world


@pytest.mark.parametrize(("field3", "socket_type", "protocol"), [
    ("rpc/udp", "dgram", Protocol.UDP),
    ("rpc/tcp", "stream", Protocol.TCP),
    ("rpc/udp6", "dgram", Protocol.UDP6),
    ("rpc/tcp6", "stream", Protocol.TCP6),
    ("rpc/udp4", "dgram", Protocol.UDP4),
    ("rpc/*", "dgram", Protocol.UDP46),  # BSD: every transport of the socket type
    ("rpc/*", "stream", Protocol.TCP46),
])  # fmt: skip
def test_rpc_transports(field3: str, socket_type: str, protocol: Protocol) -> None:
    spec = parse_one(f"rusersd/2-3 {socket_type} {field3} wait nobody {CAT} cat\n")
    assert (spec.service, spec.rpc, spec.protocol) == ("rusersd", RpcSpec(2, 3), protocol)
    assert spec.socket_type is SocketType(socket_type)
    assert parse(format_spec(spec), "x.conf").specs == (spec,)  # it writes back


def test_the_debian_line_parses_as_written() -> None:
    spec = parse_one(DEBIAN_RSTATD)
    assert (spec.service, spec.rpc, spec.wait, spec.user) == ("rstatd", RpcSpec(1, 5), True,
                                                              "nobody")
    assert (spec.server, spec.argv) == ("/usr/sbin/tcpd", ("/usr/sbin/rpc.rstatd",))


def test_one_version_a_number_and_an_address() -> None:
    spec = parse_one(f"127.0.0.1:100099/7 dgram rpc/udp wait nobody {CAT} cat\n")
    assert (spec.service, spec.rpc, spec.addresses) == ("100099", RpcSpec(7, 7), ("127.0.0.1",))


@pytest.mark.parametrize(("line", "message"), [
    ("rstatd dgram rpc/udp wait nobody /bin/cat cat",
     "t.conf:1: field 1 'rstatd': an RPC service needs its versions "
     "(write PROGRAM/LOW-HIGH or PROGRAM/VERSION, e.g. rstatd/1-5)"),
    ("rstatd/5-1 dgram rpc/udp wait nobody /bin/cat cat",
     "t.conf:1: field 1 'rstatd/5-1': RPC version range '5-1' runs backwards (write 1-5)"),
    ("rstatd/1-x dgram rpc/udp wait nobody /bin/cat cat",
     "t.conf:1: field 1 'rstatd/1-x': bad RPC version range '1-x' "
     "(write LOW-HIGH or one version, numbers 0 to 2147483647)"),
    ("rstatd/1-40 dgram rpc/udp wait nobody /bin/cat cat",
     "t.conf:1: field 1 'rstatd/1-40': RPC version range '1-40' is too wide "
     "(at most 32 versions per entry)"),
    ("0/1 dgram rpc/udp wait nobody /bin/cat cat",
     "t.conf:1: field 1 '0/1': bad RPC program number '0' (a program number is 1 to "
     "2147483647)"),
    ("/1 dgram rpc/udp wait nobody /bin/cat cat",
     "t.conf:1: field 1 '/1': bad RPC program '' (write a name from /etc/rpc or a program "
     "number)"),
    ("rstatd/1 dgram rpc/icmp wait nobody /bin/cat cat",
     "t.conf:1: field 3 'rpc/icmp': unknown RPC transport 'icmp' "
     "(write rpc/udp, rpc/tcp, rpc/udp6, rpc/tcp6 or rpc/*)"),
    ("rstatd/1 stream rpc/unix wait nobody /bin/cat cat",
     "t.conf:1: field 3 'rpc/unix': unknown RPC transport 'unix' "
     "(write rpc/udp, rpc/tcp, rpc/udp6, rpc/tcp6 or rpc/*)"),
    ("rstatd/1 stream rpc/udp wait nobody /bin/cat cat",
     "t.conf:1: field 2 'stream': socket type stream does not go with RPC over udp "
     "(write dgram rpc/udp)"),
    ("rstatd/1 seqpacket rpc/* wait nobody /bin/cat cat",
     "t.conf:1: field 2 'seqpacket': socket type seqpacket does not go with RPC over udp46 "
     "(write dgram rpc/udp46)"),
    ("rstatd/1 dgram udp wait nobody /bin/cat cat",
     "t.conf:1: field 1 'rstatd/1': a '/' in the service name is an RPC program and its "
     "versions (write protocol rpc/udp or rpc/tcp for an RPC service)"),
])  # fmt: skip
def test_parse_errors_name_the_field(line: str, message: str) -> None:
    assert parse_errors(line + "\n") == [message]


def test_a_bad_rpc_entry_leaves_the_rest_of_the_file() -> None:
    parsed = parse("rstatd/9-1 dgram rpc/udp wait nobody /bin/cat cat\n"
                   "echo stream tcp nowait root internal\n", "t.conf")
    assert [s.service for s in parsed.specs] == ["echo"] and len(parsed.errors) == 1


def test_resolved_rpc_service() -> None:
    svc = only(DEBIAN_RSTATD.replace("/usr/sbin/tcpd\t/usr/sbin/rpc.rstatd", f"{CAT}\tcat"))
    assert svc.rpc == RpcProgram(100001, 1, 5, ("udp",))
    assert svc.name == "rstatd/1-5/rpc/udp"
    assert svc.key.endpoints == (Endpoint(2, "0.0.0.0", 0),)  # any free port, told to rpcbind
    assert svc.key.label == svc.name  # its reload identity: program, versions, transport
    assert svc.wait and svc.program == CAT


@pytest.mark.parametrize(("line", "program"), [
    (f"rusers/2-3 dgram rpc/udp6 wait nobody {CAT} cat", RpcProgram(100002, 2, 3, ("udp6",))),
    (f"rup/1 stream rpc/tcp wait nobody {CAT} cat", RpcProgram(100001, 1, 1, ("tcp",))),
    (f"100099/1-2 stream rpc/* wait nobody {CAT} cat",
     RpcProgram(100099, 1, 2, ("tcp", "tcp6"))),
    (f"100099/1 dgram rpc/* wait nobody {CAT} cat", RpcProgram(100099, 1, 1, ("udp", "udp6"))),
])  # fmt: skip
def test_aliases_numbers_and_netids(line: str, program: RpcProgram) -> None:
    assert only(line + "\n").rpc == program


def test_resolution_errors_name_the_field() -> None:
    assert errors(f"nosuch/1 dgram rpc/udp wait nobody {CAT} cat\n") == [
        "/etc/t.conf:1: field 1 'nosuch/1': unknown RPC program 'nosuch' "
        "(add it to /etc/rpc or write the program number)"]
    assert errors("rstatd/1 dgram rpc/udp wait nobody internal\n") == [
        "/etc/t.conf:1: field 6 'internal': an RPC service runs a program: poolinetd has no "
        "RPC built-ins (write the program's path and argv[0])"]
    assert errors(f"twohomed:rstatd/1 dgram rpc/udp wait nobody {CAT} cat\n") == [
        "/etc/t.conf:1: field 1 'twohomed:rstatd/1': an RPC service listens on one address "
        "(write one address (or none: the wildcard))"]


def test_two_entries_registering_the_same_version_clash() -> None:
    loaded = load(f"rstatd/1-3 dgram rpc/udp wait nobody {CAT} cat\n"
                  f"rstat/3-5 dgram rpc/udp wait nobody {CAT} cat\n"
                  f"rstatd/4-5 dgram rpc/udp wait nobody {CAT} cat\n"
                  f"rstatd/1-3 stream rpc/tcp wait nobody {CAT} cat\n")
    assert [s.name for s in loaded.services] == ["rstatd/1-3/rpc/udp", "rstatd/4-5/rpc/udp",
                                                 "rstatd/1-3/rpc/tcp"]
    assert [str(d) for d in loaded.errors] == [
        "/etc/t.conf:2: field 1 'rstat/3-5': RPC program 100001 is also registered by "
        "rstatd/1-3/rpc/udp at /etc/t.conf:1 for the same version and transport (rpcbind "
        "maps a program's version to one port: remove one or split the versions)"]


# -- /etc/rpc --------------------------------------------------------------------------------


def test_etc_rpc_table() -> None:
    table = rpcnames.parse_rpc("# comment\nportmapper\t100000\tportmap sunrpc rpcbind\n"
                               "rstatd 100001 rstat rup # trailing\nbroken line\n"
                               "big 99999999999\nzero 0\nrstatd 5\n")
    assert table == {"portmapper": 100000, "portmap": 100000, "sunrpc": 100000,
                     "rpcbind": 100000, "rstatd": 100001, "rstat": 100001, "rup": 100001}


def test_etc_rpc_is_read_bounded_and_never_waits(tmp_path: Path) -> None:
    good = tmp_path / "rpc"
    good.write_text("walld 100008 rwall shutdown\n")
    assert rpcnames.read_table(str(good)) == {"walld": 100008, "rwall": 100008,
                                               "shutdown": 100008}
    good.write_text("walld 100009\n")  # changed: read again
    assert rpcnames.read_table(str(good)) == {"walld": 100009}
    big = tmp_path / "big"
    big.write_bytes(b"x 1\n" * (rpcnames.MAX_BYTES // 4 + 1))
    assert rpcnames.read_table(str(big)) == {}
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes it: opening it blocking would hang the master
    assert rpcnames.read_table(str(fifo)) == {}
    assert rpcnames.read_table(str(tmp_path / "missing")) == {}
    assert rpcnames.read_table(str(tmp_path)) == {}  # a directory


@pytest.mark.skipif(not os.path.isfile("/etc/rpc"), reason="no /etc/rpc on this host")
def test_the_system_table_knows_rstatd() -> None:
    assert rpcnames.getrpcbyname("rstatd") == 100001
    with pytest.raises(LookupError):
        rpcnames.getrpcbyname("no-such-rpc-program")


def test_check_json_shows_the_rpc_program() -> None:
    from poolinetd.check import service_to_dict

    svc = only(f"rup/2-4 dgram rpc/* wait nobody {CAT} cat\n")
    assert service_to_dict(svc)["rpc"] == {"program": 100001, "versions": [2, 4],
                                           "netids": ["udp", "udp6"]}
    assert "rpc" not in service_to_dict(only("echo stream tcp nowait root internal\n"))


def test_key_values_rpc_entries() -> None:
    svc = only("rstatd/1-5 on protocol=rpc/udp, wait=yes, user=nobody, exec=/bin/cat, "
               "args=cat, no_access=127.0.0.1;\n")
    assert (svc.rpc, svc.name) == (RpcProgram(100001, 1, 5, ("udp",)), "rstatd/1-5/rpc/udp")
    assert [str(n) for n in svc.no_access.networks] == ["127.0.0.1/32"]
    dual = only("100099/1 on protocol=rpc/*, socktype=stream, wait=yes, user=nobody, "
                "exec=/bin/cat, args=cat;\n")
    assert dual.rpc == RpcProgram(100099, 1, 1, ("tcp", "tcp6"))
    assert dual.spec.protocol is Protocol.TCP46
