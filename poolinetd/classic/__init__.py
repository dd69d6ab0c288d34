"""Classic mode: fork a child per connection, as inetd always has.

Owns the fork dispatcher (``dispatcher``). It launches programs through the
same ``launch.program`` contract as a pool worker, so the two modes differ
only in when the process is forked.

May import: every layer up to engine (its ``dispatch`` and ``runtime``).
"""
