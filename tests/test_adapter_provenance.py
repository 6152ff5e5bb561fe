"""Starting from an adapter that exists, estimating before spending, and what a trained adapter says about itself.

Protects: ``--init-from`` accepts another family's adapter when every tensor fits (tiny SD2.x -> SD1.x: one line,
the weights loaded, the origin in the new adapter's metadata) and refuses SDXL in one sentence naming the first
layer that does not fit; ``--estimate`` prints finite images/s, peak memory and projections for 1, 4 and 8 devices
and writes no adapter; the adapter metadata (family, checkpoint hash, dataset items and hash, steps, global batch,
resolution, init origin, latest evaluation) is read back by ``python -m dreamcache info`` and turned into a model
card with Hugging Face front matter by ``python -m dreamcache card``.
"""
from __future__ import annotations

import json
import math
import re

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
    return make_dataset(tmp_path_factory.mktemp("prov_data"), objects=3, images=2, size=RES)


@pytest.fixture(scope="module")
def sd1(comfy):
    from tiny_models import make_clip, make_model, make_vae

    return make_model("sd1"), make_clip("sd1"), make_vae()


def _trainer(models, data, out, log=None, **kw):
    from dreamcache.apps.train.config import TrainConfig
    from dreamcache.apps.train.loop import Trainer

    base = dict(data=str(data), out=str(out), steps=1, batch_size=2, resolution=RES, num_workers=0, progress=False,
                lr=1e-3, save_every=0, seed=0)
    base.update(kw)
    model, clip, vae = models
    return Trainer(model, clip, vae, TrainConfig(**base), checkpoint_name="tiny.safetensors",
                   log=log or (lambda *a: None))


def _sd2_adapter(path, seed=4):
    from tiny_models import make_model

    from dreamcache.comfy.model import model_channels_at
    from dreamcache.core.adapter import DreamCacheAdapter
    from dreamcache.core.adapter_io import save_adapter
    from dreamcache.core.layers import SD_LAYERS

    sd2 = make_model("sd2")
    src = DreamCacheAdapter({r: model_channels_at(sd2, r) for r in SD_LAYERS})
    src.reset_reference_init(seed)
    save_adapter(str(path), src, family="sd2", extra_metadata={"step": 1234})
    return src


