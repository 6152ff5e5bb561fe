"""Regional DreamCache, several subjects, per-layer weights and attention maps through the nodes in a real ComfyUI
(tiny random-weight SD1 model) and through the golden fixture.

Protects: the MASK input of Apply DreamCache (all-zero = the base model bit for bit, all-one = no mask bit for bit,
through the golden fixture too: expected eps_base / eps_dreamcache); bad masks are one clear error; two chained
subjects with their own masks are both patched and switched off together by the image condition; Apply DreamCache
(Advanced)'s layer weights (0 = that layer's base block exactly, unknown names list the valid ones); the attention
recorder leaves the sampled image and the FLOPs of an evaluation unchanged when not recording (the benchmark's FLOP
count), and the show node draws overlays of the right sizes or says what is missing.
"""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT
from helpers import denoise_once, run_node
from test_golden_parity import EPS_TOL, _eps, _golden_cache, setup  # noqa: F401  (setup: the golden fixture)

SIGMA = 3.0


def _x(batch=1, h=8, w=8, seed=11):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed)) * SIGMA


def _den(model, positive, x=None, **kw):
    return denoise_once(model, _x() if x is None else x, SIGMA, positive, **kw)


def apply(sd1, model=None, node="DreamCacheApply", **kw):
    return run_node(node, model=sd1.model if model is None else model, adapter=sd1.adapter, cache=sd1.cache, **kw)[0]


