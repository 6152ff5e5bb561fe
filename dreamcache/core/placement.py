"""The training layout of a reference: where and how large the subject sits on its square canvas.

One definition for the data pipeline (training, random placement) and for SubjectMask's ``train`` layout and the
trainer's previews (inference, centred). method.md, "Preprocessing": in training the subject, cropped to its
bounding box, is rescaled so that it spans 70-100% of the canvas *width* at a random position; its height follows
the aspect ratio and is capped at the canvas (so a tall subject spans the full height). Inference offers the same
layout, deterministic: the middle of that width range, centred. See docs/architecture.md.
"""
from __future__ import annotations

#: Training: the subject's width is a uniform fraction in this range of the canvas side.
TRAIN_WIDTH_RANGE = (0.7, 1.0)
#: Inference: the middle of the training range, centred on the canvas.
INFERENCE_WIDTH = 0.85


def bounding_box(mask) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` (x1, y1 exclusive) of the pixels of a 2-D mask (torch tensor or numpy array) that are
    > 0 / True, or None when there are none."""
    on = mask > 0
    cols = on.any(0).nonzero()
    rows = on.any(1).nonzero()
    cols, rows = (cols[0], rows[0]) if isinstance(cols, tuple) else (cols.flatten(), rows.flatten())  # numpy / torch
    if len(cols) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def subject_size(box_width: int, box_height: int, size: int, width: float = INFERENCE_WIDTH) -> tuple[int, int]:
    """``(w, h)`` in pixels of a ``box_width x box_height`` subject on a ``size`` canvas: its width is ``width *
    size``, its height follows the aspect ratio and is capped at ``size`` (the width then shrinks with it)."""
    aspect = box_width / box_height
    w = max(1, int(round(width * size)))
    h = max(1, int(round(w / aspect)))
    if h > size:
        h = size
        w = max(1, min(size, int(round(h * aspect))))
    return w, h


def subject_offset(size: int, w: int, h: int, u: float | None = None, v: float | None = None) -> tuple[int, int]:
    """``(x, y)`` of the subject's top-left corner: centred, or at relative position ``(u, v)`` in [0, 1) of the
    free room (training's random placement)."""
    if u is None or v is None:
        return (size - w) // 2, (size - h) // 2
    return min(size - w, int(u * (size - w + 1))), min(size - h, int(v * (size - h + 1)))
