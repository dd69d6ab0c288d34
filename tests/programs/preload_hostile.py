#!/usr/bin/python3
"""A Python program that misbehaves on request, for tests/test_preload_e2e.py.

Reads one line naming what to do; ``ok`` answers ``ok PID PPID``. The others
must harm only their own connection when the program is preloaded.
"""

import os
import signal
import sys
import threading
import time

what, _, arg = sys.stdin.readline().strip().partition(" ")
if what == "ok":
    print("ok", os.getpid(), os.getppid())
elif what == "kill-parent":
    print("killing", os.getppid(), flush=True)
    os.kill(os.getppid(), signal.SIGKILL)
elif what == "crash":
    raise RuntimeError("boom on purpose")
elif what == "exit3":
    sys.exit(3)
elif what == "stall":
    time.sleep(60)
elif what == "flood":
    chunk = b"x" * 65536
    while True:
        sys.stdout.buffer.write(chunk)
elif what == "fork":
    if os.fork() == 0:
        time.sleep(1)
        os._exit(0)
    print("forked")
elif what == "threads":
    for _ in range(20):
        threading.Thread(target=time.sleep, args=(0.5,)).start()
    print("threads started")
elif what == "unclosed":  # written, never closed or flushed: the exit must flush it
    kept = open(arg, "w")  # noqa: SIM115
    kept.write("flushed at exit\n")
    print("wrote", arg)
elif what == "exit-message":
    sys.exit("a message for stderr")
elif what == "interrupt":
    raise KeyboardInterrupt
else:
    print("unknown", what)
