"""Training data without ComfyUI: dataset validation, the seeded augmentations (jitter before normalisation),
caption dropout, data order, synthesis helpers, the resumable training state and the trainer's settings."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_data import make_dataset

from dreamcache.apps import data as D
from dreamcache.apps.data import cli as DC
from dreamcache.apps.train import config as T
from dreamcache.core.adapter import DreamCacheAdapter
from dreamcache.core.errors import DreamCacheError
from dreamcache.core.layers import SD_LAYERS


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), objects=5, images=4, size=64)


def cfg(**kw):
    base = dict(resolution=64, jitter_p=0.0, erase_p=0.0, hflip_p=0.0)
    base.update(kw)
    return D.AugmentConfig(**base)


# ---- validation -----------------------------------------------------------------------------------------------------

def test_valid_dataset_is_indexed(dataset):
    index = D.validate_dataset(dataset)
    assert len(index.objects) == 5 and len(index) == 20
    assert [o for o, _ in index.objects] == [f"obj{i:02d}" for i in range(5)]
    assert [it.n for it in index.objects[0][1]] == ["0", "1", "2", "3"]


def test_every_broken_item_is_reported(tmp_path):
    root = make_dataset(tmp_path / "d", objects=3, images=3, size=64)
    (root / "obj00" / "0_mask.png").unlink()                                  # missing file
    (root / "obj00" / "1_generation.png").write_bytes(b"not a png at all")    # unreadable image
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "obj01" / "0_mask.png")   # empty mask
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(root / "obj01" / "1_mask.png")  # wrong size
    (root / "obj02" / "2_caption.txt").write_text("  \n")                      # empty caption
    (root / "empty_object").mkdir()
    report = tmp_path / "problems.txt"
    with pytest.raises(D.DatasetError) as e:
        D.validate_dataset(root, report=str(report))
    probs = e.value.problems
    assert len(probs) == 6, probs
    text = str(e.value)
    for what in ("obj00/0: missing 0_mask.png", "obj00/1: unreadable image", "obj01/0: empty mask",
                 "obj01/1: mask is 32x32",
                 "obj02/2: empty caption", "empty_object: no"):
        assert what in text
    assert report.read_text().count("\n") == 6
    # the quick check only sees structure
    with pytest.raises(D.DatasetError) as e:
        D.validate_dataset(root, check_files=False)
    assert len(e.value.problems) == 2


def test_missing_and_empty_dataset_are_clear_errors(tmp_path):
    with pytest.raises(DreamCacheError, match="does not exist"):
        D.validate_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DreamCacheError, match="holds no items"):
        D.validate_dataset(tmp_path / "empty")


def test_check_command(dataset, tmp_path, capsys):
    assert DC.main(["check", str(dataset), "--no-progress"]) == 0
    assert "5 objects, 20 images" in capsys.readouterr().out
    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "x" / "0_generation.png").write_bytes(b"")
    assert DC.main(["check", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "missing 0_caption.txt, 0_mask.png" in capsys.readouterr().err


# ---- augmentations --------------------------------------------------------------------------------------------------

def _subject(h=40, w=60):
    rgb = np.full((h, w, 3), 30, np.uint8)
    rgb[..., 0] = 200
    mask = np.zeros((h, w), bool)
    mask[10:30, 20:50] = True
    rgb[~mask] = (0, 90, 0)
    return rgb, mask


def _non_white_bbox(img):
    on = (img < 0.99).any(-1)
    rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
    return rows[0], cols[0], rows[-1] + 1, cols[-1] + 1


def test_reference_layout_crop_width_and_white_background():
    rgb, mask = _subject()
    c = cfg(resolution=128)
    for pos in range(20):
        aug = D.RefAugment.draw(c, D.rng_for(0, "sample", pos))
        ref = D.augment_reference(rgb, mask, c, aug).numpy()
        assert ref.shape == (128, 128, 3) and ref.dtype == np.float32 and ref.min() >= 0 and ref.max() <= 1
        t, left, b, r = _non_white_bbox(ref)
        width = (r - left) / 128
        assert 0.7 - 0.02 <= width <= 1.0, width                   # the subject spans 70-100% of the width
        assert abs(width - aug.width_frac) < 0.02
        assert abs((r - left) / (b - t) - 1.5) < 0.1                   # aspect of the 30x20 subject kept
        assert np.all(ref[:t] == 1.0) and np.all(ref[b:] == 1.0)   # background painted white (green gone)
        assert not np.any((ref[..., 1] > 0.3) & (ref[..., 0] < 0.5))


def test_augmentation_is_seeded_and_reproducible(dataset):
    index = D.validate_dataset(dataset)
    c = D.AugmentConfig(resolution=64)
    a, b = D.TrainingData(index, c, seed=3), D.TrainingData(index, c, seed=3)
    for p in (0, 7, 123):
        sa, sb = a[p], b[p]
        assert torch.equal(sa["reference"], sb["reference"]) and torch.equal(sa["target"], sb["target"])
        assert sa["caption"] == sb["caption"]
    assert not torch.equal(a[1]["reference"], D.TrainingData(index, c, seed=4)[1]["reference"])
    s = a[5]
    assert s["target"].shape == (64, 64, 3) and s["reference"].shape == (64, 64, 3)


def test_flip():
    rgb, mask = _subject()
    aug = D.RefAugment(0.8, 0.3, 0.6, False, None, None)
    plain = D.augment_reference(rgb, mask, cfg(), aug)
    flipped = D.augment_reference(rgb, mask, cfg(), D.RefAugment(0.8, 0.3, 0.6, True, None, None))
    assert torch.equal(flipped, plain.flip(1))


def test_jitter_runs_before_normalisation():
    """The reference jittered the [-1, 1] tensor and torchvision clamped it to [0, 1]: every dark value became
    mid-grey. Here jitter sees the picture in 0..1, so dark pixels stay dark and nothing is clamped away."""
    rgb, mask = _subject()
    c0 = cfg(jitter_p=0.0)
    c1 = cfg(jitter_p=1.0)
    hits = 0
    for pos in range(30):
        a0 = D.RefAugment.draw(c0, D.rng_for(1, pos))
        a1 = D.RefAugment.draw(c1, D.rng_for(1, pos))
        assert (a0.width_frac, a0.u, a0.v, a0.flip) == (a1.width_frac, a1.u, a1.v, a1.flip) and a1.jitter is not None
        plain = D.augment_reference(rgb, mask, c0, a0)
        jit = D.augment_reference(rgb, mask, c1, a1)
        # exactly: jitter of the 0..1 picture, then (in the VAE) normalisation
        assert torch.allclose(jit, a1.jitter(plain.permute(2, 0, 1)).permute(1, 2, 0), atol=1e-6)
        dark = plain[..., 2] < 0.2  # the subject's blue channel is 30/255
        hits += int(dark.any())
        normalised = jit * 2 - 1
        # still negative after normalisation (the defect clamped it to >= 0)
        assert float(normalised[dark][..., 2].max()) < -0.1
    assert hits == 30
    # jitter refuses a normalised tensor instead of silently clamping it
    with pytest.raises(ValueError, match="before normalising"):
        D.Jitter(1.1, 1.0, 1.0, 0.0)(torch.rand(3, 8, 8) * 2 - 1)


def test_jitter_matches_torchvision_where_available():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    j = D.Jitter(1.15, 0.85, 1.1, 0.04, (3, 0, 2, 1))
    want = img
    for op in j.order:
        want = [lambda x: tvf.adjust_brightness(x, j.brightness), lambda x: tvf.adjust_contrast(x, j.contrast),
                lambda x: tvf.adjust_saturation(x, j.saturation), lambda x: tvf.adjust_hue(x, j.hue)][op](want)
    assert torch.allclose(j(img), want, atol=1e-5)


def test_white_random_erasing():
    rgb, mask = _subject()
    c = cfg(resolution=64, erase_p=1.0)
    seen = 0
    for pos in range(20):
        aug = D.RefAugment.draw(c, D.rng_for(2, pos))
        if aug.erase is None:
            continue
        seen += 1
        t, left, h, w = aug.erase
        assert 0.02 * 64 * 64 - 64 <= h * w <= 0.25 * 64 * 64 + 64
        ref = D.augment_reference(rgb, mask, c, aug)
        assert torch.all(ref[t:t + h, left:left + w] == 1.0)
    assert seen >= 15


def test_caption_dropout_rate_and_data_order():
    items = [(f"o{i}", [D.Item(f"o{i}", str(n), "/nowhere") for n in range(3)]) for i in range(7)]
    data = D.TrainingData(D.DatasetIndex("/nowhere", items), D.AugmentConfig(resolution=64), seed=11)
    plans = [data.plan(p) for p in range(14000)]
    rate = sum(p.drop_caption for p in plans) / len(plans)
    assert abs(rate - 0.07) < 0.008, rate
    for epoch in range(3):  # each epoch visits every object once, in a seeded order
        objs = [plans[epoch * 7 + s].object_index for s in range(7)]
        assert sorted(objs) == list(range(7))
    assert [plans[s].object_index for s in range(7)] != [plans[7 + s].object_index for s in range(7)]
    assert {p.item_index for p in plans} == {0, 1, 2}
    never = D.TrainingData(data.index, D.AugmentConfig(resolution=64, caption_dropout=0.0), seed=11)
    assert not any(never.plan(p).drop_caption for p in range(500))


def test_target_resize_and_crop_records_geometry():
    rgb = np.zeros((64, 96, 3), np.uint8)
    rgb[:, 40:56] = 255
    img, g = D.prepare_target(rgb, 128)
    assert img.shape == (128, 128, 3) and (g.original_width, g.original_height, g.crop_top, g.crop_left) == (96, 64, 0,
                                                                                                             32)
    assert float(img[:, 64].mean()) > 0.9 and float(img[:, 5].mean()) < 0.1  # the bright band is centred


def test_augment_config_is_checked():
    with pytest.raises(DreamCacheError, match="multiple of 64"):
        D.AugmentConfig(resolution=100)
    with pytest.raises(DreamCacheError, match="probability"):
        D.AugmentConfig(erase_p=1.5)


# ---- synthesis helpers ----------------------------------------------------------------------------------------------

def test_white_background_mask_keeps_white_inside_the_subject():
    img = torch.ones(32, 32, 3)
    img[8:24, 8:24] = 0.2
    img[12:20, 12:20] = 1.0  # a white window inside the subject
    m = D.white_background_mask(img)
    assert m[8:24, 8:24].all() and m.sum() == 16 * 16
    img2 = img.clone()
    img2[:, :] = torch.where(img2 > 0.9, torch.tensor(0.97), img2)  # near-white background
    assert torch.equal(D.white_background_mask(img2, 0.94), m)
    assert D.mask_problem(m) is None and "covers" in D.mask_problem(torch.zeros(32, 32, dtype=torch.bool))


def test_captions_dedupe_combine_and_ids(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("# comment\nA red mug on a table.\n\na red  mug on a table\nA blue car\n", encoding="utf-8")
    caps = D.dedupe(D.read_lines(f))
    assert caps == ["A red mug on a table.", "A blue car"]
    assert D.object_id_for("A red mug on a table.") == D.object_id_for("a red  mug on a table")
    assert D.object_id_for("A red mug").startswith("a-red-mug-")
    combined = D.combine_captions(["a mug", "a car"], ["on a table", "in a forest", "on a beach"], per_object=2, seed=0)
    assert len(combined) == 4 and all(c.startswith(("a mug ", "a car ")) for c in combined)
    assert combined == D.combine_captions(["a mug", "a car"], ["on a table", "in a forest", "on a beach"],
                                          per_object=2, seed=0)
    assert len(D.combine_captions(["a"], ["x", "y"], template="{object}, {context}, white background")) == 2
    with pytest.raises(DreamCacheError, match="placeholder"):
        D.combine_captions(["a"], ["b"], template="{context}")


def test_write_item_and_done(tmp_path):
    img = torch.rand(16, 16, 3)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:12, 4:12] = True
    assert not D.item_done(tmp_path, "obj", 0)
    D.write_item(tmp_path, "obj", 0, img, mask, "a thing")
    assert D.item_done(tmp_path, "obj", 0)
    index = D.validate_dataset(tmp_path)
    assert len(index) == 1 and D.load_mask(index.items[0].mask).sum() == 64


def test_sam_masker_prompts_sam_with_the_box_in_pixels(monkeypatch, tmp_path):
    """--masks sam: the box given in fractions reaches SAM in pixels, and SAM's soft mask is thresholded."""
    from dreamcache.core import sam as core_sam

    ns = argparse.Namespace(sam=str(tmp_path / "sam.pth"), sam_mode="auto", sam_box=None, white_threshold=0.94)
    class FakeSam:
        calls = []

        @staticmethod
        def load_sam(path, name=None):
            return torch.nn.Identity(), "vit_b"

        @staticmethod
        def predict(model, rgb, mode, box=None, points=None, labels=None):
            FakeSam.calls.append((mode, box))
            out = torch.zeros(rgb.shape[:2])
            out[2:6, 2:6] = 0.9
            return out

    (tmp_path / "sam.pth").write_bytes(b"x")
    monkeypatch.setattr(core_sam, "load_sam", FakeSam.load_sam)
    monkeypatch.setattr(core_sam, "predict", FakeSam.predict)
    ns.sam_mode, ns.sam_box = "box", "0.25,0.25,0.75,0.5"
    masker = D.MASKERS["sam"](ns)
    m = masker(torch.rand(8, 16, 3))
    assert m.dtype == torch.bool and int(m.sum()) == 16 and FakeSam.calls == [("box", [4.0, 2.0, 12.0, 4.0])]
    with pytest.raises(DreamCacheError, match="x0,y0,x1,y1"):
        D.parse_box("1,2,3")


