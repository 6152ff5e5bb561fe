"""A small synthetic dataset in the reference layout, made in the tests (known shapes and masks)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_dataset(root, objects: int = 5, images: int = 4, size: int = 64, seed: int = 0) -> Path:
    """``objects`` x ``images`` items: a coloured ellipse or box (the subject, exactly its mask) on a textured
    background, with a caption naming shape and colour."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40),
               "purple": (140, 40, 170)}
    names = list(colours)
    yy, xx = np.mgrid[0:size, 0:size]
    for o in range(objects):
        colour = names[o % len(names)]
        shape = "ball" if o % 2 == 0 else "box"
        d = root / f"obj{o:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for n in range(images):
            h, w = size, size + 16 * (n % 2)  # some non-square pictures
            yy, xx = np.mgrid[0:h, 0:w]
            cx, cy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h
            rx, ry = rng.uniform(0.12, 0.3) * w, rng.uniform(0.12, 0.3) * h
            if shape == "ball":
                mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
            else:
                mask = (abs(xx - cx) <= rx) & (abs(yy - cy) <= ry)
            bg = (rng.uniform(60, 200, size=(1, 1, 3)) + rng.normal(0, 12, size=(h, w, 3))).clip(0, 255)
            img = bg.copy()
            img[mask] = np.array(colours[colour]) + rng.normal(0, 6, size=(int(mask.sum()), 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{n}_generation.png")
            Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(d / f"{n}_mask.png")
            (d / f"{n}_caption.txt").write_text(f"a {colour} {shape} on a table, photo {n}\n", encoding="utf-8")
    return root
