#!/usr/bin/python3
"""A script whose top-level import fails (line 10), for tests/test_preload_e2e.py."""

import os

try:  # noqa: SIM105  (the guarded form the preloader must recognise)
    import no_such_module_guarded  # noqa: F401  (guarded: the script's business)
except ImportError:
    pass
import no_such_module_at_line_10  # noqa: F401

print("unreachable", os.getpid())