# ---- training state and settings (no ComfyUI) -----------------------------------------------------------------------

def test_training_state_round_trip_is_exact(tmp_path):
    adapter = DreamCacheAdapter({r: 16 for r in SD_LAYERS})
    adapter.reset_reference_init(0)
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        loss = sum(p.square().sum() for p in adapter.parameters())
        loss.backward()
        opt.step()
        opt.zero_grad()
    names = [n for n, _ in adapter.named_parameters()]
    config = T.TrainConfig(data="d", out=str(tmp_path / "a.safetensors"), layers=["middle_block.1"], steps=10)
    rng = {"torch_cpu": torch.get_rng_state()}
    state = T.TrainState(step=3, config=config, adapter_file=str(tmp_path / "a-step000003.safetensors"),
                         param_names=names,
                         optimizer=opt.state_dict(), rng=rng, scaler={"scale": 65536.0, "growth_factor": 2.0})
    path = tmp_path / "a-step000003.state.safetensors"
    T.save_state(str(path), state)
    back = T.load_state(str(path))
    assert back.step == 3 and back.config == config and back.param_names == names and back.scaler["scale"] == 65536.0
    assert back.adapter_file == str(tmp_path / "a-step000003.safetensors")
    assert torch.equal(back.rng["torch_cpu"], rng["torch_cpu"])
    want = opt.state_dict()
    for i, st in want["state"].items():
        for k, v in st.items():
            assert torch.equal(back.optimizer["state"][i][k], v), (i, k)
    assert back.optimizer["param_groups"][0]["lr"] == 1e-3 and back.optimizer["param_groups"][0]["betas"] == (0.9,
                                                                                                              0.999)
    assert T.find_latest_state(str(tmp_path / "a.safetensors")) == str(path)
    assert T.resolve_resume(str(tmp_path / "a-step000003.safetensors"), None) == str(path)
    with pytest.raises(DreamCacheError, match="not a DreamCache training state"):
        from dreamcache.core.adapter_io import save_adapter
        save_adapter(str(tmp_path / "x.safetensors"), adapter)
        T.load_state(str(tmp_path / "x.safetensors"))


