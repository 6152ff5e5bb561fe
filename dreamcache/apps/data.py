"""Training data for DreamCache adapters: the reference dataset layout, its validation, the training
augmentations, and the ``python -m dreamcache.data`` command (``check``, ``synth``).

Layout (the reference trainer's)::

    <root>/<object_id>/<n>_generation.png   target image (RGB)
    <root>/<object_id>/<n>_caption.txt      its caption
    <root>/<object_id>/<n>_mask.png         the subject's mask (white = subject)

The reference image of a sample is its own target, segmented and augmented (method.md, "Preprocessing"):
background painted white, cropped to the subject, rescaled so the subject spans 70-100% of the canvas width at a
random position on a white square, random h-flip, colour jitter (p 0.1) and white random erasing (p 0.4). Unlike
the reference code, colour jitter runs on the picture in 0..1, *before* the model's normalisation to [-1, 1]
(the reference jittered normalised tensors, and torchvision's clamp to [0, 1] flattened every dark pixel to grey).

Every random decision of sample ``position`` (which object, which of its images, caption dropout, the
augmentation) comes from generators seeded by ``(seed, position)``, so a run is reproducible and can resume at
any step without replaying the data. Pure numpy / PIL / torch: no ComfyUI here (``synth`` imports it lazily).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..core.errors import DreamCacheError
from ..core import sam as sam_core

IMAGE_SUFFIX = "_generation.png"
CAPTION_SUFFIX = "_caption.txt"
MASK_SUFFIX = "_mask.png"
_FILE_RE = re.compile(r"^(?P<n>.+?)(?P<kind>_generation\.png|_caption\.txt|_mask\.png)$")
#: Mask pixels at or above this value (0..255) are the subject.
MASK_THRESHOLD = 128
#: How many problems an error message lists before "and N more".
_LISTED = 12


# ---------------------------------------------------------------------------------------------------------------------
# Scanning and validation


@dataclass(frozen=True)
class Item:
    """One training example: target image, caption and subject mask of ``<object_id>/<n>``."""

    object_id: str
    n: str
    root: str

    @property
    def name(self) -> str:
        return f"{self.object_id}/{self.n}"

    def path(self, suffix: str) -> Path:
        return Path(self.root) / self.object_id / f"{self.n}{suffix}"

    @property
    def image(self) -> Path:
        return self.path(IMAGE_SUFFIX)

    @property
    def caption(self) -> Path:
        return self.path(CAPTION_SUFFIX)

    @property
    def mask(self) -> Path:
        return self.path(MASK_SUFFIX)


@dataclass
class DatasetIndex:
    """The validated dataset: objects in sorted order, each with its items."""

    root: str
    objects: list[tuple[str, list[Item]]]

    @property
    def items(self) -> list[Item]:
        return [it for _, items in self.objects for it in items]

    def __len__(self) -> int:
        return sum(len(items) for _, items in self.objects)

    def describe(self) -> str:
        return f"{len(self.objects)} objects, {len(self)} images in {self.root}"


class DatasetError(DreamCacheError):
    """The dataset has broken items; ``problems`` lists every one as ``"<object>/<n>: what"``."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def scan_dataset(root: str | os.PathLike) -> tuple[list[tuple[str, list[Item]]], list[str]]:
    """The items under ``root`` and the structural problems (missing files, empty objects); reads no image."""
    root = Path(root)
    if not root.is_dir():
        raise DreamCacheError(f"Dataset folder '{root}' does not exist; pass the folder that holds one sub-folder per object.")
    problems: list[str] = []
    objects: list[tuple[str, list[Item]]] = []
    for obj in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: _natural_key(p.name)):
        groups: dict[str, set[str]] = {}
        for f in obj.iterdir():
            m = _FILE_RE.match(f.name)
            if m and f.is_file():
                groups.setdefault(m.group("n"), set()).add(m.group("kind"))
        items = []
        for n in sorted(groups, key=_natural_key):
            have = groups[n]
            missing = [f"{n}{k}" for k in (IMAGE_SUFFIX, CAPTION_SUFFIX, MASK_SUFFIX) if k not in have]
            if missing:
                problems.append(f"{obj.name}/{n}: missing {', '.join(missing)}")
            else:
                items.append(Item(obj.name, n, str(root)))
        if not groups:
            problems.append(f"{obj.name}: no '<n>{IMAGE_SUFFIX}' files")
        if items:
            objects.append((obj.name, items))
    return objects, problems


