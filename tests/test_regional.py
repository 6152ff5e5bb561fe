"""Regional DreamCache in the core (no ComfyUI): masks, several subjects, per-layer weights, attention recording.

Protects: a mask zero everywhere is the base block bit for bit and one everywhere is no mask bit for bit; in
between the block adds ``a + w·s·(fused − a)`` per token with w the mask's area average over the token's cell;
masks of batch 1 serve any batch and a batch of masks maps to the latent batch; wrong aspect, wrong batch and empty
masks are clear errors; several subjects each see the base block's attn1 output and their own cache and add up, and
with disjoint masks every token is exactly what its subject alone gives; the image switch turns all subjects off
together; a layer weight 0 is the base block exactly and unknown layer names list the valid ones; the recorder finds
the cache token each query attends to, records the step asked for, and does not change the result.
"""

from __future__ import annotations

import oracle
import pytest
import torch
from test_block_math import HEADS, REF, C, adapter_sd, block_state, data, host_block, make_entry

from dreamcache.core.adapter import DreamCacheAdapter
from dreamcache.core.attention_maps import AttentionRecorder, head_mean_probs, point_map, reference_subject, subject_map
from dreamcache.core.cache import from_captures
from dreamcache.core.errors import DreamCacheError
from dreamcache.core.hooks import SWITCH_KEY
from dreamcache.core.layers import LayerRef, layer_name
from dreamcache.core.patch import DreamCachePatch, PatchEntry
from dreamcache.core.regional import parse_layer_weights, token_grid

H, W = 4, 5  # token grid of the test layer: 20 tokens, as data() makes
SHAPES = {"original_shape": [2, 4, 8, 10], "activations_shape": [2, C, H, W]}


