"""The trainer and dataset synthesis in a real ComfyUI with tiny random SD1 / SD2 / SDXL models on the CPU.

Protects: the objective (eps and v targets consistent with ComfyUI's own parameterisation, the cache equal to the
sampling-time cache pass), learning (overfit on a fixed batch), identity init = the base model exactly, trained
files load in DreamCacheLoader and change ApplyDreamCache's output, bit-identical resume, accumulation
equivalence, gradient checkpointing, SDXL's y vector, bf16 autocast, the CLIs, synthesis (resumable), errors.
"""
from __future__ import annotations

import csv
import math
import re

import numpy as np
import pytest
import torch
from helpers import denoise_once, run_node
from synthetic_data import make_dataset

RES = 64


@pytest.fixture(autouse=True, scope="module")
def _flush_denormals():
    """The tiny random models produce denormal floats, which make x86 CPUs ~100x slower (the CLI does this too)."""
    old = torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    del old


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train_data"), objects=5, images=4, size=RES)


@pytest.fixture(scope="module")
def sd1(comfy):
    from tiny_models import make_clip, make_model, make_vae

    return make_model("sd1"), make_clip("sd1"), make_vae()


def _config(dataset, out, **kw):
    from dreamcache.apps.train.config import TrainConfig

    base = dict(data=str(dataset), out=str(out), steps=2, batch_size=2, resolution=RES, num_workers=0, progress=False,
                lr=1e-3,
                save_every=0, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _trainer(models, dataset, out, **kw):
    from dreamcache.apps.train.loop import Trainer

    model, clip, vae = models
    return Trainer(model, clip, vae, _config(dataset, out, **kw), checkpoint_name="tiny.safetensors",
                   log=lambda *a: None)


def _grads(t):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in t.adapter.named_parameters()}


# ---- the objective ------------------------------------------------------------------------------------------------

def test_eps_objective_matches_comfyui_apply_model(sd1, dataset, tmp_path):
    """The raw U-Net output the loss uses is the eps that ComfyUI's own apply_model implies, and the step-0
    identity adapter does not change it."""
    t = _trainer(sd1, dataset, tmp_path / "a.safetensors")
    prep = t.prepare(t.next_batch())
    base = t.base
    sigma = t.ms.sigma(prep.t.float())
    x = prep.latents + sigma.view(-1, 1, 1, 1) * prep.noise
    with torch.no_grad():
        from dreamcache.core.patch import DreamCachePatch, PatchEntry

        patch = DreamCachePatch([PatchEntry(t.adapter, prep.cache)], trainable=True)
        raw = t.unet_call(x, sigma, prep.context, None, patch.transformer_options()).float()
        denoised = base.apply_model(x, sigma, c_crossattn=prep.context)
    assert torch.allclose(raw, (x - denoised) / sigma.view(-1, 1, 1, 1), atol=2e-4, rtol=1e-3)
    loss = t.loss(prep)
    assert torch.allclose(loss, torch.nn.functional.mse_loss(raw, prep.noise), atol=1e-6)


def test_v_prediction_objective(comfy, dataset, tmp_path):
    """v = sqrt(a)*eps - sqrt(1-a)*x0 in ComfyUI's sigma terms: a perfect v prediction denoises to x0 exactly as
    ComfyUI's V_PREDICTION does, and the trained output is ComfyUI's model output."""
    from tiny_models import make_clip, make_model, make_vae

    models = (make_model("sd2", v_prediction=True), make_clip("sd2"), make_vae())
    t = _trainer(models, dataset, tmp_path / "v.safetensors")
    assert t.v_prediction
    prep = t.prepare(t.next_batch())
    sigma = t.ms.sigma(prep.t.float())
    s = sigma.view(-1, 1, 1, 1)
    x = prep.latents + s * prep.noise
    v = (prep.noise - s * prep.latents) / torch.sqrt(1 + s * s)
    assert torch.allclose(t.ms.calculate_denoised(sigma, v, x), prep.latents, atol=1e-5)
    with torch.no_grad():
        raw = t.unet_call(x, sigma, prep.context, None, {}).float()
        denoised = t.base.apply_model(x, sigma, c_crossattn=prep.context)
        assert torch.allclose(t.ms.calculate_denoised(sigma, raw, x), denoised, atol=1e-5)
        assert torch.allclose(t.loss(prep), torch.nn.functional.mse_loss(raw, v), atol=1e-6)
    loss, _ = t.train_step([prep])
    assert math.isfinite(loss) and t.step == 1


