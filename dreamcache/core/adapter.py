"""The DreamCache adapter modules: one small cross-attention + fusion per patched transformer block.

Parameter names inside a layer match the authors' trainer's (``attn_mem.to_q.weight``,
``attn_mem.to_out.0.bias``, ``linear_cat.weight``, ``norm2_mem.weight`` ...), so a reference state dict maps
onto it without renaming. ``operations`` lets ComfyUI inject its casting layers (``comfy.ops.manual_cast``);
plain ``torch.nn`` is the default so the core runs without ComfyUI.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import LayerRef, sort_layers

#: Parameter name -> shape as a function of the block's channel count C.
PARAM_SHAPES = {
    "attn_mem.to_q.weight": lambda c: (c, c),
    "attn_mem.to_k.weight": lambda c: (c, c),
    "attn_mem.to_v.weight": lambda c: (c, c),
    "attn_mem.to_out.0.weight": lambda c: (c, c),
    "attn_mem.to_out.0.bias": lambda c: (c,),
    "linear_cat.weight": lambda c: (c, 2 * c),
    "linear_cat.bias": lambda c: (c,),
    "norm2_mem.weight": lambda c: (c,),
    "norm2_mem.bias": lambda c: (c,),
}

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as in the reference


def layer_parameter_count(channels: int) -> int:
    """6C² + 4C: q, k, v, out (C² each), out bias, linear_cat (2C² + C), LayerNorm (2C)."""
    return 6 * channels * channels + 4 * channels


class MemoryAttention(nn.Module):
    """``attn_mem``: multi-head cross-attention from the block's tokens to the cached reference tokens."""

    def __init__(self, dim: int, operations=nn, device=None, dtype=None):
        super().__init__()
        self.to_q = operations.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.to_k = operations.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.to_v = operations.Linear(dim, dim, bias=False, device=device, dtype=dtype)
        self.to_out = nn.ModuleList([operations.Linear(dim, dim, device=device, dtype=dtype)])


class LayerAdapter(nn.Module):
    """The adapter of one transformer block: ``norm2_mem``, ``attn_mem`` and ``linear_cat``."""

    def __init__(self, dim: int, operations=nn, device=None, dtype=None):
        super().__init__()
        self.dim = dim
        self.norm2_mem = operations.LayerNorm(dim, eps=LAYER_NORM_EPS, device=device, dtype=dtype)
        self.attn_mem = MemoryAttention(dim, operations, device=device, dtype=dtype)
        self.linear_cat = operations.Linear(2 * dim, dim, device=device, dtype=dtype)

    @torch.no_grad()
    def reset_reference_init(self, generator: torch.Generator | None = None):
        """PyTorch's default init (what the authors' trainer starts from), optionally seeded."""
        for lin in (self.attn_mem.to_q, self.attn_mem.to_k, self.attn_mem.to_v, self.attn_mem.to_out[0],
                    self.linear_cat):
            fan_in = lin.weight.shape[1]
            bound = 1.0 / fan_in**0.5
            # kaiming_uniform_(a=sqrt(5)) and the bias rule of nn.Linear both reduce to
            # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            lin.weight.uniform_(-bound, bound, generator=generator)
            if lin.bias is not None:
                lin.bias.uniform_(-bound, bound, generator=generator)
        self.norm2_mem.weight.fill_(1.0)
        self.norm2_mem.bias.zero_()

    @torch.no_grad()
    def make_identity(self):
        """linear_cat = [I | 0], bias 0: the block output equals the base block's, whatever attn_mem computes."""
        c = self.dim
        self.linear_cat.weight.zero_()
        self.linear_cat.weight[:, :c].copy_(torch.eye(c, dtype=self.linear_cat.weight.dtype))
        self.linear_cat.bias.zero_()


class DreamCacheAdapter(nn.Module):
    """All layer adapters of one adapter file, keyed by :class:`LayerRef`."""

    def __init__(self, channels: dict[LayerRef, int], operations=nn, device=None, dtype=None):
        super().__init__()
        self.layers: tuple[LayerRef, ...] = tuple(sort_layers(channels))
        self.channels = {ref: int(channels[ref]) for ref in self.layers}
        self.blocks = nn.ModuleDict(
            {ref.slot: LayerAdapter(self.channels[ref], operations, device=device, dtype=dtype) for ref in self.layers}
        )

    def layer(self, ref: LayerRef) -> LayerAdapter:
        return self.blocks[ref.slot]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict under the authors' trainer's key names
        (``diffusion_model.<module>.transformer_blocks.<i>.<param>``)."""
        out = {}
        for ref in self.layers:
            for name, t in self.layer(ref).state_dict().items():
                out[ref.key_prefix + name] = t
        return out

    @torch.no_grad()
    def load_reference_state_dict(self, tensors: dict[LayerRef, dict[str, torch.Tensor]]):
        """Copy validated per-layer tensors in (strict: every parameter of every layer must be present)."""
        for ref in self.layers:
            self.layer(ref).load_state_dict(tensors[ref], strict=True)

    @torch.no_grad()
    def reset_reference_init(self, seed: int | None = None):
        g = None
        if seed is not None:
            g = torch.Generator(device="cpu").manual_seed(seed)
        for ref in self.layers:
            if g is not None and self.layer(ref).linear_cat.weight.device.type != "cpu":
                raise ValueError("seeded init needs the adapter on the CPU")
            self.layer(ref).reset_reference_init(g)

    @torch.no_grad()
    def make_identity(self):
        for ref in self.layers:
            self.layer(ref).make_identity()
