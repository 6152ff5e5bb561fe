"""``python -m dreamcache.data``: entry point of the training-data commands (dreamcache.apps.data.cli).

Imported rather than run (the 0.1 module path), it gives the library of :mod:`dreamcache.apps.data`, with a
DeprecationWarning (:mod:`dreamcache._aliases`)."""
import sys

try:
    from .apps.data.cli import main
except ModuleNotFoundError as e:  # e.g. no torch in this Python: one line, not a traceback
    from .apps.commands import missing_module_message

    if missing_module_message(e) is None:
        raise
    print("error: " + missing_module_message(e, "'python -m dreamcache.data'"), file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
else:
    from ._aliases import entry_module_imported

    entry_module_imported(__name__, globals())