def test_cache_equals_the_sampling_time_cache_pass(sd1, dataset, tmp_path):
    """The per-step cache is BuildFeatureCache's: the reference latent at t=1, the encoded "" prompt, adapters off."""
    from dreamcache.comfy.cache_pass import pass_sigma, run_capture_pass
    from dreamcache.core.cache import from_captures

    t = _trainer(sd1, dataset, tmp_path / "a.safetensors")
    batch = t.next_batch()
    ref = t.encode_pixels(batch["reference"])
    noise = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    ours = t.build_cache(ref, noise)
    sigma = pass_sigma(t.model)
    assert abs(ours.sigma - sigma) < 1e-6 and ours.per_image and ours.references == 2
    empty = t.clip.encode_from_tokens_scheduled(t.clip.tokenize(""))
    with torch.inference_mode():
        got = run_capture_pass(t.model, torch.zeros_like(ref), (ref + sigma * noise) / sigma, sigma, empty,
                               t.adapter.layers)
    theirs = from_captures(got, per_image=True)
    for r in t.adapter.layers:
        assert torch.allclose(ours.tokens[r], theirs.tokens[r], atol=1e-5, rtol=1e-4), r


# ---- learning -----------------------------------------------------------------------------------------------------

def test_overfits_a_fixed_batch(comfy, dataset, tmp_path):
    """On one fixed batch the loss falls below half within 150 steps (seeded, CPU).

    tiny_models' seeded init gives the U-Net's output GroupNorm a weight of ~0.05 (its name has no 'norm'), which
    caps the head's output at ~0.03 std so that nothing before it could reach the eps target; a trained SD head
    has weights near 1, so the test sets that one vector to 1 (the base stays frozen)."""
    from tiny_models import make_clip, make_model, make_vae

    models = (make_model("sd1"), make_clip("sd1"), make_vae())
    with torch.no_grad():
        models[0].model.diffusion_model.out[0].weight.fill_(1.0)
    t = _trainer(models, dataset, tmp_path / "o.safetensors", lr=3e-3, weight_decay=0.0)
    prep = t.prepare(t.next_batch())
    losses = [t.train_step([prep])[0] for _ in range(150)]
    first, last = losses[0], sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in t.adapter.parameters())
    assert not any(p.requires_grad for p in t.unet.parameters())


def test_identity_init_is_the_base_model_and_trained_files_work_in_the_nodes(pack, sd1, dataset, models_dir):
    """Step 0 of identity init reproduces the base model exactly through DreamCacheLoader + ApplyDreamCache; a few
    steps of training change ApplyDreamCache's output; the file records family, layers, step and config."""
    import json

    from dreamcache.core.adapter_io import read_adapter

    folder = models_dir / "dreamcache"
    folder.mkdir(exist_ok=True)
    t0 = _trainer(sd1, dataset, folder / "tiny_identity.safetensors", steps=0)
    t0.run()
    t1 = _trainer(sd1, dataset, folder / "tiny_trained.safetensors", steps=3, lr=3e-2)
    t1.run()
    af = read_adapter(str(folder / "tiny_trained.safetensors"))
    assert af.family == "sd1" and json.loads(af.metadata["step"]) == 3
    cfg = json.loads(af.metadata["config"])
    assert cfg["layers"] == ["middle_block.1", "output_blocks.4.1", "output_blocks.6.1", "output_blocks.8.1",
                             "output_blocks.10.1"]
    assert cfg["lr"] == 3e-2 and cfg["init"] == "identity" and af.metadata["base_checkpoint"] == "tiny.safetensors"

    model, clip, vae = sd1
    image = torch.rand(1, RES, RES, 3, generator=torch.Generator().manual_seed(5))
    positive = run_node("CLIPTextEncode", clip=clip, text="a red ball")[0]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11)) * 3.0
    base = denoise_once(model, x, 3.0, positive)
    outs = {}
    for name in ("tiny_identity.safetensors", "tiny_trained.safetensors"):
        (adapter,) = run_node("DreamCacheLoader", adapter_name=name)
        cache, _ = run_node("DreamCacheBuildFeatureCache", model=model, vae=vae, image=image, clip=clip,
                            adapter=adapter, seed=0, resolution=RES)
        (patched,) = run_node("DreamCacheApply", model=model, adapter=adapter, cache=cache)
        outs[name] = denoise_once(patched, x, 3.0, positive)
    assert torch.equal(outs["tiny_identity.safetensors"], base)
    assert (outs["tiny_trained.safetensors"] - base).abs().max() > 1e-4


