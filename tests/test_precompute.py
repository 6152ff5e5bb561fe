"""Precomputed training sets (``python -m dreamcache.data precompute``, ``--precomputed``) on tiny random models.

Protects: a precomputed run equals a live run (augmentation off) within 1e-5 per step, in loss and weights; a
precomputed run resumed in the middle equals one straight run bit for bit; a set made from another checkpoint,
dataset, resolution, layer set or augmentation setting, or an unfinished one, is refused in one sentence; the
precompute command is resumable and shardable (the shards' union is the set, a second run writes nothing); stored
augmented variants are exactly the live cache of the same augmentation and noise.
"""
from __future__ import annotations

import math

import pytest
import torch
from synthetic_data import make_dataset

RES = 64


@pytest.fixture(autouse=True, scope="module")
def _flush_denormals():
    old = torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    del old


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("pre_data"), objects=3, images=2, size=RES)


@pytest.fixture(scope="module")
def sd1(comfy):
    from tiny_models import make_clip, make_model, make_vae

    return make_model("sd1"), make_clip("sd1"), make_vae()


def _precompute(models, data, out, **kw):
    from dreamcache.apps.data.precompute import run_precompute

    model, clip, vae = models
    args = dict(checkpoint_name="tiny.safetensors", resolution=RES, variants=1, augment=False, chunk_size=4,
                progress=False)
    args.update(kw)
    return run_precompute(model, clip, vae, str(data), str(out), **args)


def _trainer(models, data, out, **kw):
    from dreamcache.apps.train.config import TrainConfig
    from dreamcache.apps.train.loop import Trainer

    base = dict(data=str(data), out=str(out), steps=3, batch_size=2, resolution=RES, num_workers=0, progress=False,
                lr=1e-3, save_every=0, seed=0, init="reference", augment=False, caption_dropout=0.3)
    base.update(kw)
    model, clip, vae = models
    return Trainer(model, clip, vae, TrainConfig(**base), checkpoint_name="tiny.safetensors", log=lambda *a: None)


@pytest.fixture(scope="module")
def plain_set(sd1, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("sets") / "plain"
    folder, report = _precompute(sd1, dataset, out)
    assert report == {"written": 2, "skipped": 0, "chunks": 2}  # 6 items in chunks of 4
    return folder


def test_precomputed_run_equals_live_run(sd1, dataset, plain_set, tmp_path):
    """Augmentation off: the same samples, noise and timesteps; losses within 1e-5 per step, weights within 1e-5."""
    from dreamcache.core.adapter_io import read_adapter

    live = _trainer(sd1, dataset, tmp_path / "live.safetensors")
    pre = _trainer(sd1, dataset, tmp_path / "pre.safetensors", precomputed=plain_set)
    a, b = live.run(), pre.run()
    assert len(a) == len(b) == 3 and all(math.isfinite(x) for x in a)
    for step, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) < 1e-5, (step, x, y)
    fa, fb = read_adapter(str(tmp_path / "live.safetensors")), read_adapter(str(tmp_path / "pre.safetensors"))
    for ref in fa.layers:
        for k in fa.tensors[ref]:
            assert torch.allclose(fa.tensors[ref][k], fb.tensors[ref][k], atol=1e-5, rtol=0), (ref, k)
    # the runs really trained: the weights moved from the init
    init = _trainer(sd1, dataset, tmp_path / "init.safetensors", steps=0)
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(init.adapter.parameters(), pre.adapter.parameters()))
    assert diff > 1e-4


def test_resume_in_the_middle_of_a_precomputed_run(sd1, dataset, plain_set, tmp_path):
    from dreamcache.apps.train.config import load_state
    from dreamcache.apps.train.loop import Trainer
    from dreamcache.core.adapter_io import read_adapter

    straight = _trainer(sd1, dataset, tmp_path / "s" / "a.safetensors", steps=4, precomputed=plain_set)
    losses = straight.run()
    first = _trainer(sd1, dataset, tmp_path / "r" / "a.safetensors", steps=4, save_every=2, precomputed=plain_set)
    first.run(steps=2)
    state = load_state(str(tmp_path / "r" / "a.state.safetensors"))
    assert state.step == 2 and state.config.precomputed == plain_set
    model, clip, vae = sd1
    resumed = Trainer(model, clip, vae, state.config, checkpoint_name="tiny.safetensors", state=state)
    rest = resumed.run()
    assert rest == losses[2:]
    a, b = read_adapter(str(tmp_path / "s" / "a.safetensors")), read_adapter(str(tmp_path / "r" / "a.safetensors"))
    for ref in a.layers:
        for k in a.tensors[ref]:
            assert torch.equal(a.tensors[ref][k], b.tensors[ref][k]), (ref, k)


