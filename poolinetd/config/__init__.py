"""The config layer: inetd.conf text -> frozen, resolved service specs.

Owns the frozen specs (``spec``), the parser (``inetdconf``, positional and
key=value forms), includes, ``resolve`` (names -> numbers: ports, users,
groups, built-ins) and overlap detection. Pure: it never raises on user
input; every problem is a ``Diagnostic`` with file, line and field.
``spec.BUILTIN_NAMES`` is the vocabulary of ``internal NAME``; the builtins
layer implements it.

May import: observe, net.
"""