def test_resume_is_bit_identical(sd1, dataset, tmp_path):
    """4 steps straight == 2 steps, then a new process-like trainer resumed from the checkpoint for 2 more."""
    from dreamcache.apps.train.config import load_state, log_path
    from dreamcache.apps.train.loop import Trainer
    from dreamcache.core.adapter_io import read_adapter

    straight = _trainer(sd1, dataset, tmp_path / "s" / "a.safetensors", steps=4, init="reference", accumulate=2)
    straight.run()
    first = _trainer(sd1, dataset, tmp_path / "r" / "a.safetensors", steps=4, save_every=2, init="reference",
                     accumulate=2)
    first.run(steps=2)
    # run(steps=2) stops there and writes the adapter + state
    state = load_state(str(tmp_path / "r" / "a.state.safetensors"))
    assert state.step == 2
    model, clip, vae = sd1
    resumed = Trainer(model, clip, vae, state.config, checkpoint_name="tiny.safetensors", state=state)
    assert resumed.step == 2
    resumed.run()
    a, b = read_adapter(str(tmp_path / "s" / "a.safetensors")), read_adapter(str(tmp_path / "r" / "a.safetensors"))
    for ref in a.layers:
        for k in a.tensors[ref]:
            assert torch.equal(a.tensors[ref][k], b.tensors[ref][k]), (ref, k)
    sa = load_state(str(tmp_path / "s" / "a.state.safetensors"))
    sb = load_state(str(tmp_path / "r" / "a.state.safetensors"))
    assert sa.step == sb.step == 4
    for i in sa.optimizer["state"]:
        for k, v in sa.optimizer["state"][i].items():
            assert torch.equal(v, sb.optimizer["state"][i][k])
    with open(log_path(str(tmp_path / "r" / "a.safetensors"))) as f:
        rows = list(csv.DictReader(f))
    with open(log_path(str(tmp_path / "s" / "a.safetensors"))) as f:
        rows_s = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3",
                                         "4"] and [r["loss"] for r in rows] == [r["loss"] for r in rows_s]


def test_accumulation_really_accumulates(sd1, dataset, tmp_path):
    """batch 4 == batch 2 x accumulate 2 (same samples, same noise): gradients and loss within float tolerance."""
    a = _trainer(sd1, dataset, tmp_path / "a.safetensors", batch_size=4, accumulate=1, init="reference")
    b = _trainer(sd1, dataset, tmp_path / "b.safetensors", batch_size=2, accumulate=2, init="reference")
    la, lb = a.accumulate(), b.accumulate()
    assert abs(la - lb) < 1e-5 * max(1.0, abs(la))
    ga, gb = _grads(a), _grads(b)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-7), n
    assert sum(float(g.abs().sum()) for g in ga.values()) > 0
    single = _trainer(sd1, dataset, tmp_path / "c.safetensors", batch_size=2, accumulate=1, init="reference")
    single.accumulate()
    assert any(not torch.allclose(single.adapter.get_parameter(n).grad, ga[n], rtol=1e-3) for n in ga)


