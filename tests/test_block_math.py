"""The DreamCache block update and the patch object, against an independent reference (no ComfyUI needed).

The hooks are driven in the order ComfyUI's BasicTransformerBlock calls them (attn1 -> attn1_output_patch list ->
``x = a + x`` -> middle_patch list), through the DIFFUSION_MODEL wrapper, with the ``extra`` dict ComfyUI builds.
Protects: the true un-normalised x reaches norm2_mem (exact even with LayerNorm weights near zero); strength 0/1
are exact; rows with the image off are exactly the base block; per-image caches map to batch items; the sigma range;
other packs' hooks keep their order around ours; patch objects are never deep-copied.
"""
from __future__ import annotations

import copy
import math

import oracle
import pytest
import torch

from dreamcache.core.adapter import DreamCacheAdapter
from dreamcache.core.block import (
    fold_output,
    fuse,
    fuse_folded,
    memory_attention,
    memory_attention_heads,
    project_memory,
)
from dreamcache.core.cache import from_captures
from dreamcache.core.errors import DreamCacheError
from dreamcache.core.hooks import PLAN_OPTION, SWITCH_KEY
from dreamcache.core.layers import LayerRef
from dreamcache.core.patch import DreamCachePatch, PatchEntry

C, HEADS, CTX = 32, 4, 24
REF = LayerRef("output_blocks.4.1")
torch.manual_seed(0)