def test_init_from_another_family_that_fits_and_one_that_does_not(comfy, sd1, dataset, tmp_path, capsys):
    from tiny_models import make_clip, make_model, make_vae

    from dreamcache.apps.run.cli import main as info_main
    from dreamcache.core.adapter_io import read_adapter
    from dreamcache.core.errors import DreamCacheError

    src = _sd2_adapter(tmp_path / "sd2.safetensors")
    said = []
    t = _trainer(sd1, dataset, tmp_path / "ft.safetensors", log=said.append,
                 init_from=str(tmp_path / "sd2.safetensors"))
    assert len(said) == 1 and "SD2.x" in said[0] and "SD1.x" in said[0] and "all 5 layers fit" in said[0]
    for k, v in src.reference_state_dict().items():
        assert torch.equal(t.adapter.reference_state_dict()[k], v), k
    t.run()
    af = read_adapter(str(tmp_path / "ft.safetensors"))
    assert af.family == "sd1"
    origin = json.loads(af.metadata["init_origin"])
    assert origin["file"] == "sd2.safetensors" and origin["family"] == "sd2" and origin["step"] == "1234"
    # the same family: no line
    said.clear()
    _trainer(sd1, dataset, tmp_path / "again.safetensors", log=said.append, init_from=str(tmp_path / "ft.safetensors"))
    assert said == []
    # SDXL: the shapes differ; one sentence naming the first layer that does not fit (U-Net order)
    xl = (make_model("sdxl"), make_clip("sdxl"), make_vae())
    with pytest.raises(DreamCacheError) as e:
        _trainer(xl, dataset, tmp_path / "xl.safetensors", init_from=str(tmp_path / "sd2.safetensors"))
    msg = str(e.value)
    assert "output_blocks.4.1 has 128 channels in the adapter but 64 in the model" in msg
    assert "middle_block.1" not in msg and msg.count(". ") == 0 and "SDXL" in msg
    # info prints the provenance
    assert info_main(["info", str(tmp_path / "ft.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["training"]["init_origin"]["family"] == "sd2"


def test_adapter_metadata_info_and_model_card(sd1, dataset, tmp_path, capsys, monkeypatch):
    from dreamcache.apps.data import validate_dataset
    from dreamcache.apps.data.precompute import dataset_fingerprint
    from dreamcache.apps.run.cli import main as cli_main
    from dreamcache.apps.train import evaluation
    from dreamcache.comfy.frozen import checkpoint_fingerprint

    t = _trainer(sd1, dataset, tmp_path / "a.safetensors", steps=2, accumulate=2)
    scores = {"dino": 0.5, "clip_i": 0.75, "clip_t": 0.25, "images": 4}
    monkeypatch.setattr(evaluation, "evaluate_during_training", lambda trainer: dict(scores))
    t.cfg.eval_every = 2  # after construction: the real evaluation's DreamBench check is not this test's subject
    t.run()
    assert cli_main(["info", str(tmp_path / "a.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    tr = info["training"]
    assert info["family"] == tr["base_family"] == "sd1"
    assert tr["base_checkpoint"] == "tiny.safetensors"
    assert tr["base_checkpoint_hash"] == checkpoint_fingerprint(*sd1) and len(tr["base_checkpoint_hash"]) == 64
    assert tr["dataset"] == {"items": 6, "objects": 3, "hash": dataset_fingerprint(validate_dataset(dataset))}
    assert (tr["steps"], tr["global_batch"], tr["resolution"]) == (2, 4, RES)
    assert tr["evaluation"] == {"step": 2, **scores}
    assert "init_origin" not in tr and tr["precomputed"] is False
    # a resumed run keeps the latest scores (until its next evaluation) and counts on
    from dreamcache.apps.train.config import load_state
    from dreamcache.apps.train.loop import Trainer

    state = load_state(str(tmp_path / "a.state.safetensors"))
    state.config.steps, state.config.eval_every = 3, 0
    Trainer(*sd1, state.config, checkpoint_name="tiny.safetensors", state=state, log=lambda *a: None).run()
    assert cli_main(["info", str(tmp_path / "a.safetensors")]) == 0
    resumed = json.loads(capsys.readouterr().out)["training"]
    assert resumed["steps"] == 3 and resumed["evaluation"] == {"step": 2, **scores}
    card = tmp_path / "README.md"
    assert cli_main(["card", str(tmp_path / "a.safetensors"), "--out", str(card), "--base-model",
                     "stable-diffusion-v1-5/stable-diffusion-v1-5"]) == 0
    text = card.read_text()
    front = text.split("---")[1]
    assert "library_name: comfyui-dreamcache" in front and "base_model: stable-diffusion-v1-5" in front
    assert "| global batch | 4 |" in text and "DINO 0.5000" in text and tr["base_checkpoint_hash"] in text
    assert cli_main(["card", str(tmp_path / "a.safetensors"), "--out", str(card)]) == 2  # no silent overwrite
    # an adapter without training metadata (e.g. the released one) still gets a card, saying what is unknown
    _sd2_adapter(tmp_path / "bare.safetensors")
    assert cli_main(["card", str(tmp_path / "bare.safetensors")]) == 0
    assert "not recorded" in capsys.readouterr().out


def test_estimate_prints_finite_numbers_and_writes_nothing(comfy, sd1, dataset, tmp_path, monkeypatch, capsys):
    from dreamcache.apps.train import cli as train_cli
    from dreamcache.comfy import loading

    monkeypatch.setattr(loading, "load_checkpoint", lambda path, dtype=None: sd1)
    out = tmp_path / "run" / "e.safetensors"
    rc = train_cli.main(["--checkpoint", "tiny_sd1.safetensors", "--data", str(dataset), "--out", str(out),
                         "--steps", "25000", "--batch-size", "2", "--accumulate", "2", "--resolution", str(RES),
                         "--comfyui", str(comfy), "--no-progress", "--num-workers", "0", "--estimate",
                         "--estimate-steps", "2"])
    text = capsys.readouterr().out
    assert rc == 0, text
    m = re.search(r"([0-9.]+|inf|nan) images/s per device, ([0-9.]+|inf|nan) s per step of 4 images .* peak memory "
                  r"([0-9.]+|inf|nan) MiB", text)
    assert m, text
    assert all(math.isfinite(float(x)) and float(x) > 0 for x in m.groups())
    hours = {int(n): float(h) for n, h in re.findall(r"25000 steps on (\d) devices?: .*?\(([0-9.]+) h", text)}
    assert set(hours) == {1, 4, 8} and all(math.isfinite(h) and h > 0 for h in hours.values())
    assert hours[1] == pytest.approx(4 * hours[4], rel=0.02) and hours[1] == pytest.approx(8 * hours[8], rel=0.02)
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no adapter, state or log written


def test_progress_eta_is_the_estimate_projection():
    from types import SimpleNamespace

    from dreamcache.apps.train.estimate import format_duration, projected_seconds
    from dreamcache.apps.train.loop import Trainer

    fake = SimpleNamespace(_step_times=[], cfg=SimpleNamespace(batch_size=2, accumulate=2),
                           dist=SimpleNamespace(world_size=1), step=10)
    Trainer._eta(fake, 9.0, 110)  # the first (warm-up) step is left out once there are others
    eta = Trainer._eta(fake, 2.0, 110)
    assert eta == format_duration(projected_seconds(4 / 2.0, 100, 4)) == "3m20s"
