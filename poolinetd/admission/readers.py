"""The preamble readers poolinetd has: a PROXY protocol header, a tcpmux service name.

Pure: each is a ``preamble.Preamble`` over a parser that never raises
(proxyproto.py, tcpmux.py). ``for_service`` says which reader, if any, a
service's connections go through. Refusal reasons are stable strings: they
are counted per reason in status and metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from poolinetd.config.spec import Service
from poolinetd.net import preamble, proxyproto, tcpmux
from poolinetd.net.preamble import Invalid, NeedMore, Proceed, Refuse, Result

PROXY_MALFORMED = "proxy_malformed"
PROXY_TRUNCATED = "proxy_truncated"
PROXY_UNTRUSTED = "proxy_untrusted"
TCPMUX_UNKNOWN = "tcpmux_unknown"
TCPMUX_HELP = "tcpmux_help"
TCPMUX_MALFORMED = "tcpmux_malformed"
ANSWERED = frozenset({TCPMUX_HELP})  # "refusals" that are the answer asked for: not counted


class ProxyHeader:
    """A PROXY v1 or v2 header (detected from the first bytes), as HAProxy's accept-proxy.

    ``LOCAL`` (health checks), v1 ``UNKNOWN`` and v2 ``UNSPEC`` keep the
    connection's own addresses.
    """

    limit = proxyproto.MAX_HEADER

    def feed(self, data: bytes, eof: bool) -> Result:
        got = proxyproto.parse(data)
        if isinstance(got, NeedMore):
            return Refuse(PROXY_TRUNCATED) if eof else NeedMore()
        if isinstance(got, Invalid):
            return Refuse(PROXY_MALFORMED)
        if got.command == "LOCAL" or got.src is None:
            return Proceed(got.consumed)
        return Proceed(got.consumed, peer=got.src, local=got.dst)


class TcpmuxRequest:
    """RFC 1078: the client names the service it wants on the first line.

    ``names`` maps each sub-service's lower-cased name to whether poolinetd
    answers ``+Go`` itself (``tcpmux/+NAME``); ``HELP`` lists them.
    """

    limit = tcpmux.MAX_REQUEST

    def __init__(self, names: Mapping[str, bool]) -> None:
        self.names = names

    def feed(self, data: bytes, eof: bool) -> Result:
        got = tcpmux.parse_request(data)
        if isinstance(got, NeedMore):
            return Refuse(TCPMUX_MALFORMED, tcpmux.ERROR_READING) if eof else NeedMore()
        if isinstance(got, Invalid):
            return Refuse(TCPMUX_MALFORMED, tcpmux.ERROR_READING)
        if got.is_help:
            return Refuse(TCPMUX_HELP, tcpmux.help_reply(sorted(self.names)))
        plus = self.names.get(got.name_lower)
        if plus is None:
            return Refuse(TCPMUX_UNKNOWN, tcpmux.NOT_AVAILABLE)
        return Proceed(got.consumed, reply=tcpmux.GO if plus else b"", route=got.name_lower)


def for_service(service: Service, tcpmux_names: Callable[[], Mapping[str, bool]]
                ) -> Callable[[], preamble.Preamble] | None:
    """The reader factory for ``service``'s connections, or None (no preamble stage)."""
    if service.internal == "tcpmux":
        return lambda: TcpmuxRequest(tcpmux_names())
    if getattr(service, "proxy_protocol", False):
        return ProxyHeader
    return None
