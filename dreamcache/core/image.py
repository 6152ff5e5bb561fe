"""Reference image preparation for the cache pass (ComfyUI IMAGE layout: [B, H, W, C] float in 0..1)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DreamCacheError

FIT_MODES = ("pad", "stretch", "crop")


def from_uint8(rgb: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> IMAGE ``[1, H, W, 3]`` float 0..1 (what ComfyUI's LoadImage gives)."""
    return torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).float().div(255.0)[None]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """One IMAGE ``[H, W, 3]`` -> uint8 as ComfyUI's SaveImage writes it."""
    return np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)


def to_rgb_on_white(images: torch.Tensor) -> torch.Tensor:
    """RGB in 0..1: alpha (4th channel) is composited over white, grayscale is repeated, values are clamped."""
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        raise DreamCacheError(f"Expected an IMAGE tensor [B, H, W, C], got {getattr(images, 'shape', type(images))}.")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    b, h, w, c = images.shape
    if b == 0 or h == 0 or w == 0:
        raise DreamCacheError(f"The reference IMAGE is empty (shape {tuple(images.shape)}); connect a loaded image.")
    images = images.float()
    if c == 1:
        rgb = images.repeat(1, 1, 1, 3)
    elif c == 2:  # gray + alpha
        rgb = images[..., :1].repeat(1, 1, 1, 3) * images[..., 1:2] + (1.0 - images[..., 1:2])
    elif c == 3:
        rgb = images
    elif c == 4:
        alpha = images[..., 3:4].clamp(0, 1)
        rgb = images[..., :3] * alpha + (1.0 - alpha)
    else:
        raise DreamCacheError(f"The reference IMAGE has {c} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA).")
    return rgb.clamp(0.0, 1.0)


def shrink(images: torch.Tensor, long_side: int) -> torch.Tensor:
    """The IMAGE batch (any channel count) scaled down, aspect kept, so its longer side is at most ``long_side``;
    returned as is when it already fits.

    For huge photos (a 6000x4000 photo is 288 MB as an IMAGE): the nodes that only need a few hundred or thousand
    pixels shrink first, before they allocate anything the size of the photo. An area (box) filter read straight from
    the IMAGE's memory allocates only the small result (a bilinear one would allocate about half the photo again);
    as an antialiased downscale its error is the resize's own."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        return images
    h, w = int(images.shape[1]), int(images.shape[2])
    if max(h, w) <= long_side:
        return images
    s = long_side / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    x = images if images.is_floating_point() else images.float()
    out = F.interpolate(x.movedim(-1, 1), size=(nh, nw), mode="area")
    return out.movedim(1, -1).contiguous()


def _resize(images: torch.Tensor, h: int, w: int) -> torch.Tensor:
    if images.shape[1] == h and images.shape[2] == w:
        return images
    x = images.movedim(-1, 1)
    down = h < x.shape[2] or w < x.shape[3]
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=down)
    return x.movedim(1, -1).clamp(0.0, 1.0)


def _shrink_crop(images, side):
    """crop and stretch fits: the shorter side is resized to the resolution, so shrink by it."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        return images
    h, w = int(images.shape[1]), int(images.shape[2])
    short = min(h, w)
    return images if short <= side else shrink(images, round(max(h, w) * side / short))


def fit_reference(images: torch.Tensor, resolution: int = 512, fit: str = "pad", multiple: int = 8) -> torch.Tensor:
    """The reference fitted to the cache pass's resolution (what BuildFeatureCache encodes).

    ``resolution > 0``: a square of that side; ``fit`` = ``pad`` (keep aspect, pad with white, centred),
    ``stretch`` (resize the whole picture, as the reference inference script does) or ``crop`` (centre crop).
    ``resolution == 0``: keep the size, rounded down to a multiple of ``multiple`` (the VAE needs 8).
    A photo larger than twice the resolution is first shrunk to that (:func:`shrink`), so a huge photo costs no
    full-size copy.
    """
    if resolution > 0 and fit in FIT_MODES:
        images = shrink(images, 2 * int(resolution)) if fit == "pad" else _shrink_crop(images, 2 * int(resolution))
    rgb = to_rgb_on_white(images)
    b, h, w, _ = rgb.shape
    if fit not in FIT_MODES:
        raise DreamCacheError(f"Unknown fit mode '{fit}'; use one of {', '.join(FIT_MODES)}.")
    if resolution == 0:
        nh, nw = (h // multiple) * multiple, (w // multiple) * multiple
        if nh < 64 or nw < 64:
            raise DreamCacheError(f"The reference is {w}x{h} pixels; it must be at least 64x64 (set a resolution to "
                                  "upscale it).")
        top, left = (h - nh) // 2, (w - nw) // 2
        return rgb[:, top:top + nh, left:left + nw, :]
    if resolution < 64 or resolution % multiple:
        raise DreamCacheError(f"Reference resolution {resolution} must be a multiple of {multiple} and at least 64.")
    if fit == "stretch":
        return _resize(rgb, resolution, resolution)
    if fit == "crop":
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return _resize(rgb[:, top:top + side, left:left + side, :], resolution, resolution)
    side = max(h, w)
    canvas = torch.ones((b, side, side, 3), dtype=rgb.dtype, device=rgb.device)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[:, top:top + h, left:left + w, :] = rgb
    return _resize(canvas, resolution, resolution)