def test_resume_keeps_the_run_settings():
    saved = T.TrainConfig(data="/d", out="o.safetensors", checkpoint="c", lr=1e-5, batch_size=2, steps=100)
    p = T.build_parser()
    cfg = T.config_from_args(p.parse_args(["--steps", "200", "--save-every", "10"]), saved)
    assert cfg.steps == 200 and cfg.save_every == 10 and cfg.batch_size == 2 and cfg.lr == 1e-5
    with pytest.raises(DreamCacheError, match="--lr 0.001"):
        T.config_from_args(p.parse_args(["--lr", "1e-3", "--batch-size", "2"]), saved)
    with pytest.raises(DreamCacheError, match="--checkpoint, --data"):
        T.config_from_args(p.parse_args(["--out", "x.safetensors"]))
    with pytest.raises(DreamCacheError, match="--batch-size 0"):
        T.TrainConfig(batch_size=0)
    assert "--init-from" in T.build_parser().format_help() and "synth" in DC.build_parser().format_help()
    assert T.parse_layer("output_blocks.4.1[1]").block_index == 1
    assert T.parse_layer("middle_block.1").module == "middle_block.1"
    assert T.checkpoint_path("runs/a.safetensors", 500) == "runs/a-step000500.safetensors"
    assert T.state_path_for("runs/a.safetensors") == "runs/a.state.safetensors"


def test_sam_masker_runs_the_subjectmask_core(tmp_path, monkeypatch):
    """With SubjectMask's SAM core present (dreamcache/sam.py), --masks sam loads a SAM file through it and returns
    boolean subject masks (a tiny seeded SAM stands in for the real checkpoint)."""
    try:
        from dreamcache.core import sam as core_sam
    except ImportError:
        pytest.skip("SubjectMask's SAM core (dreamcache/sam.py) is not in this checkout")
    tiny_sam = pytest.importorskip("tiny_sam")
    pytest.importorskip("segment_anything")
    tiny_sam.register_tiny_variant(core_sam, monkeypatch)
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sam.make_tiny_sam(seed=123).state_dict(), str(path))
    img = torch.ones(64, 64, 3)
    img[16:48, 20:44] = torch.tensor([0.8, 0.2, 0.1])
    for mode, box in (("auto", None), ("box", "0.25,0.2,0.75,0.8")):
        masker = D.sam_masker(str(path), mode, box)
        m = masker(img, "a thing")
        assert m.shape == (64, 64) and m.dtype == torch.bool
        assert "sam tiny" in masker.describe