def test_gradient_checkpointing_gives_the_same_gradients(sd1, dataset, tmp_path, monkeypatch):
    import torch.utils.checkpoint
    from comfy.ldm.modules.diffusionmodules import openaimodel

    original = openaimodel.forward_timestep_embed
    real, used = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: used.append(1) or real(*a, **k))
    t = _trainer(sd1, dataset, tmp_path / "a.safetensors", init="reference")
    prep = t.prepare(t.next_batch())
    t.loss(prep).backward()
    plain = _grads(t)
    t.optimizer.zero_grad(set_to_none=True)
    t.cfg.gradient_checkpointing = True
    t.loss(prep).backward()
    ckpt = _grads(t)
    assert openaimodel.forward_timestep_embed is original
    assert len(used) == 25  # 12 input blocks, the middle block, 12 output blocks
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], rtol=1e-5, atol=1e-8), n


def test_sdxl_trains_one_step_with_its_y_vector(comfy, dataset, tmp_path):
    from tiny_models import make_clip, make_model, make_vae

    from dreamcache.core.layers import SDXL_LAYERS

    models = (make_model("sdxl"), make_clip("sdxl"), make_vae())
    t = _trainer(models, dataset, tmp_path / "xl.safetensors", steps=1, lr=1e-2, init="reference")
    assert t.family == "sdxl" and t.adapter.layers == SDXL_LAYERS
    prep = t.prepare(t.next_batch())
    assert prep.y is not None and prep.y.shape == (2, t.base.adm_channels)
    before = {n: p.detach().clone() for n, p in t.adapter.named_parameters()}
    loss, _ = t.train_step([prep])
    assert math.isfinite(loss) and t.step == 1
    assert any(not torch.equal(before[n], p) for n, p in t.adapter.named_parameters())


def test_bf16_autocast_keeps_fp32_master_weights(sd1, dataset, tmp_path):
    t = _trainer(sd1, dataset, tmp_path / "b.safetensors", precision="bf16", steps=1, init="reference")
    assert t.autocast_dtype == torch.bfloat16 and t.scaler is None
    loss, _ = t.train_step()
    assert math.isfinite(loss) and all(p.dtype == torch.float32 and p.grad is None for p in t.adapter.parameters())


# ---- init, layers, errors -----------------------------------------------------------------------------------------

def test_init_from_a_reference_pt_and_layer_overrides(sd1, dataset, tmp_path):
    from dreamcache.comfy.model import model_channels_at
    from dreamcache.core.adapter import DreamCacheAdapter
    from dreamcache.core.errors import DreamCacheError
    from dreamcache.core.layers import SD_LAYERS

    model = sd1[0]
    src = DreamCacheAdapter({r: model_channels_at(model, r) for r in SD_LAYERS})
    src.reset_reference_init(9)
    pt = tmp_path / "cross_attention-0.pt"
    torch.save(src.reference_state_dict(), pt)  # the reference trainer's format
    t = _trainer(sd1, dataset, tmp_path / "ft.safetensors", init_from=str(pt), steps=0)
    for k, v in src.reference_state_dict().items():
        assert torch.equal(t.adapter.reference_state_dict()[k], v)
    with pytest.raises(DreamCacheError, match="differ from the layers"):
        _trainer(sd1, dataset, tmp_path / "x.safetensors", init_from=str(pt), layers=["middle_block.1"])
    custom = _trainer(sd1, dataset, tmp_path / "c.safetensors", layers=["middle_block.1", "output_blocks.11.1"])
    assert [str(r) for r in custom.adapter.layers] == ["middle_block.1", "output_blocks.11.1"]
    with pytest.raises(DreamCacheError, match="no transformer block at output_blocks.0.1"):
        _trainer(sd1, dataset, tmp_path / "y.safetensors", layers=["output_blocks.0.1"])


