"""Deployment glue: how the master meets the system around it.

Owns listening sockets (``listeners``), socket activation and hand-over
(``activation``, ``adopt``, ``handoff``, ``upgrade``), the pidfile,
sd_notify, and the bounded request/reply servers (``sockserve``) behind the
control socket (``control``) and the metrics endpoint (``metricshttp``).

May import: observe, net, config.
"""
