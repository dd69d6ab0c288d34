#!/usr/bin/python3
"""A script whose import hangs in the preloader, for tests/test_preload_e2e.py."""

import preload_slow_import  # noqa: F401

print("served")
