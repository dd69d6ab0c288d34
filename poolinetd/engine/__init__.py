"""The master's engine: one thread, one selector loop, the same for both modes.

Owns the loop and its handlers (``loop``), the accept stage (``accept``:
accept batch, admission, preamble, routing, hand-off), the records it
tracks (``runtime``), reloads (``reload``, ``reloadplan``), the upgrade
hand-over (``upgrading``), the status and metrics documents (``reports``)
and the seam a mode implements (``dispatch``).

May import: every layer below it (observe, net, config, admission,
builtins, launch, ops); never pool or classic (it knows a mode only through
``dispatch.Dispatcher``).
"""
