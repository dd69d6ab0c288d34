"""Admission: who may connect, decided before anything is spawned. Pure.

Owns one service's admission policy (``policy``: access lists, per-source
limits and rates, the spawn-rate loop guard), per-source tracking with
bounded state (``sources``) and the preamble readers bound to a service
(``readers``: PROXY header, tcpmux name) that the engine's preamble stage
feeds, and hosts_access(5) (``tcpwrappers``, pure; ``tcpwrappers_files``
reads hosts.allow/hosts.deny, the one module here that touches files).

May import: observe, net, config.
"""
