"""The training augmentations, on pictures in 0..1 until the VAE normalises them to [-1, 1] (method.md,
"Preprocessing"): the reference is the target segmented on white, cropped to the subject, placed at 70-100% of the
canvas width at a random position (:mod:`dreamcache.core.placement`), h-flipped, colour-jittered (p 0.1) and randomly
erased with white (p 0.4). Unlike the authors' code, colour jitter runs on the picture in 0..1, *before* the
normalisation (they jittered normalised tensors, and torchvision's clamp to [0, 1] flattened every dark pixel to grey).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ...core.errors import DreamCacheError
from ...core.placement import INFERENCE_WIDTH, TRAIN_WIDTH_RANGE, bounding_box, subject_offset, subject_size


@dataclass(frozen=True)
class AugmentConfig:
    """The authors' trainer's settings (GenDataset): 70-100% width, h-flip, jitter p 0.1, erasing p 0.4."""

    resolution: int = 512
    min_width: float = TRAIN_WIDTH_RANGE[0]
    max_width: float = TRAIN_WIDTH_RANGE[1]
    hflip_p: float = 0.5
    jitter_p: float = 0.1
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    erase_p: float = 0.4
    erase_scale: tuple[float, float] = (0.02, 0.25)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    caption_dropout: float = 0.07
    #: False: every reference is the subject at the inference layout (85% width, centred), no flip, jitter or
    #: erasing (:meth:`RefAugment.identity`): one fixed reference per item, which a precomputed set stores exactly
    augment: bool = True

    def __post_init__(self):
        if self.resolution < 64 or self.resolution % 64:
            raise DreamCacheError(f"Training resolution {self.resolution} must be a multiple of 64 (e.g. 512 for "
                                  "SD1/SD2, 1024 for SDXL).")
        if not 0 < self.min_width <= self.max_width <= 1:
            raise DreamCacheError(f"Subject width range {self.min_width}-{self.max_width} must satisfy 0 < min <= max "
                                  "<= 1.")
        for name in ("hflip_p", "jitter_p", "erase_p", "caption_dropout"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise DreamCacheError(f"{name} {v} is not a probability; use a value between 0 and 1.")


def subject_on_white(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Background (mask False) painted white."""
    out = rgb.copy()
    out[~mask] = 255
    return out


def crop_subject(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The subject on white, cropped to the bounding box of its mask."""
    box = bounding_box(mask)
    if box is None:
        raise DreamCacheError("The subject mask is empty, so there is no subject to crop; fix or remove this item.")
    x0, y0, x1, y1 = box
    return subject_on_white(rgb, mask)[y0:y1, x0:x1]


def place_on_canvas(fg: np.ndarray, size: int, width_frac: float, u: float | None = None, v: float | None = None
                    ) -> np.ndarray:
    """``fg`` resized to the training layout (:func:`dreamcache.core.placement.subject_size`: width ``width_frac *
    size``, aspect kept, height capped at ``size``) and pasted on a white ``size`` square, centred or at relative
    position (u, v) in [0, 1) of the free room."""
    dw, dh = subject_size(fg.shape[1], fg.shape[0], size, width_frac)
    im = Image.fromarray(fg).resize((dw, dh), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(im, subject_offset(size, dw, dh, u, v))
    return np.asarray(canvas, dtype=np.uint8)


def _gray(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img[0], img[1], img[2]
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(0)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: float) -> torch.Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)


def _rgb_to_hsv(img):
    r, g, b = img[0], img[1], img[2]
    maxc, _ = img.max(0)
    minc, _ = img.min(0)
    v = maxc
    cr = maxc - minc
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(cr == 0, torch.zeros_like(h), h)
    h = (h / 6.0) % 1.0
    return torch.stack([h, s, v])


def _hsv_to_rgb(img):
    h, s, v = img[0], img[1], img[2]
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0, 1)
    q = (v * (1.0 - s * f)).clamp(0, 1)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0, 1)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(img)
    for k, (r, g, b) in enumerate(choices):
        sel = i == k
        out[0] = torch.where(sel, r, out[0])
        out[1] = torch.where(sel, g, out[1])
        out[2] = torch.where(sel, b, out[2])
    return out


@dataclass(frozen=True)
class Jitter:
    """One draw of colour jitter: factors and the order of the four operations (torchvision's ColorJitter)."""

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    order: tuple[int, ...] = (0, 1, 2, 3)

    @staticmethod
    def draw(cfg: AugmentConfig, rng: np.random.Generator) -> "Jitter":
        b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
        c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        s = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
        h = rng.uniform(-cfg.hue, cfg.hue)
        return Jitter(float(b), float(c), float(s), float(h), tuple(int(i) for i in rng.permutation(4)))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """``img`` (3, H, W) in 0..1 -> (3, H, W) in 0..1 (each step clamps, as torchvision does on floats)."""
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"colour jitter expects (3, H, W), got {tuple(img.shape)}")
        if float(img.min()) < 0.0 or float(img.max()) > 1.0:
            raise ValueError("colour jitter expects a picture in 0..1 (apply it before normalising to [-1, 1])")
        for op in self.order:
            if op == 0:
                img = (img * self.brightness).clamp(0.0, 1.0)
            elif op == 1:
                img = _blend(img, _gray(img).mean(), self.contrast)
            elif op == 2:
                img = _blend(img, _gray(img).expand_as(img), self.saturation)
            elif self.hue != 0.0:
                hsv = _rgb_to_hsv(img)
                hsv[0] = (hsv[0] + self.hue) % 1.0
                img = _hsv_to_rgb(hsv)
        return img


def erase_box(h: int, w: int, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """torchvision RandomErasing's box rule: area in ``erase_scale`` of the picture, log-uniform aspect in
    ``erase_ratio``, up to 10 tries; ``(top, left, height, width)`` or None."""
    area = h * w
    lo, hi = math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*cfg.erase_scale)
        aspect = math.exp(rng.uniform(lo, hi))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if eh < h and ew < w:
            return int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1)), eh, ew
    return None