def test_clear_errors(sd1, dataset, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from dreamcache.comfy import loading
    from dreamcache.core.errors import DreamCacheError

    junk = tmp_path / "junk.safetensors"
    save_file({"some.weight": torch.zeros(3, 3)}, str(junk))
    with pytest.raises(DreamCacheError, match="could not be loaded as a Stable Diffusion checkpoint"):
        loading.load_checkpoint(str(junk))
    with pytest.raises(DreamCacheError, match="does not exist"):
        loading.load_checkpoint(str(tmp_path / "missing.safetensors"))
    from types import SimpleNamespace

    flux_like = SimpleNamespace(model=SimpleNamespace(model_config=SimpleNamespace(),
                                                      diffusion_model=torch.nn.Linear(1, 1)))
    with pytest.raises(DreamCacheError, match="not a supported U-Net"):
        loading.check_supported(flux_like, "flux.safetensors")
    from tiny_models import make_model

    inpaint = make_model("sd1")
    inpaint.model.concat_keys = ("mask", "masked_image")
    with pytest.raises(DreamCacheError, match="inpainting"):
        loading.check_supported(inpaint, "inpaint.safetensors")
    assert loading.check_supported(sd1[0]) == "sd1"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DreamCacheError, match="holds no items"):
        _trainer(sd1, tmp_path / "empty", tmp_path / "e.safetensors")
    t = _trainer(sd1, dataset, tmp_path / "m.safetensors")

    def oom(prep):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(t, "loss", oom)
    with pytest.raises(DreamCacheError, match="lower --batch-size and raise --accumulate"):
        t.train_step()


# ---- command lines ------------------------------------------------------------------------------------------------

def test_train_cli_runs_resumes_and_previews(comfy, sd1, dataset, tmp_path, monkeypatch, capsys):
    import json

    from dreamcache.apps.train import cli as train_cli
    from dreamcache.comfy import loading
    from dreamcache.core.adapter_io import read_adapter

    loaded = []
    monkeypatch.setattr(loading, "load_checkpoint", lambda path, dtype=None: loaded.append((path, dtype)) or sd1)
    out = tmp_path / "run" / "tiny.safetensors"
    common = ["--comfyui", str(comfy), "--out", str(out), "--no-progress", "--num-workers", "0"]
    rc = train_cli.main(["--checkpoint", "tiny_sd1.safetensors", "--data", str(dataset), "--steps", "2",
                         "--save-every", "1", "--batch-size", "2",
                     "--resolution", str(RES), "--lr", "1e-3", *common])
    assert rc == 0, capsys.readouterr().err
    assert loaded == [("tiny_sd1.safetensors", torch.float32)]
    assert (tmp_path / "run" / "tiny-step000001.safetensors").is_file()
    assert (tmp_path / "run" / "tiny.state.safetensors").is_file()
    rc = train_cli.main(["--resume", "latest", "--steps", "3", "--preview-every", "3", "--preview-steps", "2", *common])
    assert rc == 0, capsys.readouterr().err
    af = read_adapter(str(out))
    assert json.loads(af.metadata["step"]) == 3 and af.family == "sd1"
    from PIL import Image

    with Image.open(tmp_path / "run" / "tiny-preview-step000003.png") as im:
        assert im.size == (RES, RES)
        assert np.asarray(im).std() > 1.0  # a picture, not a flat (black NaN) square
    assert train_cli.main(["--resume", str(out), "--lr", "0.5", *common]) == 2
    assert "--lr 0.5" in capsys.readouterr().err


def test_the_preview_reference_is_what_subject_mask_makes(pack, dataset):
    """The trainer's preview prepares its reference on the node's path (SubjectMask in mask mode, train layout at
    the training resolution), so a preview shows what a user of the nodes would get: the same pixels."""
    from types import SimpleNamespace

    from helpers import run_node

    from dreamcache.apps.data import load_mask, load_rgb
    from dreamcache.apps.train.loop import Trainer
    from dreamcache.core.image import from_uint8

    image = sorted(dataset.rglob("*_generation.png"))[0]
    mask = image.with_name(image.name.replace("_generation", "_mask"))
    size = 2 * RES  # not the photo's size: the layout scales
    cfg = SimpleNamespace(preview_reference=str(image), preview_mask=str(mask), preview_prompt="a thing",
                          resolution=size)
    fake = SimpleNamespace(cfg=cfg, data=SimpleNamespace(index=SimpleNamespace(objects=[("o", [None])])))
    got, prompt = Trainer.preview_inputs(fake)
    want, _ = run_node("DreamCacheSubjectMask", image=from_uint8(load_rgb(image)), prompt_mode="mask",
                       mask=torch.from_numpy(load_mask(mask)).float()[None], layout="train", size=size)
    assert prompt == "a thing" and got.shape == (1, size, size, 3)
    assert torch.equal(got, want)


