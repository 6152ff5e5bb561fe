"""``python -m dreamcache.train``: entry point of the trainer (dreamcache.apps.train.cli).

Imported rather than run (the 0.1 module path), it gives the configuration and state API of
:mod:`dreamcache.apps.train.config`, with a DeprecationWarning (:mod:`dreamcache._aliases`)."""
import sys

try:
    from .apps.train.cli import main
except ModuleNotFoundError as e:  # e.g. no torch in this Python: one line, not a traceback
    from .apps.commands import missing_module_message

    if missing_module_message(e) is None:
        raise
    print("error: " + missing_module_message(e, "'python -m dreamcache.train'"), file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
else:
    from ._aliases import entry_module_imported

    entry_module_imported(__name__, globals())
