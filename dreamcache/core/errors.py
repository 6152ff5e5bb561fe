"""The one exception type the pack raises for bad user input.

Every message is a single sentence that names what is wrong and what to do about it; ComfyUI shows it
in the node's error panel, and the server keeps running.
"""


class DreamCacheError(ValueError):
    """A user-facing error: bad file, mismatched adapter/model/cache, bad shapes, empty mask, missing model."""


# ComfyUI shows errors as "<module>.<class>: message"; inside ComfyUI this package's module path is the pack's
# file-system path, so give the class a short, stable name for the UI.
DreamCacheError.__module__ = "dreamcache"
