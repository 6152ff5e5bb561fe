"""Huge subject photos (issue 26): Subject Mask and Build Feature Cache shrink the photo before they allocate
anything its size, and give today's result within the resize's own error.

Protects: a photo that fits the working size gives exactly the full-size result of before (threshold, grow, feather
and both layouts); a larger one (here the working size is made small so a 1200x900 photo counts as huge) gives the
same mask (IoU >= 0.98, differences only along the edge) and reference (mean difference < 1 %), with grow and
feather still counted in pixels of the photo; the reference of Build Feature Cache from a shrunk photo equals the
one from the full photo within 1 % on average for every fit. Peak memory itself is measured on a real server by
benchmarks/huge_photo_memory.py (not a timed test).
"""
from __future__ import annotations

import pytest
import torch

from dreamcache.core import image, subject


def photo(h=900, w=1200):
    """A smooth photo (gradient background) with a disc subject, and the disc's mask."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    img = torch.stack([xx / w * 0.5, yy / h * 0.5, 0.3 + 0.2 * torch.sin(xx / 90.0)], -1)[None]
    disc = ((xx - w * 0.55) ** 2 + (yy - h * 0.5) ** 2) <= (min(h, w) * 0.3) ** 2
    img[0][disc] = torch.tensor([0.9, 0.3, 0.2])
    return img, disc.float()[None]


def today(img, m, layout, grow, feather, size=128):
    """The full-size pipeline as it was before issue 26."""
    masks = subject.refine_masks(subject.subject_probabilities(img, "mask", mask=m), 0.5, grow, feather)
    return subject.make_reference(img, masks, layout, size), masks


@pytest.mark.parametrize("layout,grow,feather", [("train", 0, 0), ("train", -6, 6), ("keep", 0, 0), ("keep", 4, 8)])
def test_subject_mask_on_a_shrunk_photo_matches_the_full_size_result(layout, grow, feather):
    img, m = photo()
    want_ref, want_mask = today(img, m, layout, grow, feather)
    ref, mask = subject.subject_reference(img, "mask", mask=m, grow=grow, feather=feather, layout=layout, size=128,
                                work_side=300)
    assert ref.shape == want_ref.shape and mask.shape == want_mask.shape == (1, 900, 1200)
    on, was = mask > 0.5, want_mask > 0.5
    assert (on & was).sum() / (on | was).sum() >= 0.98
    assert (mask - want_mask).abs().mean() < 0.005
    assert (ref - want_ref).abs().mean() < 0.01
    # the differences lie along the subject's edge (two working pixels = 8 photo pixels, plus the feather), nowhere else
    r = 8 + 2 * feather
    edge = subject.grow_mask(was.float(), r) - subject.grow_mask(was.float(), -r)
    far = (mask - want_mask).abs() * (1 - edge)
    assert far.max() < 1e-6


@pytest.mark.parametrize("layout,grow,feather", [("train", 0, 0), ("train", -3, 4), ("keep", 2, 3)])
def test_a_photo_that_fits_the_working_size_gives_exactly_the_old_result(layout, grow, feather):
    img, m = photo(180, 240)
    want_ref, want_mask = today(img, m, layout, grow, feather)
    ref, mask = subject.subject_reference(img, "mask", mask=m, grow=grow, feather=feather, layout=layout, size=128)
    assert torch.equal(ref, want_ref) and torch.equal(mask, want_mask)


def test_sam_prompts_are_scaled_to_the_shrunk_photo():
    img, m = photo()
    seen = {}

    def segment(rgb, box=None, points=None, labels=None):
        seen.update(shape=tuple(rgb.shape), box=box, points=points, labels=labels)
        return subject.resize_masks(m, 1, rgb.shape[1], rgb.shape[2])

    subject.subject_reference(img, "box", segment=segment, prompts=((120, 90, 1200, 900), [(600, 450)], [1]),
                              work_side=300, size=128)
    assert seen["shape"] == (1, 225, 300, 3)
    assert seen["box"] == pytest.approx((30, 22.5, 300, 225)) and seen["points"] == [pytest.approx((150, 112.5))]


@pytest.mark.parametrize("fit", ["pad", "stretch", "crop"])
def test_build_feature_cache_reference_from_a_shrunk_photo_matches_the_full_one(fit, monkeypatch):
    img, _ = photo(1500, 2100)
    got = image.fit_reference(img, 256, fit)
    monkeypatch.setattr(image, "shrink", lambda x, side: x)  # the full-size path of before
    want = image.fit_reference(img, 256, fit)
    assert got.shape == want.shape == (1, 256, 256, 3)
    assert (got - want).abs().mean() < 0.01


def test_shrink_keeps_the_aspect_and_allocates_only_the_result():
    img = torch.rand(2, 400, 600, 4)
    out = image.shrink(img, 150)
    assert out.shape == (2, 100, 150, 4)
    assert image.shrink(img, 600) is img
