"""preload=python, the pure parts: the keys, the script's resolution, the #! line, the
preloader's import discovery and its reports (the running server: test_preload_e2e.py)."""

from __future__ import annotations

import ast
import json

import pytest
from config_fakes import fake_lookups
from config_helpers import LOAD_SOURCE, NO_OPTIONS
from log_events import Event
from log_events import events as events  # the fixture

from poolinetd.check import service_to_dict
from poolinetd.config.resolve import LoadedConfig, load_text
from poolinetd.launch import preload, preloader


def load(text: str) -> LoadedConfig:
    """``text`` resolved in the fake world, where every absolute path is a program."""
    return load_text(text, LOAD_SOURCE, NO_OPTIONS, fake_lookups(all_programs=True))


def _one(text: str):  # type: ignore[no-untyped-def]
    loaded = load(text)
    assert not loaded.errors, loaded.errors
    (service,) = loaded.services
    return service


def _errors(text: str) -> list[str]:
    return [f"{d.field} {d.message}" for d in load(text).errors]


LINE = "7100 on protocol=tcp, wait=no, user=nobody, exec={exec}, args={args}, preload={kind}{more};"


def test_the_script_is_the_program_when_it_names_no_interpreter() -> None:
    svc = _one(LINE.format(exec="/srv/svc.py", args="svc.py A B", kind="python", more=""))
    assert svc.preload is not None
    assert (svc.preload.script, svc.preload.interpreter) == ("/srv/svc.py", None)
    assert svc.preload.argv == ("/srv/svc.py", "A", "B")


def test_exec_names_the_interpreter_and_the_script_follows_its_options() -> None:
    svc = _one(LINE.format(exec="/usr/bin/python3.11",
                           args="python3 -u -X dev -W error /srv/svc.py A",
                           kind="python", more=", preload_modules=json email.mime.text"))
    pre = svc.preload
    assert pre is not None
    assert pre.interpreter == "/usr/bin/python3.11"
    assert pre.options == ("-u", "-X", "dev", "-W", "error")
    assert pre.argv == ("/srv/svc.py", "A") and pre.modules == ("json", "email.mime.text")
    doc = service_to_dict(svc)["preload"]
    assert doc == {"kind": "python", "script": "/srv/svc.py", "interpreter": "/usr/bin/python3.11",
                   "options": ["-u", "-X", "dev", "-W", "error"], "argv": ["/srv/svc.py", "A"],
                   "modules": ["json", "email.mime.text"]}


def test_no_and_unset_mean_exec() -> None:
    assert _one(LINE.format(exec="/srv/svc.py", args="svc.py", kind="no", more="")).preload is None
    svc = _one("7100 stream tcp nowait nobody /srv/svc.py svc.py")
    assert svc.preload is None and service_to_dict(svc)["preload"] is None


def test_defaults_set_it_for_every_program_and_not_for_built_ins() -> None:
    loaded = load("defaults on preload=python, preload_modules=json;\n"
                  "7100 stream tcp nowait nobody /srv/svc.py svc.py\n"
                  "7101 stream tcp nowait nobody internal echo\n")
    assert not loaded.errors
    by_port = {s.name: s for s in loaded.services}
    assert by_port["svc.py:7100/tcp"].preload is not None
    assert by_port["svc.py:7100/tcp"].preload.modules == ("json",)  # type: ignore[union-attr]


@pytest.mark.parametrize(("exec_", "args", "more", "field", "says"), [
    ("/usr/bin/python3", "python3 -m http.server", "", "args", "-m names none"),
    ("/usr/bin/python3", "python3 -c pass", "", "args", "-c names none"),
    ("/usr/bin/python3", "python3 -u", "", "args", "needs the script after"),
    ("/usr/bin/python3", "python3 svc.py", "", "args", "absolute path"),
    ("/srv/svc.py", "svc.py", ", preload_modules=json 3bad", "preload_modules",
     "'3bad' is not a Python module name"),
])
def test_what_names_no_script_is_an_error_at_its_field(exec_: str, args: str, more: str,
                                                       field: str, says: str) -> None:
    errors = _errors(LINE.format(exec=exec_, args=args, kind="python", more=more))
    assert len(errors) == 1 and says in errors[0], errors


def test_a_bad_value_and_a_built_in_are_errors() -> None:
    assert "preload must be python or no, not 'yes'" in _errors(
        LINE.format(exec="/srv/svc.py", args="svc.py", kind="yes", more=""))[0]
    assert "applies to programs, not built-ins" in _errors(
        "7100 on protocol=tcp, user=nobody, args=echo, preload=python;")[0]


@pytest.mark.parametrize(("line", "want"), [
    (b"#!/usr/bin/python3\n", ("/usr/bin/python3", "/usr/bin/python3", ())),
    (b"#! /usr/bin/python3.11 -u\nx", ("/usr/bin/python3.11", "/usr/bin/python3.11", ("-u",))),
    (b"#!/usr/bin/python3 -u -O\n", ("/usr/bin/python3", "/usr/bin/python3", ("-u -O",))),
    (b"#!/usr/bin/env python3\n", ("/usr/bin/python3", "python3", ())),
    (b"#!/usr/bin/env -S python3 -u -B\n", ("/usr/bin/python3", "python3", ("-u", "-B"))),
    (b"#!/bin/sh\n", "names /bin/sh, not a Python interpreter"),
    (b"#!/usr/bin/env\n", "runs env without a program"),
    (b"#!/usr/bin/env no-such-python-here\n", "not found"),
    (b"print('no shebang')\n", "no #! line"),
    (b"#!\xff\xfe\n", "not text"),
])
def test_the_shebang_is_read_as_linux_reads_it(line: bytes, want: object) -> None:
    got = preload.parse_shebang(line)
    if isinstance(want, str):
        assert isinstance(got, str) and want in got, got
    else:
        assert got == want


