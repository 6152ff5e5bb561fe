"""DreamCache guidance in ComfyUI: DreamCacheGuider, DualGuidanceSampler, plain KSampler, and coexistence.

Protects: combined guidance equals e(∅,∅) + s_I(e(c_I,∅) − e(∅,∅)) + s_T(e(c_I,c_T) − e(c_I,∅)) with the image
switched per branch, batched or split into calls of at most a positive and a negative; joint guidance; ControlNet on
the positive; other packs' patches that index cond_or_uncond as cond/uncond (never see an index above 1); HyperTile
in either order (our hooks are reordered around its reshaping); an error mid-sampling leaves nothing patched.
"""
from __future__ import annotations

import oracle
import pytest
import torch
from helpers import cpu_only, denoise_once, eps_from_denoised, run_node

SIGMA = 3.0


def _x(batch=1, h=8, w=8, seed=21):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed)) * SIGMA


def guided_once(guider, x, sigma=SIGMA):
    """One guider evaluation (what a sampler step sees) through guider.sample."""
    import comfy.samplers

    got = {}

    class OneCall(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            got["out"] = model_wrap(noise, sigmas[0] * noise.new_ones([noise.shape[0]]), **extra_args)
            return noise

    with torch.inference_mode():
        guider.sample(x, torch.zeros_like(x), OneCall(), torch.tensor([sigma, 0.0]), disable_pbar=True, seed=0)
    return got["out"].cpu()


def formula(core, model, x, pos, neg, s_t, s_i, sigma=SIGMA):
    """The method's combined guidance (the independent reference's formula) on the three branches, each evaluated
    alone with the image switched on or off. Returns the guided prediction and the branches (x0 predictions)."""
    e_it = denoise_once(model, x, sigma, pos, switch=(True,))
    e_i0 = denoise_once(model, x, sigma, neg, switch=(True,))
    e_00 = denoise_once(model, x, sigma, neg, switch=(False,))
    return oracle.combined_guidance(e_00, e_i0, e_it, s_i, s_t), (e_it, e_i0, e_00)


@pytest.fixture(scope="module")
def patched(sd1):
    return run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)[0]


class CondUncondIndexer:
    """Stands in for IPAdapter-style patches: they index (cond, uncond)[i] by cond_or_uncond."""

    def __init__(self):
        self.seen = set()

    def __call__(self, n, context, value, extra):
        for i in extra["cond_or_uncond"]:
            self.seen.add(i)
            ("cond", "uncond")[i]  # IndexError on a third cond, like the real packs
        return n, context, value


@pytest.fixture
def cond_batches(monkeypatch):
    """The number of conds in each calc_cond_batch call the guider makes."""
    import comfy.samplers

    seen, real = [], comfy.samplers.calc_cond_batch

    def spy(model, conds, *a, **k):
        seen.append(len(conds))
        return real(model, conds, *a, **k)

    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", spy)
    return seen


def test_combined_guidance_batched_equals_formula(sd1, patched, cond_batches, monkeypatch):
    import comfy.ldm.modules.attention as A

    monkeypatch.setattr(A, "optimized_attention",
                        A.attention_pytorch)  # as with --use-pytorch-cross-attention or on a GPU
    core = sd1.core
    g = core.comfy.guidance.make_guider(patched, sd1.positive, sd1.negative, 7.5, 3.0, "combined")
    assert core.comfy.guidance.only_our_patches(patched.model_options)
    x = _x()
    want, (e_it, e_i0, e_00) = formula(sd1.core, patched, x, sd1.positive, sd1.negative, 7.5, 3.0)
    cond_batches.clear()
    assert (guided_once(g, x) - want).abs().max().item() < 1e-4
    assert cond_batches == [3]  # the three branches in one call
    assert (e_i0 - e_00).abs().max() > 1e-4 and (e_it - e_i0).abs().max() > 1e-4  # both terms matter
    # e(∅,∅) is the base model on the negative prompt
    assert torch.equal(e_00, denoise_once(sd1.model, x, SIGMA, sd1.negative))