@dataclass(frozen=True)
class RefAugment:
    """Every random decision of one reference augmentation."""

    width_frac: float
    u: float
    v: float
    flip: bool
    jitter: Jitter | None
    erase: tuple[int, int, int, int] | None

    @staticmethod
    def draw(cfg: AugmentConfig, rng: np.random.Generator) -> "RefAugment":
        width_frac = float(rng.uniform(cfg.min_width, cfg.max_width))
        u, v = float(rng.random()), float(rng.random())
        flip = bool(rng.random() < cfg.hflip_p)
        jitter = Jitter.draw(cfg, rng) if rng.random() < cfg.jitter_p else None
        erase = erase_box(cfg.resolution, cfg.resolution, cfg, rng) if rng.random() < cfg.erase_p else None
        return RefAugment(width_frac, u, v, flip, jitter, erase)

    @staticmethod
    def identity() -> "RefAugment":
        """No augmentation: the subject at the inference layout (``INFERENCE_WIDTH``, centred), as SubjectMask's
        ``train`` layout shows it."""
        return RefAugment(INFERENCE_WIDTH, None, None, False, None, None)


def augment_reference(rgb: np.ndarray, mask: np.ndarray, cfg: AugmentConfig, aug: RefAugment) -> torch.Tensor:
    """The reference of a training sample, ``(R, R, 3)`` float in 0..1 (ComfyUI IMAGE layout):
    segment on white -> crop to the subject -> place at 70-100% width -> flip -> jitter (in 0..1) -> white erasing.
    The VAE's normalisation to [-1, 1] comes after all of it."""
    canvas = place_on_canvas(crop_subject(rgb, mask), cfg.resolution, aug.width_frac, aug.u, aug.v)
    if aug.flip:
        canvas = canvas[:, ::-1]
    img = torch.from_numpy(canvas.copy()).permute(2, 0, 1).float() / 255.0
    if aug.jitter is not None:
        img = aug.jitter(img)
    if aug.erase is not None:
        top, left, eh, ew = aug.erase
        img[:, top:top + eh, left:left + ew] = 1.0  # white (1 in 0..1 is 1 in [-1, 1] too)
    return img.permute(1, 2, 0).contiguous()


@dataclass(frozen=True)
class TargetGeometry:
    """SDXL's size conditioning of a target: original size and the crop taken from the resized picture."""

    original_width: int
    original_height: int
    crop_top: int
    crop_left: int


def prepare_target(rgb: np.ndarray, resolution: int) -> tuple[torch.Tensor, TargetGeometry]:
    """Shorter side resized to ``resolution``, centre crop to a square; ``(R, R, 3)`` float in 0..1."""
    h, w = rgb.shape[:2]
    scale = resolution / min(h, w)
    nw, nh = max(resolution, int(round(w * scale))), max(resolution, int(round(h * scale)))
    im = Image.fromarray(rgb)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    img = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).float() / 255.0
    return img, TargetGeometry(w, h, top, left)
