"""``python -m dreamcache``: the pack's command line (dreamcache.apps.cli)."""
import sys

from .apps.cli import main

sys.exit(main())
