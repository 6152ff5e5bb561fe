"""``python -m dreamcache.train``: entry point of the trainer (dreamcache.apps.train_cli).

Imported rather than run (the 0.1 module path), it gives the configuration and state API of
:mod:`dreamcache.apps.train`, with a DeprecationWarning."""
import sys

try:
    from .apps.train_cli import main
except ModuleNotFoundError as e:  # e.g. no torch in this Python: one line, not a traceback
    from .apps.cli import missing_module_message

    if missing_module_message(e) is None:
        raise
    print("error: " + missing_module_message(e, "'python -m dreamcache.train'"), file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main())
else:
    import warnings

    from .apps.train import *  # noqa: F401,F403

    warnings.warn("dreamcache.train moved to dreamcache.apps.train; import it from there.", DeprecationWarning,
                  stacklevel=2)
