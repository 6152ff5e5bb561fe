"""Regional DreamCache: a mask per subject and a weight per patched layer (torch only).

At a patched layer with attn1 output ``a``, linear_cat output ``fused``, strength ``s``, layer weight ``λ`` and the
mask's area average ``w`` over the token's cell of that layer's grid, the block adds, per token::

    a + w·λ·s·(fused − a)                      (several subjects: a + Σᵢ wᵢ·λᵢ·sᵢ·(fusedᵢ − a))

instead of the plain ``x + a``. Exact cases: a mask that is zero everywhere (or λ = 0) drops the subject from that
layer, so the block is the base block bit for bit; a mask that is one everywhere is the same as no mask (the plain
path of :mod:`.block`, bit for bit).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from .errors import DreamCacheError
from .layers import LayerRef, layer_name, resolve_layer

LAYER_WEIGHT_RANGE = (-1.0, 3.0)


# ---- layer weights ----------------------------------------------------------------------------------------------


def parse_layer_weights(text: str, layers) -> dict[LayerRef, float]:
    """``"middle=1, output_4=0.8"`` (commas, semicolons or new lines between entries) -> {LayerRef: weight}.
    Layers not named keep weight 1; an empty text is every layer at 1."""
    out: dict[LayerRef, float] = {}
    for item in re.split(r"[,;\n]", text or ""):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        if "=" not in item:
            raise DreamCacheError(f"Layer weight '{item}' is not of the form name=value (e.g. output_4=0.8).")
        name, value = (s.strip() for s in item.split("=", 1))
        ref = resolve_layer(name, layers)
        try:
            v = float(value)
        except ValueError:
            raise DreamCacheError(f"Layer weight '{item}': '{value}' is not a number.") from None
        if ref in out:
            raise DreamCacheError(f"Layer '{name}' is given two weights; name each layer once.")
        out[ref] = v
    return check_layer_weights(out, layers)


def check_layer_weights(weights: dict, layers) -> dict[LayerRef, float]:
    lo, hi = LAYER_WEIGHT_RANGE
    layers = list(layers)
    for ref, v in weights.items():
        if ref not in layers:
            valid = ", ".join(layer_name(r) for r in layers)
            raise DreamCacheError(f"The adapter has no layer '{layer_name(ref)}'; its layers are: {valid}.")
        if not (isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi):
            raise DreamCacheError(
                f"Layer weight {v} for '{layer_name(ref)}' is out of range; use a value between {lo:g} and {hi:g}."
            )
    return {ref: float(v) for ref, v in weights.items()}


# ---- masks --------------------------------------------------------------------------------------------------------


def prepare_mask(mask) -> torch.Tensor:
    """A ComfyUI MASK ((H, W) or (B, H, W), or (B, 1, H, W)) as a float32 CPU tensor (B, H, W) clamped to [0, 1]."""
    if not isinstance(mask, torch.Tensor):
        raise DreamCacheError(f"The DreamCache mask must be a MASK tensor, not {type(mask).__name__}.")
    m = mask.detach()
    if m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.dim() == 2:
        m = m[None]
    if m.dim() != 3:
        raise DreamCacheError(
            f"The DreamCache mask has shape {tuple(mask.shape)}; a MASK is (height, width) or (batch, height, width)."
        )
    if m.numel() == 0:
        raise DreamCacheError(
            f"The DreamCache mask is empty (shape {tuple(mask.shape)}); connect a mask with at least one pixel."
        )
    m = m.to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(m).all():
        raise DreamCacheError("The DreamCache mask contains NaN or infinite values.")
    return m.clamp(0.0, 1.0).contiguous()


def mask_kind(mask: torch.Tensor | None) -> str:
    """'none' (no mask, or one everywhere: the plain path), 'zero' (zero everywhere: the subject is off) or 'soft'."""
    if mask is None or bool((mask >= 1.0).all()):
        return "none"
    if not bool(mask.any()):
        return "zero"
    return "soft"


def token_grid(n_tokens: int, activations_shape=None, original_shape=None) -> tuple[int, int]:
    """The h×w token grid of a transformer layer: its input's spatial size (ComfyUI's ``activations_shape``) when
    that holds ``n_tokens``; else the latent's size halved (rounding up, as the U-Net's stride-2 convolutions do)
    until it does."""
    if activations_shape is not None and len(activations_shape) == 4:
        h, w = int(activations_shape[-2]), int(activations_shape[-1])
        if h * w == n_tokens:
            return h, w
    if original_shape is not None and len(original_shape) >= 4:
        h, w = int(original_shape[-2]), int(original_shape[-1])
        for _ in range(8):
            if h * w == n_tokens:
                return h, w
            h, w = (h + 1) // 2, (w + 1) // 2
    raise DreamCacheError(
        f"Cannot tell the token grid of a layer with {n_tokens} tokens (latent {original_shape}); "
        "the DreamCache mask needs a U-Net with square-pixel token grids."
    )


def check_aspect(mask: torch.Tensor, latent_hw: tuple[int, int]):
    """The mask may have any resolution but must have the latent's aspect, up to one latent cell."""
    mh, mw = mask.shape[-2:]
    lh, lw = latent_hw
    if abs(mh * lw / mw - lh) >= 1.0 or abs(mw * lh / mh - lw) >= 1.0:
        raise DreamCacheError(
            f"The DreamCache mask is {mw}×{mh} (width×height) but the latent is {lw}×{lh} "
            f"({lw * 8}×{lh * 8} pixels): "
            "their aspect ratios differ; make the mask the size of the image you generate."
        )


def token_weights(
    mask: torch.Tensor, grid: tuple[int, int], latent_hw: tuple[int, int], scale: float, device, dtype
) -> torch.Tensor:
    """``w·scale`` per token, (B_mask, h·w, 1): the mask area-averaged over each token's cell of the grid."""
    check_aspect(mask, latent_hw)
    h, w = grid
    pooled = F.adaptive_avg_pool2d(mask[:, None].double(), (h, w))[:, 0]  # area averaging, in float64
    pooled = pooled.clamp(0.0, 1.0) * scale
    return pooled.reshape(mask.shape[0], h * w, 1).to(device=device, dtype=dtype)


def batch_index(n_masks: int, batch: int, chunk: int, device) -> torch.Tensor | None:
    """Which mask each row of a model call uses: None for one mask (broadcast), else row % chunk."""
    if n_masks == 1:
        return None
    if n_masks != chunk:
        raise DreamCacheError(
            f"The DreamCache mask has a batch of {n_masks} but the latent batch is {chunk}; "
            "use one mask (it serves every latent) or one per latent."
        )
    return torch.arange(batch, device=device) % chunk
