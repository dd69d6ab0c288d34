"""Module state for preload_report.py: a counter each connection increments once."""

counter = 0