def test_stale_or_foreign_sets_are_refused(sd1, dataset, plain_set, tmp_path):
    import shutil

    from tiny_models import make_model

    from dreamcache.core.errors import DreamCacheError

    other = (make_model("sd1", seed=5), sd1[1], sd1[2])
    with pytest.raises(DreamCacheError, match="made with another checkpoint") as e:
        _trainer(other, dataset, tmp_path / "x.safetensors", precomputed=plain_set)
    assert str(e.value).count(". ") == 0  # one sentence
    with pytest.raises(DreamCacheError, match="made at 64 px but this run trains at 128 px"):
        _trainer(sd1, dataset, tmp_path / "x.safetensors", precomputed=plain_set, resolution=128)
    with pytest.raises(DreamCacheError, match="without reference augmentation but this run trains with it"):
        _trainer(sd1, dataset, tmp_path / "x.safetensors", precomputed=plain_set, augment=True)
    with pytest.raises(DreamCacheError, match="holds the cache of .* but this run trains output_blocks.11.1"):
        _trainer(sd1, dataset, tmp_path / "x.safetensors", precomputed=plain_set,
                 layers=["middle_block.1", "output_blocks.11.1"])
    from tiny_models import make_model as mm

    xl = (mm("sdxl"), sd1[1], sd1[2])
    with pytest.raises(DreamCacheError, match="made with an SD1.x model but this run trains SDXL"):
        _trainer(xl, dataset, tmp_path / "x.safetensors", precomputed=plain_set)
    grown = tmp_path / "grown"
    shutil.copytree(dataset, grown)
    for f in (grown / "obj00").glob("0_*"):
        shutil.copy(f, grown / "obj00" / f.name.replace("0_", "7_", 1))
    with pytest.raises(DreamCacheError, match=r"another state of the dataset \(6 items.*now 7 items"):
        _trainer(sd1, grown, tmp_path / "x.safetensors", precomputed=plain_set)
    broken = tmp_path / "broken"
    shutil.copytree(plain_set, broken)
    (broken / "chunk-000001.safetensors").unlink()
    with pytest.raises(DreamCacheError, match=r"unfinished \(1 of 2 chunks\)"):
        _trainer(sd1, dataset, tmp_path / "x.safetensors", precomputed=str(broken))
    with pytest.raises(DreamCacheError, match="is not a precomputed training set"):
        _trainer(sd1, dataset, tmp_path / "x.safetensors", precomputed=str(dataset))
    with pytest.raises(DreamCacheError, match="made with other settings"):  # resuming a set with other settings
        _precompute(sd1, dataset, broken, resolution=128)