def test_combined_guidance_is_the_method_formula_in_eps_space(sd1, patched):
    """method.md states the guidance on noise predictions; the guider combines ComfyUI's x0 predictions. The weights
    sum to one, so both agree: the guided x0 is x − σ·ε̂ with ε̂ the reference formula on the three branches' ε."""
    g = sd1.core.comfy.guidance.make_guider(patched, sd1.positive, sd1.negative, 7.5, 3.0, "combined")
    x = _x()
    _, branches = formula(sd1.core, patched, x, sd1.positive, sd1.negative, 7.5, 3.0)
    e_it, e_i0, e_00 = (eps_from_denoised(x, b, SIGMA) for b in branches)
    eps = oracle.combined_guidance(e_00, e_i0, e_it, 3.0, 7.5)
    got = guided_once(g, x)
    assert (got - (x - SIGMA * eps)).abs().max().item() < 1e-4
    # and it is not the plain CFG of the image-on branches (the image term matters)
    assert (got - (x - SIGMA * (e_i0 + 7.5 * (e_it - e_i0)))).abs().max().item() > 1e-3


@cpu_only("on a GPU the three branches are always one batched call")
def test_combined_guidance_on_cpu_sub_quad_attention_splits_the_branches(sd1, patched, cond_batches, monkeypatch):
    """On a CPU with ComfyUI's chunked attention a batch of three is slower than two calls (benchmarks/README.md)."""
    import comfy.ldm.modules.attention as A

    monkeypatch.setattr(A, "optimized_attention", A.attention_sub_quad)
    g = sd1.core.comfy.guidance.make_guider(patched, sd1.positive, sd1.negative, 7.5, 3.0, "combined")
    x = _x()
    want, _ = formula(sd1.core, patched, x, sd1.positive, sd1.negative, 7.5, 3.0)
    cond_batches.clear()
    assert (guided_once(g, x) - want).abs().max().item() < 1e-4
    assert cond_batches == [2, 2]  # [positive, negative] with the image, then [None, negative] without


def test_combined_guidance_split_with_foreign_patch_equals_formula(sd1, patched):
    spy = CondUncondIndexer()
    m = patched.clone()
    m.set_model_attn2_patch(spy)
    core = sd1.core
    assert not core.comfy.guidance.only_our_patches(m.model_options)
    g = core.comfy.guidance.make_guider(m, sd1.positive, sd1.negative, 7.5, 3.0, "combined")
    x = _x()
    want, _ = formula(sd1.core, patched, x, sd1.positive, sd1.negative, 7.5, 3.0)
    assert (guided_once(g, x) - want).abs().max().item() < 1e-4
    assert spy.seen == {0, 1}


def test_joint_guidance_equals_formula(sd1, patched):
    g = sd1.core.comfy.guidance.make_guider(patched, sd1.positive, sd1.negative, 6.0, 1.0, "joint")
    x = _x()
    e_it = denoise_once(patched, x, SIGMA, sd1.positive, switch=(True,))
    e_00 = denoise_once(patched, x, SIGMA, sd1.negative, switch=(False,))
    assert (guided_once(g, x) - (e_00 + 6.0 * (e_it - e_00))).abs().max().item() < 1e-4
    # combined with equal scales is the same guidance
    g2 = sd1.core.comfy.guidance.make_guider(patched, sd1.positive, sd1.negative, 6.0, 6.0, "combined")
    assert (guided_once(g2, x) - guided_once(g, x)).abs().max().item() < 1e-4


