"""``python -m benchmarks``: run the pool vs classic benchmark (see benchmarks/run.py)."""

import sys

from benchmarks.run import main

sys.exit(main())
