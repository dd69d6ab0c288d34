"""Imported by preload_slow.py: hangs when imported by a preloader (no connection yet)."""

import os
import time

if "TCPREMOTEIP" not in os.environ:
    time.sleep(3600)