def left_half(size=64, b=1):
    m = torch.zeros(b, size, size)
    m[..., : size // 2] = 1.0
    return m


# ---- mask ---------------------------------------------------------------------------------------------------------


def test_mask_zero_is_the_base_model_and_mask_one_is_no_mask(sd1):
    base, plain = _den(sd1.model, sd1.positive), _den(apply(sd1), sd1.positive)
    assert torch.equal(_den(apply(sd1, mask=torch.zeros(1, 64, 64)), sd1.positive), base)
    assert torch.equal(_den(apply(sd1, mask=torch.ones(1, 64, 64)), sd1.positive), plain)
    soft = _den(apply(sd1, mask=left_half()), sd1.positive)
    assert (soft - base).abs().max() > 1e-4 and (soft - plain).abs().max() > 1e-4
    # the subject acts mostly where the mask is: the left half of the latent moves more than the right
    d = (soft - base).abs()
    assert d[..., :4].mean() > d[..., 4:].mean()


def test_mask_serves_any_batch_or_matches_it(sd1):
    xb = _x(batch=2)
    m2 = torch.stack([left_half()[0], 1 - left_half()[0]])
    both = _den(apply(sd1, mask=m2), sd1.positive, x=xb)
    for i in range(2):
        one = _den(apply(sd1, mask=m2[i : i + 1]), sd1.positive, x=xb[i : i + 1])
        assert torch.allclose(both[i : i + 1], one, atol=1e-5)
    with pytest.raises(sd1.core.core.errors.DreamCacheError, match="mask has a batch of 2 but the latent batch is 3"):
        _den(apply(sd1, mask=m2), sd1.positive, x=_x(batch=3))


def test_bad_masks(sd1):
    err = sd1.core.core.errors.DreamCacheError
    with pytest.raises(err, match=r"mask is 64×32 \(width×height\) but the latent is 8×8 \(64×64 pixels\)"):
        _den(apply(sd1, mask=torch.ones(1, 32, 64) * 0.5), sd1.positive)
    with pytest.raises(err, match="mask is empty"):
        apply(sd1, mask=torch.zeros(0, 64, 64))


def test_golden_mask_one_reproduces_eps_dreamcache_and_mask_zero_eps_base(setup):  # noqa: F811
    model, T, order, core = setup
    (adapter,) = run_node("DreamCacheLoader", adapter_name="golden_public_adapter.pt")
    cache = _golden_cache(core, T, order)
    h, w = T["input.x_t"].shape[-2:]
    (one,) = run_node("DreamCacheApply", model=model, adapter=adapter, cache=cache, mask=torch.ones(1, 8 * h, 8 * w))
    (zero,) = run_node("DreamCacheApply", model=model, adapter=adapter, cache=cache, mask=torch.zeros(1, 8 * h, 8 * w))
    (plain,) = run_node("DreamCacheApply", model=model, adapter=adapter, cache=cache)
    e_one, e_zero = _eps(one, T), _eps(zero, T)
    assert (e_one - T["expected.eps_dreamcache"]).abs().max().item() <= EPS_TOL
    assert (e_zero - T["expected.eps_base"]).abs().max().item() <= EPS_TOL
    assert torch.equal(e_one, _eps(plain, T)) and torch.equal(e_zero, _eps(model, T))


# ---- several subjects ---------------------------------------------------------------------------------------------


def test_two_chained_subjects_with_masks(sd1, pack):
    from helpers import random_adapter

    other = random_adapter(sd1.core, sd1.model, seed=7)
    cache2, _ = run_node(
        "DreamCacheBuildFeatureCache",
        model=sd1.model,
        vae=sd1.vae,
        image=1 - sd1.image,
        clip=sd1.clip,
        adapter=other,
        seed=0,
        resolution=64,
    )
    left = left_half()
    (m1,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache, mask=left)
    (m12,) = run_node("DreamCacheApply", model=m1, adapter=other, cache=cache2, mask=1 - left)
    patch = sd1.core.comfy.apply_patch.find_patch(m12)
    assert len(patch.entries) == 2 and all(e.mask is not None for e in patch.entries)
    assert len(m12.model_patches_models()) == 2
    base = _den(sd1.model, sd1.positive)
    two = _den(m12, sd1.positive)
    assert (two - _den(m1, sd1.positive)).abs().max() > 1e-4 and (two - base).abs().max() > 1e-4
    # the image condition switches both subjects off together: the base model exactly
    assert torch.equal(_den(m12, sd1.positive, switch=(False,)), base)
    # combined guidance runs with both
    out = _sample(m12, sd1, steps=2, seed=1)
    assert torch.isfinite(out["samples"]).all()


# ---- per-layer weights --------------------------------------------------------------------------------------------


def test_advanced_layer_weights(sd1):
    adapter = sd1.adapter
    layers = adapter.layers
    all_off = ", ".join(f"{sd1.core.core.regional.layer_name(r)}=0" for r in layers)
    base = _den(sd1.model, sd1.positive)
    assert torch.equal(_den(apply(sd1, node="DreamCacheApplyAdvanced", layer_weights=all_off), sd1.positive), base)
    assert torch.equal(
        _den(apply(sd1, node="DreamCacheApplyAdvanced", layer_weights=""), sd1.positive), _den(apply(sd1), sd1.positive)
    )
    # output_4 at 0 = the same adapter without its output_4 layer (that block runs the base block exactly)
    drop = layers[1]
    assert sd1.core.core.regional.layer_name(drop) == "output_4"
    fewer = sd1.core.core.adapter_io.AdapterFile(
        name="fewer",
        channels={r: c for r, c in adapter.channels.items() if r != drop},
        tensors={r: t for r, t in adapter.tensors.items() if r != drop},
        family="sd1",
    )
    (m_fewer,) = run_node("DreamCacheApply", model=sd1.model, adapter=fewer, cache=sd1.cache)
    weighted = apply(sd1, node="DreamCacheApplyAdvanced", layer_weights="output_4=0")
    assert torch.equal(_den(weighted, sd1.positive), _den(m_fewer, sd1.positive))
    # a weight scales the strength at that layer
    half = apply(
        sd1,
        node="DreamCacheApplyAdvanced",
        layer_weights=", ".join(f"{sd1.core.core.regional.layer_name(r)}=0.5" for r in layers),
    )
    assert torch.equal(_den(half, sd1.positive), _den(apply(sd1, strength=0.5), sd1.positive))
    with pytest.raises(
        sd1.core.core.errors.DreamCacheError,
        match="no layer 'input_4'; its layers are: middle, output_4, output_6, output_8, output_10",
    ):
        apply(sd1, node="DreamCacheApplyAdvanced", layer_weights="input_4=0.5")
    # with a mask as well
    masked = apply(sd1, node="DreamCacheApplyAdvanced", layer_weights="output_10=0.5", mask=left_half())
    assert torch.isfinite(_den(masked, sd1.positive)).all()


# ---- attention maps -----------------------------------------------------------------------------------------------


def _sample(model, sd1, steps=3, seed=2):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (out,) = run_node(
        "DreamCacheDualGuidanceSampler",
        model=model,
        positive=sd1.positive,
        negative=sd1.negative,
        latent_image=latent,
        seed=seed,
        steps=steps,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
        text_scale=5.0,
        image_scale=3.0,
        mode="combined",
    )
    return out


def test_recorder_and_show_node(sd1):
    patched = apply(sd1)
    rec_model, handle = run_node("DreamCacheAttentionRecorder", model=patched, layer="output_6", step_percent=1.0)
    plain = _sample(patched, sd1)
    out = _sample(rec_model, sd1)
    assert torch.equal(out["samples"], plain["samples"])  # recording leaves the image unchanged
    assert handle.step == 2 and handle.steps == 3
    r = handle.get(1)
    ref = sd1.core.core.layers.LayerRef("output_blocks.6.1")
    assert r.grid == (4, 4) and r.ref_grid == sd1.cache.spatial[ref] and r.probs.shape == (1, 16, 16)
    image = torch.rand(1, 64, 64, 3)
    img_map, ref_map = run_node(
        "DreamCacheShowAttention",
        attention=handle,
        latent=out,
        image=image,
        reference=sd1.reference,
        point_x=0.25,
        point_y=0.75,
        subject=1,
        opacity=0.5,
    )
    assert img_map.shape == (1, 64, 64, 3) and ref_map.shape == (1, 64, 64, 3)
    assert 0 <= img_map.min() and img_map.max() <= 1 and not torch.equal(img_map, image)
    # the reference map draws the attention row of the token under the point: (0.25, 0.75) -> token row 3, column 1
    overlay = sd1.core.core.attention_maps.overlay
    row = r.probs[0, 3 * 4 + 1].reshape(1, 4, 4)
    assert torch.allclose(ref_map, overlay(sd1.reference, row, 0.5).clamp(0, 1), atol=1e-6)
    assert not torch.allclose(
        ref_map, overlay(sd1.reference, r.probs[0, 0].reshape(1, 4, 4), 0.5).clamp(0, 1), atol=1e-3
    )
    with pytest.raises(sd1.core.core.errors.DreamCacheError, match="Subject 2 was not recorded"):
        run_node(
            "DreamCacheShowAttention", attention=handle, latent=out, image=image, reference=sd1.reference, subject=2
        )
    with pytest.raises(sd1.core.core.errors.DreamCacheError, match="is not the one recorded"):
        run_node(
            "DreamCacheShowAttention",
            attention=handle,
            latent={"samples": torch.zeros(2, 4, 8, 8)},
            image=image,
            reference=sd1.reference,
        )


def test_show_node_without_a_recording(sd1):
    patched = apply(sd1)
    rec_model, handle = run_node("DreamCacheAttentionRecorder", model=patched, layer="middle", step_percent=0.5)
    out = _sample(patched, sd1)  # the sampler used the model without the recorder
    with pytest.raises(
        sd1.core.core.errors.DreamCacheError, match="recorded nothing: connect its MODEL output to the sampler"
    ):
        run_node(
            "DreamCacheShowAttention",
            attention=handle,
            latent=out,
            image=torch.rand(1, 64, 64, 3),
            reference=sd1.reference,
        )
    with pytest.raises(sd1.core.core.errors.DreamCacheError, match="must come from DreamCache Attention Recorder"):
        run_node(
            "DreamCacheShowAttention",
            attention="nope",
            latent=out,
            image=torch.rand(1, 64, 64, 3),
            reference=sd1.reference,
        )
    with pytest.raises(sd1.core.core.errors.DreamCacheError, match="has no DreamCache patch"):
        run_node("DreamCacheAttentionRecorder", model=sd1.model, layer="middle", step_percent=0.5)
    with pytest.raises(
        sd1.core.core.errors.DreamCacheError, match="no layer 'input_1'; its layers are: middle, output_4"
    ):
        run_node("DreamCacheAttentionRecorder", model=patched, layer="input_1", step_percent=0.5)
    assert "layer: 'nope' is not one of" in run_node_validate("DreamCacheAttentionRecorder", layer="nope")


def run_node_validate(node_id, **kw):
    from helpers import node

    return node(node_id).PREPARE_CLASS_CLONE({}).validate_inputs(**kw)


def test_recorder_chained_before_another_subject_records_both(sd1):
    patched = apply(sd1)
    rec_model, handle = run_node("DreamCacheAttentionRecorder", model=patched, layer="output_4", step_percent=0.0)
    (two,) = run_node("DreamCacheApply", model=rec_model, adapter=sd1.adapter, cache=sd1.cache, mask=left_half())
    out = _sample(two, sd1, steps=2)
    assert len(handle.records) == 2 and handle.get(2).probs.shape == handle.get(1).probs.shape
    img_map, ref_map = run_node(
        "DreamCacheShowAttention",
        attention=handle,
        latent=out,
        image=torch.rand(1, 64, 64, 3),
        reference=sd1.reference,
        subject=2,
    )
    assert img_map.shape == (1, 64, 64, 3)


def test_recording_off_leaves_the_flops_of_an_evaluation_unchanged(sd1):
    """benchmarks/bench.py's exact FLOP count: a recorder that is not at its step adds nothing; at its step it adds
    exactly its own matmuls (to_q again and q·kᵀ per head) at the one layer it records."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench

    patched = apply(sd1)
    rec_model, handle = run_node("DreamCacheAttentionRecorder", model=patched, layer="output_6", step_percent=1.0)
    find = sd1.core.comfy.apply_patch.find_patch
    latent = torch.randn(1, 4, 8, 8)
    schedule = {
        "sample_sigmas": torch.tensor([10.0, 5.0, 0.0]),
        "sigmas": torch.tensor([10.0]),
    }  # step 1 of 2: not the recorded one
    plain = bench.count_flops(sd1.model, find(patched), latent, sd1.positive, schedule)
    off = bench.count_flops(sd1.model, find(rec_model), latent, sd1.positive, schedule)
    assert off == plain and handle.records == {}
    masked = apply(sd1, mask=left_half())
    assert (
        bench.count_flops(sd1.model, find(masked), latent, sd1.positive, schedule)["dreamcache"] == plain["dreamcache"]
    )
    on = bench.count_flops(sd1.model, find(rec_model), latent, sd1.positive)  # a direct call: recorded
    r = handle.get(1)
    n, m = r.probs.shape[1:]
    c = sd1.adapter.channels[sd1.core.core.layers.LayerRef("output_blocks.6.1")]
    assert on["dreamcache"] - plain["dreamcache"] == 2 * n * c * c + 2 * n * m * c