def _open_image(path: Path) -> Image.Image:
    im = Image.open(path)
    im.load()
    return ImageOps.exif_transpose(im)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """``(H, W, 3)`` uint8. Transparent pixels are composited on white."""
    im = _open_image(Path(path))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """``(H, W)`` bool, True = subject (grey value >= 128; an RGBA mask uses its alpha when it has one)."""
    im = _open_image(Path(path))
    if im.mode in ("RGBA", "LA"):
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min() < 255:
            return alpha >= MASK_THRESHOLD
    return np.asarray(im.convert("L")) >= MASK_THRESHOLD


def check_item(item: Item) -> list[str]:
    """Every problem of one item (unreadable or mismatched files, empty mask or caption)."""
    out = []
    size = None
    try:
        with Image.open(item.image) as im:
            im.load()
            size = ImageOps.exif_transpose(im).size
    except Exception as e:
        out.append(f"{item.name}: unreadable image {item.image.name} ({type(e).__name__}: {str(e)[:80]})")
    try:
        mask = load_mask(item.mask)
        if size is not None and (mask.shape[1], mask.shape[0]) != size:
            out.append(f"{item.name}: mask is {mask.shape[1]}x{mask.shape[0]} but the image is {size[0]}x{size[1]}")
        elif not mask.any():
            out.append(f"{item.name}: empty mask (no pixel >= {MASK_THRESHOLD})")
    except Exception as e:
        out.append(f"{item.name}: unreadable mask {item.mask.name} ({type(e).__name__}: {str(e)[:80]})")
    try:
        text = item.caption.read_text(encoding="utf-8").strip()
        if not text:
            out.append(f"{item.name}: empty caption")
    except (OSError, UnicodeDecodeError) as e:
        out.append(f"{item.name}: unreadable caption ({type(e).__name__})")
    return out


def validate_dataset(root: str | os.PathLike, check_files: bool = True, progress: bool = False, report: str | None = None) -> DatasetIndex:
    """Scan and (with ``check_files``) open every image, mask and caption; raise one :class:`DatasetError`
    listing every broken item, or return the index. ``report`` (a path) receives the full list of problems."""
    objects, problems = scan_dataset(root)
    if check_files:
        items = [it for _, its in objects for it in its]
        for it in _progress(items, progress, "checking dataset"):
            problems.extend(check_item(it))
    if problems:
        if report:
            Path(report).parent.mkdir(parents=True, exist_ok=True)
            Path(report).write_text("\n".join(problems) + "\n", encoding="utf-8")
        shown = "; ".join(problems[:_LISTED]) + (f"; and {len(problems) - _LISTED} more" if len(problems) > _LISTED else "")
        where = f" (full list in {report})" if report else ""
        raise DatasetError(
            f"The dataset at '{root}' has {len(problems)} problem(s){where}: {shown}; fix or remove those items "
            f"(each needs <n>{IMAGE_SUFFIX}, <n>{CAPTION_SUFFIX} and a non-empty <n>{MASK_SUFFIX}).", problems)
    if not objects:
        raise DreamCacheError(f"The dataset at '{root}' holds no items; it needs <object_id>/<n>{IMAGE_SUFFIX} with a caption and a mask "
                              "(build one with 'python -m dreamcache.data synth').")
    return DatasetIndex(str(root), objects)


