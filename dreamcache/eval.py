"""``python -m dreamcache.eval``: entry point of the DreamBench evaluation (dreamcache.apps.eval)."""

import sys

from .apps.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