def test_precompute_is_sharded_and_resumable(sd1, dataset, plain_set, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "sharded"
    _, r0 = _precompute(sd1, dataset, out, shard=(0, 2))
    _, r1 = _precompute(sd1, dataset, out, shard=(1, 2))
    assert (r0["written"], r1["written"]) == (1, 1)
    _, again = _precompute(sd1, dataset, out)
    assert again == {"written": 0, "skipped": 2, "chunks": 2}
    for name in ("chunk-000000.safetensors", "chunk-000001.safetensors"):
        a, b = load_file(str(out / name)), load_file(f"{plain_set}/{name}")
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_stored_variants_are_the_live_cache_of_their_augmentation(sd1, dataset, tmp_path):
    """Variant v of an item holds the cache a live pass computes on that variant's augmented reference and noise;
    a training step reads them; two variants differ."""
    from safetensors.torch import load_file

    from dreamcache.apps.data import AugmentConfig, augment_reference, load_mask, load_rgb, validate_dataset
    from dreamcache.apps.data.precompute import reference_noise, variant_augment

    folder, _ = _precompute(sd1, dataset, tmp_path / "aug", variants=2, augment=True, seed=3)
    t = _trainer(sd1, dataset, tmp_path / "a.safetensors", augment=True, precomputed=folder, steps=1)
    loss, _ = t.train_step()
    assert math.isfinite(loss)
    item = validate_dataset(dataset).items[0]
    cfg = AugmentConfig(resolution=RES)
    stored = load_file(f"{folder}/chunk-000000.safetensors")
    rgb, mask = load_rgb(item.image), load_mask(item.mask)
    for v in range(2):
        ref = augment_reference(rgb, mask, cfg, variant_augment(cfg, 3, item.name, v))[None]
        lat = t.encode_pixels(ref)
        cache = t.build_cache(lat, reference_noise(3, item.name, v, lat.shape[1:])[None])
        for r in t.adapter.layers:
            assert torch.allclose(cache.tokens[r][0], stored[f"0.cache.{v}.{r}"], atol=1e-5, rtol=1e-4), (v, r)
    r = t.adapter.layers[-1]
    assert not torch.allclose(stored[f"0.cache.0.{r}"], stored[f"0.cache.1.{r}"])


def test_precompute_and_train_command_lines(comfy, sd1, dataset, tmp_path, monkeypatch, capsys):
    """python -m dreamcache.data precompute, then python -m dreamcache.train --precomputed on it (and a refusal)."""
    from dreamcache.apps.data import cli as data_cli
    from dreamcache.apps.train import cli as train_cli
    from dreamcache.comfy import loading

    monkeypatch.setattr(loading, "load_checkpoint", lambda path, dtype=None: sd1)
    out = tmp_path / "set"
    common = ["--comfyui", str(comfy), "--no-progress"]
    rc = data_cli.main(["precompute", "--checkpoint", "ckpt/tiny_sd1.safetensors", "--data", str(dataset), "--out",
                        str(out), "--resolution", str(RES), "--no-augment", "--chunk-size", "4", "--cpu", *common])
    text = capsys.readouterr().out
    assert rc == 0 and "2 chunk(s) written, 0 already done, of 2" in text and f"--precomputed {out}" in text
    train = ["--checkpoint", "tiny_sd1.safetensors", "--data", str(dataset), "--out", str(tmp_path / "a.safetensors"),
             "--steps", "1", "--batch-size", "2", "--resolution", str(RES), "--num-workers", "0", *common]
    assert train_cli.main([*train, "--precomputed", str(out), "--no-augment"]) == 0
    assert (tmp_path / "a.safetensors").is_file()
    assert train_cli.main([*train, "--precomputed", str(out)]) == 2  # the set has no augmentation, the run has
    assert "without reference augmentation" in capsys.readouterr().err


def test_full_size_sd15_precomputed_equals_live(comfy, tmp_path):
    """The same equality on the full-size SD1.5 U-Net with a full-size CLIP-L and VAE (random weights, 64 px)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "train_speed", Path(__file__).resolve().parents[1] / "benchmarks" / "train_speed.py")
    train_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_speed)
    models = train_speed.full_sd15()
    data = make_dataset(tmp_path / "data", objects=2, images=1, size=RES)
    folder, _ = _precompute(models, data, tmp_path / "set")
    kw = dict(steps=2, batch_size=1, lr=1e-4)
    live = _trainer(models, data, tmp_path / "live.safetensors", **kw).run()
    pre = _trainer(models, data, tmp_path / "pre.safetensors", precomputed=folder, **kw).run()
    assert len(live) == 2 and all(math.isfinite(x) and x > 0 for x in live)
    for step, (x, y) in enumerate(zip(live, pre)):
        assert abs(x - y) < 1e-5, (step, x, y)


def test_weights_fingerprint_follows_the_weights(sd1):
    """The checkpoint hash is remembered only while no weight changes: an in-place edit gives another hash, undoing
    it gives the first one back."""
    from dreamcache.comfy.frozen import checkpoint_fingerprint

    first = checkpoint_fingerprint(*sd1)
    p = next(sd1[0].model.diffusion_model.parameters())
    original = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    try:
        changed = checkpoint_fingerprint(*sd1)
    finally:
        with torch.no_grad():
            p.copy_(original)
    assert changed != first and checkpoint_fingerprint(*sd1) == first and len(first) == 64


def test_sdxl_precomputed_run_equals_live_run(comfy, dataset, tmp_path):
    """SDXL: the stored pooled vectors and target geometry give the live run's y vector (losses within 1e-5)."""
    from tiny_models import make_clip, make_model, make_vae

    xl = (make_model("sdxl"), make_clip("sdxl"), make_vae())
    folder, _ = _precompute(xl, dataset, tmp_path / "xl")
    live = _trainer(xl, dataset, tmp_path / "live.safetensors", steps=2).run()
    pre = _trainer(xl, dataset, tmp_path / "pre.safetensors", steps=2, precomputed=folder).run()
    assert all(math.isfinite(x) for x in live)
    for step, (x, y) in enumerate(zip(live, pre)):
        assert abs(x - y) < 1e-5, (step, x, y)