def block_state(seed=0, dim=C, ctx=CTX):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) / math.sqrt(s[-1])  # noqa: E731
    sd = {}
    for ln in ("norm1", "norm2", "norm3"):
        sd[f"{ln}.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        sd[f"{ln}.bias"] = 0.1 * torch.randn(dim, generator=g)
    for att, kv in (("attn1", dim), ("attn2", ctx)):
        sd[f"{att}.to_q.weight"] = r(dim, dim)
        sd[f"{att}.to_k.weight"] = r(dim, kv)
        sd[f"{att}.to_v.weight"] = r(dim, kv)
        sd[f"{att}.to_out.0.weight"] = r(dim, dim)
        sd[f"{att}.to_out.0.bias"] = 0.1 * torch.randn(dim, generator=g)
    sd["ff.net.0.proj.weight"] = r(8 * dim, dim)
    sd["ff.net.0.proj.bias"] = 0.1 * torch.randn(8 * dim, generator=g)
    sd["ff.net.2.weight"] = r(dim, 4 * dim)
    sd["ff.net.2.bias"] = 0.1 * torch.randn(dim, generator=g)
    return sd


def make_entry(seed=1, refs=1, per_image=False, strength=1.0, tokens=16, ln_scale=None, sigma_start=math.inf,
               sigma_end=0.0, dtype=torch.float32):
    ad = DreamCacheAdapter({REF: C})
    ad.reset_reference_init(seed)
    if ln_scale is not None:
        with torch.no_grad():
            ad.layer(REF).norm2_mem.weight.mul_(ln_scale)
    ad = ad.to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    caps = {REF: torch.randn(refs, C, 4, tokens // 4, generator=g).to(dtype) * 3}
    return PatchEntry(ad, from_captures(caps, per_image=per_image), strength, sigma_start, sigma_end)


def adapter_sd(entry):
    return entry.adapter.layer(REF).state_dict()


def host_block(patch, x, text, bsd, to, block=("output", 4), block_index=0):
    """What ComfyUI does for one BasicTransformerBlock call, with its patch lists, behind the model wrapper."""

    def executor(x, timesteps, context, y, control, to, **kw):
        extra = {k: v for k, v in to.items() if k not in ("patches", "patches_replace")}
        extra.update(block=block, block_index=block_index, n_heads=HEADS, dim_head=C // HEADS, attn_precision=None)
        patches = to.get("patches", {})
        n = oracle._ln(x, bsd, "norm1.")
        a = oracle._cross_attention(n, n, bsd, "attn1.", HEADS)
        for p in patches.get("attn1_output_patch", []):
            a = p(a, extra)
        x = a + x
        for p in patches.get("middle_patch", []):
            x = p(x, extra)
        x = x + oracle._cross_attention(oracle._ln(x, bsd, "norm2."), context, bsd, "attn2.", HEADS)
        h = oracle._ln(x, bsd, "norm3.") @ bsd["ff.net.0.proj.weight"].T + bsd["ff.net.0.proj.bias"]
        h, gate = h.chunk(2, -1)
        return x + (h * torch.nn.functional.gelu(gate)) @ bsd["ff.net.2.weight"].T + bsd["ff.net.2.bias"]

    to = dict(to)
    to.setdefault("patches", {"attn1_output_patch": [patch.output_hook], "middle_patch": [patch.middle_hook]})
    return patch.wrapper(executor, x, None, text, None, None, to)


def data(b=2, n=20, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, C, generator=g).to(dtype) * 2, torch.randn(b, 7, CTX, generator=g).to(dtype)


def test_hooked_block_matches_reference():
    e = make_entry()
    bsd = block_state()
    x, text = data()
    got = host_block(DreamCachePatch([e]), x, text, bsd, {})
    r = e.cache.tokens[REF]
    want = oracle.dreamcache_block(x, text, r, bsd, adapter_sd(e), HEADS)
    assert (got - want).abs().max().item() < 2e-5
    base = oracle.dreamcache_block(x, text, None, bsd, None, HEADS)
    assert (got - base).abs().max().item() > 1e-2


def test_norm2_mem_sees_the_true_input_even_with_near_zero_layernorm_weights():
    """Any reconstruction of x from norm1(x) or from x + a breaks down here; reading the true x does not."""
    e = make_entry(ln_scale=1e-6)
    with torch.no_grad():
        e.adapter.layer(REF).norm2_mem.weight[:4] = 0.0
    bsd = block_state()
    bsd["norm1.weight"][:8] = 0.0  # x cannot be recovered from norm1(x) through these channels
    bsd["norm1.weight"][8:16] = 1e-7
    x, text = data()
    x = x * 1000.0  # large activations: x + a - a is far from x in fp32
    got = host_block(DreamCachePatch([e]), x, text, bsd, {})
    xs = x.double()
    want = oracle.dreamcache_block(xs, text.double(), e.cache.tokens[REF].double(), {k: v.double() for k,
                                                                                     v in bsd.items()},
                                      {k: v.double() for k, v in adapter_sd(e).items()}, HEADS)
    rel = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-6


def _block_tail(x, text, bsd):
    """The block after its self-attention residual: cross-attention and the GEGLU feed-forward."""
    x = x + oracle._cross_attention(oracle._ln(x, bsd, "norm2."), text, bsd, "attn2.", HEADS)
    h = oracle._ln(x, bsd, "norm3.") @ bsd["ff.net.0.proj.weight"].T + bsd["ff.net.0.proj.bias"]
    h, gate = h.chunk(2, -1)
    return x + (h * torch.nn.functional.gelu(gate)) @ bsd["ff.net.2.weight"].T + bsd["ff.net.2.bias"]


def test_strength_endpoints_are_exact():
    """Strength 0 is the untouched block and strength 1 is x + linear_cat([a, a_c]) itself, both bit for bit (no
    interpolation rounding at the endpoints); 0.5 lies between, as the reference computes it."""
    bsd = block_state()
    x, text = data()
    # strength 0 is the untouched block: identical to running it without any patch
    zero = host_block(DreamCachePatch([make_entry(strength=0.0)]), x, text, bsd, {})
    plain = host_block(DreamCachePatch([make_entry()]), x, text, bsd, {"patches": {}})
    assert torch.equal(zero, plain)
    # strength 1 is the fused update, computed here from the pack's own block functions without any mixing
    # (a + s·(fused − a) at s = 1 would differ from fused in rounding)
    e = make_entry(strength=1.0)
    patch = DreamCachePatch([e])
    full = host_block(patch, x, text, bsd, {})
    layer = e.adapter.layer(REF)
    with torch.no_grad():
        k, v = project_memory(layer, e.cache.tokens[REF])
        n = oracle._ln(x, bsd, "norm1.")
        a = oracle._cross_attention(n, n, bsd, "attn1.", HEADS)
        rows = x.shape[0]
        kx, vx = k.expand(rows, -1, -1), v.expand(rows, -1, -1)
        # the hot path's fused value: linear_cat with to_out folded into its second half (block.fold_output)
        o = memory_attention_heads(layer, x, kx, vx, HEADS, patch.attention)
        fused = fuse_folded(fold_output(layer, x.device, x.dtype), a, o)
        want_full = _block_tail(x + fused, text, bsd)
        # the fold is the unfolded linear_cat(concat([a, to_out(o)])) up to fp32 rounding
        unfolded = fuse(layer, a, memory_attention(layer, x, kx, vx, HEADS, patch.attention))
    assert torch.equal(full, want_full)
    assert (fused - unfolded).abs().max().item() < 1e-5
    ref_full = oracle.dreamcache_block(x, text, e.cache.tokens[REF], bsd, adapter_sd(e), HEADS)
    assert (full - ref_full).abs().max().item() < 2e-5
    half = host_block(DreamCachePatch([make_entry(strength=0.5)]), x, text, bsd, {})
    want_half = oracle.dreamcache_block(x, text, e.cache.tokens[REF], bsd, adapter_sd(e), HEADS, strength=0.5)
    assert (half - want_half).abs().max().item() < 2e-5
    assert not torch.equal(half, full) and not torch.equal(half, zero)


def test_rows_with_image_off_are_exactly_the_base_block():
    e = make_entry()
    bsd = block_state()
    x, text = data(b=3)
    to = {"cond_or_uncond": [0, 1, 2], SWITCH_KEY: (True, False, True)}
    got = host_block(DreamCachePatch([e]), x, text, bsd, to)
    base = host_block(DreamCachePatch([e]), x, text, bsd, {"patches": {}})
    full = host_block(DreamCachePatch([e]), x, text, bsd, {})
    assert torch.equal(got[1], base[1])
    assert (got[[0, 2]] - full[[0, 2]]).abs().max().item() < 1e-5
    off = host_block(DreamCachePatch([e]), x, text, bsd, {"cond_or_uncond": [0, 1, 2], SWITCH_KEY: (False, False,
                                                                                                    False)})
    assert torch.equal(off, base)


def test_chunks_of_several_rows_follow_cond_or_uncond():
    e = make_entry()
    bsd = block_state()
    x, text = data(b=4)  # two chunks of two rows: [uncond, uncond, cond, cond]
    got = host_block(DreamCachePatch([e]), x, text, bsd, {"cond_or_uncond": [1, 0], SWITCH_KEY: (True, False)})
    base = host_block(DreamCachePatch([e]), x, text, bsd, {"patches": {}})
    full = host_block(DreamCachePatch([e]), x, text, bsd, {})
    assert torch.equal(got[:2], base[:2])
    assert (got[2:] - full[2:]).abs().max().item() < 1e-5


def test_one_cache_broadcasts_and_per_image_caches_map_to_batch_items():
    bsd = block_state()
    x, text = data(b=2)
    e1 = make_entry(refs=1)
    got = host_block(DreamCachePatch([e1]), x, text, bsd, {})
    for i in range(2):
        want = oracle.dreamcache_block(x[i:i + 1], text[i:i + 1], e1.cache.tokens[REF], bsd, adapter_sd(e1), HEADS)
        assert (got[i:i + 1] - want).abs().max().item() < 2e-5
    ep = make_entry(refs=2, per_image=True)
    got = host_block(DreamCachePatch([ep]), x, text, bsd, {"cond_or_uncond": [0]})
    for i in range(2):
        want = oracle.dreamcache_block(x[i:i + 1], text[i:i + 1], ep.cache.tokens[REF][i:i + 1], bsd, adapter_sd(ep),
                                       HEADS)
        assert (got[i:i + 1] - want).abs().max().item() < 2e-5
    with pytest.raises(DreamCacheError, match="2 per-image references but the batch has 3"):
        host_block(DreamCachePatch([ep]), *data(b=3), bsd, {})


def test_multi_reference_concat_attends_to_all_tokens():
    bsd = block_state()
    x, text = data(b=1)
    e = make_entry(refs=3)
    assert e.cache.tokens[REF].shape == (1, 48, C)
    got = host_block(DreamCachePatch([e]), x, text, bsd, {})
    want = oracle.dreamcache_block(x, text, e.cache.tokens[REF], bsd, adapter_sd(e), HEADS)
    assert (got - want).abs().max().item() < 2e-5


def test_two_entries_add_their_updates():
    bsd = block_state()
    x, text = data(b=1)
    e1, e2 = make_entry(seed=1, strength=0.7), make_entry(seed=2, strength=0.4)
    got = host_block(DreamCachePatch([e1, e2]), x, text, bsd, {})
    n = oracle._ln(x, bsd, "norm1.")
    a = oracle._cross_attention(n, n, bsd, "attn1.", HEADS)

    def fused(e):
        ac = oracle.memory_branch(x, e.cache.tokens[REF], adapter_sd(e), HEADS)
        return torch.cat([a, ac], -1) @ adapter_sd(e)["linear_cat.weight"].T + adapter_sd(e)["linear_cat.bias"]

    x1 = x + a + 0.7 * (fused(e1) - a) + 0.4 * (fused(e2) - a)
    x1 = x1 + oracle._cross_attention(oracle._ln(x1, bsd, "norm2."), text, bsd, "attn2.", HEADS)
    h = oracle._ln(x1, bsd, "norm3.") @ bsd["ff.net.0.proj.weight"].T + bsd["ff.net.0.proj.bias"]
    h, gate = h.chunk(2, -1)
    want = x1 + (h * torch.nn.functional.gelu(gate)) @ bsd["ff.net.2.weight"].T + bsd["ff.net.2.bias"]
    assert (got - want).abs().max().item() < 2e-5


def test_sigma_range():
    bsd = block_state()
    x, text = data(b=1)
    e = make_entry(sigma_start=5.0, sigma_end=1.0)
    base = host_block(DreamCachePatch([e]), x, text, bsd, {"patches": {}})
    inside = host_block(DreamCachePatch([e]), x, text, bsd, {"sigmas": torch.tensor([3.0])})
    above = host_block(DreamCachePatch([e]), x, text, bsd, {"sigmas": torch.tensor([9.0])})
    below = host_block(DreamCachePatch([e]), x, text, bsd, {"sigmas": torch.tensor([0.5])})
    assert torch.equal(above, base) and torch.equal(below, base) and not torch.equal(inside, base)


def test_blocks_without_an_adapter_are_untouched():
    e = make_entry()
    bsd = block_state()
    x, text = data()
    base = host_block(DreamCachePatch([e]), x, text, bsd, {"patches": {}})
    for block, idx in ((("output", 5), 0), (("output", 4), 1), (("middle", 0), 0)):
        assert torch.equal(host_block(DreamCachePatch([e]), x, text, bsd, {}, block=block, block_index=idx), base)


def test_other_packs_hooks_keep_their_order_around_ours():
    """A pack that registered attn1_output/middle patches *after* ours still sees the self-attention output a and
    the post-fusion residual; their lists are reordered on a copy, never mutated."""
    e = make_entry()
    patch = DreamCachePatch([e])
    bsd = block_state()
    x, text = data(b=1)
    seen = {}

    def their_out(a, extra):
        seen["a"] = a.clone()
        return a * 1.0

    def their_mid(x, extra):
        seen["x"] = x.clone()
        return x

    lists = {"attn1_output_patch": [patch.output_hook, their_out], "middle_patch": [their_mid, patch.middle_hook]}
    snapshot = {k: list(v) for k, v in lists.items()}
    got = host_block(patch, x, text, bsd, {"patches": lists})
    assert lists == snapshot  # caller's lists untouched
    want = host_block(patch, x, text, bsd, {})
    assert torch.equal(got, want)
    n = oracle._ln(x, bsd, "norm1.")
    assert (seen["a"] - oracle._cross_attention(n, n, bsd, "attn1.", HEADS)).abs().max().item() < 1e-6
    assert seen["x"].shape == x.shape and not torch.equal(seen["x"], x)


def test_hooks_without_the_wrapper_still_compute_correctly():
    """If another pack runs the diffusion model without wrappers, the hooks plan the call themselves."""
    e = make_entry()
    patch = DreamCachePatch([e])
    bsd = block_state()
    x, text = data()
    extra = {"block": ("output", 4), "block_index": 0, "n_heads": HEADS}
    n = oracle._ln(x, bsd, "norm1.")
    a = oracle._cross_attention(n, n, bsd, "attn1.", HEADS)
    z = patch.output_hook(a, extra)
    assert z.shape == a.shape and not z.any()
    mid = patch.middle_hook(z + x, extra)
    with_wrapper = {}

    def ex(x, *args, **kw):
        with_wrapper["plan"] = args[4][PLAN_OPTION]
        return x

    patch.wrapper(ex, x, None, text, None, None, {})
    ac = oracle.memory_branch(x, e.cache.tokens[REF], adapter_sd(e), HEADS)
    want = x + torch.cat([a, ac], -1) @ adapter_sd(e)["linear_cat.weight"].T + adapter_sd(e)["linear_cat.bias"]
    assert (mid - want).abs().max().item() < 2e-5
    assert with_wrapper["plan"].ordered


def test_token_layout_changed_by_another_patch_is_a_clear_error():
    e = make_entry()
    patch = DreamCachePatch([e])
    extra = {"block": ("output", 4), "block_index": 0, "n_heads": HEADS}
    x = torch.randn(2, 20, C)
    patch.output_hook(torch.randn(4, 10, C), extra)
    with pytest.raises(DreamCacheError, match="changed the token layout"):
        patch.middle_hook(x, extra)


def test_patch_objects_are_not_deep_copied():
    e = make_entry()
    patch = DreamCachePatch([e])
    opts = {"transformer_options": {"patches": {"attn1_output_patch": [patch.output_hook],
                                                "middle_patch": [patch.middle_hook]},
                                    "wrappers": {"diffusion_model": {"dreamcache": [patch.wrapper]}}}}
    dup = copy.deepcopy(opts)
    assert dup["transformer_options"]["patches"]["attn1_output_patch"][0] is patch.output_hook
    assert dup["transformer_options"]["patches"]["middle_patch"][0] is patch.middle_hook
    assert dup["transformer_options"]["wrappers"]["diffusion_model"]["dreamcache"][0] is patch.wrapper
    assert copy.deepcopy(patch) is patch
    assert patch.output_hook.models() == [] and patch.output_hook.to(torch.float16) is patch.output_hook


def test_kv_memo_is_per_device_and_dtype_and_dropped_on_move():
    e = make_entry()
    patch = DreamCachePatch([e])
    k1, _ = patch.kv(0, REF, "cpu", torch.float32)
    assert patch.kv(0, REF, "cpu", torch.float32)[0] is k1
    assert torch.allclose(k1, e.adapter.layer(REF).attn_mem.to_k(e.cache.tokens[REF]))
    patch.to(torch.device("meta"))
    assert not patch._kv


def test_entry_validation():
    e = make_entry()
    with pytest.raises(DreamCacheError, match="strength"):
        PatchEntry(e.adapter, e.cache, strength=float("nan"))
    other = from_captures({LayerRef("middle_block.1"): torch.randn(1, C, 2, 2)})
    with pytest.raises(DreamCacheError, match="no features for layer"):
        PatchEntry(e.adapter, other)
    wrong = from_captures({REF: torch.randn(1, C // 2, 2, 2)})
    with pytest.raises(DreamCacheError, match="channels"):
        PatchEntry(e.adapter, wrong)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_block_is_close_to_fp32(dtype):
    bsd = block_state()
    x, text = data()
    e32 = make_entry()
    want = host_block(DreamCachePatch([e32]), x, text, bsd, {})
    eh = make_entry(dtype=dtype)
    got = host_block(DreamCachePatch([eh]), x.to(dtype), text.to(dtype), {k: v.to(dtype) for k, v in bsd.items()}, {})
    assert got.dtype == dtype
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 0.05


def test_trainable_patch_lets_gradients_reach_every_adapter_parameter():
    """Training mode: no K/V memo, autograd through to_k/to_v, norm2_mem, to_q, to_out and linear_cat."""
    e = make_entry()
    for p in e.adapter.parameters():
        p.requires_grad_(True)
    patch = DreamCachePatch([e], trainable=True)
    bsd = block_state()
    x, text = data()
    out = host_block(patch, x, text, bsd, patch.transformer_options())
    out.square().mean().backward()
    for name, p in e.adapter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not patch._kv
    # the same numbers as the sampling path
    with torch.no_grad():
        assert torch.allclose(out, host_block(DreamCachePatch([e]), x, text, bsd, {}), atol=1e-6)


def test_transformer_options_adds_hooks_without_touching_the_base():
    e = make_entry()
    patch = DreamCachePatch([e])
    other = object()
    base = {"patches": {"middle_patch": [other]}, "wrappers": {"diffusion_model": {"x": [other]}}}
    to = patch.transformer_options(base)
    assert to["patches"]["middle_patch"] == [patch.middle_hook, other]
    assert to["patches"]["attn1_output_patch"] == [patch.output_hook]
    assert to["wrappers"]["diffusion_model"] == {"x": [other], "dreamcache": [patch.wrapper]}
    assert base == {"patches": {"middle_patch": [other]}, "wrappers": {"diffusion_model": {"x": [other]}}}


def test_non_contiguous_image_rows_use_the_gather_path():
    """Chunks [on, off, on]: not one run, so rows are gathered and scattered; same result as row by row."""
    e = make_entry()
    bsd = block_state()
    x, text = data(b=3)
    to = {"cond_or_uncond": [0, 1, 2], SWITCH_KEY: (True, False, True)}
    patch = DreamCachePatch([e])
    plan = patch.plan(to, 3, "cpu", torch.float32, ordered=True)
    assert isinstance(plan.rows, torch.Tensor) and plan.rows.tolist() == [0, 2]
    contiguous = patch.plan({"cond_or_uncond": [1, 0, 2], SWITCH_KEY: (True, False, True)}, 3, "cpu", torch.float32,
                            ordered=True)
    assert contiguous.rows == slice(1, 3)
    got = host_block(patch, x, text, bsd, to)
    full = host_block(patch, x, text, bsd, {})
    base = host_block(patch, x, text, bsd, {"patches": {}})
    assert torch.equal(got[1], base[1]) and (got[[0, 2]] - full[[0, 2]]).abs().max().item() < 1e-5


def test_the_combined_guidance_formula_is_the_oracles():
    """core.guidance.combined_guidance (what the guider computes, given ComfyUI's text term) is the method's formula
    e(∅,∅) + s_I·(e(c_I,∅) − e(∅,∅)) + s_T·(e(c_I,c_T) − e(c_I,∅)), written independently in tests/oracle.py; handing
    it the plain text term changes nothing."""
    from dreamcache.core.guidance import combined_guidance

    g = torch.Generator().manual_seed(7)
    e_00, e_i0, e_it = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for s_i, s_t in ((5.0, 7.5), (0.4, 7.5), (0.0, 1.0), (1.0, 0.0)):
        want = oracle.combined_guidance(e_00, e_i0, e_it, s_i, s_t)
        torch.testing.assert_close(combined_guidance(e_00, e_i0, e_it, s_i, s_t), want, rtol=1e-12, atol=1e-12)
        text = e_i0 + s_t * (e_it - e_i0)
        torch.testing.assert_close(combined_guidance(e_00, e_i0, e_it, s_i, s_t, text_guided=text), want,
                                   rtol=1e-12, atol=1e-12)