def host_mid(patch, x, bsd, to=None):
    """x after the middle patches of one block (the residual DreamCache changes), the ComfyUI hook order."""
    out = {}

    def executor(x, timesteps, context, y, control, to, **kw):
        extra = {k: v for k, v in to.items() if k not in ("patches", "patches_replace")}
        extra.update(block=("output", 4), block_index=0, n_heads=HEADS, dim_head=C // HEADS)
        n = oracle._ln(x, bsd, "norm1.")
        a = oracle._cross_attention(n, n, bsd, "attn1.", HEADS)
        out["a"] = a
        for p in to["patches"].get("attn1_output_patch", []):
            a = p(a, extra)
        x = a + x
        for p in to["patches"].get("middle_patch", []):
            x = p(x, extra)
        return x

    to = {**SHAPES, **(to or {})}
    to.setdefault("patches", {"attn1_output_patch": [patch.output_hook], "middle_patch": [patch.middle_hook]})
    res = patch.wrapper(executor, x, None, None, None, None, to)
    return res, out["a"]


def with_mask(e: PatchEntry, mask, strength=None, layer_weights=None) -> PatchEntry:
    return PatchEntry(
        e.adapter, e.cache, e.strength if strength is None else strength, mask=mask, layer_weights=layer_weights
    )


def fused_of(e, x, a):
    sd = adapter_sd(e)
    ac = oracle.memory_branch(x, e.cache.tokens[REF], sd, HEADS)
    return torch.cat([a, ac], -1) @ sd["linear_cat.weight"].T + sd["linear_cat.bias"]


def soft_mask(seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 16, 20, generator=g)  # 4x the token grid, aspect 4:5 like the 8x10 latent


# ---- exactness ------------------------------------------------------------------------------------------------------


def test_mask_zero_is_the_base_block_and_mask_one_is_no_mask_bit_for_bit():
    e = make_entry(strength=0.7)
    bsd = block_state()
    x, text = data()
    base = host_block(DreamCachePatch([e]), x, text, bsd, {**SHAPES, "patches": {}})
    plain = host_block(DreamCachePatch([e]), x, text, bsd, SHAPES)
    zero = host_block(DreamCachePatch([with_mask(e, torch.zeros(1, 16, 20))]), x, text, bsd, SHAPES)
    one = host_block(DreamCachePatch([with_mask(e, torch.ones(1, 16, 20))]), x, text, bsd, SHAPES)
    assert torch.equal(zero, base) and torch.equal(one, plain) and not torch.equal(plain, base)
    # a mask above one is clamped to one (still the plain path); the batch of ones too
    assert torch.equal(
        host_block(DreamCachePatch([with_mask(e, 2 * torch.ones(2, 8, 10))]), x, text, bsd, SHAPES), plain
    )


def test_soft_mask_adds_w_s_fused_minus_a_per_token_with_area_averaging():
    e = make_entry(strength=0.8)
    bsd = block_state()
    x, _ = data()
    mask = soft_mask()
    got, a = host_mid(DreamCachePatch([with_mask(e, mask)]), x, bsd)
    w = mask.reshape(1, H, 4, W, 4).mean((2, 4)).reshape(1, H * W, 1)  # area average over each token's 4x4 cell
    want = x + a + w * 0.8 * (fused_of(e, x, a) - a)
    assert (got - want).abs().max().item() < 2e-5
    # a token whose cell is zero is x + a exactly; a token whose cell is one is the full update
    half = torch.zeros(1, 16, 20)
    half[:, :, :8] = 1.0  # token columns 0-1 on, 2-4 off
    got, a = host_mid(DreamCachePatch([with_mask(e, half)]), x, bsd)
    g, x_, a_ = got.reshape(2, H, W, C), x.reshape(2, H, W, C), a.reshape(2, H, W, C)
    assert torch.equal(g[:, :, 2:], x_[:, :, 2:] + a_[:, :, 2:])
    full = (x + a + 0.8 * (fused_of(e, x, a) - a)).reshape(2, H, W, C)
    assert (g[:, :, :2] - full[:, :, :2]).abs().max().item() < 2e-5


def test_a_mask_of_any_resolution_with_the_latents_aspect():
    e = make_entry()
    bsd = block_state()
    x, _ = data()
    small, _ = host_mid(
        DreamCachePatch([with_mask(e, soft_mask().reshape(1, 4, 4, 5, 4).mean((2, 4)))]), x, bsd
    )  # 4x5 = the grid
    big, _ = host_mid(DreamCachePatch([with_mask(e, soft_mask())]), x, bsd)
    assert (small - big).abs().max().item() < 1e-5


def test_mask_batches_map_to_the_latent_batch():
    e = make_entry()
    bsd = block_state()
    x, _ = data(b=4)
    masks = soft_mask(1, b=2)
    to = {
        "cond_or_uncond": [1, 0],
        "original_shape": [4, 4, 8, 10],
        "activations_shape": [4, C, H, W],
    }  # 2 chunks x 2 latents
    got, _ = host_mid(DreamCachePatch([with_mask(e, masks)]), x, bsd, to)
    for i in range(4):
        one, _ = host_mid(DreamCachePatch([with_mask(e, masks[i % 2 : i % 2 + 1])]), x[i : i + 1], bsd)
        assert torch.equal(got[i : i + 1], one), i
    # rows with the image off are the base block whatever the mask
    got_off, a = host_mid(DreamCachePatch([with_mask(e, masks)]), x, bsd, {**to, SWITCH_KEY: (True, False)})
    assert torch.equal(got_off[:2], (x + a)[:2]) and torch.equal(got_off[2:], got[2:])  # chunk 0 is cond 1: off
    with pytest.raises(DreamCacheError, match="mask has a batch of 2 but the latent batch is 3"):
        host_mid(DreamCachePatch([with_mask(e, masks)]), data(b=3)[0], bsd, {"original_shape": [3, 4, 8, 10]})


def test_bad_masks_are_clear_errors():
    e = make_entry()
    bsd = block_state()
    x, _ = data()
    with pytest.raises(
        DreamCacheError, match=r"mask is 20×20 \(width×height\) but the latent is 10×8 \(80×64 pixels\)"
    ):
        host_mid(DreamCachePatch([with_mask(e, torch.rand(1, 20, 20))]), x, bsd)
    with pytest.raises(DreamCacheError, match="mask is empty"):
        with_mask(e, torch.zeros(1, 0, 20))
    with pytest.raises(DreamCacheError, match="shape"):
        with_mask(e, torch.zeros(2, 2, 3, 4, 5))
    with pytest.raises(DreamCacheError, match="NaN"):
        with_mask(e, torch.full((1, 4, 5), float("nan")))


def test_token_grid_follows_the_layer():
    assert token_grid(20, [1, C, 4, 5], [1, 4, 8, 10]) == (4, 5)
    assert token_grid(15, None, [1, 4, 12, 20]) == (3, 5)  # 12x20 -> 6x10 -> 3x5
    assert token_grid(6, [1, C, 3, 5], [1, 4, 12, 20]) == (2, 3)  # ceil halving, activations_shape of another layer
    with pytest.raises(DreamCacheError, match="token grid"):
        token_grid(7, None, [1, 4, 12, 20])


# ---- several subjects -----------------------------------------------------------------------------------------------


def constant_subject(value: float, channel: int, dim=C, tokens=16) -> PatchEntry:
    """An adapter + cache whose update is recognisable: every cached token is value·e_channel, to_v and to_out are the
    identity (no bias) and linear_cat = [I | I], so fused = a + value·e_channel whatever the attention weights."""
    ad = DreamCacheAdapter({REF: dim})
    ad.reset_reference_init(0)
    layer = ad.layer(REF)
    eye = torch.eye(dim)
    with torch.no_grad():
        layer.attn_mem.to_v.weight.copy_(eye)
        layer.attn_mem.to_out[0].weight.copy_(eye)
        layer.attn_mem.to_out[0].bias.zero_()
        layer.linear_cat.weight.copy_(torch.cat([eye, eye], 1))
        layer.linear_cat.bias.zero_()
    r = torch.zeros(1, dim, 4, tokens // 4)
    r[:, channel] = value
    return PatchEntry(ad, from_captures({REF: r}))


def halves():
    left, right = torch.zeros(1, 16, 20), torch.zeros(1, 16, 20)
    left[..., :8] = 1.0  # token columns 0, 1
    right[..., 12:] = 1.0  # token columns 3, 4 (column 2: neither)
    return left, right


def test_two_subjects_each_see_the_base_attention_and_add_up():
    bsd = block_state()
    x, _ = data()
    s1, s2 = constant_subject(3.0, 0), constant_subject(5.0, 1)
    both = torch.ones(1, 16, 20)
    got, a = host_mid(DreamCachePatch([with_mask(s1, both * 0.5), with_mask(s2, both * 0.5)]), x, bsd)
    # each adds w·(fused_i − a) = 0.5·value_i·e_i: had subject 2 seen subject 1's output as its a, channel 0 would
    # get subject 1's update twice
    delta = got - x - a
    assert (delta[..., 0] - 1.5).abs().max() < 1e-5 and (delta[..., 1] - 2.5).abs().max() < 1e-5
    assert delta[..., 2:].abs().max() < 1e-5


def test_disjoint_masks_give_each_region_exactly_its_subject_alone():
    bsd = block_state()
    x, _ = data()
    left, right = halves()
    for e1, e2 in (
        (constant_subject(3.0, 0), constant_subject(5.0, 1)),
        (make_entry(seed=1, strength=0.9), make_entry(seed=2, strength=1.3)),
    ):
        two, a = host_mid(DreamCachePatch([with_mask(e1, left), with_mask(e2, right)]), x, bsd)
        only1, _ = host_mid(DreamCachePatch([with_mask(e1, left)]), x, bsd)
        only2, _ = host_mid(DreamCachePatch([with_mask(e2, right)]), x, bsd)
        g, o1, o2 = (t.reshape(2, H, W, C) for t in (two, only1, only2))
        assert torch.equal(g[:, :, :2], o1[:, :, :2])  # token by token, bit for bit
        assert torch.equal(g[:, :, 3:], o2[:, :, 3:])
        assert torch.equal(g[:, :, 2], (x + a).reshape(2, H, W, C)[:, :, 2])  # neither mask: the base block
        assert not torch.equal(g[:, :, :2], (x + a).reshape(2, H, W, C)[:, :, :2])  # and the subject acts


def test_overlapping_masks_add():
    bsd = block_state()
    x, _ = data()
    s1, s2 = constant_subject(3.0, 0), constant_subject(5.0, 0)
    ones = torch.ones(1, 16, 20)
    got, a = host_mid(DreamCachePatch([with_mask(s1, ones * 0.999), with_mask(s2, ones * 0.999)]), x, bsd)
    assert ((got - x - a)[..., 0] - 0.999 * 8.0).abs().max() < 1e-4


def test_the_image_switch_turns_every_subject_off_together():
    bsd = block_state()
    x, _ = data(b=2)
    left, right = halves()
    p = DreamCachePatch([with_mask(make_entry(seed=1), left), with_mask(make_entry(seed=2), right)])
    got, a = host_mid(p, x, bsd, {"cond_or_uncond": [0, 1], SWITCH_KEY: (True, False)})
    on, _ = host_mid(p, x, bsd, {"cond_or_uncond": [0, 1], SWITCH_KEY: (True, True)})
    assert torch.equal(got[1], (x + a)[1]) and torch.equal(got[0], on[0]) and not torch.equal(on[1], got[1])


# ---- per-layer weights ----------------------------------------------------------------------------------------------


def test_layer_weight_zero_is_the_base_block_and_weights_scale_the_strength():
    e = make_entry()
    bsd = block_state()
    x, text = data()
    base = host_block(DreamCachePatch([e]), x, text, bsd, {"patches": {}})
    off = host_block(DreamCachePatch([PatchEntry(e.adapter, e.cache, 1.0, layer_weights={REF: 0.0})]), x, text, bsd, {})
    assert torch.equal(off, base)
    half_layer = host_block(
        DreamCachePatch([PatchEntry(e.adapter, e.cache, 1.0, layer_weights={REF: 0.5})]), x, text, bsd, {}
    )
    half_strength = host_block(DreamCachePatch([PatchEntry(e.adapter, e.cache, 0.5)]), x, text, bsd, {})
    assert torch.equal(half_layer, half_strength)
    one = host_block(DreamCachePatch([PatchEntry(e.adapter, e.cache, 0.7, layer_weights={REF: 1.0})]), x, text, bsd, {})
    assert torch.equal(one, host_block(DreamCachePatch([PatchEntry(e.adapter, e.cache, 0.7)]), x, text, bsd, {}))


def test_layer_weight_names():
    layers = [
        LayerRef("middle_block.1"),
        LayerRef("output_blocks.4.1"),
        LayerRef("output_blocks.6.1", 1),
        LayerRef("input_blocks.7.1"),
    ]
    assert [layer_name(r) for r in layers] == ["middle", "output_4", "output_6_1", "input_7"]
    got = parse_layer_weights("middle=1, output_4=0.8\n output_6_1 = 0 ; input_blocks.7.1=0.5", layers)
    assert got == {layers[0]: 1.0, layers[1]: 0.8, layers[2]: 0.0, layers[3]: 0.5}
    assert parse_layer_weights("  ", layers) == {}
    with pytest.raises(
        DreamCacheError, match="no layer 'output_10'; its layers are: middle, output_4, output_6_1, input_7"
    ):
        parse_layer_weights("output_10=1", layers)
    with pytest.raises(DreamCacheError, match="name=value"):
        parse_layer_weights("middle 1", layers)
    with pytest.raises(DreamCacheError, match="not a number"):
        parse_layer_weights("middle=high", layers)
    with pytest.raises(DreamCacheError, match="out of range"):
        parse_layer_weights("middle=7", layers)
    with pytest.raises(DreamCacheError, match="two weights"):
        parse_layer_weights("middle=1, middle=0", layers)
    e = make_entry()
    with pytest.raises(DreamCacheError, match="no layer 'middle'; its layers are: output_4"):
        PatchEntry(e.adapter, e.cache, layer_weights={LayerRef("middle_block.1"): 1.0})


# ---- attention recording --------------------------------------------------------------------------------------------

N_TOK, M_TOK = H * W, 16
TARGET = torch.tensor([(7 * n + 3) % M_TOK for n in range(N_TOK)])  # the cache token query n must attend to


def pointing_setup(extra_layers=()):
    """x_n = 8·e_{TARGET[n]}, cache token m = e_m, to_q = to_k = 6·I, norm2_mem the plain LayerNorm: q_n·k_m is large
    only for m = TARGET[n] (in the head holding that channel), so each query's attention peaks at its target."""
    ad = DreamCacheAdapter({REF: C, **{ref: C for ref in extra_layers}})
    ad.reset_reference_init(0)
    layer = ad.layer(REF)
    with torch.no_grad():
        layer.norm2_mem.weight.fill_(1.0)
        layer.norm2_mem.bias.zero_()
        layer.attn_mem.to_q.weight.copy_(6 * torch.eye(C))
        layer.attn_mem.to_k.weight.copy_(6 * torch.eye(C))
    r = torch.zeros(1, C, 4, 4)
    r.view(1, C, M_TOK)[0, torch.arange(M_TOK), torch.arange(M_TOK)] = 1.0
    entry = PatchEntry(ad, from_captures({REF: r, **{ref: r for ref in extra_layers}}))
    x = torch.zeros(2, N_TOK, C)
    x[0, torch.arange(N_TOK), TARGET] = 8.0
    x[1, torch.arange(N_TOK), (TARGET + 5) % M_TOK] = 8.0
    return entry, x


def test_recorder_finds_the_token_each_query_attends_to():
    entry, x = pointing_setup()
    bsd = block_state()
    rec = AttentionRecorder(REF, 0.5)
    plain, _ = host_mid(DreamCachePatch([entry]), x, bsd)
    recorded, _ = host_mid(DreamCachePatch([entry], recorder=rec), x, bsd)
    assert torch.equal(plain, recorded)  # recording does not change the image
    r = rec.get(1)
    assert r.probs.shape == (2, N_TOK, M_TOK) and r.grid == (H, W) and r.ref_grid == (4, 4) and r.references == 1
    assert torch.allclose(r.probs.sum(-1), torch.ones(2, N_TOK), atol=1e-5)
    assert torch.equal(r.probs[0].argmax(-1), TARGET) and torch.equal(r.probs[1].argmax(-1), (TARGET + 5) % M_TOK)
    for n in (0, 7, 19):
        pm, (row, col) = point_map(r, (n % W + 0.5) / W, (n // W + 0.5) / H)
        assert (row, col) == (n // W, n % W) and pm.shape == (2, 1, 4, 4)
        assert int(pm[0, 0].flatten().argmax()) == int(TARGET[n])
    # subject map: the queries whose target is a subject token draw most on the subject
    subject = torch.zeros(4, 4)
    subject[:2] = 1.0  # reference tokens 0-7
    sm = subject_map(r, reference_subject((4, 4), 1, mask=subject))
    on = (TARGET < 8).reshape(H, W)
    assert sm.shape == (2, H, W) and sm[0][on].min() > 0.5 > sm[0][~on].max()
    # the explicit probabilities are those of the attention the block really ran
    layer = entry.adapter.layer(REF)
    q = layer.attn_mem.to_q(layer.norm2_mem(x))
    k, v = layer.attn_mem.to_k(entry.cache.tokens[REF]), layer.attn_mem.to_v(entry.cache.tokens[REF])
    d = C // HEADS
    ref_out = torch.nn.functional.scaled_dot_product_attention(
        q.view(2, -1, HEADS, d).transpose(1, 2),
        k.view(1, -1, HEADS, d).transpose(1, 2).expand(2, -1, -1, -1),
        v.view(1, -1, HEADS, d).transpose(1, 2).expand(2, -1, -1, -1),
    )
    probs_h = torch.softmax(
        q.view(2, -1, HEADS, d).transpose(1, 2) @ k.view(1, -1, HEADS, d).transpose(1, 2).transpose(-1, -2) * d**-0.5,
        -1,
    )
    assert torch.allclose(probs_h @ v.view(1, -1, HEADS, d).transpose(1, 2), ref_out, atol=1e-5)
    assert torch.allclose(head_mean_probs(q, k, HEADS), probs_h.mean(1), atol=1e-6)


def test_recorder_records_the_step_asked_for_and_only_the_positive_prompt():
    entry, x = pointing_setup()
    bsd = block_state()
    schedule = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.5, 0.0])  # 5 steps
    rec = AttentionRecorder(REF, 0.5)  # step round(0.5·4) = 2: sigma 3
    p = DreamCachePatch([entry], recorder=rec)
    for sigma in schedule[:-1]:
        xs = x * (1 + sigma)  # a different x per step, so each step's attention is recognisable
        host_mid(p, xs, bsd, {"sample_sigmas": schedule, "sigmas": sigma[None], "cond_or_uncond": [1, 0]})
        if float(sigma) == 3.0:
            layer = entry.adapter.layer(REF)
            want = head_mean_probs(
                layer.attn_mem.to_q(layer.norm2_mem(xs[1:])), layer.attn_mem.to_k(entry.cache.tokens[REF]), HEADS
            )
    r = rec.get(1)
    assert rec.step == 2 and rec.steps == 5 and rec.sigma == 3.0
    assert r.probs.shape[0] == 1 and torch.allclose(r.probs, want, atol=1e-6)  # row 1 is the positive prompt's
    # a new run (new schedule) starts a new recording; a run where the positive prompt never has the image: nothing
    host_mid(
        p,
        x,
        bsd,
        {
            "sample_sigmas": schedule.clone(),
            "sigmas": schedule[2:3],
            "cond_or_uncond": [0, 1],
            SWITCH_KEY: (False, True),
        },
    )
    with pytest.raises(DreamCacheError, match="recorded nothing"):
        rec.get(1)
    with pytest.raises(DreamCacheError, match="step_percent"):
        AttentionRecorder(REF, 1.5)


def test_recorder_averages_the_chunks_of_regional_prompts():
    entry, x = pointing_setup()
    bsd = block_state()
    rec = AttentionRecorder(REF, 0.0)
    xb = torch.cat([x[:1], x[1:], x[:1]])  # positive prompt area 1, area 2, negative
    host_mid(
        DreamCachePatch([entry], recorder=rec), xb, bsd, {"cond_or_uncond": [0, 0, 1], "original_shape": [3, 4, 8, 10]}
    )
    r = rec.get(1)
    layer = entry.adapter.layer(REF)
    k = layer.attn_mem.to_k(entry.cache.tokens[REF])
    each = head_mean_probs(layer.attn_mem.to_q(layer.norm2_mem(x)), k, HEADS)
    assert r.count == 2 and torch.allclose(r.probs[0], each.mean(0), atol=1e-6)
    with pytest.raises(DreamCacheError, match="Subject 2 was not recorded"):
        rec.get(2)


def test_reference_subject_from_a_white_background():
    img = torch.ones(1, 8, 8, 3)
    img[:, :4, :4] = 0.2  # subject in the top-left quarter
    s = reference_subject((2, 2), 1, image=img)
    assert s.tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(DreamCacheError, match="batch of 3 but the cache holds 2"):
        reference_subject((2, 2), 2, mask=torch.ones(3, 8, 8))


def test_only_the_chosen_layer_is_recorded():
    """With an adapter on two layers (output_4 and middle), running the output_4 block records it for a recorder
    of output_4 and nothing for a recorder of middle: the recorder keeps its own layer, not whichever block runs."""
    mid = LayerRef("middle_block.1")
    entry, x = pointing_setup(extra_layers=(mid,))
    assert set(entry.adapter.layers) == {REF, mid}
    chosen = AttentionRecorder(REF, 0.5)
    host_mid(DreamCachePatch([entry], recorder=chosen), x, block_state())
    assert set(chosen.records) == {0}
    other = AttentionRecorder(mid, 0.5)
    host_mid(DreamCachePatch([entry], recorder=other), x, block_state())
    assert other.records == {}
