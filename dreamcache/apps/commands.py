"""What every command line of the pack shares: one ``error:`` line instead of a traceback for a bad input
(:func:`run_main`) or for a Python without ComfyUI's packages (:func:`missing_module_message`). Needs no torch."""
from __future__ import annotations

import argparse
import sys

from ..core.errors import DreamCacheError

#: Packages ComfyUI's Python has and a bare system Python often lacks.
COMFY_PYTHON_PACKAGES = {"torch", "torchvision", "safetensors", "numpy", "PIL", "comfy", "einops"}


def missing_module_message(e: ModuleNotFoundError, what: str = "This command") -> str | None:
    """One line for a command run with a Python that lacks torch (or another of ComfyUI's packages); None for any
    other missing module (a real bug, which keeps its traceback)."""
    top = (e.name or "").split(".")[0]
    if top not in COMFY_PYTHON_PACKAGES:
        return None
    return (f"{what} needs the Python package '{top}', which {sys.executable} does not have: run it with ComfyUI's "
            "Python (the one that starts ComfyUI, e.g. ComfyUI/venv/bin/python, or python_embeded\\python.exe in the "
            "portable build).")


def run_main(parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse, run the chosen subcommand, and turn a DreamCacheError into one ``error:`` line and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DreamCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        command = getattr(args, "command", None)
        message = missing_module_message(e, f"'{parser.prog}{' ' + command if command else ''}'")
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
