"""Which services tcp_wrappers judge, under which daemon name; Debian's tcpd lines. Pure.

``settle(spec, server, wanted, out)`` answers the server to run and the
daemon name hosts.allow/hosts.deny judge the service under (None: not
judged natively):

* an entry whose program is /usr/sbin/tcpd (Debian's update-inetd writes
  ``finger stream tcp nowait nobody /usr/sbin/tcpd /usr/sbin/in.fingerd``)
  is judged natively even without ``--tcp-wrappers``: the real program (the
  words after tcpd; a bare name is looked for in /usr/sbin, tcpd's
  REAL_DAEMON_DIR on Debian) runs directly, and its argv[0]'s basename is
  the daemon name, as tcpd would use;
* otherwise, with ``tcp_wrappers=yes`` along the chain (``--tcp-wrappers``
  sets it for every service), a built-in is judged under its service name
  (its built-in name when the service is a port number) and a program under
  its argv[0]'s basename; ``tcp_wrappers=no`` lifts it.

What can be judged natively is what tcpd can judge: a stream nowait IP
service (each connection the master accepts) and a datagram wait IP
program (the source of the datagram that starts it, peeked before the
socket is lent: engine/accept.py). A stream wait program accepts its own
connections and a unix socket has no client address: neither tcpd nor
poolinetd can judge them, and a warning at the service's line says so (a
tcpd line there keeps running tcpd, as before; the flag leaves the service
unjudged). A datagram built-in answers each datagram itself (in a worker
that holds the socket): it is not judged either (only_from/no_access
apply to it).
"""

from __future__ import annotations

import os

from poolinetd.config.report import SpecReport
from poolinetd.config.servers import Server
from poolinetd.config.spec import ServiceSpec, SocketType

TCPD = "/usr/sbin/tcpd"
REAL_DAEMON_DIR = "/usr/sbin"  # where Debian's tcpd looks for a program named without a path


def judged_natively(spec: ServiceSpec, internal: bool = False) -> bool:
    """Whether the master sees each client of this service before it is served (and so
    can judge it): a stream nowait IP service, or a datagram wait IP program."""
    if spec.protocol.is_unix:
        return False
    if spec.socket_type is SocketType.STREAM:
        return not spec.wait
    return spec.socket_type is SocketType.DGRAM and spec.wait and not internal


def _why_not(spec: ServiceSpec) -> str:
    """Why a service cannot be judged (for the warning)."""
    if spec.protocol.is_unix:
        return "a unix socket has no client address to judge"
    if spec.socket_type is SocketType.STREAM and spec.wait:
        return ("a stream wait program accepts its own connections: neither tcpd nor "
                "poolinetd sees its clients")
    return "only stream nowait services and datagram wait programs can be judged"


def settle(spec: ServiceSpec, server: Server, wanted: bool | None, out: SpecReport
           ) -> tuple[Server, str | None]:
    """(server to run, daemon name to judge under or None); problems go to ``out``."""
    judged = judged_natively(spec, server.internal is not None)
    if server.program == TCPD and wanted is not False and not judged:
        out.report("server", f"tcp_wrappers not applied natively: {_why_not(spec)}",
                   f"{TCPD} still runs for it as written", warning=True)
        return server, None
    if server.program == TCPD and wanted is not False:
        if not server.argv:
            out.report("server", "tcpd needs the real program after it",
                       f"write e.g. {TCPD} /usr/sbin/in.fingerd")
            return server, None
        real = server.argv[0]
        path = real if real.startswith("/") else os.path.join(REAL_DAEMON_DIR, real)
        return Server(None, path, server.argv), os.path.basename(real)
    if wanted is not True:
        return server, None
    if not judged:
        hint = ("only_from/no_access apply to it" if server.internal is not None
                or spec.protocol.is_unix else "its program must judge its clients itself")
        out.report("tcp_wrappers", f"tcp_wrappers not applied: {_why_not(spec)}",
                   f"{hint}, or set tcp_wrappers=no", warning=True)
        return server, None
    if server.internal is not None:  # its service name; a port number says nothing
        return server, server.internal if spec.service.isdigit() else spec.service
    if server.program is not None and server.argv:
        return server, os.path.basename(server.argv[0])
    return server, None
