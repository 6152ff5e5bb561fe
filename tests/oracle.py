"""An independent reference of the patched transformer block, written from the method description.

Deliberately plain: explicit einsum attention with an fp32 (or fp64) softmax, functional LayerNorm and GEGLU,
every weight read from a state dict. Tests compare the pack's hooked ComfyUI block and its fused hot path
against this. It is never used for generation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _attention(q, k, v, heads):
    b, n, c = q.shape
    d = c // heads
    if k.shape[0] != b:
        k, v = k.expand(b, -1, -1), v.expand(b, -1, -1)
    q = q.reshape(b, n, heads, d)
    k = k.reshape(b, k.shape[1], heads, d)
    v = v.reshape(b, v.shape[1], heads, d)
    sim = torch.einsum("bihd,bjhd->bhij", q.float() if q.dtype != torch.float64 else q,
                       k.float() if k.dtype != torch.float64 else k) * d**-0.5
    p = sim.softmax(dim=-1).to(v.dtype)
    return torch.einsum("bhij,bjhd->bihd", p, v).reshape(b, n, c)


def _ln(x, sd, prefix, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + "weight"], sd[prefix + "bias"], eps)


def _cross_attention(x, ctx, sd, prefix, heads):
    q = x @ sd[prefix + "to_q.weight"].T
    k = ctx @ sd[prefix + "to_k.weight"].T
    v = ctx @ sd[prefix + "to_v.weight"].T
    return _attention(q, k, v, heads) @ sd[prefix + "to_out.0.weight"].T + sd[prefix + "to_out.0.bias"]


def memory_branch(x, r, adapter_sd, heads):
    """a_c = attn_mem(norm2_mem(x), context=r), adapter_sd with the reference's per-layer names."""
    return _cross_attention(_ln(x, adapter_sd, "norm2_mem."), r, adapter_sd, "attn_mem.", heads)


def dreamcache_block(x, text, r, block_sd, adapter_sd, heads, strength=1.0):
    """One BasicTransformerBlock (ldm / ComfyUI parameter names) with the DreamCache update.

    ``r=None`` (image condition off) runs the pretrained block unchanged. ``strength`` interpolates the
    self-attention residual between the base block (0) and the reference math (1).
    """
    a = _cross_attention(_ln(x, block_sd, "norm1."), _ln(x, block_sd, "norm1."), block_sd, "attn1.", heads)
    if r is None:
        x = x + a
    else:
        a_c = memory_branch(x, r, adapter_sd, heads)
        fused = torch.cat([a, a_c], -1) @ adapter_sd["linear_cat.weight"].T + adapter_sd["linear_cat.bias"]
        x = x + (a + strength * (fused - a))
    x = x + _cross_attention(_ln(x, block_sd, "norm2."), text, block_sd, "attn2.", heads)
    h = _ln(x, block_sd, "norm3.") @ block_sd["ff.net.0.proj.weight"].T + block_sd["ff.net.0.proj.bias"]
    h, gate = h.chunk(2, dim=-1)
    h = h * F.gelu(gate)
    return x + h @ block_sd["ff.net.2.weight"].T + block_sd["ff.net.2.bias"]


def combined_guidance(e_00, e_i0, e_it, image_scale, text_scale):
    """e = e(∅,∅) + s_I·(e(c_I,∅) − e(∅,∅)) + s_T·(e(c_I,c_T) − e(c_I,∅))."""
    return e_00 + image_scale * (e_i0 - e_00) + text_scale * (e_it - e_i0)
