"""The pack's nodes in a real ComfyUI with tiny random-weight SD models.

Protects: BuildFeatureCache (seeded, multi-reference, per-image, alpha and odd sizes, conditioning override, SDXL's y
vector); ApplyDreamCache is plug-and-play (the input model is bit-identical afterwards, no state leaks between runs,
deep copies share the patch); LoRA before/after; batch > 1; fp16/bf16; another resolution than the reference's;
one clear error per bad input; cache files saved inside their folder and loaded back with checked metadata.
"""
from __future__ import annotations

import copy

import pytest
import torch
from helpers import denoise_once, random_adapter, run_node

SIGMA = 3.0


def _x(batch=1, h=8, w=8, seed=11):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed)) * SIGMA


def _den(model, positive, x=None, **kw):
    return denoise_once(model, _x() if x is None else x, SIGMA, positive, **kw)


# ---- BuildFeatureCache --------------------------------------------------------------------------------------------

def test_build_cache_metadata_and_shapes(sd1):
    c = sd1.cache
    assert c.layers == sd1.adapter.layers and c.model_family == "sd1" and c.references == 1 and not c.per_image
    assert abs(c.sigma - 0.0413) < 2e-4 and c.seed == 0 and c.resolution == (64,
                                                                             64) and c.conditioning == "empty prompt"
    for ref in c.layers:
        h, w = c.spatial[ref]
        assert c.tokens[ref].shape == (1, h * w, sd1.adapter.channels[ref]) and c.tokens[ref].device.type == "cpu"
    assert sd1.reference.shape == (1, 64, 64, 3)


def test_build_cache_is_seeded(sd1):
    again, _ = run_node("DreamCacheBuildFeatureCache", model=sd1.model, vae=sd1.vae, image=sd1.image, clip=sd1.clip,
                        adapter=sd1.adapter, seed=0, resolution=64)
    other, _ = run_node("DreamCacheBuildFeatureCache", model=sd1.model, vae=sd1.vae, image=sd1.image, clip=sd1.clip,
                        adapter=sd1.adapter, seed=1, resolution=64)
    ref = sd1.adapter.layers[-1]
    assert torch.equal(again.tokens[ref], sd1.cache.tokens[ref])
    assert not torch.equal(other.tokens[ref], sd1.cache.tokens[ref])


def test_build_cache_matches_a_manual_pass(sd1):
    """The node's pass is: reference -> VAE -> latent*scale + sigma_1*noise(seed) at t=1 with the encoded "" prompt."""
    import comfy.sample

    core = sd1.core
    with torch.inference_mode():
        latent = sd1.vae.encode(sd1.reference)
        noise = comfy.sample.prepare_noise(latent, 0)
        empty = sd1.clip.encode_from_tokens_scheduled(sd1.clip.tokenize(""))
        sigma = core.comfy.cache_pass.pass_sigma(sd1.model)
        scaled = sd1.model.model.process_latent_in(latent)
        x = scaled + sigma * noise
        got = core.comfy.cache_pass.run_capture_pass(sd1.model, torch.zeros_like(latent), x / sigma, sigma, empty,
                                                     sd1.adapter.layers)
    for ref in sd1.adapter.layers:
        assert torch.allclose(core.core.cache.from_captures(got).tokens[ref], sd1.cache.tokens[ref], atol=1e-5,
                              rtol=1e-5)


def test_multi_reference_concat_and_per_image(sd1):
    imgs = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    cat, _ = run_node("DreamCacheBuildFeatureCache", model=sd1.model, vae=sd1.vae, image=imgs, clip=sd1.clip,
                      adapter=sd1.adapter, resolution=64, batch_mode="concat")
    per, _ = run_node("DreamCacheBuildFeatureCache", model=sd1.model, vae=sd1.vae, image=imgs, clip=sd1.clip,
                      adapter=sd1.adapter, resolution=64, batch_mode="per_image")
    ref = sd1.adapter.layers[-1]
    h, w = cat.spatial[ref]
    assert cat.references == 2 and cat.tokens[ref].shape[:2] == (1, 2 * h * w)
    assert per.per_image and per.tokens[ref].shape[:2] == (2, h * w)
    assert torch.equal(per.tokens[ref].reshape(1, -1, per.tokens[ref].shape[-1]), cat.tokens[ref])
    # per-image cache: batch item i uses reference i
    (m,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=per)
    out = _den(m, sd1.positive, x=_x(batch=2))
    (m0,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.core.core.cache.FeatureCache(
        tokens={r: t[:1] for r, t in per.tokens.items()}, spatial=per.spatial, model_family="sd1"))
    assert torch.allclose(out[:1], _den(m0, sd1.positive, x=_x(batch=2)[:1]), atol=1e-5)


