"""DreamCache's guidance, as pure tensor arithmetic (method.md, "Guidance"); the ComfyUI guider that evaluates the
branches is :class:`dreamcache.comfy.guidance.DreamCacheGuider`.

combined: e = e(∅,∅) + s_I·(e(c_I,∅) − e(∅,∅)) + s_T·(e(c_I,c_T) − e(c_I,∅))   (three evaluations)
joint:    e = e(∅,∅) + s·(e(c_I,c_T) − e(∅,∅))                                 (two; s_I = s_T = s: plain CFG)
"""
from __future__ import annotations

import math

from .errors import DreamCacheError

MODES = ("combined", "joint")


def check_scales(text_scale: float, image_scale: float, mode: str):
    """One sentence for a scale outside 0..100 (or not a finite number) or an unknown mode."""
    for name, v in (("text_scale", text_scale), ("image_scale", image_scale)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 100.0):
            raise DreamCacheError(f"{name} {v} is out of range; use a value between 0 and 100.")
    if mode not in MODES:
        raise DreamCacheError(f"Unknown guidance mode '{mode}'; use 'combined' or 'joint'.")


def combined_guidance(e_00, e_i0, e_it, image_scale: float, text_scale: float, text_guided=None):
    """The combined-guidance prediction from the three branches e(∅,∅), e(c_I,∅), e(c_I,c_T).

    ``text_guided``: the text term e(c_I,∅) + s_T·(e(c_I,c_T) − e(c_I,∅)) as the caller made it; the guider passes
    ComfyUI's ``cfg_function`` result so that sampler-CFG functions and post-CFG hooks apply to it. The image term
    is then added as e(∅,∅) + s_I·(e(c_I,∅) − e(∅,∅)) − e(c_I,∅), which with the plain text term is the formula."""
    if text_guided is None:
        text_guided = e_i0 + text_scale * (e_it - e_i0)
    return text_guided + (image_scale - 1.0) * (e_i0 - e_00)
