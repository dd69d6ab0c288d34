"""``preload=python``: which script a service's preloader runs, checked at load.

Pure (the script's stamp comes through ``Lookups.file_stamp``, a stat).
Two ways to name the script, as an operator writes a Python service today:

* the program is the script (``exec=/srv/svc.py``): its ``#!`` line names
  the interpreter, read later by the worker as the service's user;
* ``exec=`` names a Python interpreter and the script is its first argument
  that is not an option (``args=python3 -u /srv/svc.py ARG``).

Everything else is an error at the field that says it, with a way out.
"""

from __future__ import annotations

import posixpath
import re

from poolinetd.config.lookups import Lookups
from poolinetd.config.report import SpecReport
from poolinetd.config.servers import Server
from poolinetd.config.spec import PreloadKind, PythonPreload

# What an interpreter is called: python, python3, python3.11, pypy3 (and -dbg builds).
PYTHON_NAME = re.compile(r"(?:python|pypy)[0-9.]*(?:-dbg)?")
# Interpreter options that take the next word as their value.
_OPTIONS_WITH_VALUE = frozenset({"-W", "-X"})
# Options that mean "no script": the interpreter runs something else.
_NOT_A_SCRIPT = frozenset({"-c", "-m", "-"})


def python_preload(kind: PreloadKind | None, own: bool, modules: tuple[str, ...] | None,
                   server: Server, lookups: Lookups, out: SpecReport) -> PythonPreload | None:
    """The service's PythonPreload, or None (``preload`` unset or ``no``, or reported).

    ``own``: the entry wrote ``preload`` itself (``defaults``' applies to programs only,
    without a word about built-ins)."""
    if kind is not PreloadKind.PYTHON:
        return None
    if server.program is None:
        if server.internal is not None and own:
            out.report("preload", "preload=python applies to programs, not built-ins",
                       "remove preload=python")
        return None
    argv = server.argv
    options: tuple[str, ...] = ()
    if PYTHON_NAME.fullmatch(posixpath.basename(server.program)) is None:
        script, interpreter, args = server.program, None, argv[1:]
    else:
        found = _script_argument(argv)
        if isinstance(found, str):
            out.report("args", found, "write args=python3 /path/to/script.py [ARG...]")
            return None
        at = found
        script, interpreter, options, args = argv[at], server.program, argv[1:at], argv[at + 1:]
    if not script.startswith("/"):
        out.report("args" if interpreter else "server",
                   f"preload=python needs the script's absolute path, not {script!r}",
                   "write the full path (a relative one would be looked up from /)")
        return None
    return PythonPreload(script=script, interpreter=interpreter, options=tuple(options),
                         argv=(script, *args), modules=modules or (),
                         stamp=lookups.file_stamp(script))


def _script_argument(argv: tuple[str, ...]) -> int | str:
    """The index of the script in an interpreter's argv, or why there is none."""
    at = 1
    while at < len(argv):
        word = argv[at]
        if word in _NOT_A_SCRIPT or (word.startswith("-") and word[:2] in _NOT_A_SCRIPT):
            return f"preload=python runs a script file, and {word} names none"
        if word == "--":
            at += 1
            break
        if not word.startswith("-"):
            return at
        at += 2 if word in _OPTIONS_WITH_VALUE else 1
    if at < len(argv):
        return at
    return "preload=python needs the script after the interpreter's options"
