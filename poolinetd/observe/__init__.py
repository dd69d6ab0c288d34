"""Observability: what the other layers say and count.

Owns the log (stderr, file; one line per event, text or JSON), the metrics
primitives (histograms, the Prometheus text document), log throttles and the
stage trace used by the benchmarks. Pure or touching only its own fds.

May import: nothing of poolinetd (the bottom layer).
"""