# ---------------------------------------------------------------------------------------------------------------------
# Seeded randomness


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from ``seed`` and integer/string keys (stable across runs, platforms and processes)."""
    words = [int(seed) & 0xFFFFFFFFFFFFFFFF]
    for k in keys:
        if isinstance(k, str):
            words.append(int.from_bytes(hashlib.sha1(k.encode()).digest()[:8], "little"))
        else:
            words.append(int(k) & 0xFFFFFFFFFFFFFFFF)
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def rng_for(seed: int, *keys) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *keys))


# ---------------------------------------------------------------------------------------------------------------------
# Augmentations (pictures in 0..1 until the VAE normalises them to [-1, 1])


@dataclass(frozen=True)
class AugmentConfig:
    """The reference trainer's settings (GenDataset): 70-100% width, h-flip, jitter p 0.1, erasing p 0.4."""

    resolution: int = 512
    min_width: float = 0.7
    max_width: float = 1.0
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

    def __post_init__(self):
        if self.resolution < 64 or self.resolution % 64:
            raise DreamCacheError(f"Training resolution {self.resolution} must be a multiple of 64 (e.g. 512 for SD1/SD2, 1024 for SDXL).")
        if not 0 < self.min_width <= self.max_width <= 1:
            raise DreamCacheError(f"Subject width range {self.min_width}-{self.max_width} must satisfy 0 < min <= max <= 1.")
        for name in ("hflip_p", "jitter_p", "erase_p", "caption_dropout"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise DreamCacheError(f"{name} {v} is not a probability; use a value between 0 and 1.")


def subject_on_white(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Background (mask False) painted white."""
    out = rgb.copy()
    out[~mask] = 255
    return out


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` (exclusive) of the True pixels."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise DreamCacheError("The subject mask is empty, so there is no subject to crop; fix or remove this item.")
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def place_on_canvas(fg: np.ndarray, size: int, width_frac: float, u: float, v: float) -> np.ndarray:
    """``fg`` resized so its width is ``width_frac * size`` (height then capped at ``size``, aspect kept), pasted on
    a white ``size`` square at relative position (u, v) in [0, 1) of the free room."""
    h, w = fg.shape[:2]
    aspect = w / h
    dw = max(1, int(round(width_frac * size)))
    dh = max(1, int(round(dw / aspect)))
    if dh > size:
        dh = size
        dw = max(1, min(size, int(round(dh * aspect))))
    im = Image.fromarray(fg).resize((dw, dh), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    x = min(size - dw, int(u * (size - dw + 1)))
    y = min(size - dh, int(v * (size - dh + 1)))
    canvas.paste(im, (x, y))
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


def augment_reference(rgb: np.ndarray, mask: np.ndarray, cfg: AugmentConfig, aug: RefAugment) -> torch.Tensor:
    """The reference of a training sample, ``(R, R, 3)`` float in 0..1 (ComfyUI IMAGE layout):
    segment on white -> crop to the subject -> place at 70-100% width -> flip -> jitter (in 0..1) -> white erasing.
    The VAE's normalisation to [-1, 1] comes after all of it."""
    top, left, bottom, right = mask_bbox(mask)
    fg = subject_on_white(rgb, mask)[top:bottom, left:right]
    canvas = place_on_canvas(fg, cfg.resolution, aug.width_frac, aug.u, aug.v)
    if aug.flip:
        canvas = canvas[:, ::-1]
    img = torch.from_numpy(canvas.copy()).permute(2, 0, 1).float() / 255.0
    if aug.jitter is not None:
        img = aug.jitter(img)
    if aug.erase is not None:
        t, l, eh, ew = aug.erase
        img[:, t:t + eh, l:l + ew] = 1.0  # white (1 in 0..1 is 1 in [-1, 1] too)
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


# ---------------------------------------------------------------------------------------------------------------------
# The training data stream


@dataclass(frozen=True)
class SamplePlan:
    position: int
    object_index: int
    item_index: int
    drop_caption: bool
    augment: RefAugment


class TrainingData(torch.utils.data.Dataset):
    """Map-style dataset indexed by *sample position* (0, 1, 2, ... over the whole run).

    Position p belongs to epoch ``p // n_objects``; each epoch visits every object once in a seeded permutation
    and picks one of its images at random (as the reference GenDataset does). Everything about sample p depends
    only on ``(seed, p)``.
    """

    def __init__(self, index: DatasetIndex, cfg: AugmentConfig, seed: int = 0):
        if not index.objects:
            raise DreamCacheError(f"The dataset at '{index.root}' holds no items.")
        self.index = index
        self.cfg = cfg
        self.seed = int(seed)
        self._perm_epoch = None
        self._perm = None

    def __len__(self) -> int:
        return len(self.index.objects)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = rng_for(self.seed, "order", epoch).permutation(len(self.index.objects))
            self._perm_epoch = epoch
        return self._perm

    def plan(self, position: int) -> SamplePlan:
        n = len(self.index.objects)
        epoch, slot = divmod(int(position), n)
        obj = int(self.permutation(epoch)[slot])
        rng = rng_for(self.seed, "sample", int(position))
        item = int(rng.integers(len(self.index.objects[obj][1])))
        drop = bool(rng.random() < self.cfg.caption_dropout)
        return SamplePlan(int(position), obj, item, drop, RefAugment.draw(self.cfg, rng))

    def item(self, plan: SamplePlan) -> Item:
        return self.index.objects[plan.object_index][1][plan.item_index]

    def __getitem__(self, position: int) -> dict:
        plan = self.plan(position)
        it = self.item(plan)
        rgb = load_rgb(it.image)
        mask = load_mask(it.mask)
        if mask.shape != rgb.shape[:2]:
            raise DreamCacheError(f"{it.name}: mask and image sizes differ; run 'python -m dreamcache.data check {self.index.root}'.")
        target, geom = prepare_target(rgb, self.cfg.resolution)
        reference = augment_reference(rgb, mask, self.cfg, plan.augment)
        caption = "" if plan.drop_caption else it.caption.read_text(encoding="utf-8").strip()
        return {"position": plan.position, "name": it.name, "target": target, "reference": reference, "caption": caption,
                "geometry": geom}


def collate(samples: list[dict]) -> dict:
    return {
        "position": [s["position"] for s in samples],
        "name": [s["name"] for s in samples],
        "target": torch.stack([s["target"] for s in samples]),
        "reference": torch.stack([s["reference"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "geometry": [s["geometry"] for s in samples],
    }


class PositionSampler(torch.utils.data.Sampler):
    """Sample positions ``start, start + 1, ...`` (endless, or ``count`` of them)."""

    def __init__(self, start: int = 0, count: int | None = None):
        self.start, self.count = int(start), count

    def __iter__(self):
        p = self.start
        while self.count is None or p < self.start + self.count:
            yield p
            p += 1

    def __len__(self):
        if self.count is None:
            raise TypeError("endless sampler")
        return self.count


def batches(data: TrainingData, batch_size: int, start_position: int = 0, num_workers: int = 0):
    """Endless iterator of collated batches of consecutive positions from ``start_position``."""
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, sampler=PositionSampler(start_position), collate_fn=collate, num_workers=num_workers,
        persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers > 0 else None)
    return iter(loader)


# ---------------------------------------------------------------------------------------------------------------------
# Masks for synthesised images (pluggable: any callable rgb [H, W, 3] 0..1 -> bool mask [H, W])


def white_background_mask(rgb: torch.Tensor, threshold: float = 0.94) -> torch.Tensor:
    """Subject mask of a picture on a near-white background: the background is every near-white pixel (all
    channels >= ``threshold``) connected to the border; everything else is the subject (white parts *inside*
    the subject stay subject). ``rgb`` (H, W, 3) float 0..1 -> (H, W) bool."""
    white = (rgb[..., :3] >= threshold).all(-1)
    seed = torch.zeros_like(white)
    seed[0, :], seed[-1, :], seed[:, 0], seed[:, -1] = white[0, :], white[-1, :], white[:, 0], white[:, -1]
    cand = white.float()[None, None]
    bg = seed.float()[None, None]
    while True:
        grown = torch.nn.functional.max_pool2d(bg, 3, stride=1, padding=1) * cand
        if torch.equal(grown, bg):
            break
        bg = grown
    return ~(bg[0, 0] > 0)


def white_background_masker(threshold: float = 0.94):
    def masker(rgb: torch.Tensor, caption: str = "") -> torch.Tensor:
        return white_background_mask(rgb, threshold)

    masker.describe = f"none-white-bg (threshold {threshold})"
    return masker


def parse_box(text: str | None):
    """``"x0,y0,x1,y1"``: pixels, or fractions of the picture when every value is <= 1."""
    if not text:
        return None
    try:
        vals = [float(t) for t in re.split(r"[\s,]+", text.strip()) if t]
    except ValueError:
        vals = []
    if len(vals) != 4 or not (vals[0] < vals[2] and vals[1] < vals[3]) or min(vals) < 0:
        raise DreamCacheError(f"Box '{text}' is not understood; write x0,y0,x1,y1 in pixels (or fractions 0-1) with x0 < x1 and y0 < y1.")
    return vals


def sam_masker(path: str, mode: str = "auto", box: str | None = None, device: str | None = None):
    """A masker that runs SAM through the SubjectMask core (:mod:`dreamcache.core.sam`)."""
    if mode not in ("auto", "box"):
        raise DreamCacheError(f"SAM prompt mode '{mode}' is not supported here; use auto or box.")
    if not path or not os.path.isfile(path):
        raise DreamCacheError(f"SAM checkpoint '{path}' does not exist; pass --sam /path/to/sam_vit_b_01ec64.pth (models/sams).")
    box_vals = parse_box(box)
    if mode == "box" and box_vals is None:
        raise DreamCacheError("SAM prompt mode 'box' needs --sam-box x0,y0,x1,y1.")
    model, variant = sam_core.load_sam(path)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(dev)

    def masker(rgb: torch.Tensor, caption: str = "") -> torch.Tensor:
        h, w = rgb.shape[:2]
        b = None
        if mode == "box":
            b = box_vals if max(box_vals) > 1 else [box_vals[0] * w, box_vals[1] * h, box_vals[2] * w, box_vals[3] * h]
        probs = sam_core.predict(model, rgb, mode, box=b)
        return probs >= 0.5

    masker.describe = f"sam {variant} ({mode})"
    return masker


#: ``--masks`` choices -> factory(args) -> masker
MASKERS = {
    "sam": lambda a: sam_masker(a.sam, a.sam_mode, a.sam_box),
    "none-white-bg": lambda a: white_background_masker(a.white_threshold),
}


def mask_ok(mask: torch.Tensor, min_area: float = 0.005, max_area: float = 0.95) -> str | None:
    """Why a synthesised mask is unusable (too small / almost the whole picture), or None."""
    frac = float(mask.float().mean())
    if frac < min_area:
        return f"subject covers {frac:.1%} of the picture (< {min_area:.1%})"
    if frac > max_area:
        return f"subject covers {frac:.1%} of the picture (> {max_area:.0%})"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Captions for synthesis


def read_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty lines without '#' comments."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DreamCacheError(f"Could not read '{path}' ({e.strerror or e}); pass an existing UTF-8 text file with one entry per line.") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def caption_key(caption: str) -> str:
    """What makes two captions the same: case, spacing and trailing punctuation are ignored."""
    return re.sub(r"\s+", " ", caption.strip().lower()).rstrip(" .,;:!")


def dedupe(captions: list[str]) -> list[str]:
    seen, out = set(), []
    for c in captions:
        k = caption_key(c)
        if k and k not in seen:
            seen.add(k)
            out.append(c.strip())
    return out


def combine_captions(objects: list[str], contexts: list[str], template: str = "{object} {context}", per_object: int | None = None,
                     seed: int = 0) -> list[str]:
    """Object x context captions: every pair, or ``per_object`` seeded contexts per object."""
    if "{object}" not in template:
        raise DreamCacheError(f"Caption template '{template}' has no {{object}} placeholder; e.g. '{{object}} {{context}}'.")
    out = []
    for i, obj in enumerate(objects):
        ctxs = contexts
        if per_object is not None and per_object < len(contexts):
            pick = rng_for(seed, "contexts", obj).choice(len(contexts), size=per_object, replace=False)
            ctxs = [contexts[j] for j in sorted(pick)]
        for ctx in ctxs or [""]:
            out.append(re.sub(r"\s+", " ", template.format(object=obj, context=ctx)).strip())
    return out


def object_id_for(caption: str) -> str:
    """A stable folder name: a slug of the first words plus a hash of the normalised caption."""
    slug = re.sub(r"[^a-z0-9]+", "-", caption_key(caption)).strip("-")[:40].strip("-") or "object"
    return f"{slug}-{hashlib.sha1(caption_key(caption).encode()).hexdigest()[:8]}"


def item_done(root: str | os.PathLike, object_id: str, n: int) -> bool:
    d = Path(root) / object_id
    return all((d / f"{n}{s}").is_file() for s in (IMAGE_SUFFIX, CAPTION_SUFFIX, MASK_SUFFIX))


def _atomic_write(path: Path, write):
    tmp = path.with_name(f".partial-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def write_item(root: str | os.PathLike, object_id: str, n: int, image: torch.Tensor, mask: torch.Tensor, caption: str):
    """Write one synthesised item (image, mask, caption last: an item is complete when all three exist)."""
    d = Path(root) / object_id
    d.mkdir(parents=True, exist_ok=True)
    img = (image[..., :3].float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    m = (mask.bool().cpu().numpy().astype(np.uint8) * 255)
    _atomic_write(d / f"{n}{IMAGE_SUFFIX}", lambda p: Image.fromarray(img).save(p, format="PNG"))
    _atomic_write(d / f"{n}{MASK_SUFFIX}", lambda p: Image.fromarray(m, mode="L").save(p, format="PNG"))
    _atomic_write(d / f"{n}{CAPTION_SUFFIX}", lambda p: p.write_text(caption.strip() + "\n", encoding="utf-8"))


def _progress(iterable, enabled: bool, desc: str, total: int | None = None):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a requirement; degrade to no bar rather than fail
        return iterable
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True)


@dataclass
class SynthSettings:
    """What ``synth`` renders (the paper: SD-XL, CFG 3.5, 25 steps)."""

    width: int = 1024
    height: int = 1024
    steps: int = 25
    cfg: float = 3.5
    sampler: str = "euler"
    scheduler: str = "normal"
    negative: str = ""
    prompt_suffix: str = ""
    images_per_caption: int = 1
    seed: int = 0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def cmd_check(args) -> int:
    index = validate_dataset(args.root, check_files=not args.quick, progress=not args.no_progress, report=args.report)
    print(f"ok: {index.describe()}")
    return 0


def captions_from_args(args) -> list[str]:
    if args.captions:
        caps = read_lines(args.captions)
    elif args.objects and args.contexts:
        caps = combine_captions(read_lines(args.objects), read_lines(args.contexts), args.template, args.contexts_per_object, args.seed)
    else:
        raise DreamCacheError("synth needs captions: pass --captions FILE, or --objects FILE with --contexts FILE.")
    caps = dedupe(caps)
    if args.limit:
        caps = caps[: args.limit]
    if not caps:
        raise DreamCacheError("The caption list is empty after removing blank lines, comments and duplicates; add captions.")
    return caps


def cmd_synth(args) -> int:
    captions = captions_from_args(args)
    masker = MASKERS[args.masks](args)
    from ..comfy.env import import_comfyui

    import_comfyui(args.comfyui, cpu=True if args.cpu else None)
    from ..comfy.loading import load_checkpoint
    from .synth import synthesize

    model, clip, vae = load_checkpoint(args.checkpoint)
    settings = SynthSettings(width=args.width, height=args.height, steps=args.steps, cfg=args.cfg, sampler=args.sampler, scheduler=args.scheduler,
                             negative=args.negative, prompt_suffix=args.prompt_suffix, images_per_caption=args.images_per_caption, seed=args.seed,
                             extra={"checkpoint": os.path.basename(args.checkpoint), "masks": getattr(masker, "describe", args.masks)})
    report = synthesize(model, clip, vae, captions, args.out, masker, settings, progress=not args.no_progress)
    print(f"{report['written']} written, {report['skipped']} already done, {report['rejected']} rejected (see synth_rejected.jsonl); "
          f"dataset at {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamcache.data", description="DreamCache training data: check a dataset or synthesise one.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a dataset folder and list every broken item")
    c.add_argument("root")
    c.add_argument("--quick", action="store_true", help="only check that every item has its three files (open nothing)")
    c.add_argument("--report", help="write the full list of problems to this file")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser("synth", help="render a dataset with a checkpoint through ComfyUI (resumable)")
    s.add_argument("--checkpoint", required=True, help="the checkpoint that renders the images (the paper used SD-XL base)")
    s.add_argument("--out", required=True, help="dataset folder to create or complete")
    g = s.add_argument_group("captions")
    g.add_argument("--captions", help="text file, one caption per line ('#' comments and blank lines ignored)")
    g.add_argument("--objects", help="text file of objects, combined with --contexts")
    g.add_argument("--contexts", help="text file of contexts ('on a wooden table', ...)")
    g.add_argument("--template", default="{object} {context}", help="how an object and a context make a caption")
    g.add_argument("--contexts-per-object", type=int, help="use this many seeded contexts per object (default: all)")
    g.add_argument("--limit", type=int, help="use only the first N captions (after de-duplication)")
    g = s.add_argument_group("rendering")
    g.add_argument("--images-per-caption", type=int, default=1)
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--cfg", type=float, default=3.5)
    g.add_argument("--sampler", default="euler")
    g.add_argument("--scheduler", default="normal")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--prompt-suffix", default="", help="appended to every caption, e.g. ', on a plain white background' (saved in the caption)")
    g.add_argument("--seed", type=int, default=0)
    g = s.add_argument_group("masks")
    g.add_argument("--masks", choices=sorted(MASKERS), default="sam", help="sam (SubjectMask's SAM) or none-white-bg (threshold a near-white background)")
    g.add_argument("--sam", help="SAM checkpoint (models/sams/sam_vit_b_01ec64.pth ...)")
    g.add_argument("--sam-mode", choices=["auto", "box"], default="auto")
    g.add_argument("--sam-box", help="x0,y0,x1,y1 box prompt in pixels, or fractions 0-1 of the picture")
    g.add_argument("--white-threshold", type=float, default=0.94, help="none-white-bg: a channel value >= this is white")
    s.add_argument("--comfyui", help="ComfyUI folder (default: COMFYUI_PATH or the ComfyUI this pack is installed in)")
    s.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_synth)
    return p


def main(argv=None) -> int:
    from .cli import run_main

    return run_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
