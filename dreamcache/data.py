"""``python -m dreamcache.data``: entry point of the training-data commands (dreamcache.apps.data)."""
import sys

from .apps.data import main

if __name__ == "__main__":
    sys.exit(main())
