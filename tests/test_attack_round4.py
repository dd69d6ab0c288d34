"""Hostile review, round four (after issue 21): each attack made for real, on loopback.

Every test asserts the safe outcome and failed on the code before its fix. The
worker attacks become a taken-over worker the way tests/test_attack_worker.py
does (``pidfd_getfd`` of the worker's own descriptors).
"""

from __future__ import annotations

import os

import orjson
import pytest
from conftest import IS_ROOT, TEST_USER, wait_until
from test_attack_worker import steal_upward, worker_of

from poolinetd.pool import wire

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (pidfd_getfd of a worker)")


# -- a worker's LOG line cannot rename or re-level itself in the JSON log -------------------


@pytest.mark.root
@needs_root
def test_a_worker_log_line_cannot_override_the_json_event_level_or_time(serve) -> None:
    """The JSON formatter spread a line's fields over its own keys, so a worker's LOG
    with fields ``event``, ``level`` and ``ts`` came out as the master's ``stopped``
    at level error with a time of the worker's choosing. Now those keys stay the
    formatter's and the worker's values are dropped."""
    server = serve(f"127.0.0.1:0 stream tcp nowait {TEST_USER} internal echo\n",
                   "--log-format", "json")
    pid = worker_of(server, "echo")
    up = steal_upward(pid)
    try:
        os.write(up, wire.frame(wire.encode_log(20, "conn_end", {
            "event": "stopped", "level": "error", "ts": 0.0, "peer": "forged"})))
    finally:
        os.close(up)
    wait_until(lambda: "forged" in server.log(), 5, "the worker's line")
    docs = [orjson.loads(line) for line in server.log().splitlines()
            if line.startswith("{") and "forged" in line]
    assert len(docs) == 1, docs
    doc = docs[0]
    assert (doc["event"], doc["level"], doc["pid"]) == ("conn_end", "info", pid), doc
    assert doc["ts"] > 1e9, doc
    assert doc["service"] == "echo:0/tcp"
    assert not any(orjson.loads(line).get("event") == "stopped"
                   for line in server.log().splitlines() if line.startswith("{"))
