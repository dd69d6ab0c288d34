"""The built-in services: echo, discard, chargen, daytime, time.

Owns the table of built-ins and their non-blocking stream handlers
(``internal``), message records for SOCK_SEQPACKET services (``records``)
and the datagram responder (``dgram``) with its loop and reflection guard.
Handlers never own the socket they are given: the caller closes it.

May import: observe, net, config.
"""
