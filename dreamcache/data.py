"""``python -m dreamcache.data``: entry point of the training-data commands (dreamcache.apps.data)."""
import sys

try:
    from .apps.data import main
except ModuleNotFoundError as e:  # e.g. no torch in this Python: one line, not a traceback
    from .apps.cli import missing_module_message

    if missing_module_message(e) is None:
        raise
    print("error: " + missing_module_message(e, "'python -m dreamcache.data'"), file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
