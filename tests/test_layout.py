"""One training layout (dreamcache.core.placement) for the data pipeline and for SubjectMask.

Protects: the geometry method.md gives (subject width a fraction of the canvas, aspect kept, height capped at the
canvas; random placement in training, centred at inference), one bounding-box convention for torch and numpy
masks, and that SubjectMask's ``train`` layout and the training data put a subject at the very same place."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamcache.apps.data import augment
from dreamcache.core import placement as layout
from dreamcache.core import subject


def test_bounding_box_is_the_same_for_torch_and_numpy_masks():
    m = np.zeros((20, 30), dtype=bool)
    m[3:9, 5:27] = True
    assert layout.bounding_box(m) == layout.bounding_box(torch.from_numpy(m)) == (5, 3, 27, 9)
    assert layout.bounding_box(torch.from_numpy(m).float()) == (5, 3, 27, 9)
    assert layout.bounding_box(np.zeros((4, 4))) is None and layout.bounding_box(torch.zeros(4, 4)) is None


@pytest.mark.parametrize("w, h, size, frac, expected", [
    (40, 20, 128, 0.85, (109, 54)),  # wide: width 85%, height by aspect
    (41, 41, 128, 0.85, (109, 109)),
    (10, 80, 64, 0.85, (8, 64)),  # tall: height capped at the canvas, width follows the aspect
    (10, 10, 100, 0.7, (70, 70)),
    (10, 10, 100, 1.0, (100, 100)),
])
def test_subject_size_spans_the_width_and_caps_the_height(w, h, size, frac, expected):
    assert layout.subject_size(w, h, size, frac) == expected


def test_training_places_at_random_inference_centres():
    assert layout.subject_offset(100, 60, 40) == (20, 30)
    assert layout.subject_offset(100, 60, 40, 0.0, 0.0) == (0, 0)
    assert layout.subject_offset(100, 60, 40, 0.999, 0.999) == (40, 60)
    assert layout.TRAIN_WIDTH_RANGE[0] < layout.INFERENCE_WIDTH < layout.TRAIN_WIDTH_RANGE[1]
    cfg = augment.AugmentConfig()
    assert (cfg.min_width, cfg.max_width) == layout.TRAIN_WIDTH_RANGE


@pytest.mark.parametrize("rw, rh", [(40, 20), (12, 50), (30, 30)])
def test_subject_mask_and_the_data_pipeline_place_a_subject_alike(rw, rh):
    """The same solid subject lands on the same pixels in SubjectMask's train layout (torch, bilinear) and in the
    data pipeline's centred placement (PIL, bicubic): one definition of the layout, two resamplers."""
    size = 64
    rgb = np.full((70, 80, 3), 30, dtype=np.uint8)
    mask = np.zeros((70, 80), dtype=bool)
    mask[5:5 + rh, 9:9 + rw] = True
    rgb[mask] = (200, 10, 10)
    data_canvas = augment.place_on_canvas(augment.crop_subject(rgb, mask), size, layout.INFERENCE_WIDTH)
    node_canvas = subject.make_reference(torch.from_numpy(rgb).float()[None] / 255,
                                         torch.from_numpy(mask).float()[None],
                                         layout="train", size=size)[0]
    data_box = layout.bounding_box((data_canvas < 250).any(-1))
    node_box = layout.bounding_box((node_canvas < 250 / 255).any(-1))
    assert data_box == node_box
    w, h = layout.subject_size(rw, rh, size)
    x, y = layout.subject_offset(size, w, h)
    assert data_box == (x, y, x + w, y + h)