def test_alpha_odd_sizes_and_conditioning_override(sd1):
    rgba = torch.rand(1, 77, 85, 4, generator=torch.Generator().manual_seed(2))
    c, refimg = run_node("DreamCacheBuildFeatureCache", model=sd1.model, vae=sd1.vae, image=rgba, clip=sd1.clip,
                         adapter=sd1.adapter, resolution=64)
    assert refimg.shape == (1, 64, 64, 3)
    keep, refimg = run_node("DreamCacheBuildFeatureCache", model=sd1.model, vae=sd1.vae, image=rgba, clip=sd1.clip,
                            adapter=sd1.adapter, resolution=0)
    assert refimg.shape == (1, 72, 80, 3) and keep.resolution == (72, 80)
    over, _ = run_node("DreamCacheBuildFeatureCache", model=sd1.model, vae=sd1.vae, image=sd1.image,
                       adapter=sd1.adapter, resolution=64, conditioning=sd1.positive)
    assert over.conditioning == "custom conditioning"
    assert not torch.equal(over.tokens[sd1.adapter.layers[-1]], sd1.cache.tokens[sd1.adapter.layers[-1]])
    with pytest.raises(sd1.core.core.errors.DreamCacheError, match="needs a CLIP"):
        run_node("DreamCacheBuildFeatureCache", model=sd1.model, vae=sd1.vae, image=sd1.image, adapter=sd1.adapter,
                 resolution=64)


def test_sdxl_cache_pass_and_sampling(pack):
    """SDXL needs the y vector: the pass goes through ComfyUI's cond encoding, so it is built like in sampling."""
    from tiny_models import make_clip, make_model, make_vae

    core = pack.dreamcache
    model, clip, vae = make_model("sdxl"), make_clip("sdxl"), make_vae()
    adapter = random_adapter(core, model, seed=1)
    assert [r.module for r in adapter.layers] == ["middle_block.1", "output_blocks.1.1", "output_blocks.3.1",
                                                  "output_blocks.5.1"]
    img = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    cache, _ = run_node("DreamCacheBuildFeatureCache", model=model, vae=vae, image=img, clip=clip, adapter=adapter,
                        resolution=64)
    assert cache.model_family == "sdxl"
    (patched,) = run_node("DreamCacheApply", model=model, adapter=adapter, cache=cache)
    pos = run_node("CLIPTextEncode", clip=clip, text="a dog")[0]
    a, b = _den(model, pos), _den(patched, pos)
    assert torch.isfinite(b).all() and (a - b).abs().max() > 1e-4


# ---- ApplyDreamCache ----------------------------------------------------------------------------------------------

def test_plug_and_play_original_model_is_bit_identical(sd1):
    before = _den(sd1.model, sd1.positive)
    opts_before = copy.deepcopy(sd1.model.model_options)
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    p1 = _den(patched, sd1.positive)
    after = _den(sd1.model, sd1.positive)
    p2 = _den(patched, sd1.positive)
    assert torch.equal(before, after) and torch.equal(p1, p2)
    assert (p1 - before).abs().max() > 1e-4
    assert sd1.model.model_options == opts_before
    assert sd1.core.comfy.apply_patch.find_patch(sd1.model) is None


def test_clones_share_the_patch_and_deepcopy_copies_no_tensors(sd1):
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    patch = sd1.core.comfy.apply_patch.find_patch(patched)
    clone = patched.clone()
    assert sd1.core.comfy.apply_patch.find_patch(clone) is patch
    dup = copy.deepcopy(patched.model_options)
    patches = dup["transformer_options"]["patches"]
    hooks = patches["attn1_output_patch"] + patches["middle_patch"]
    assert all(h.patch is patch for h in hooks)
    # the adapter's weights and the cache tensors are the very same objects
    assert patch.entries[0].cache.tokens is sd1.cache.tokens
    middle = clone.model_options["transformer_options"]["patches"]["middle_patch"]
    assert middle[0].patch.entries[0].adapter is patch.entries[0].adapter


