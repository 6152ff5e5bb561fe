"""Writing synthesised items into the dataset layout, and what ``synth`` renders."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .layout import CAPTION_SUFFIX, IMAGE_SUFFIX, MASK_SUFFIX


def _atomic_write(path: Path, write):
    tmp = path.with_name(f".partial-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def write_item(root: str | os.PathLike, object_id: str, n: int, image: torch.Tensor, mask: torch.Tensor, caption: str):
    """Write one synthesised item (image, mask, caption last: an item is complete when all three exist)."""
    d = Path(root) / object_id
    d.mkdir(parents=True, exist_ok=True)
    img = (image[..., :3].float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    m = (mask.bool().cpu().numpy().astype(np.uint8) * 255)
    _atomic_write(d / f"{n}{IMAGE_SUFFIX}", lambda p: Image.fromarray(img).save(p, format="PNG"))
    _atomic_write(d / f"{n}{MASK_SUFFIX}", lambda p: Image.fromarray(m, mode="L").save(p, format="PNG"))
    _atomic_write(d / f"{n}{CAPTION_SUFFIX}", lambda p: p.write_text(caption.strip() + "\n", encoding="utf-8"))


@dataclass
class SynthSettings:
    """What ``synth`` renders (the paper: SD-XL, CFG 3.5, 25 steps)."""

    width: int = 1024
    height: int = 1024
    steps: int = 25
    cfg: float = 3.5
    sampler: str = "euler"
    scheduler: str = "normal"
    negative: str = ""
    prompt_suffix: str = ""
    images_per_caption: int = 1
    seed: int = 0
    extra: dict = field(default_factory=dict)
