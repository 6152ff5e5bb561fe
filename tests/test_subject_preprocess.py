"""SubjectMask's pure preprocessing (dreamcache.core.subject), on synthetic images whose right answer is known.

Protects: the train layout (exact bounding box crop, aspect kept, subject's width at 85% of the square, height capped,
centred, background exactly the chosen colour, nothing of the photo's background left); the keep layout; threshold,
grow and feather; mask resizing and batching; RGBA alpha and grayscale input; which mask source each prompt mode
uses; prompt, point and colour parsing; the clear errors for an empty mask and bad input. No ComfyUI, no SAM.
"""
from __future__ import annotations

import pytest
import torch

from dreamcache.core import subject
from dreamcache.core.errors import DreamCacheError

RED = torch.tensor([1.0, 0.0, 0.0])


def disc_on_noise(h=96, w=128, cx=80, cy=40, r=20, seed=0):
    """A red disc on uniform noise, and its exact mask."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(h, w, 3, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    mask = (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).float()
    img[mask.bool()] = RED
    return img[None], mask[None]


def rect_on_noise(h=80, w=100, x0=30, y0=20, rw=40, rh=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(h, w, 3, generator=g)
    mask = torch.zeros(h, w)
    mask[y0:y0 + rh, x0:x0 + rw] = 1.0
    img[mask.bool()] = RED
    return img[None], mask[None]


def not_background(img, color=(1.0, 1.0, 1.0)):
    return (img != torch.tensor(color)).any(dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# layouts


def test_bounding_box_of_disc_is_exact():
    _, mask = disc_on_noise(cx=80, cy=40, r=20)
    assert subject.bounding_box(mask[0]) == (60, 20, 101, 61)
    assert subject.bounding_box(torch.zeros(5, 7)) is None


def test_train_layout_disc_is_cropped_scaled_to_85_percent_centred_on_exact_white():
    img, mask = disc_on_noise()
    out = subject.make_reference(img, mask, layout="train", size=128)
    assert out.shape == (1, 128, 128, 3) and out.dtype == torch.float32
    side = round(0.85 * 128)  # 109: the disc's 41-pixel bounding box scaled to 85% of the side
    lo = (128 - side) // 2
    box = subject.bounding_box(not_background(out[0]).float())
    assert box == (lo, lo, lo + side, lo + side)
    # background exactly white: everything outside the scaled disc (+ one source pixel of resampled edge) is 1.0
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    c = lo + side / 2 - 0.5
    dist = ((xx - c) ** 2 + (yy - c) ** 2).sqrt()
    outside = dist > side / 2 + side / 41
    assert torch.equal(out[0][outside], torch.ones_like(out[0][outside]))
    inside = dist < side / 2 - 2 * side / 41 - 1  # minus the resampled edge and the disc's pixel staircase
    assert torch.allclose(out[0][inside], RED.expand_as(out[0][inside]), atol=1e-5)
    # no colour of the noise bleeds into the edge: every pixel is red blended with white, (1, 1-a, 1-a)
    assert torch.allclose(out[0, ..., 0], torch.ones(128, 128), atol=1e-5)
    assert torch.allclose(out[0, ..., 1], out[0, ..., 2], atol=1e-5)


def test_train_layout_keeps_the_aspect_of_a_wide_subject():
    img, mask = rect_on_noise(rw=40, rh=20)
    out = subject.make_reference(img, mask, layout="train", size=128)
    long_side = round(0.85 * 128)
    short_side = round(20 * 0.85 * 128 / 40)  # 54
    left, top = (128 - long_side) // 2, (128 - short_side) // 2
    assert subject.bounding_box(not_background(out[0]).float()) == (left, top, left + long_side, top + short_side)
    region = out[0, top:top + short_side, left:left + long_side]
    assert torch.allclose(region, RED.expand_as(region), atol=1e-5)


def test_train_layout_of_a_tall_subject_and_a_custom_background():
    img, mask = rect_on_noise(h=90, w=60, x0=10, y0=5, rw=10, rh=80)
    out = subject.make_reference(img, mask, layout="train", size=64, background="0,0,0")
    # as in training (core.placement): the width would be 85% of the side, but the height is capped at the side
    long_side, short_side = 64, round(64 * 10 / 80)
    box = subject.bounding_box(not_background(out[0], (0.0, 0.0, 0.0)).float())
    assert (box[2] - box[0], box[3] - box[1]) == (short_side, long_side)
    assert box[0] == (64 - short_side) // 2 and box[1] == (64 - long_side) // 2
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[box[1]:box[3], box[0]:box[2]] = False
    assert torch.equal(out[0][outside], torch.zeros_like(out[0][outside]))


def test_keep_layout_paints_the_background_and_keeps_the_subject_exactly():
    img, mask = disc_on_noise()
    out = subject.make_reference(img, mask, layout="keep", background="#ffffff")
    assert out.shape == img.shape
    m = mask[0].bool()
    assert torch.equal(out[0][~m], torch.ones_like(out[0][~m]))
    assert torch.equal(out[0][m], img[0][m])
    grey = subject.make_reference(img, mask, layout="keep", background="#808080")
    assert torch.allclose(grey[0][~m], torch.full_like(grey[0][~m], 128 / 255))


def test_mask_covering_everything_is_the_whole_picture_padded_to_a_square():
    img = torch.rand(1, 40, 80, 3)
    full = torch.ones(1, 40, 80)
    masks = subject.refine_masks(full)
    out = subject.make_reference(img, masks, layout="train", size=64)
    long_side, short_side = round(0.85 * 64), round(40 * 0.85 * 64 / 80)
    box = subject.bounding_box(not_background(out[0]).float())
    assert (box[2] - box[0], box[3] - box[1]) == (long_side, short_side)


def test_tiny_subject_is_upscaled_and_a_batch_gets_one_square_each():
    img = torch.rand(2, 12, 9, 3)
    masks = torch.zeros(2, 12, 9)
    masks[0, 5, 4] = 1.0  # one pixel
    masks[1, 2:10, 1:8] = 1.0
    out = subject.make_reference(img, masks, layout="train", size=32)
    assert out.shape == (2, 32, 32, 3)
    assert torch.allclose(out[0, 16, 16], img[0, 5, 4], atol=1e-5)  # the single pixel fills the centre
    assert out.min() >= 0 and out.max() <= 1


# ---------------------------------------------------------------------------------------------------------------------
# mask operations


def test_threshold_grow_and_shrink_move_the_box_by_exactly_the_pixels():
    _, mask = rect_on_noise()
    probs = mask * 0.8 + 0.1  # subject 0.9, background 0.1
    base = subject.refine_masks(probs, threshold=0.5)
    assert torch.equal(base, mask)
    assert torch.equal(subject.refine_masks(probs, threshold=0.05), torch.ones_like(mask))
    with pytest.raises(DreamCacheError, match="No subject found"):
        subject.refine_masks(probs, threshold=0.95)
    x0, y0, x1, y1 = subject.bounding_box(mask[0])
    assert subject.bounding_box(subject.refine_masks(probs, grow=4)[0]) == (x0 - 4, y0 - 4, x1 + 4, y1 + 4)
    assert subject.bounding_box(subject.refine_masks(probs, grow=-3)[0]) == (x0 + 3, y0 + 3, x1 - 3, y1 - 3)
    _, disc = disc_on_noise(cx=64, cy=48, r=15)
    grown = subject.grow_mask(disc, 4)
    assert torch.all(grown >= disc) and set(grown.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(subject.grow_mask(grown, -4) * disc, disc)  # shrinking back keeps the whole disc
    # a point grows into a near-round octagon: the full cross, not the square's corners
    dot = torch.zeros(1, 15, 15)
    dot[0, 7, 7] = 1
    g = subject.grow_mask(dot, 4)[0]
    assert g[7, 3] == 1 and g[3, 7] == 1 and g[11, 7] == 1 and g[3, 3] == 0
    with pytest.raises(DreamCacheError, match="threshold"):
        subject.binarize(probs, 1.5)


def test_feather_gives_a_soft_edge_exactly_feather_pixels_wide():
    _, mask = rect_on_noise()
    soft = subject.feather_mask(mask, 4)
    assert soft.min() >= 0 and soft.max() <= 1
    x0, y0, x1, y1 = subject.bounding_box(mask[0])
    assert subject.bounding_box(soft[0]) == (x0 - 4, y0 - 4, x1 + 4, y1 + 4)
    assert soft[0, 30, 50] == 1.0  # deep inside
    row = soft[0, 30, x0 - 5:x0 + 5]
    assert row[0] == 0 and torch.all(row[1:] >= row[:-1]) and 0 < row[5] < 1  # a monotone ramp across the edge
    assert torch.equal(subject.feather_mask(mask, 0), mask)


def test_empty_mask_is_a_clear_error():
    with pytest.raises(DreamCacheError, match="No subject found in image 2 of 2.*give a box or points"):
        subject.refine_masks(torch.stack([torch.ones(8, 8), torch.zeros(8, 8)]))
    with pytest.raises(DreamCacheError, match="after shrinking"):
        subject.refine_masks(torch.ones(1, 8, 8) * torch.eye(8), grow=-2)


def test_masks_of_another_size_are_resized_and_batched():
    small = torch.zeros(16, 16)
    small[4:12, 4:12] = 1
    m = subject.resize_masks(small, 3, 64, 32)
    assert m.shape == (3, 64, 32) and m.dtype == torch.float32
    assert torch.equal(m[0], m[2]) and m[0, 32, 16] == 1 and m[0, 2, 2] == 0
    assert subject.resize_masks(torch.ones(2, 1, 8, 8), 2, 8, 8).shape == (2, 8, 8)
    assert subject.resize_masks(torch.ones(2, 8, 8, 1), 2, 8, 8).shape == (2, 8, 8)
    assert subject.resize_masks(torch.full((1, 8, 8), 3.0), 1, 8, 8).max() == 1.0
    with pytest.raises(DreamCacheError, match="3 masks for 2 images"):
        subject.resize_masks(torch.ones(3, 8, 8), 2, 8, 8)
    with pytest.raises(DreamCacheError, match="not a MASK"):
        subject.resize_masks("mask", 1, 8, 8)


# ---------------------------------------------------------------------------------------------------------------------
# mask sources


def _must_not_segment(_rgb):
    raise AssertionError("SAM must not run here")


def test_mask_mode_uses_the_mask_input_as_is_and_never_calls_the_segmenter():
    img, mask = disc_on_noise()
    soft = mask * 0.7
    probs = subject.subject_probabilities(img, "mask", mask=soft, segment=_must_not_segment)
    assert torch.equal(probs, soft)
    inv = subject.subject_probabilities(img, "mask", mask=mask, invert_mask=True, segment=_must_not_segment)
    assert torch.equal(inv, 1 - mask)
    assert not subject.needs_sam("mask", img)
    with pytest.raises(DreamCacheError, match="needs a MASK input"):
        subject.subject_probabilities(img, "mask")


def test_rgba_alpha_is_the_mask_candidate_in_auto_and_mask_modes():
    img, mask = disc_on_noise()
    rgba = torch.cat([img, mask[..., None] * 0.9 + 0.05], dim=-1)  # alpha 0.95 on the disc, 0.05 elsewhere
    assert not subject.needs_sam("auto", rgba) and subject.needs_sam("box", rgba)
    for mode in ("auto", "mask"):
        probs = subject.subject_probabilities(rgba, mode, segment=_must_not_segment)
        assert torch.equal(subject.refine_masks(probs), mask)
    out = subject.make_reference(rgba, mask, layout="keep")
    assert out.shape[-1] == 3
    m = mask[0].bool()
    expected = img[0][m] * 0.95 + 0.05  # alpha composited on white
    assert torch.allclose(out[0][m], expected, atol=1e-6)
    # an opaque RGBA image is not cut out: SAM is needed
    opaque = torch.cat([img, torch.ones_like(mask)[..., None]], dim=-1)
    assert subject.alpha_mask(opaque) is None and subject.needs_sam("auto", opaque)


def test_sam_modes_call_the_segmenter_with_rgb_on_white():
    gray = torch.rand(2, 10, 12, 1)
    seen = {}

    def segment(rgb):
        seen["rgb"] = rgb
        return torch.full(rgb.shape[:3], 0.9)

    probs = subject.subject_probabilities(gray, "auto", segment=segment)
    assert seen["rgb"].shape == (2, 10, 12, 3) and torch.equal(seen["rgb"][..., 0], gray[..., 0])
    assert probs.shape == (2, 10, 12)
    out = subject.make_reference(gray, subject.refine_masks(probs), layout="keep")
    assert out.shape == (2, 10, 12, 3)
    with pytest.raises(DreamCacheError, match="needs a SAM model.*DreamCacheSAMLoader"):
        subject.subject_probabilities(gray, "box")
    with pytest.raises(DreamCacheError, match="Unknown prompt_mode"):
        subject.subject_probabilities(gray, "lasso")


def test_bad_images_are_clear_errors():
    with pytest.raises(DreamCacheError, match="empty"):
        subject.as_image_batch(torch.zeros(0, 8, 8, 3))
    with pytest.raises(DreamCacheError, match="5 channels"):
        subject.as_image_batch(torch.zeros(1, 8, 8, 5))
    with pytest.raises(DreamCacheError, match="layout"):
        subject.make_reference(torch.rand(1, 8, 8, 3), torch.ones(1, 8, 8), layout="stretch")


# ---------------------------------------------------------------------------------------------------------------------
# parsing


def test_points_boxes_and_colours_are_parsed_and_validated():
    assert subject.parse_points("120,80; 200,150") == [(120.0, 80.0), (200.0, 150.0)]
    assert subject.parse_points("(1, 2)\n[3 4];") == [(1.0, 2.0), (3.0, 4.0)]
    assert subject.parse_points("  ") == []
    with pytest.raises(DreamCacheError, match="Point '1,2,3' in positive_points is not understood"):
        subject.parse_points("1,2,3", "positive_points")
    box, pts, labels = subject.sam_prompts("box", 100, 50, 10, 5, 200, 20, "", "3,4")
    assert box == (10, 5, 100, 25) and pts == [(3.0, 4.0)] and labels == [0]
    box, pts, labels = subject.sam_prompts("points", 100, 50, positive_points="1,1; 2,2", negative_points="9,9")
    assert box is None and pts == [(1, 1), (2, 2), (9, 9)] and labels == [1, 1, 0]
    assert subject.sam_prompts("auto", 100, 50) == (None, None, None)
    with pytest.raises(DreamCacheError, match="at least one positive point"):
        subject.sam_prompts("points", 100, 50, negative_points="9,9")
    with pytest.raises(DreamCacheError, match="outside the 100x50 image"):
        subject.sam_prompts("points", 100, 50, positive_points="100,10")
    with pytest.raises(DreamCacheError, match="box_width and box_height"):
        subject.sam_prompts("box", 100, 50, 0, 0, 0, 10)
    with pytest.raises(DreamCacheError, match="outside"):
        subject.sam_prompts("box", 100, 50, 120, 0, 10, 10)
    assert subject.parse_color("#ffffff") == (1.0, 1.0, 1.0)
    assert subject.parse_color("#f00") == (1.0, 0.0, 0.0)
    assert subject.parse_color("0, 128, 255") == (0.0, 128 / 255, 1.0)
    assert subject.parse_color((255, 255, 255)) == (1.0, 1.0, 1.0)
    assert subject.parse_color("White") == (1.0, 1.0, 1.0)
    for bad in ("#12345", "300,0,0", "blue-ish", "1,2"):
        with pytest.raises(DreamCacheError, match="Background colour"):
            subject.parse_color(bad)
