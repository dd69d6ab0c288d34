"""JSON documents that can always be encoded: status, the ready line, control answers.

Pure. orjson refuses a str that is not valid UTF-8 (a lone surrogate, which
is how Python carries undecodable bytes from a file or a peer). Such a
string must never take a document, or the master, down: it is written with
each bad code point escaped as ``\\udcXX`` text instead.
"""

from __future__ import annotations

import orjson


def dumps(doc: object) -> bytes:
    """Encode ``doc``; strings that are not valid UTF-8 are escaped, never an error."""
    try:
        return orjson.dumps(doc)
    except (orjson.JSONEncodeError, TypeError):
        return orjson.dumps(_clean(doc))


def _clean(value: object) -> object:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {str(_clean(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
