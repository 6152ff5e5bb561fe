"""``python -m dreamcache``: the pack's command line (dreamcache.apps.run.cli)."""
import sys

from .apps.run.cli import main

sys.exit(main())
