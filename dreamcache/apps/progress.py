"""Progress bars of the command lines (tqdm, or nothing when it is off or missing)."""
from __future__ import annotations


def progress_bar(iterable, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a requirement; degrade to no bar rather than fail
        return iterable
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True)
