"""NaN and inf named where they first appear (issue 26), on the tiny models inside ComfyUI.

Protects: a NaN injected at each place the pack computes (the reference image, the VAE, the text encoder and the
U-Net in the cache pass; the input latent, the text conditioning, the U-Net and the adapter while sampling; Subject
Mask's image, mask and SAM; the attention recording and its overlay; cache files) stops the node with the one
sentence of ``core.finite`` naming the node, what was not finite and the likely cause: the base model when the base
model alone is already NaN, DreamCache only when the base model is finite; no cache holding NaN is ever returned; the
check while sampling costs one host read per sampling run, not one per layer or step.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers import random_adapter, run_node

NAN = float("nan")


@pytest.fixture(scope="module")
def fin(pack):
    return pack.dreamcache.core.finite


def _poison(module: torch.nn.Module, value=NAN):
    """Every weight of ``module`` NaN (what a part of a checkpoint that did not load can hold); the tiny models are
    built afresh in each test that poisons them."""
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def _build(sd1, **kw):
    args = dict(model=sd1.model, vae=sd1.vae, image=sd1.image, clip=sd1.clip, adapter=sd1.adapter, seed=0,
                resolution=64, fit="pad", batch_mode="concat")
    args.update(kw)
    return run_node("DreamCacheBuildFeatureCache", **args)


def _sample(sd1, model, positive=None, steps=2, latent=None):
    (out,) = run_node("DreamCacheDualGuidanceSampler", model=model, positive=positive or sd1.positive,
                      negative=sd1.negative, latent_image=latent or {"samples": torch.zeros(1, 4, 8, 8)}, seed=0,
                      steps=steps, sampler_name="euler", scheduler="normal", denoise=1.0, text_scale=5.0,
                      image_scale=3.0, mode="combined")
    return out


def test_the_check_allocates_nothing_large_and_tells_nan_from_inf_and_overflow(fin):
    """what_is_bad reads a sum first (a finite sum means all finite); when the sum overflows it looks slice by slice."""
    big = torch.full((3, 1 << 21), 3e38)  # finite, but the sum overflows to inf: still finite
    assert fin.what_is_bad(big) is None
    big[1, 5] = NAN
    assert fin.what_is_bad(big) == "NaN"
    big[2, -1] = -float("inf")
    assert fin.what_is_bad(big) == "NaN and inf"
    assert fin.what_is_bad(torch.tensor([1.0, float("inf")])) == "inf"
    assert fin.what_is_bad(torch.zeros(0)) is None and fin.what_is_bad(torch.ones(3, dtype=torch.long)) is None
    assert fin.what_is_bad(torch.rand(4, 5)[:, ::2]) is None  # a view


# ---- the cache pass -------------------------------------------------------------------------------------------------

def test_cache_pass_names_a_nan_reference_image(sd1, fin):
    img = sd1.image.clone()
    img[0, 3, 4, 1] = NAN
    with pytest.raises(fin.NonFiniteError, match=r"^Build Feature Cache \(DreamCache\): the reference IMAGE holds NaN "
                                                 r"values; the node connected to image produced them"):
        _build(sd1, image=img)


def test_cache_pass_names_a_text_encoder_that_did_not_load(sd1, fin):
    from tiny_models import make_clip

    clip = make_clip("sd1")
    _poison(clip.cond_stage_model)
    with pytest.raises(fin.NonFiniteError) as e:
        _build(sd1, clip=clip)
    msg = str(e.value)
    assert msg.startswith("Build Feature Cache (DreamCache): the conditioning of the cache pass holds NaN values")
    assert "text encoder did not load" in msg and "clip missing:" in msg and msg.count(".") >= 1


def test_cache_pass_names_a_vae_that_did_not_load(sd1, fin):
    from tiny_models import make_vae

    vae = make_vae()
    _poison(vae.first_stage_model.encoder)
    with pytest.raises(fin.NonFiniteError, match=r"the VAE's latent of the reference holds NaN values.*--fp32-vae"):
        _build(sd1, vae=vae)


def test_cache_pass_blames_the_base_model_when_the_unet_makes_nan(sd1, fin):
    from tiny_models import make_model

    model = make_model("sd1")
    _poison(model.model.diffusion_model.input_blocks[0][0])  # the first conv: every layer after it is NaN
    with pytest.raises(fin.NonFiniteError) as e:
        _build(sd1, model=model)
    msg = str(e.value)
    assert "the base model's features at layer" in msg and "it is the base model, not DreamCache" in msg
    assert "--force-upcast-attention" in msg and "no cache was made" in msg


def test_cache_files_holding_nan_are_refused_on_load_and_fp16_overflow_on_save(sd1, fin, tmp_path):
    cache_mod = sd1.core.core.cache
    bad = cache_mod.FeatureCache(**{**sd1.cache.__dict__,
                                    "tokens": {r: t.clone() for r, t in sd1.cache.tokens.items()}})
    ref = next(iter(bad.tokens))
    bad.tokens[ref][0, 0, 0] = NAN
    cache_mod.save_cache(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(fin.NonFiniteError, match=r"^Load DreamCache Cache: cache file 'bad.safetensors' at layer .* "
                                                 r"holds NaN values"):
        cache_mod.load_cache(str(tmp_path / "bad.safetensors"))
    big = cache_mod.FeatureCache(**{**sd1.cache.__dict__,
                                    "tokens": {r: t * 1e6 for r, t in sd1.cache.tokens.items()}})
    with pytest.raises(fin.NonFiniteError, match=r"^Save DreamCache Cache: the cache in float16 .* holds inf values.*"
                                                 r"save it in fp32 or bf16"):
        cache_mod.save_cache(big, str(tmp_path / "big.safetensors"), dtype=torch.float16)
    assert not (tmp_path / "big.safetensors").exists()


# ---- sampling -------------------------------------------------------------------------------------------------------

def test_sampling_blames_the_base_model_when_it_alone_makes_nan(sd1, fin):
    from tiny_models import make_model

    model = make_model("sd1")
    _poison(model.model.diffusion_model.out[2])  # the last conv: the base prediction is NaN, every block finite
    (patched,) = run_node("DreamCacheApply", model=model, adapter=sd1.adapter, cache=sd1.cache)
    with pytest.raises(fin.NonFiniteError) as e:
        _sample(sd1, patched)
    msg = str(e.value)
    assert "the base model's own prediction at the first step (with DreamCache off) holds NaN values" in msg
    assert "the base model, not DreamCache" in msg and "unet missing:" in msg


def test_sampling_names_a_nan_text_conditioning(sd1, fin):
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    positive = [[torch.full_like(sd1.positive[0][0], NAN), dict(sd1.positive[0][1])]]
    with pytest.raises(fin.NonFiniteError, match=r"the text conditioning \(CONDITIONING\) of the sampler holds NaN "
                                                 r"values; the text encoder did not load"):
        _sample(sd1, patched, positive=positive)


def test_sampling_names_a_nan_latent(sd1, fin):
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    latent = torch.zeros(1, 4, 8, 8)
    latent[0, 0, 0, 0] = NAN
    with pytest.raises(fin.NonFiniteError, match="the LATENT given to the sampler holds NaN values"):
        _sample(sd1, patched, latent={"samples": latent})


def test_sampling_names_the_first_patched_layer_an_adapter_with_nan_weights_breaks(sd1, fin):
    adapter = random_adapter(sd1.core, sd1.model, seed=0)
    module = adapter.build()
    layer = module.layer(sd1.core.core.layers.LayerRef("output_blocks.4.1"))
    with torch.no_grad():
        layer.linear_cat.weight[0, 0] = NAN
    broken = sd1.core.core.adapter_io.adapter_file_of(module, "sd1", name="broken")
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=broken, cache=sd1.cache)
    with pytest.raises(fin.NonFiniteError) as e:
        _sample(sd1, patched)
    msg = str(e.value)
    assert "the output of patched layer output_4 at the first step holds NaN values" in msg, msg
    assert "the base block's output there is finite, so DreamCache's adapter makes them" in msg
    assert "linear_cat.weight" in msg and "damaged" in msg


def test_sampling_names_an_overflowing_adapter_with_the_fp16_advice(sd1, fin):
    """Finite adapter weights whose products overflow: every patched layer's own output is still finite (1e24), the
    base blocks after them overflow; the base model alone is finite, so DreamCache is named, with the fp16 advice."""
    adapter = random_adapter(sd1.core, sd1.model, seed=0, scale=1e12)
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=adapter, cache=sd1.cache)
    with pytest.raises(fin.NonFiniteError) as e:
        _sample(sd1, patched)
    msg = str(e.value)
    assert "DreamCache's prediction at the first step holds" in msg, msg
    assert "the base model alone is finite, so DreamCache's adapter makes them" in msg
    assert "--force-upcast-attention" in msg and "bf16" in msg and "weights hold" not in msg


def test_the_sampling_check_reads_the_host_once_per_run(sd1, fin, monkeypatch):
    """Cheap: one finiteness check per sampling run (the first model call), none per layer or later step."""
    calls = []
    real = fin.what_is_bad
    monkeypatch.setattr(fin, "what_is_bad", lambda t: calls.append(tuple(t.shape)) or real(t))
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    out = _sample(sd1, patched, steps=4)
    assert torch.isfinite(out["samples"]).all()
    assert len(calls) == 1, calls
    _sample(sd1, patched, steps=3)  # a new run is checked again
    assert len(calls) == 2, calls


# ---- Subject Mask ---------------------------------------------------------------------------------------------------

def _photo():
    img = torch.full((1, 48, 64, 3), 0.2)
    img[:, 12:36, 16:48] = torch.tensor([0.9, 0.6, 0.1])
    return img


def test_subject_mask_names_a_nan_image_mask_and_sam_output(pack, fin):
    subject = pack.dreamcache.core.subject
    m = torch.zeros(1, 48, 64)
    m[:, 12:36, 16:48] = 1
    img = _photo()
    img[0, 0, 0, 0] = NAN
    with pytest.raises(fin.NonFiniteError, match=r"^Subject Mask \(DreamCache\): the image input holds NaN values; the "
                                                 r"node connected to image produced them"):
        run_node("DreamCacheSubjectMask", image=img, prompt_mode="mask", mask=m)
    bad = m.clone()
    bad[0, 5, 5] = float("inf")
    with pytest.raises(fin.NonFiniteError, match=r"^Subject Mask \(DreamCache\): the mask input holds inf values"):
        run_node("DreamCacheSubjectMask", image=_photo(), prompt_mode="mask", mask=bad)

    def nan_sam(rgb, box=None, points=None, labels=None):
        return torch.full(rgb.shape[:3], NAN)

    with pytest.raises(fin.NonFiniteError, match=r"^Subject Mask \(DreamCache\): SAM's mask holds NaN values; the SAM "
                                                 r"checkpoint is damaged"):
        subject.subject_reference(_photo(), "auto", segment=nan_sam)


# ---- attention recording and overlay --------------------------------------------------------------------------------

def test_attention_overlay_names_nan_instead_of_an_index_error(sd1, fin):
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    rec_model, handle = run_node("DreamCacheAttentionRecorder", model=patched, layer="output_6", step_percent=1.0)
    out = _sample(sd1, rec_model, steps=3)
    image = torch.rand(1, 64, 64, 3)
    image[:, :8] = NAN  # a VAE that decodes NaN: the black image of issue 26
    with pytest.raises(fin.NonFiniteError, match=r"^Show DreamCache Attention: the image input holds NaN values; the "
                                                 r"generated image is broken"):
        run_node("DreamCacheShowAttention", attention=handle, latent=out, image=image, reference=sd1.reference)
    with pytest.raises(fin.NonFiniteError, match="point_x is nan; give a number between 0 and 1"):
        run_node("DreamCacheShowAttention", attention=handle, latent=out, image=torch.rand(1, 64, 64, 3),
                 reference=sd1.reference, point_x=math.nan)
    rec = handle.get(1)
    rec.probs_sum = rec.probs_sum.clone()
    rec.probs_sum[0, 0, 0] = NAN
    with pytest.raises(fin.NonFiniteError, match=r"^Show DreamCache Attention: the recording holds NaN values"):
        run_node("DreamCacheShowAttention", attention=handle, latent=out, image=torch.rand(1, 64, 64, 3),
                 reference=sd1.reference)


def test_attention_recorder_names_nan_attention_at_the_recorded_layer(sd1, fin):
    adapter = random_adapter(sd1.core, sd1.model, seed=0)
    module = adapter.build()
    layer = module.layer(sd1.core.core.layers.LayerRef("output_blocks.6.1"))
    with torch.no_grad():
        layer.attn_mem.to_q.weight.fill_(NAN)
    broken = sd1.core.core.adapter_io.adapter_file_of(module, "sd1", name="broken")
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=broken, cache=sd1.cache)
    rec_model, handle = run_node("DreamCacheAttentionRecorder", model=patched, layer="output_6", step_percent=0.0)
    recorder = handle
    patch = sd1.core.comfy.apply_patch.find_patch(rec_model)
    work = patch.plan({}, 1, torch.device("cpu"), torch.float32, ordered=True).layers
    key = sd1.core.core.layers.LayerRef("output_blocks.6.1").hook_key
    x = torch.randn(1, 16, 64)
    extra = {"original_shape": (1, 4, 8, 8)}
    with pytest.raises(fin.NonFiniteError, match=r"^DreamCache Attention Recorder: the adapter attention at layer "
                                                 r"output_6 holds NaN values"):
        recorder.observe(patch, work[key], x, (torch.tensor([0]), 1), 2, extra)
    x[0, 3, 3] = NAN
    with pytest.raises(fin.NonFiniteError, match=r"^DreamCache Attention Recorder: the input of layer output_6 "
                                                 r"at the recorded step holds NaN values; the model's stream is "
                                                 r"already broken before DreamCache's adapter"):
        recorder.observe(patch, work[key], x, (torch.tensor([0]), 1), 2, extra)
