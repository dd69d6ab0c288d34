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

Only stream nowait IP services are judged natively (a connection the
master accepts). Any other kind is left alone: a tcpd line keeps running
tcpd (which judges the client itself, as before), and the flag's warning
says the service is not judged.
"""

from __future__ import annotations

import os

from poolinetd.config.report import SpecReport
from poolinetd.config.servers import Server
from poolinetd.config.spec import ServiceSpec, SocketType

TCPD = "/usr/sbin/tcpd"
REAL_DAEMON_DIR = "/usr/sbin"  # where Debian's tcpd looks for a program named without a path


def judged_natively(spec: ServiceSpec) -> bool:
    """Whether the master accepts this service's connections (and so can judge them)."""
    return (spec.socket_type is SocketType.STREAM and not spec.wait
            and not spec.protocol.is_unix)


def settle(spec: ServiceSpec, server: Server, wanted: bool | None, out: SpecReport
           ) -> tuple[Server, str | None]:
    """(server to run, daemon name to judge under or None); problems go to ``out``."""
    if server.program == TCPD and wanted is not False and judged_natively(spec):
        if not server.argv:
            out.report("server", "tcpd needs the real program after it",
                       f"write e.g. {TCPD} /usr/sbin/in.fingerd")
            return server, None
        real = server.argv[0]
        path = real if real.startswith("/") else os.path.join(REAL_DAEMON_DIR, real)
        return Server(None, path, server.argv), os.path.basename(real)
    if wanted is not True:
        return server, None
    if not judged_natively(spec):
        hint = (f"run the program through {TCPD} (it judges the client itself)"
                if server.program is not None else "only_from/no_access apply to it")
        out.report("tcp_wrappers", "tcp_wrappers not applied: only stream nowait IP "
                   "services are judged natively", f"{hint}, or set tcp_wrappers=no",
                   warning=True)
        return server, None
    if server.internal is not None:  # its service name; a port number says nothing
        return server, server.internal if spec.service.isdigit() else spec.service
    if server.program is not None and server.argv:
        return server, os.path.basename(server.argv[0])
    return server, None