def test_adapter_is_loaded_with_the_model_through_models(sd1):
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    extra = patched.model_patches_models()
    assert len(extra) == 1 and extra[0].model is sd1.core.comfy.apply_patch.find_patch(patched).entries[0].adapter


def _lora_sd(core, model, scale=0.5, seed=9):
    """A kohya-style LoRA touching every linear module of the patched transformer blocks."""
    import comfy.lora

    keymap = comfy.lora.model_lora_keys_unet(model.model, {})
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for ref in core.core.layers.SD_LAYERS:
        prefix = f"diffusion_model.{ref.module}.transformer_blocks.0."
        for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"):
            wkey = prefix + name + ".weight"
            lkey = next(k for k, v in keymap.items() if v == wkey and k.startswith("lora_unet_"))
            w = model.get_model_object(wkey)
            sd[f"{lkey}.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=g) * scale
            sd[f"{lkey}.lora_down.weight"] = torch.randn(2, w.shape[1], generator=g) * scale
            sd[f"{lkey}.alpha"] = torch.tensor(2.0)
    return sd


def test_lora_before_or_after_apply_on_every_module_of_the_patched_blocks(sd1):
    import comfy.sd

    lora = _lora_sd(sd1.core, sd1.model)
    lora_model, _ = comfy.sd.load_lora_for_models(sd1.model, None, lora, 1.0, 0.0)
    (before,) = run_node("DreamCacheApply", model=lora_model, adapter=sd1.adapter, cache=sd1.cache)
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    after, _ = comfy.sd.load_lora_for_models(patched, None, lora, 1.0, 0.0)
    n_keys = len([k for k in lora_model.patches])
    assert n_keys == 50, n_keys  # 10 modules x 5 blocks: every LoRA key found a weight
    a, b, plain = _den(before, sd1.positive), _den(after, sd1.positive), _den(patched, sd1.positive)
    assert torch.equal(a, b)
    assert (a - plain).abs().max() > 1e-3  # the LoRA really acts on the patched blocks
    # and equals a model whose weights carry the LoRA for real
    merged = sd1.model.clone()
    merged.add_patches(comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(sd1.model.model, {})), 1.0)
    (m2,) = run_node("DreamCacheApply", model=merged, adapter=sd1.adapter, cache=sd1.cache)
    assert torch.allclose(_den(m2, sd1.positive), a, atol=1e-6)


