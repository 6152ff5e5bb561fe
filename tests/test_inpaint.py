"""DreamCache on an inpainting checkpoint (9 input channels: latent, mask, masked image) in a real ComfyUI, with a
tiny random-weight SD2 inpainting U-Net, and the photo kept outside the painted area.

Protects: the cache pass feeds an inpainting model a full mask and the fully masked (grey) image and never the
photo a custom conditioning carries (docs/how-it-works.md); its cache has the regular model's layers and shapes;
the patched inpainting model samples through InpaintModelConditioning and Dual Guidance Sampler; strength 0 is the
plain inpainting model bit for bit; an adapter of another family, or a model with extra channels the pass cannot
feed, is one clear sentence; with one MASK on Apply DreamCache and SetLatentNoiseMask the latent outside the mask is
the photo's.
"""
from __future__ import annotations

import pytest
import torch
from helpers import random_adapter, run_node


@pytest.fixture(scope="module")
def inp(pack):
    from types import SimpleNamespace

    from tiny_models import make_clip, make_model, make_vae

    ns = SimpleNamespace(core=pack.dreamcache, model=make_model("sd2", inpaint=True), plain=make_model("sd2"),
                         clip=make_clip("sd2"), vae=make_vae())
    ns.adapter = random_adapter(ns.core, ns.model, seed=0)
    ns.subject = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    ns.photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    ns.mask = torch.zeros(1, 64, 64)
    ns.mask[:, 16:48, 24:56] = 1.0
    ns.positive = run_node("CLIPTextEncode", clip=ns.clip, text="a photo of a mug on a table")[0]
    ns.negative = run_node("CLIPTextEncode", clip=ns.clip, text="")[0]
    return ns


def build(ns, model=None, **kw):
    return run_node("DreamCacheBuildFeatureCache", model=model or ns.model, vae=ns.vae, image=ns.subject,
                    **{"adapter": ns.adapter, "clip": ns.clip, "seed": 0, "resolution": 64, **kw})


@pytest.mark.parametrize("family", ["sd2", "sd1"])
def test_cache_pass_feeds_a_full_mask_and_the_grey_masked_image(inp, family):
    from tiny_models import make_clip, make_model

    model = inp.model if family == "sd2" else make_model("sd1", inpaint=True)
    clip = inp.clip if family == "sd2" else make_clip("sd1")
    plain_model = inp.plain if family == "sd2" else make_model("sd1")
    assert model.model.concat_keys == ("mask", "masked_image")
    seen = []
    conv_in = model.model.diffusion_model.input_blocks[0][0]
    handle = conv_in.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        cache, _ = build(inp, model=model, adapter=random_adapter(inp.core, model, seed=0), clip=clip)
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (1, 9, 8, 8)
    with torch.inference_mode():
        grey = model.model.process_latent_in(inp.vae.encode(torch.full((1, 64, 64, 3), 0.5)))
    assert torch.equal(seen[0][:, 4:5], torch.ones(1, 1, 8, 8))
    assert torch.allclose(seen[0][:, 5:], grey, atol=1e-6)
    # the same layers and token shapes as the regular model's cache
    plain, _ = build(inp, model=plain_model, adapter=random_adapter(inp.core, plain_model, seed=0), clip=clip)
    assert cache.layers == plain.layers and cache.spatial == plain.spatial and cache.model_family == family
    assert all(cache.tokens[r].shape == plain.tokens[r].shape and torch.isfinite(cache.tokens[r]).all()
               for r in cache.layers)


def test_cache_ignores_the_photo_a_custom_conditioning_carries(inp):
    """Wiring InpaintModelConditioning's output into the cache's conditioning must not put the photo in the cache."""
    empty = inp.negative
    pos, _neg, _lat = run_node("InpaintModelConditioning", positive=empty, negative=empty, vae=inp.vae,
                               pixels=inp.photo, mask=inp.mask, noise_mask=True)
    assert "concat_latent_image" in pos[0][1]
    clean, _ = build(inp, conditioning=empty)
    carried, _ = build(inp, conditioning=pos)
    for ref in clean.layers:
        assert torch.equal(clean.tokens[ref], carried.tokens[ref])


def _sample(ns, model, conds, seed=0, scheduler="normal"):
    return run_node("DreamCacheDualGuidanceSampler", model=model, positive=conds[0],
                    negative=conds[1], latent_image=conds[2], seed=seed, steps=2,
                    sampler_name="euler", scheduler=scheduler, denoise=1.0, text_scale=7.5, image_scale=5.0,
                    mode="combined")[0]["samples"]