def test_synth_end_to_end_and_resumable(sd1, tmp_path, monkeypatch, comfy, capsys):
    from dreamcache.apps import data
    from dreamcache.apps.data import SynthSettings, dedupe, validate_dataset
    from dreamcache.apps.data import cli as data_cli
    from dreamcache.apps.data.synth import REJECTED, synthesize
    from dreamcache.comfy import loading

    model, clip, vae = sd1
    calls = []

    def centre_box(rgb, caption):
        calls.append(caption)
        m = torch.zeros(rgb.shape[:2], dtype=torch.bool)
        m[16:48, 20:44] = True
        return m

    captions = dedupe(["a red mug on a table", "A red mug on a table.", "a green car in a forest"])
    s = SynthSettings(width=RES, height=RES, steps=2, cfg=3.5, images_per_caption=2,
                      prompt_suffix=", white background", seed=1)
    root = tmp_path / "synth"
    got = synthesize(model, clip, vae, captions, root, centre_box, s, progress=False)
    assert got == {"written": 4, "skipped": 0, "rejected": 0}
    index = validate_dataset(root)
    assert len(index.objects) == 2 and len(index) == 4
    assert index.items[0].caption.read_text().strip().endswith(", white background")
    # resumable: finished items are skipped; another caption is added and rendered
    got = synthesize(model, clip, vae, captions + ["a blue box"], root, centre_box, s, progress=False)
    assert got == {"written": 2, "skipped": 4, "rejected": 0} and len(calls) == 6
    # a masker that finds nothing: the item is recorded as rejected and not retried
    nothing = lambda rgb, caption: torch.zeros(rgb.shape[:2], dtype=torch.bool)  # noqa: E731
    assert synthesize(model, clip, vae, ["a yellow kite"], root, nothing, s, progress=False)["rejected"] == 2
    assert (root / REJECTED).read_text().count("\n") == 2
    assert synthesize(model, clip, vae, ["a yellow kite"], root, nothing, s, progress=False) == {"written": 0,
                                                                                                 "skipped": 2,
                                                                                                 "rejected": 0}
    # the seeds are per item: the same caption renders the same picture in another run
    again = synthesize(model, clip, vae, captions[:1], tmp_path / "again", centre_box, s, progress=False)
    assert again["written"] == 2
    a = data.load_rgb(next((root / data.object_id_for(captions[0])).glob("0_generation.png")))
    b = data.load_rgb(next((tmp_path / "again" / data.object_id_for(captions[0])).glob("0_generation.png")))
    assert (a == b).all()

    # the command line, with the checkpoint loader replaced by the tiny models
    monkeypatch.setattr(loading, "load_checkpoint", lambda path, dtype=None: sd1)
    caps = tmp_path / "caps.txt"
    caps.write_text("a red mug\na red mug\n# c\na tree\n")
    rc = data_cli.main(["synth", "--checkpoint", "tiny.safetensors", "--out", str(tmp_path / "cli"), "--captions",
                        str(caps), "--masks", "none-white-bg",
                    "--width", str(RES), "--height", str(RES), "--steps", "1", "--comfyui", str(comfy),
                        "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    # two captions after dropping the duplicate and the comment, one image each: every item is written or rejected,
    # and the printed counts are the files on disk
    m = re.search(r"(\d+) written, 0 already done, (\d+) rejected", out.out)
    assert m, out.out
    written, rejected = int(m.group(1)), int(m.group(2))
    assert written + rejected == 2, out.out
    assert len(list((tmp_path / "cli").glob("*/*_generation.png"))) == written
    rejected_file = tmp_path / "cli" / REJECTED
    assert (rejected_file.read_text().count("\n") if rejected_file.exists() else 0) == rejected
    assert data_cli.main(["synth", "--checkpoint", "x", "--out", str(tmp_path / "cli"), "--no-progress"]) == 2
    assert "needs captions" in capsys.readouterr().err