def test_batch_greater_than_one(sd1):
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    xb = _x(batch=3)
    out = _den(patched, sd1.positive, x=xb)
    for i in range(3):
        assert torch.allclose(out[i:i + 1], _den(patched, sd1.positive, x=xb[i:i + 1]), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(pack, sd1, dtype):
    from tiny_models import make_model

    model = make_model("sd1", dtype=dtype)
    (patched,) = run_node("DreamCacheApply", model=model, adapter=sd1.adapter, cache=sd1.cache)
    patch = sd1.core.comfy.apply_patch.find_patch(patched)
    assert patch.entries[0].adapter.layer(sd1.adapter.layers[0]).linear_cat.weight.dtype == dtype
    (p32,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    got, want = _den(patched, sd1.positive), _den(p32, sd1.positive)
    base = _den(model, sd1.positive)
    assert torch.isfinite(got).all()
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.05
    assert (got - base).abs().max() > 1e-3


def test_resolution_different_from_the_reference(sd1):
    """A cache built from a 64 px reference personalises latents of other sizes and shapes: the subject's cache is
    read there (another subject's cache gives another result, not just any change from the base model), and the
    result is finite."""
    other = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(99))
    other_cache, _ = run_node("DreamCacheBuildFeatureCache", model=sd1.model, vae=sd1.vae, image=other, clip=sd1.clip,
                              adapter=sd1.adapter, seed=0, resolution=64, fit="pad", batch_mode="concat")
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    (patched_other,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=other_cache)
    for h, w in ((16, 8), (12, 20)):
        x = _x(h=h, w=w)
        out, base = _den(patched, sd1.positive, x=x), _den(sd1.model, sd1.positive, x=x)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert (out - base).abs().max() > 1e-4
        assert (out - _den(patched_other, sd1.positive, x=x)).abs().max() > 1e-4


def test_start_end_percent(sd1):
    ms = sd1.model.get_model_object("model_sampling")
    (late,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache, start_percent=0.6,
                       end_percent=1.0)
    sig_early, sig_late = float(ms.percent_to_sigma(0.1)), float(ms.percent_to_sigma(0.9))
    x = _x()
    assert torch.equal(denoise_once(late, x, sig_early, sd1.positive), denoise_once(sd1.model, x, sig_early,
                                                                                    sd1.positive))
    assert not torch.equal(denoise_once(late, x, sig_late, sd1.positive), denoise_once(sd1.model, x, sig_late,
                                                                                       sd1.positive))


def test_applying_twice_adds_a_second_subject(sd1):
    (once,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache, strength=0.5)
    (twice,) = run_node("DreamCacheApply", model=once, adapter=sd1.adapter, cache=sd1.cache, strength=0.5)
    patch = sd1.core.comfy.apply_patch.find_patch(twice)
    assert len(patch.entries) == 2
    lists = twice.model_options["transformer_options"]["patches"]
    assert sum(getattr(p, "dreamcache_hook", None) == "output" for p in lists["attn1_output_patch"]) == 1
    assert len(twice.model_patches_models()) == 2
    (full,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache, strength=1.0)
    # two halves of the same subject add up to the full update
    assert torch.allclose(_den(twice, sd1.positive), _den(full, sd1.positive), atol=1e-5)


# ---- errors -------------------------------------------------------------------------------------------------------

def _patch_state(model):
    """Everything an apply could leave on a ModelPatcher: options (callables by identity), weight and object patches,
    additional models, and whether the diffusion model carries forward hooks."""
    def view(v):
        if isinstance(v, dict):
            return {k: view(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [view(x) for x in v]
        return v if isinstance(v, (str, int, float, bool, type(None))) else ("id", id(v))

    dm = model.get_model_object("diffusion_model")
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in dm.modules())
    return (view(model.model_options), sorted(model.patches), sorted(model.object_patches),
            len(model.model_patches_models()), hooks)


def test_adapter_that_does_not_fit_names_both(pack, sd1):
    from tiny_models import make_model

    xl = make_model("sdxl")
    before_xl, before_sd1 = _patch_state(xl), _patch_state(sd1.model)
    with pytest.raises(sd1.core.core.errors.DreamCacheError, match=r"Adapter 'random-sd1-0' \(for SD1.x\) does not fit "
                                                                   r"this SDXL model: .*channels in the adapter but .* "
                                                                   r"in the model"):
        run_node("DreamCacheApply", model=xl, adapter=sd1.adapter, cache=sd1.cache)
    sd2 = make_model("sd2")
    wrong_family = random_adapter(sd1.core, sd2, family="sd2")
    with pytest.raises(sd1.core.core.errors.DreamCacheError, match=r"trained for SD2.x but this model is SD1.x"):
        run_node("DreamCacheApply", model=sd1.model, adapter=wrong_family, cache=sd1.cache)
    # a failed apply leaves nothing patched on the models it was given
    assert _patch_state(xl) == before_xl and _patch_state(sd1.model) == before_sd1
    assert not sd1.core.comfy.apply_patch.is_patched(xl) and not sd1.core.comfy.apply_patch.is_patched(sd1.model)
    # the comparison can fail: a successful apply on a clone changes the state
    (ok,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    assert _patch_state(ok) != before_sd1 and _patch_state(sd1.model) == before_sd1


def test_cache_from_another_family_or_adapter(pack, sd1):
    from tiny_models import make_model

    sd2 = make_model("sd2")
    ad2 = random_adapter(sd1.core, sd2)
    with pytest.raises(sd1.core.core.errors.DreamCacheError, match=r"cache was built with a SD1.x model but the model "
                                                                   r"here is SD2.x"):
        run_node("DreamCacheApply", model=sd2, adapter=ad2, cache=sd1.cache)
    ref = sd1.core.core.layers.LayerRef("input_blocks.4.1")
    other = random_adapter(sd1.core, sd1.model, layers=[ref], family="sd1")
    with pytest.raises(sd1.core.core.errors.DreamCacheError, match=r"no features for layer\(s\) input_blocks.4.1"):
        run_node("DreamCacheApply", model=sd1.model, adapter=other, cache=sd1.cache)


def test_out_of_range_values(sd1):
    err = sd1.core.core.errors.DreamCacheError
    with pytest.raises(err, match="strength 5.0 is out of range"):
        sd1.core.comfy.apply_patch.apply_dreamcache(sd1.model, sd1.adapter, sd1.cache, strength=5.0)
    with pytest.raises(err, match="start_percent 0.8 and end_percent 0.2"):
        sd1.core.comfy.apply_patch.apply_dreamcache(sd1.model, sd1.adapter, sd1.cache, start_percent=0.8,
                                                    end_percent=0.2)
    import nodes

    # the node schema bounds what the UI and /prompt validation accept
    strength = next(i for i in nodes.NODE_CLASS_MAPPINGS["DreamCacheApply"].GET_SCHEMA().inputs if i.id == "strength")
    assert (strength.min, strength.max) == (0.0, 2.0)


def test_loader_errors(sd1, models_dir):
    import folder_paths

    err = sd1.core.core.errors.DreamCacheError
    folder = models_dir / "dreamcache"
    folder.mkdir(exist_ok=True)
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(err, match="could not be read as safetensors"):
        run_node("DreamCacheLoader", adapter_name="broken.safetensors")
    with pytest.raises(err, match="was not found in .*dreamcache"):
        run_node("DreamCacheLoader", adapter_name="nope.safetensors")
    # a typed '../' cannot leave the folder, even to a file that exists beside it
    outside = models_dir / "dreamcache_caches" / "escape_target.safetensors"
    outside.parent.mkdir(exist_ok=True)
    sd1.core.core.adapter_io.save_adapter(str(outside), sd1.adapter)  # a valid adapter: loading it would succeed
    assert folder_paths.get_full_path("dreamcache", "../dreamcache_caches/escape_target.safetensors") is None
    with pytest.raises(err, match="was not found in .*dreamcache"):
        run_node("DreamCacheLoader", adapter_name="../dreamcache_caches/escape_target.safetensors")


def test_loader_lists_models_folder_and_respects_extra_paths(sd1, tmp_path):
    import folder_paths

    assert "dreamcache" in folder_paths.folder_names_and_paths
    assert "dreamcache_caches" in folder_paths.folder_names_and_paths
    folder_paths.add_model_folder_path("dreamcache", str(tmp_path))
    torch.save(sd1.adapter.build().reference_state_dict(), tmp_path / "extra_adapter.pt")
    assert "extra_adapter.pt" in folder_paths.get_filename_list("dreamcache")
    (ad,) = run_node("DreamCacheLoader", adapter_name="extra_adapter.pt", base_family="sd1")
    assert ad.family == "sd1" and ad.channels == sd1.adapter.channels


# ---- cache files --------------------------------------------------------------------------------------------------

def test_save_and_load_cache_nodes(sd1, models_dir):
    import folder_paths

    res = run_node("DreamCacheSave", cache=sd1.cache, filename_prefix="people/alice", dtype="fp32")
    assert res == ()
    names = [n for n in folder_paths.get_filename_list("dreamcache_caches") if n.startswith("people")]
    assert names and names[-1].startswith("people/alice_0000")
    (loaded,) = run_node("DreamCacheLoad", cache_name=names[-1])
    for r in sd1.cache.tokens:
        assert torch.equal(loaded.tokens[r], sd1.cache.tokens[r])
    run_node("DreamCacheSave", cache=sd1.cache, filename_prefix="people/alice", dtype="fp16")
    names2 = sorted(n for n in folder_paths.get_filename_list("dreamcache_caches") if n.startswith("people/alice"))
    assert len(names2) == len(names) + 1  # nothing overwritten
    (half,) = run_node("DreamCacheLoad", cache_name=names2[-1])
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=half)
    (exact,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    assert torch.allclose(_den(patched, sd1.positive), _den(exact, sd1.positive), atol=1e-2)


@pytest.mark.parametrize("prefix", ["../escape", "/abs/path", "a/../../b", "", "C:/x"])
def test_save_rejects_paths_outside_the_caches_folder(sd1, prefix):
    with pytest.raises(sd1.core.core.errors.DreamCacheError, match="caches folder"):
        run_node("DreamCacheSave", cache=sd1.cache, filename_prefix=prefix)


def test_load_cache_errors(sd1, models_dir):
    from safetensors.torch import save_file

    folder = models_dir / "dreamcache_caches"
    folder.mkdir(exist_ok=True)
    save_file({"x": torch.zeros(2)}, str(folder / "foreign.safetensors"))
    with pytest.raises(sd1.core.core.errors.DreamCacheError, match="not a DreamCache cache file"):
        run_node("DreamCacheLoad", cache_name="foreign.safetensors")


def test_combine_node(sd1):
    """Combining concatenates the references' tokens: a cache combined with itself attends to every token twice,
    which leaves the softmax-weighted mean unchanged, so it denoises exactly like the single cache; combined with
    another subject's cache it does not."""
    (both,) = run_node("DreamCacheCombine", cache_a=sd1.cache, cache_b=sd1.cache)
    assert both.references == 2
    (patched,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=both)
    (single,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=sd1.cache)
    out, want = _den(patched, sd1.positive), _den(single, sd1.positive)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    same = (out - want).abs().max()
    other = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(99))
    other_cache, _ = run_node("DreamCacheBuildFeatureCache", model=sd1.model, vae=sd1.vae, image=other, clip=sd1.clip,
                              adapter=sd1.adapter, seed=0, resolution=64, fit="pad", batch_mode="concat")
    (mixed,) = run_node("DreamCacheCombine", cache_a=sd1.cache, cache_b=other_cache)
    (patched_mixed,) = run_node("DreamCacheApply", model=sd1.model, adapter=sd1.adapter, cache=mixed)
    # the tiny random adapter moves the prediction little: compare with the rounding-level difference above
    assert (_den(patched_mixed, sd1.positive) - want).abs().max() > max(100 * same, 1e-6)


def test_combo_inputs_are_validated_at_prompt_time(sd1, models_dir):
    """ComfyUI 0.3.64 does not check V3 combo values itself; our validate_inputs refuses them (run on the locked
    class clone ComfyUI uses) and leaves min/max checks of the other inputs to ComfyUI."""
    import inspect

    from helpers import node

    def validate(node_id, **kw):
        cls = node(node_id).PREPARE_CLASS_CLONE({})
        return cls.validate_inputs(**kw)

    (models_dir / "dreamcache").mkdir(exist_ok=True)
    torch.save(sd1.adapter.build().reference_state_dict(), models_dir / "dreamcache" / "valid_for_validation.pt")
    assert validate("DreamCacheLoader", adapter_name="nope.pt").startswith("Adapter 'nope.pt' was not found in")
    assert validate("DreamCacheLoader", adapter_name="valid_for_validation.pt", base_family="sd1") is True
    assert "base_family: 'sd9' is not one of" in validate("DreamCacheLoader", adapter_name="valid_for_validation.pt",
                                                          base_family="sd9")
    assert validate("DreamCacheBuildFeatureCache", fit="pad", batch_mode="concat") is True
    assert "fit: 'zoom' is not one of" in validate("DreamCacheBuildFeatureCache", fit="zoom")
    assert validate("DreamCacheDualGuidanceSampler", sampler_name="euler", scheduler="normal", mode="joint") is True
    assert "scheduler: 'weird'" in validate("DreamCacheDualGuidanceSampler", sampler_name="euler", scheduler="weird")
    assert "mode: 'nested'" in validate("DreamCacheGuider", mode="nested")
    assert "dtype: 'fp8'" in validate("DreamCacheSave", dtype="fp8")
    assert validate("DreamCacheLoad",
                    cache_name="missing.safetensors").startswith("Cache 'missing.safetensors' was not found")
    assert "prompt_mode: 'magic'" in validate("DreamCacheSubjectMask", prompt_mode="magic")
    assert validate("DreamCacheSubjectMask", prompt_mode="mask", layout="keep") is True
    assert validate("DreamCacheSAMLoader", sam_name="none.pth").startswith("SAM checkpoint 'none.pth' was not found")
    for node_id in ("DreamCacheLoader", "DreamCacheBuildFeatureCache", "DreamCacheDualGuidanceSampler",
                    "DreamCacheGuider", "DreamCacheSave",
                    "DreamCacheLoad", "DreamCacheSubjectMask", "DreamCacheSAMLoader"):
        spec = inspect.getfullargspec(node(node_id).validate_inputs)
        assert spec.varkw is None, \
            f"{node_id}.validate_inputs must not take **kwargs (ComfyUI would skip its own checks)"
