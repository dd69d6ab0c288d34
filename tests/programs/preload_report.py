#!/usr/bin/env python3
"""Reports, as one JSON line on stdout, what a Python program finds when it starts.

For tests/test_preload_e2e.py: the same script runs exec'd and preloaded
(preload=python), and the two reports must agree. Reads one line first; its
stdout is not flushed by hand (the interpreter's exit must do it), and an
atexit handler writes a last line.
"""

import atexit
import json
import os
import resource
import signal
import sys

import preload_state  # a module next to it: state must not be shared between connections


def _status() -> dict:
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("SigBlk", "SigIgn", "SigCgt"):
                fields[key] = value.strip()
    return fields


def _stream(stream) -> list:
    return [stream.encoding, stream.errors, stream.line_buffering, stream.write_through,
            stream.fileno(), getattr(stream, "name", None)]


preload_state.counter += 1
line = sys.stdin.readline()
umask = os.umask(0)
os.umask(umask)
env = dict(os.environ)
env.pop("TCPREMOTEPORT", None)
env.pop("REMOTE_PORT", None)
env.pop("TCPLOCALPORT", None)  # the two services listen on two ports
report = {
    "line": line,
    "argv": sys.argv,
    "orig_argv": getattr(sys, "orig_argv", None),
    "name": __name__,
    "file": __file__,
    "loader": type(__loader__).__name__,
    "main_is_me": sys.modules["__main__"].__dict__ is globals(),
    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    "env": env,
    "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())],
    "umask": umask,
    "nice": os.nice(0),
    "cwd": os.getcwd(),
    "session_leader": os.getsid(0) == os.getpid(),
    "signals": _status(),
    "sigpipe": str(signal.getsignal(signal.SIGPIPE)),
    "sigint": str(signal.getsignal(signal.SIGINT)),
    "limits": {name: resource.getrlimit(getattr(resource, name))
               for name in ("RLIMIT_NOFILE", "RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_CORE")},
    "stdin": _stream(sys.stdin),
    "stdout": _stream(sys.stdout),
    "stderr": _stream(sys.stderr),
    "dunder_stdout_is_stdout": sys.__stdout__ is sys.stdout,
    "path0": sys.path[0],
    "counter": preload_state.counter,
    "executable": sys.executable,
}
atexit.register(lambda: sys.stdout.write("atexit ran\n"))
sys.stdout.write(json.dumps(report) + "\n")
