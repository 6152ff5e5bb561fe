"""Default multi-head attention for the core (PyTorch SDPA). Inside ComfyUI the glue passes ComfyUI's own
optimized attention instead; both take ``(q, k, v, heads)`` with q ``(B, N, C)`` and k, v ``(B or 1, M, C)``."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, **_ignored) -> torch.Tensor:
    b, n, c = q.shape
    d = c // heads
    if k.shape[0] != b:
        k = k.expand(b, -1, -1)
        v = v.expand(b, -1, -1)
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.reshape(b, -1, heads, d).transpose(1, 2)
    v = v.reshape(b, -1, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)  # scale d^-0.5, no mask
    return out.transpose(1, 2).reshape(b, n, c)
