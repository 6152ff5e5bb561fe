"""Masks for synthesised images (pluggable: any callable rgb [H, W, 3] 0..1 -> bool mask [H, W]) and the check
that a mask is usable."""
from __future__ import annotations

import os
import re

import torch

from ...core import sam as sam_core
from ...core.errors import DreamCacheError


def white_background_mask(rgb: torch.Tensor, threshold: float = 0.94) -> torch.Tensor:
    """Subject mask of a picture on a near-white background: the background is every near-white pixel (all
    channels >= ``threshold``) connected to the border; everything else is the subject (white parts *inside*
    the subject stay subject). ``rgb`` (H, W, 3) float 0..1 -> (H, W) bool."""
    white = (rgb[..., :3] >= threshold).all(-1)
    seed = torch.zeros_like(white)
    seed[0, :], seed[-1, :], seed[:, 0], seed[:, -1] = white[0, :], white[-1, :], white[:, 0], white[:, -1]
    cand = white.float()[None, None]
    bg = seed.float()[None, None]
    while True:
        grown = torch.nn.functional.max_pool2d(bg, 3, stride=1, padding=1) * cand
        if torch.equal(grown, bg):
            break
        bg = grown
    return ~(bg[0, 0] > 0)


def white_background_masker(threshold: float = 0.94):
    def masker(rgb: torch.Tensor, caption: str = "") -> torch.Tensor:
        return white_background_mask(rgb, threshold)

    masker.describe = f"none-white-bg (threshold {threshold})"
    return masker


def parse_box(text: str | None):
    """``"x0,y0,x1,y1"``: pixels, or fractions of the picture when every value is <= 1."""
    if not text:
        return None
    try:
        vals = [float(t) for t in re.split(r"[\s,]+", text.strip()) if t]
    except ValueError:
        vals = []
    if len(vals) != 4 or not (vals[0] < vals[2] and vals[1] < vals[3]) or min(vals) < 0:
        raise DreamCacheError(f"Box '{text}' is not understood; write x0,y0,x1,y1 in pixels (or fractions 0-1) with x0 "
                              "< x1 and y0 < y1.")
    return vals


def sam_masker(path: str, mode: str = "auto", box: str | None = None, device: str | None = None):
    """A masker that runs SAM through the SubjectMask core (:mod:`dreamcache.core.sam`)."""
    if mode not in ("auto", "box"):
        raise DreamCacheError(f"SAM prompt mode '{mode}' is not supported here; use auto or box.")
    if not path or not os.path.isfile(path):
        raise DreamCacheError(f"SAM checkpoint '{path}' does not exist; pass --sam /path/to/sam_vit_b_01ec64.pth "
                              "(models/sams).")
    box_vals = parse_box(box)
    if mode == "box" and box_vals is None:
        raise DreamCacheError("SAM prompt mode 'box' needs --sam-box x0,y0,x1,y1.")
    model, variant = sam_core.load_sam(path)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(dev)

    def masker(rgb: torch.Tensor, caption: str = "") -> torch.Tensor:
        h, w = rgb.shape[:2]
        b = None
        if mode == "box":
            b = box_vals if max(box_vals) > 1 else [box_vals[0] * w, box_vals[1] * h, box_vals[2] * w, box_vals[3] * h]
        probs = sam_core.predict(model, rgb, mode, box=b)
        return probs >= 0.5

    masker.describe = f"sam {variant} ({mode})"
    return masker


#: ``--masks`` choices -> factory(args) -> masker
MASKERS = {
    "sam": lambda a: sam_masker(a.sam, a.sam_mode, a.sam_box),
    "none-white-bg": lambda a: white_background_masker(a.white_threshold),
}


def mask_problem(mask: torch.Tensor, min_area: float = 0.005, max_area: float = 0.95) -> str | None:
    """Why a synthesised mask is unusable (too small / almost the whole picture), or None."""
    frac = float(mask.float().mean())
    if frac < min_area:
        return f"subject covers {frac:.1%} of the picture (< {min_area:.1%})"
    if frac > max_area:
        return f"subject covers {frac:.1%} of the picture (> {max_area:.0%})"
    return None