def test_dual_guidance_sampler_end_to_end(sd1, patched):
    latent = {"samples": torch.zeros(2, 4, 8, 8)}
    kw = dict(model=patched, positive=sd1.positive, negative=sd1.negative, latent_image=latent, seed=3, steps=3,
              sampler_name="euler", scheduler="normal", denoise=1.0, text_scale=5.0, image_scale=2.0, mode="combined")
    (a,) = run_node("DreamCacheDualGuidanceSampler", **kw)
    (b,) = run_node("DreamCacheDualGuidanceSampler", **kw)
    (c,) = run_node("DreamCacheDualGuidanceSampler", **{**kw, "image_scale": 0.0})
    assert a["samples"].shape == (2, 4, 8, 8) and torch.isfinite(a["samples"]).all()
    assert torch.equal(a["samples"], b["samples"])
    assert (a["samples"] - c["samples"]).abs().max() > 1e-3
    (d,) = run_node("DreamCacheDualGuidanceSampler", **{**kw, "denoise": 0.5,
                                                        "latent_image": {"samples": a["samples"]}})
    assert torch.isfinite(d["samples"]).all()


def test_sampler_custom_advanced_with_guider_matches_dual_sampler(sd1, patched):
    (guider,) = run_node("DreamCacheGuider", model=patched, positive=sd1.positive, negative=sd1.negative,
                         text_scale=5.0, image_scale=2.0, mode="combined")
    (noise,) = run_node("RandomNoise", noise_seed=4)
    (sampler,) = run_node("KSamplerSelect", sampler_name="euler")
    (sigmas,) = run_node("BasicScheduler", model=patched, scheduler="normal", steps=3, denoise=1.0)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    out, _ = run_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                      latent_image=latent)
    (ref,) = run_node("DreamCacheDualGuidanceSampler", model=patched, positive=sd1.positive, negative=sd1.negative,
                      latent_image=latent, seed=4,
                      steps=3, sampler_name="euler", scheduler="normal", denoise=1.0, text_scale=5.0, image_scale=2.0,
                      mode="combined")
    assert torch.allclose(out["samples"], ref["samples"], atol=1e-5)


def test_plain_ksampler_applies_the_image_to_every_chunk(sd1, patched):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    kw = dict(positive=sd1.positive, negative=sd1.negative, latent_image=latent, seed=1, steps=2, cfg=5.0,
              sampler_name="euler", scheduler="normal", denoise=1.0)
    (p,) = run_node("KSampler", model=patched, **kw)
    (b,) = run_node("KSampler", model=sd1.model, **kw)
    assert torch.isfinite(p["samples"]).all() and (p["samples"] - b["samples"]).abs().max() > 1e-3
    x = _x()
    # no switch: both cond and uncond chunks carry the image
    pos, neg = denoise_once(patched, x, SIGMA, sd1.positive, negative=sd1.negative)
    assert torch.allclose(neg, denoise_once(patched, x, SIGMA, sd1.negative, switch=(True,)), atol=1e-5)
    assert torch.allclose(pos, denoise_once(patched, x, SIGMA, sd1.positive, switch=(True,)), atol=1e-5)


def test_controlnet_on_the_positive_with_both_guidance_modes(pack, sd1, patched):
    from tiny_models import make_controlnet

    cn = make_controlnet("sd1")
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(8))
    pos, neg = run_node("ControlNetApplyAdvanced", positive=sd1.positive, negative=sd1.negative, control_net=cn,
                        image=hint,
                        strength=1.0, start_percent=0.0, end_percent=1.0)
    x = _x()
    for mode, s_i in (("combined", 3.0), ("joint", 7.5)):
        g = sd1.core.comfy.guidance.make_guider(patched, pos, neg, 7.5, s_i, mode)
        with_cn = guided_once(g, x)
        without = guided_once(sd1.core.comfy.guidance.make_guider(patched, sd1.positive, sd1.negative, 7.5, s_i, mode),
                              x)
        assert torch.isfinite(with_cn).all() and (with_cn - without).abs().max() > 1e-4, mode
    # the batched three-branch call gives the same result as the formula evaluated branch by branch
    g = sd1.core.comfy.guidance.make_guider(patched, pos, neg, 7.5, 3.0, "combined")
    want, _ = formula(sd1.core, patched, x, pos, neg, 7.5, 3.0)
    assert (guided_once(g, x) - want).abs().max().item() < 1e-4
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (out,) = run_node("DreamCacheDualGuidanceSampler", model=patched, positive=pos, negative=neg, latent_image=latent,
                      seed=0, steps=2,
                      sampler_name="euler", scheduler="normal", denoise=1.0, text_scale=7.5, image_scale=3.0,
                      mode="combined")
    assert torch.isfinite(out["samples"]).all()