def _ksample(model, conds, seed=0):
    return run_node("KSampler", model=model, seed=seed, steps=2, cfg=7.5, sampler_name="euler", scheduler="normal",
                    positive=conds[0], negative=conds[1], latent_image=conds[2], denoise=1.0)[0]["samples"]


def test_patched_inpainting_model_samples_and_strength_0_is_the_plain_model(inp):
    cache, _ = build(inp)
    conds = run_node("InpaintModelConditioning", positive=inp.positive, negative=inp.negative, vae=inp.vae,
                     pixels=inp.photo, mask=inp.mask, noise_mask=True)
    (full,) = run_node("DreamCacheApply", model=inp.model, adapter=inp.adapter, cache=cache, strength=1.0,
                       mask=inp.mask)
    (zero,) = run_node("DreamCacheApply", model=inp.model, adapter=inp.adapter, cache=cache, strength=0.0,
                       mask=inp.mask)
    got = _sample(inp, full, conds)
    assert got.shape == (1, 4, 8, 8) and torch.isfinite(got).all() and got.std() > 1e-3
    plain = _ksample(inp.model, conds)
    assert (_ksample(full, conds) - plain).abs().max() > 1e-4
    assert torch.equal(_ksample(zero, conds), plain)
    # outside the mask (in latent cells the mask does not touch) the photo's latent is kept, subject or not
    with torch.inference_mode():
        photo = inp.vae.encode(inp.photo)
    outside = torch.nn.functional.max_pool2d(inp.mask[:, None], 8)[0, 0] == 0
    assert outside.any() and (~outside).any()
    assert torch.allclose(got[0][:, outside], photo[0][:, outside], atol=1e-5)


def test_regular_model_with_set_latent_noise_mask_keeps_the_photo_outside(pack, sd1):
    """The dreamcache_inpaint recipe: one MASK into Apply DreamCache and SetLatentNoiseMask, Differential Diffusion.
    (Differential Diffusion repaints everything in a step at sigma_min, where the "normal" and "karras" schedules
    end; a real model changes next to nothing there. "simple", like the workflows' ddim_uniform, ends above it.)"""
    from helpers import node

    node("DifferentialDiffusion")  # loads ComfyUI's comfy_extras node modules the tests use
    photo = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:40, 16:48] = 1.0
    with torch.inference_mode():
        latent = {"samples": sd1.vae.encode(photo)}
    (masked_latent,) = run_node("SetLatentNoiseMask", samples=latent, mask=mask)
    (dd,) = run_node("DifferentialDiffusion", model=sd1.model)
    (patched,) = run_node("DreamCacheApply", model=dd, adapter=sd1.adapter, cache=sd1.cache, mask=mask)
    got = _sample(sd1, patched, (sd1.positive, sd1.negative, masked_latent), scheduler="simple")
    outside = torch.nn.functional.max_pool2d(mask[:, None], 8)[0, 0] == 0
    assert torch.isfinite(got).all() and (got[0][:, ~outside] - latent["samples"][0][:, ~outside]).abs().max() > 1e-3
    assert torch.allclose(got[0][:, outside], latent["samples"][0][:, outside], atol=1e-5)


def test_other_family_adapter_and_unfeedable_extra_channels_are_one_sentence(inp):
    from tiny_models import make_model, unet_config

    errors = inp.core.core.errors
    sd1_adapter = random_adapter(inp.core, inp.model, seed=0, family="sd1")
    with pytest.raises(errors.DreamCacheError, match="trained for SD1.x but this model is SD2.x"):
        run_node("DreamCacheBuildFeatureCache", model=inp.model, vae=inp.vae, image=inp.subject, clip=inp.clip,
                 adapter=sd1_adapter, resolution=64)
    odd = make_model("sd2", unet={**unet_config("sd2"), "in_channels": 8})  # e.g. an instruct-pix2pix layout
    with pytest.raises(errors.DreamCacheError, match="extra input channels .* that the cache pass cannot feed"):
        run_node("DreamCacheBuildFeatureCache", model=odd, vae=inp.vae, image=inp.subject, clip=inp.clip,
                 adapter=random_adapter(inp.core, odd, seed=0), resolution=64)
