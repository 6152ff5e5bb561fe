"""``python -m dreamcache.train``: entry point of the trainer (dreamcache.apps.train_cli)."""
import sys

from .apps.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
