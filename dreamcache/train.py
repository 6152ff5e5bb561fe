"""``python -m dreamcache.train``: entry point of the trainer (dreamcache.apps.train)."""
import sys

from .apps.train import main

if __name__ == "__main__":
    sys.exit(main())
