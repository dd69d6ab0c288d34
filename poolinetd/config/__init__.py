"""The config layer: inetd.conf text -> frozen, resolved service specs.

Owns the frozen specs (``spec``); the parser (``inetdconf``, the front door,
with ``tokens``, ``fields``, ``positional``, ``kvscan``, ``keyvalues``,
``keys``, ``values``, ``formatter``), includes; ``resolve`` (names -> numbers,
the front door, with ``lookups``, ``endpoints``, ``identity``, ``servers``,
``settings``) and overlap detection; ``report`` and ``accesslists`` serve both.
xinetd.conf files (told by ``xinetd_lexer.looks_like_xinetd`` in ``includes``) are read by
``xinetd_lexer``, ``xinetd_load`` and ``xinetd_map`` into the same specs.
Pure: it never raises on user input; every problem is a ``Diagnostic`` with
file, line and field. ``spec.BUILTIN_NAMES`` is the vocabulary of
``internal NAME``; the builtins layer implements it.

May import: observe, net.
"""
