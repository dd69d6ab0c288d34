"""``python -m poolinetd``: the same entry point as the ``poolinetd`` console script."""

from poolinetd.cli import main

main()
