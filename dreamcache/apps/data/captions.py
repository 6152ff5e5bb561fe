"""Captions for synthesis: reading caption lists, de-duplicating, object x context combinations, folder names."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ...core.errors import DreamCacheError
from .seeds import rng_for


def read_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty lines without '#' comments."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DreamCacheError(f"Could not read '{path}' ({e.strerror or e}); pass an existing UTF-8 text file with one "
                              "entry per line.") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def caption_key(caption: str) -> str:
    """What makes two captions the same: case, spacing and trailing punctuation are ignored."""
    return re.sub(r"\s+", " ", caption.strip().lower()).rstrip(" .,;:!")


def dedupe(captions: list[str]) -> list[str]:
    seen, out = set(), []
    for c in captions:
        k = caption_key(c)
        if k and k not in seen:
            seen.add(k)
            out.append(c.strip())
    return out


def combine_captions(objects: list[str], contexts: list[str], template: str = "{object} {context}",
                     per_object: int | None = None,
                     seed: int = 0) -> list[str]:
    """Object x context captions: every pair, or ``per_object`` seeded contexts per object."""
    if "{object}" not in template:
        raise DreamCacheError(f"Caption template '{template}' has no {{object}} placeholder; e.g. '{{object}} "
                              f"{{context}}'.")
    out = []
    for i, obj in enumerate(objects):
        ctxs = contexts
        if per_object is not None and per_object < len(contexts):
            pick = rng_for(seed, "contexts", obj).choice(len(contexts), size=per_object, replace=False)
            ctxs = [contexts[j] for j in sorted(pick)]
        for ctx in ctxs or [""]:
            out.append(re.sub(r"\s+", " ", template.format(object=obj, context=ctx)).strip())
    return out


def object_id_for(caption: str) -> str:
    """A stable folder name: a slug of the first words plus a hash of the normalised caption."""
    slug = re.sub(r"[^a-z0-9]+", "-", caption_key(caption)).strip("-")[:40].strip("-") or "object"
    return f"{slug}-{hashlib.sha1(caption_key(caption).encode()).hexdigest()[:8]}"
