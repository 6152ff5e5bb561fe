"""``python -m dreamcache.train``: entry point of the trainer (dreamcache.apps.train)."""
import sys

try:
    from .apps.train import main
except ModuleNotFoundError as e:  # e.g. no torch in this Python: one line, not a traceback
    from .apps.cli import missing_module_message

    if missing_module_message(e) is None:
        raise
    print("error: " + missing_module_message(e, "'python -m dreamcache.train'"), file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