def test_top_level_imports_and_which_are_guarded() -> None:
    tree = ast.parse(
        "import os, json as j\n"
        "from email.mime import text, base\n"
        "from . import sibling\n"
        "try:\n    import ujson\nexcept ImportError:\n    ujson = None\n"
        "if False:\n    import never\n"
        "with open('x') as f:\n    import csv\n"
        "def f():\n    import inside_a_function\n"
        "class C:\n    import inside_a_class\n")
    got = preloader.top_level_imports(tree)
    assert got == [
        (1, "os", (), False), (1, "json", (), False),
        (2, "email.mime", ("text", "base"), False),
        (5, "ujson", (), True), (9, "never", (), True), (11, "csv", (), True),
    ]


def test_the_preloader_reports_where_a_script_fails(tmp_path) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "bad.py"
    script.write_text("import os\n\ndef f(:\n    pass\n")
    with pytest.raises(preloader.PreloadError) as err:
        preloader.preload({"script": str(script), "modules": []})
    assert (err.value.line, err.value.error) == (3, "SyntaxError: invalid syntax")
    script.write_text("import os\nimport no_such_module_anywhere\n")
    with pytest.raises(preloader.PreloadError) as err:
        preloader.preload({"script": str(script), "modules": []})
    assert err.value.line == 2 and "No module named 'no_such_module_anywhere'" in err.value.error
    with pytest.raises(preloader.PreloadError) as err:
        preloader.preload({"script": str(script), "modules": ["no_such_extra"]})
    assert err.value.error.startswith("preload_modules: ModuleNotFoundError")
    script.write_text("try:\n    import no_such_module_anywhere\nexcept ImportError:\n    pass\n")
    code = preloader.preload({"script": str(script), "modules": ["json"]})
    assert code.co_filename == str(script)


@pytest.mark.parametrize("raw", [
    b"not json", b"{}", b'{"t": "spawned", "id": "1", "pid": 2}', b'{"t": "spawned", "id": 1}',
    b'{"t": "exit", "id": 1, "pid": 2, "status": true, "usec": 1}', b'{"t": "other"}', b"[1]",
    b'{"t": "ready", "pid": 1e300, "modules": 1, "threads": 1}',
])
def test_a_report_no_preloader_sends_is_refused(raw: bytes) -> None:
    assert preload._parse(raw) is None


def test_reports_are_read_into_events() -> None:
    assert preload._parse(json.dumps({"t": "spawned", "id": 4, "pid": 77}).encode()) == \
        preload.Spawned(4, 77)
    assert preload._parse(b'{"t": "exit", "id": 4, "pid": 77, "status": -9, "usec": 5}') == \
        preload.Exited(4, 77, -9, 5)
    got = preload._parse(b'{"t": "failed", "file": "/s.py", "line": 3, "error": "' +
                         b"x" * 5000 + b'"}')
    assert isinstance(got, preload.Failed) and len(got.error) == 2000


class _Host:
    """What a worker does for pool.preloaded, recorded."""

    def __init__(self) -> None:
        self.execd: list[int] = []
        self.watching: int | None = None

    def exec_now(self, conn_id, sock, peer, local):  # type: ignore[no-untyped-def]
        sock.close()
        self.execd.append(conn_id)

    def spawned(self, conn_id, pid):  # type: ignore[no-untyped-def]
        pass

    def ended(self, conn_id, pid, code, duration, peer):  # type: ignore[no-untyped-def]
        pass

    def dropped(self, conn_id):  # type: ignore[no-untyped-def]
        pass

    def watch_foreign(self, conn_id, pid, peer):  # type: ignore[no-untyped-def]
        pass

    def watch_preloader(self, fd):  # type: ignore[no-untyped-def]
        self.watching = fd


class _BootingPreloader:
    """A preloader that never says READY (an import hangs)."""

    state = preload.State.BOOTING
    pid = 0

    def reap(self, kill: bool = True) -> int:
        self.state = preload.State.FAILED
        self.killed = kill
        return -9


def test_a_preloader_that_never_gets_ready_is_given_up(events: list[Event]) -> None:
    import socket

    from poolinetd.pool import preloaded

    svc = _one(LINE.format(exec="/srv/svc.py", args="svc.py", kind="python", more=""))
    now = [100.0]
    host = _Host()
    got = preloaded.Preloaded(host, svc, lambda: now[0])  # type: ignore[arg-type]
    fake = _BootingPreloader()
    got.preloader = fake  # type: ignore[assignment]
    got.started_at = now[0]
    pairs = [socket.socketpair() for _ in range(3)]
    got.launch(1, pairs[0][0], "peer", "")  # queued: it may be ready in a moment
    assert host.execd == [] and got.busy == 1
    assert got.due() == 100.0 + preloaded.QUEUE_WHILE_BOOTING
    now[0] += preloaded.QUEUE_WHILE_BOOTING
    got.tick(now[0], stopping=False)
    assert host.execd == [1]  # waited long enough: exec'd
    got.launch(2, pairs[1][0], "peer", "")  # still booting, past the queueing time: exec'd
    assert host.execd == [1, 2]
    assert got.due() == 100.0 + preloaded.BOOT_TIMEOUT
    now[0] = 100.0 + preloaded.BOOT_TIMEOUT
    got.tick(now[0], stopping=False)
    assert fake.killed and fake.state is preload.State.FAILED
    assert [name for _, name, _ in events] == ["preload_failed"]
    assert "not ready in 60 s" in str(events[0][2]["error"])
    got.launch(3, pairs[2][0], "peer", "")
    assert host.execd == [1, 2, 3] and got.busy == 0
    for _, b in pairs:
        b.close()
