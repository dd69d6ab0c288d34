"""Wire formats and addresses: pure, no sockets, no config.

Owns address matching (``netmatch``: networks, address lists), the
preamble readers' result types (``preamble``: NeedMore / Refuse / Proceed),
the PROXY protocol v1/v2 parser and the tcpmux (RFC 1078) request parser.
Every function is total on bytes from the network: it returns a result or a
refusal, never raises on input.

May import: observe.
"""