@pytest.mark.parametrize("mode", ["combined", "joint"])
def test_cond_uncond_indexing_packs_never_see_a_third_cond(sd1, patched, mode):
    spy = CondUncondIndexer()
    m = patched.clone()
    m.set_model_attn1_patch(spy)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (out,) = run_node("DreamCacheDualGuidanceSampler", model=m, positive=sd1.positive, negative=sd1.negative,
                      latent_image=latent, seed=0, steps=2,
                      sampler_name="euler", scheduler="normal", denoise=1.0, text_scale=7.5, image_scale=3.0, mode=mode)
    assert torch.isfinite(out["samples"]).all() and spy.seen <= {0, 1} and spy.seen


def test_hypertile_in_either_order(sd1):
    """HyperTile reshapes tokens between attn1 and attn1_output at the 8x8 level, where output_blocks.10.1 sits."""
    kw = dict(tile_size=32, swap_size=1, max_depth=0, scale_depth=False)
    (ht_first,) = run_node("HyperTile", model=sd1.model, **kw)
    (a,) = run_node("DreamCacheApply", model=ht_first, adapter=sd1.adapter, cache=sd1.cache)
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    (b,) = run_node("HyperTile", model=patched, **kw)
    lists = b.model_options["transformer_options"]["patches"]["attn1_output_patch"]
    assert getattr(lists[0], "dreamcache_hook", None) == "output"  # registered before HyperTile's...
    x = _x()
    out_a = denoise_once(a, x, SIGMA, sd1.positive)
    out_b = denoise_once(b, x, SIGMA, sd1.positive)  # ...yet runs after it, on the untiled output
    assert torch.isfinite(out_a).all() and torch.equal(out_a, out_b)
    assert (out_a - denoise_once(ht_first, x, SIGMA, sd1.positive)).abs().max() > 1e-4


def test_an_error_during_sampling_leaves_nothing_patched(sd1, patched):
    x = _x()
    before_base = denoise_once(sd1.model, x, SIGMA, sd1.positive)
    before = denoise_once(patched, x, SIGMA, sd1.positive)

    def boom(n, extra):
        raise RuntimeError("interrupted")

    m = patched.clone()
    m.set_model_attn2_output_patch(boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        denoise_once(m, x, SIGMA, sd1.positive)
    assert torch.equal(denoise_once(patched, x, SIGMA, sd1.positive), before)
    assert torch.equal(denoise_once(sd1.model, x, SIGMA, sd1.positive), before_base)


def test_guider_errors(sd1, patched):
    err = sd1.core.core.errors.DreamCacheError
    with pytest.raises(err, match="no DreamCache patch"):
        run_node("DreamCacheGuider", model=sd1.model, positive=sd1.positive, negative=sd1.negative, text_scale=7.5,
                 image_scale=5.0, mode="combined")
    with pytest.raises(err, match="image_scale -1.0 is out of range"):
        sd1.core.comfy.guidance.make_guider(patched, sd1.positive, sd1.negative, 7.5, -1.0)
    with pytest.raises(err, match="Unknown guidance mode"):
        sd1.core.comfy.guidance.make_guider(patched, sd1.positive, sd1.negative, 7.5, 1.0, "nested")
