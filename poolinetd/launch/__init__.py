"""Processes: what both modes do to start one and to live in one.

Owns forking a child with only the fds it keeps (``spawn``), the program
launch contract shared by pool workers and classic children (``program``:
the socket on fds 0-2, the clean environment with the connection variables,
posix_spawn or exec in place, exit logging), privilege drops
(``privileges``), signal dispositions and the wakeup pipe (``signals``) and
the fork/wait/kill seam (``system``).

May import: observe, net, config.
"""
