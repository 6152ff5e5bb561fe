"""SAM in the core (dreamcache.sam), without ComfyUI.

Protects: ViT-B/L/H are told apart from tensor shapes alone (built on the meta device: no memory, no time); files that
are not SAM checkpoints (random safetensors, pickles with custom classes, text, wrong depth, extra keys) give one clear
DreamCacheError and nothing is unpickled; predictions use exactly SamPredictor's preprocessing and prompt transforms
(parity with segment_anything's own predictor on a tiny seeded SAM); auto mode is deterministic and sized right;
an image seen before is not encoded again (and gives the same masks);
the pack's core works, and says what to install, when segment_anything is missing.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from dreamcache.core import sam as core_sam
from dreamcache.core import subject
from dreamcache.core.errors import DreamCacheError

pytest.importorskip("segment_anything", reason="segment-anything is not installed (pip install segment-anything)")

from tiny_sam import make_tiny_sam, register_tiny_variant  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_sam(seed=0)


def _meta_state_dict(variant):
    return core_sam.build_empty(variant, device="meta").state_dict()


# ---------------------------------------------------------------------------------------------------------------------
# detection and loading


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_variant_is_detected_from_shapes(variant):
    sd = _meta_state_dict(variant)
    assert all(t.is_meta for t in sd.values())
    assert core_sam.detect_variant(sd, "x.pth") == variant
    # renaming the file changes nothing: only shapes count
    assert core_sam.detect_variant(dict(sd), "sam_vit_h_4b8939.pth") == variant


def test_sam_like_files_of_another_shape_are_refused():
    sd = _meta_state_dict("vit_b")
    fewer = {k: v for k, v in sd.items() if not k.startswith("image_encoder.blocks.11.")}
    with pytest.raises(DreamCacheError, match="width 768 with 11 blocks, which is none of ViT-B"):
        core_sam.detect_variant(fewer, "odd.pth")
    extra = dict(sd, **{"image_encoder.extra_head.weight": torch.empty(3, device="meta")})
    with pytest.raises(DreamCacheError, match="looks like SAM vit_b but its weights do not fit it.*extra_head"):
        core_sam.sam_from_state_dict(extra, "extra.pth")
    with pytest.raises(DreamCacheError, match="missing SAM weights"):
        core_sam.sam_from_state_dict(sd, "meta.pth")  # every tensor still on the meta device


def test_non_sam_safetensors_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "random.safetensors"
    save_file({"weight": torch.randn(4, 4), "bias": torch.randn(4)}, str(path))
    with pytest.raises(DreamCacheError, match="'random.safetensors' is not a Segment Anything "
                                              "checkpoint.*sam_vit_b_01ec64.pth"):
        core_sam.load_sam(str(path))
    (tmp_path / "broken.safetensors").write_bytes(b"not a header")
    with pytest.raises(DreamCacheError, match="could not be read as safetensors"):
        core_sam.load_sam(str(tmp_path / "broken.safetensors"))


class Payload:
    """A custom class in a pickle: weights_only must refuse it without ever running its __setstate__."""

    ran = False

    def __setstate__(self, state):
        Payload.ran = True


def test_pickles_with_custom_objects_are_refused_without_unpickling(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1), "payload": Payload()}, str(path))
    with pytest.raises(DreamCacheError, match="'evil.pth' contains objects other than tensors, which are never "
                                              "unpickled"):
        core_sam.load_sam(str(path))
    assert Payload.ran is False
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(DreamCacheError, match="could not be read as a PyTorch tensor file"):
        core_sam.load_sam(str(tmp_path / "text.pth"))
    torch.save([torch.zeros(2)], str(tmp_path / "list.pth"))
    with pytest.raises(DreamCacheError, match="not hold a plain dict of tensors"):
        core_sam.load_sam(str(tmp_path / "list.pth"))
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(DreamCacheError, match="extension '.onnx'"):
        core_sam.load_sam(str(tmp_path / "model.onnx"))
    with pytest.raises(DreamCacheError, match="does not exist"):
        core_sam.load_sam(str(tmp_path / "missing.pth"))


def test_a_tiny_sam_round_trips_through_a_file_strictly(tmp_path, tiny, monkeypatch):
    """The real load path (safe read, shape detection, meta build, strict assign) with a tiny variant in the table."""
    register_tiny_variant(core_sam, monkeypatch)
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), str(path))
    model, variant = core_sam.load_sam(str(path))
    assert variant == "tiny"
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert torch.equal(model.pixel_mean.flatten(), tiny.pixel_mean.flatten())
    for (k, a), (k2, b) in zip(model.state_dict().items(), tiny.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# prediction


def _photo(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(h, w, 3, generator=g) * 0.3
    img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = torch.tensor([0.9, 0.5, 0.1])
    return img


def test_prompted_prediction_matches_sam_predictor(tiny):
    from segment_anything import SamPredictor

    img = _photo(48, 80)
    pred = SamPredictor(tiny)
    pred.set_image((img * 255).round().to(torch.uint8).numpy())
    emb = core_sam.embed_image(tiny, img)
    assert torch.equal(emb.features, pred.features)
    assert emb.input_size == pred.input_size and emb.original_size == pred.original_size

    box = (20, 12, 60, 36)
    logits, iou, _ = pred.predict(box=np.array(box), multimask_output=False, return_logits=True)
    ours = core_sam.predict(tiny, img, "box", box=box)
    assert torch.allclose(ours, torch.sigmoid(torch.as_tensor(logits[0])), atol=1e-6)

    points, labels = [(40.0, 24.0), (3.0, 3.0)], [1, 0]
    logits, iou, _ = pred.predict(point_coords=np.array(points), point_labels=np.array(labels), multimask_output=False,
                                  return_logits=True)
    ours = core_sam.predict(tiny, img, "points", points=points, labels=labels)
    assert torch.allclose(ours, torch.sigmoid(torch.as_tensor(logits[0])), atol=1e-6)

    # one point: three candidates, the one SAM's IoU head scores best
    logits, iou, _ = pred.predict(point_coords=np.array(points[:1]), point_labels=np.array([1]), multimask_output=True,
                                  return_logits=True)
    ours = core_sam.predict(tiny, img, "points", points=points[:1], labels=[1])
    assert torch.allclose(ours, torch.sigmoid(torch.as_tensor(logits[int(np.argmax(iou))])), atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 80), (7, 5), (300, 24)])
def test_auto_mode_gives_a_deterministic_probability_map_of_the_image_size(tiny, shape):
    img = _photo(*shape)
    a = core_sam.predict(tiny, img, "auto")
    b = core_sam.predict(tiny, img, "auto")
    assert a.shape == shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) <= 1 and float(a.max()) > float(a.min())


def test_auto_mode_is_the_centre_point_refined_by_the_box_of_the_largest_confident_candidate(tiny):
    from segment_anything import SamPredictor

    img = _photo(48, 80, seed=3)
    pred = SamPredictor(tiny)
    pred.set_image((img * 255).round().to(torch.uint8).numpy())
    centre = np.array([[39.5, 23.5]])
    masks, iou, _ = pred.predict(point_coords=centre, point_labels=np.array([1]), multimask_output=True)
    area = masks.reshape(3, -1).mean(1)
    ok = (area > 0) & (area < core_sam.MAX_SUBJECT_AREA)
    assert ok.any(), "the tiny SAM must give a usable first-pass candidate for this test"
    confident = ok & (iou >= iou[ok].max() - core_sam.CONFIDENT_MARGIN)
    pick = int(np.argmax(np.where(confident, area, -1)))
    ys, xs = np.nonzero(masks[pick])
    # our box comes from the 4x-upsampled low-res logits: within a few pixels of the full-size mask's box
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)
    logits, iou2, _ = pred.predict(point_coords=centre, point_labels=np.array([1]), box=box, multimask_output=True,
                                   return_logits=True)
    expected = torch.sigmoid(torch.as_tensor(logits[int(np.argmax(iou2))]))
    ours = core_sam.predict(tiny, img, "auto")
    agree = ((ours > 0.5) == (expected > 0.5)).float().mean()
    assert agree > 0.97, agree


class EncoderCounter:
    def __init__(self, sam):
        self.n = 0
        self.handle = sam.image_encoder.register_forward_hook(self)

    def __call__(self, *args):
        self.n += 1


def test_embedding_cache_skips_the_encoder_for_an_image_seen_before(tiny):
    cache = core_sam.EmbeddingCache(max_items=2)
    imgs = [_photo(40, 56, seed=s) for s in range(3)]
    count = EncoderCounter(tiny)
    try:
        first = core_sam.predict(tiny, imgs[0], "box", box=(4, 4, 50, 30), cache=cache)
        assert count.n == 1 and len(cache) == 1
        again = core_sam.predict(tiny, imgs[0].clone(), "points", points=[(20, 20)], labels=[1], cache=cache)
        assert count.n == 1  # same pixels, other prompt: decoder only
        assert torch.equal(first, core_sam.predict(tiny, imgs[0], "box", box=(4, 4, 50, 30)))
        assert torch.equal(again, core_sam.predict(tiny, imgs[0], "points", points=[(20, 20)], labels=[1]))
        count.n = 0
        core_sam.predict(tiny, imgs[1], "auto", cache=cache)
        core_sam.predict(tiny, imgs[2], "auto", cache=cache)  # evicts imgs[0] (two entries kept)
        core_sam.predict(tiny, imgs[0], "auto", cache=cache)
        assert count.n == 3 and len(cache) == 2
    finally:
        count.handle.remove()


def test_points_mode_without_a_positive_point_is_refused(tiny):
    with pytest.raises(DreamCacheError, match="at least one positive point"):
        core_sam.predict(tiny, _photo(16, 16), "points", points=[(1, 1)], labels=[0])
    with pytest.raises(DreamCacheError, match="does not use SAM"):
        core_sam.predict(tiny, _photo(16, 16), "mask")


def test_batch_prediction_calls_back_per_image(tiny):
    imgs = torch.stack([_photo(32, 40, seed=s) for s in range(3)])
    seen = []
    out = core_sam.predict_batch(tiny, imgs, "box", box=(5, 5, 30, 25), on_image=seen.append)
    assert out.shape == (3, 32, 40) and seen == [0, 1, 2]
    assert torch.equal(out[1], core_sam.predict(tiny, imgs[1], "box", box=(5, 5, 30, 25)))


# ---------------------------------------------------------------------------------------------------------------------
# without segment_anything


def test_core_works_without_segment_anything_and_says_what_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "segment_anything" or m.startswith("segment_anything.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # import now fails like an uninstalled package
    with pytest.raises(DreamCacheError, match="pip install segment-anything"):
        core_sam.require_segment_anything()
    with pytest.raises(DreamCacheError, match="pip install segment-anything"):
        core_sam.load_sam(__file__)
    # mask mode needs nothing of SAM
    img = _photo(20, 30)[None]
    mask = torch.zeros(1, 20, 30)
    mask[0, 5:15, 8:22] = 1
    out = subject.make_reference(img, subject.refine_masks(subject.subject_probabilities(img, "mask", mask=mask)),
                                 size=64)
    assert out.shape == (1, 64, 64, 3)
