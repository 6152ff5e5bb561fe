"""The DreamCache block update, as used in the hot path.

With x the token stream entering the block, a = attn1(norm1(x)) (after to_out) and r the cached tokens::

    a_c = attn_mem(norm2_mem(x), context=r)
    x   = x + linear_cat(concat([a, a_c], -1))         # instead of x = x + a

K = to_k(r) and V = to_v(r) do not depend on x, so callers compute them once per run
(:func:`project_memory`) and pass them in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapter import LayerAdapter


def project_memory(layer: LayerAdapter, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the cached reference tokens (B, T, C); nothing normalises the cache."""
    return layer.attn_mem.to_k(tokens), layer.attn_mem.to_v(tokens)


def memory_attention(layer: LayerAdapter, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                     attention) -> torch.Tensor:
    """a_c = to_out(softmax(q kᵀ / √d) v) with q = to_q(norm2_mem(x)); x is the *un-normalised* block input."""
    q = layer.attn_mem.to_q(layer.norm2_mem(x))
    return layer.attn_mem.to_out[0](attention(q, k, v, heads, attn_precision=torch.float32))


def memory_attention_heads(layer: LayerAdapter, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                           attention) -> torch.Tensor:
    """softmax(q kᵀ / √d) v, heads merged, *before* ``to_out`` (which :func:`fold_output` folds into linear_cat)."""
    return attention(layer.attn_mem.to_q(layer.norm2_mem(x)), k, v, heads, attn_precision=torch.float32)


@torch.no_grad()
def fold_output(layer: LayerAdapter, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_a, W_oᵀ, b): linear_cat's two halves with ``to_out`` folded into the second, computed once in fp32 and cast:
    ``linear_cat(concat([a, to_out(o)])) = a W_aᵀ + o W_oᵀ + b`` with W_a = W[:, :C], W_o = W[:, C:] · W_out and
    b = b_cat + W[:, C:] b_out (the same sum as the unfolded form, up to fp32 rounding)."""
    c = layer.dim
    w = layer.linear_cat.weight.to(device=device, dtype=torch.float32)
    out = layer.attn_mem.to_out[0]
    w_out = out.weight.to(device=device, dtype=torch.float32)
    bias = layer.linear_cat.bias.to(device=device, dtype=torch.float32)
    if out.bias is not None:
        bias = bias + w[:, c:] @ out.bias.to(device=device, dtype=torch.float32)
    w_a = w[:, :c].contiguous()
    w_o_t = (w[:, c:] @ w_out).t()  # kept transposed (a view made once): addmm_ takes it as is, no per-call .t()
    return w_a.to(dtype), w_o_t.to(dtype), bias.to(dtype)


def fuse_folded(folded: tuple, a: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """:func:`fuse` of ``a`` and ``to_out(o)`` with the weights of :func:`fold_output`: two matmuls accumulating
    into one buffer (no concat copy, no separate ``to_out``)."""
    w_a, w_o_t, bias = folded
    out = F.linear(a, w_a, bias)
    out.view(-1, out.shape[-1]).addmm_(o.reshape(-1, o.shape[-1]), w_o_t)
    return out


def fuse(layer: LayerAdapter, a: torch.Tensor, a_c: torch.Tensor) -> torch.Tensor:
    """linear_cat(concat([a, a_c])): the first C input columns multiply a, the last C multiply a_c."""
    return layer.linear_cat(torch.cat([a, a_c], dim=-1))


def mix(a: torch.Tensor, fused: list[torch.Tensor], strengths: list[float]) -> torch.Tensor:
    """What is added to x. One adapter: lerp(a, fused, s) (s=0 gives a, s=1 gives fused, both exactly).
    Several: a + Σ sᵢ (fusedᵢ − a)."""
    if len(fused) == 1:
        s = strengths[0]
        if s == 1.0:
            return fused[0]
        if s == 0.0:
            return a
        return torch.lerp(a, fused[0], s)
    out = a
    for f, s in zip(fused, strengths):
        out = out + s * (f - a)
    return out


def mix_weighted(a: torch.Tensor, fused: list[torch.Tensor], scales: list, weights: list) -> torch.Tensor:
    """What is added to x when some subjects carry a mask: a + Σ wsᵢ·(fusedᵢ − a), where wsᵢ is the
    per-token tensor w·λ·s (B or 1, N, 1) of a masked subject or the scalar λ·s of an unmasked one. Without any
    tensor this is :func:`mix` exactly. A token where every wsᵢ is 0 gets ``a`` bit for bit, and one subject's term
    is the same whether or not other subjects are added (so disjoint masks give each region what its subject alone
    gives)."""
    if all(w is None for w in weights):
        return mix(a, fused, scales)
    out = a
    for f, s, ws in zip(fused, scales, weights):
        out = out + s * (f - a) if ws is None else torch.addcmul(out, ws, f - a)
    return out
