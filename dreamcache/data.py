"""``python -m dreamcache.data``: entry point of the training-data commands (dreamcache.apps.data.cli)."""
import sys

from .apps.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
