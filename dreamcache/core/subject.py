"""Turning an ordinary photo into the reference DreamCache was trained on: the subject alone on white.

Pure tensor code (no ComfyUI, no segment_anything): choosing the mask source, parsing prompts and colours, resizing,
thresholding, growing and feathering masks, the bounding box, and the two layouts. ComfyUI layouts throughout:
IMAGE ``[B, H, W, C]`` float 0..1, MASK ``[B, H, W]`` float 0..1 (1 = subject).

The segmenter (SAM) is passed in as a callable, so this module never imports it.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import DreamCacheError
from .image import shrink, to_rgb_on_white
from .placement import INFERENCE_WIDTH, bounding_box, subject_offset, subject_size

PROMPT_MODES = ("auto", "box", "points", "mask")
SAM_MODES = ("auto", "box", "points")
LAYOUTS = ("train", "keep")
#: An alpha channel is a mask candidate when some pixel is at least this transparent.
_ALPHA_OPAQUE = 0.999

_NAMED_COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "grey": (128, 128, 128)}


# ---------------------------------------------------------------------------------------------------------------------
# Parsing user input


def parse_color(value) -> tuple[float, float, float]:
    """A background colour as RGB floats in 0..1.

    Accepts ``#rgb``, ``#rrggbb`` (with or without '#'), ``r,g,b`` / ``r g b`` integers 0..255, the names white,
    black, gray/grey, or a sequence of three numbers 0..255.
    """
    bad = DreamCacheError(f"Background colour {value!r} is not understood; use a hex colour like #ffffff or three "
                          "numbers 0-255 like 255,255,255.")
    if isinstance(value, (tuple, list)):
        parts = list(value)
    else:
        text = str(value).strip().lower()
        if text in _NAMED_COLOURS:
            parts = list(_NAMED_COLOURS[text])
        elif re.fullmatch(r"#?([0-9a-f]{3}|[0-9a-f]{6})", text) and (text.startswith("#") or not text.isdigit()):
            h = text.lstrip("#")
            if len(h) == 3:
                h = "".join(c * 2 for c in h)
            parts = [int(h[i:i + 2], 16) for i in (0, 2, 4)]
        else:
            tokens = [t for t in re.split(r"[\s,;()\[\]]+", text) if t]
            try:
                parts = [float(t) for t in tokens]
            except ValueError:
                raise bad from None
    if len(parts) != 3:
        raise bad
    try:
        nums = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise bad from None
    if any(not math.isfinite(n) or n < 0 or n > 255 for n in nums):
        raise bad
    return tuple(n / 255.0 for n in nums)  # type: ignore[return-value]


def parse_points(text: str, what: str = "points") -> list[tuple[float, float]]:
    """``"120,80; 200,150"`` -> ``[(120.0, 80.0), (200.0, 150.0)]``; points are separated by ';' or new lines and may be
    written ``(x, y)`` or ``[x, y]``. An empty text gives no points."""
    points = []
    for chunk in re.split(r"[;\n]+", text or ""):
        chunk = chunk.strip().strip("()[]").strip()
        if not chunk:
            continue
        nums = [t for t in re.split(r"[\s,]+", chunk) if t]
        try:
            if len(nums) != 2:
                raise ValueError
            x, y = float(nums[0]), float(nums[1])
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError
        except ValueError:
            raise DreamCacheError(
                f"Point '{chunk}' in {what} is not understood; write points as x,y pixel pairs separated by ';', e.g. "
                "120,80; 200,150."
            ) from None
        points.append((x, y))
    return points


def check_points(points: Sequence[tuple[float, float]], width: int, height: int, what: str = "points"):
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise DreamCacheError(f"Point ({x:g}, {y:g}) in {what} lies outside the {width}x{height} image; give "
                                  "points in pixels of the input image.")


def box_from_xywh(x: int, y: int, w: int, h: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) from x, y, width, height, clipped to the image."""
    if w <= 0 or h <= 0:
        raise DreamCacheError(f"The box is {w}x{h} pixels; set box_width and box_height to the size of the subject in "
                              "pixels.")
    x0, y0 = max(0, int(x)), max(0, int(y))
    x1, y1 = min(width, int(x) + int(w)), min(height, int(y) + int(h))
    if x1 <= x0 or y1 <= y0:
        raise DreamCacheError(f"The box (x={x}, y={y}, {w}x{h}) lies outside the {width}x{height} image; give it in "
                              "pixels of the input image.")
    return x0, y0, x1, y1


# ---------------------------------------------------------------------------------------------------------------------
# Mask sources


def as_image_batch(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() not in (3, 4):
        raise DreamCacheError(f"Expected an IMAGE tensor [B, H, W, C], got {getattr(images, 'shape', type(images))}.")
    images = images if images.dim() == 4 else images.unsqueeze(0)
    b, h, w, c = images.shape
    if b == 0 or h == 0 or w == 0:
        raise DreamCacheError(f"The IMAGE is empty (shape {tuple(images.shape)}); connect a loaded image.")
    if c not in (1, 2, 3, 4):
        raise DreamCacheError(f"The IMAGE has {c} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA).")
    return images


def alpha_mask(images: torch.Tensor) -> torch.Tensor | None:
    """The alpha channel ``[B, H, W]`` of a gray+alpha or RGBA batch when some pixel is transparent, else None."""
    images = as_image_batch(images)
    if images.shape[-1] not in (2, 4):
        return None
    alpha = images[..., -1].float().clamp(0.0, 1.0)
    if not bool((alpha < _ALPHA_OPAQUE).any()):
        return None
    return alpha


def needs_sam(prompt_mode: str, images: torch.Tensor | None) -> bool:
    """Whether ``prompt_mode`` on these images runs SAM (auto on an image with transparency uses the alpha)."""
    if prompt_mode == "mask":
        return False
    if prompt_mode == "auto" and images is not None and alpha_mask(images) is not None:
        return False
    return True


def resize_masks(mask: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """A MASK (``[H, W]``, ``[B, H, W]``, ``[B, 1, H, W]`` or ``[B, H, W, 1]``) as ``[batch, height, width]`` float
    in 0..1:
    resized (bilinear) when its size differs, one mask repeated for every image."""
    if not isinstance(mask, torch.Tensor):
        raise DreamCacheError(f"The mask input is a {type(mask).__name__}, not a MASK; connect a MASK output.")
    m = mask.float()
    if m.dim() == 2:
        m = m.unsqueeze(0)
    elif m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    elif m.dim() == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.dim() != 3 or m.shape[0] == 0 or m.shape[1] == 0 or m.shape[2] == 0:
        raise DreamCacheError(f"The mask has shape {tuple(mask.shape)}; expected a MASK [B, H, W].")
    if m.shape[0] not in (1, batch):
        raise DreamCacheError(f"The MASK batch holds {m.shape[0]} masks for {batch} images; give one mask, or one per "
                              "image.")
    if m.shape[1:] != (height, width):
        down = height < m.shape[1] or width < m.shape[2]
        m = F.interpolate(m.unsqueeze(1), size=(height, width), mode="bilinear", align_corners=False,
                          antialias=down)[:, 0]
    m = m.clamp(0.0, 1.0)
    return m.expand(batch, -1, -1).contiguous() if m.shape[0] == 1 else m.contiguous()


def subject_probabilities(images: torch.Tensor, prompt_mode: str, mask: torch.Tensor | None = None,
                          invert_mask: bool = False,
                          segment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The subject mask candidate ``[B, H, W]`` in 0..1 before thresholding.

    * ``mask``: the MASK input (inverted if asked), else the image's alpha; SAM is never used.
    * ``auto``: the alpha when the image has transparency (it is already cut out), else ``segment``.
    * ``box`` / ``points``: ``segment``.

    ``segment`` receives the batch as RGB on white ``[B, H, W, 3]`` and returns probabilities ``[B, H, W]``.
    """
    if prompt_mode not in PROMPT_MODES:
        raise DreamCacheError(f"Unknown prompt_mode '{prompt_mode}'; use one of {', '.join(PROMPT_MODES)}.")
    images = as_image_batch(images)
    b, h, w, _ = images.shape
    if prompt_mode == "mask":
        if mask is not None:
            m = resize_masks(mask, b, h, w)
            return 1.0 - m if invert_mask else m
        alpha = alpha_mask(images)
        if alpha is None:
            raise DreamCacheError("prompt_mode 'mask' needs a MASK input (or an image with transparency); connect a "
                                  "mask, or pick auto, box or points with a SAM model.")
        return alpha
    if prompt_mode == "auto":
        alpha = alpha_mask(images)
        if alpha is not None:
            logging.info("DreamCache SubjectMask: the image has transparency; its alpha is used as the subject mask "
                         "(SAM not run).")
            return alpha
    if segment is None:
        raise DreamCacheError(f"prompt_mode '{prompt_mode}' needs a SAM model; connect DreamCacheSAMLoader to the sam "
                              "input, or use prompt_mode 'mask' with any segmenter's MASK.")
    probs = segment(to_rgb_on_white(images))
    if not isinstance(probs, torch.Tensor) or tuple(probs.shape) != (b, h, w):
        raise DreamCacheError(f"The segmenter returned {getattr(probs, 'shape', type(probs))} for {b} images of "
                              f"{w}x{h}; this is a bug, please report it.")
    return probs.float().clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Mask operations (all on [B, H, W] float tensors)


def binarize(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 where ``probs > threshold``, else 0."""
    if not 0.0 <= float(threshold) < 1.0:
        raise DreamCacheError(f"threshold {threshold} must be in [0, 1); 0.5 is SAM's own cut-off.")
    return (probs > float(threshold)).to(probs.dtype)


def _dilate_once(m: torch.Tensor, square: bool) -> torch.Tensor:
    x = m.unsqueeze(1)
    if square:
        return F.max_pool2d(x, 3, stride=1, padding=1)[:, 0]
    out = x.clone()
    p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        out = torch.maximum(out, p[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]])
    return out[:, 0]


def grow_mask(m: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate (``pixels > 0``) or erode (``< 0``) by ``|pixels|`` with an octagonal (near-round) structuring element.
    Pixels outside the image count as background for growing and as subject for shrinking, so a subject cut by the
    frame edge stays cut there."""
    n = int(pixels)
    if n == 0:
        return m
    x = m if n > 0 else 1.0 - m
    for i in range(abs(n)):
        x = _dilate_once(x, square=i % 2 == 1)
    return x if n > 0 else 1.0 - x


def feather_mask(m: torch.Tensor, pixels: int) -> torch.Tensor:
    """Soften the edge: a separable Gaussian blur (sigma = pixels / 3, truncated at ``pixels``), so the edge becomes a
    ramp about ``pixels`` wide on each side and values stay exactly 0 farther than ``pixels`` from the subject."""
    r = int(pixels)
    if r <= 0:
        return m
    sigma = r / 3.0
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=m.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(m.dtype)
    x = m.unsqueeze(1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    x = x[:, 0].clamp(0.0, 1.0)
    # float dust from the convolution: far outside is exactly 0, deep inside exactly 1
    return torch.where(x < 1e-6, torch.zeros_like(x), torch.where(x > 1.0 - 1e-6, torch.ones_like(x), x))


def refine_masks(probs: torch.Tensor, threshold: float = 0.5, grow: int = 0, feather: int = 0) -> torch.Tensor:
    """Threshold, then grow/shrink, then feather: the final soft mask ``[B, H, W]``. Raises when an image has no
    subject."""
    m = binarize(probs, threshold)
    empty = [i for i in range(m.shape[0]) if not bool(m[i].any())]
    if empty:
        raise DreamCacheError(
            f"No subject found in image {empty[0] + 1} of {m.shape[0]} (the mask is empty at threshold {threshold:g}); "
            "give a box or points, or lower the threshold."
        )
    m = grow_mask(m, grow)
    empty = [i for i in range(m.shape[0]) if not bool(m[i].any())]
    if empty:
        raise DreamCacheError(f"No subject left in image {empty[0] + 1} after shrinking the mask by {-grow} pixels; "
                              "use a smaller negative grow.")
    for i in range(m.shape[0]):
        if bool((m[i] > 0).all()):
            logging.warning("DreamCache SubjectMask: the mask of image %d covers the whole picture; give a box or "
                            "points if that is not the subject.", i + 1)
    return feather_mask(m, feather)


# ---------------------------------------------------------------------------------------------------------------------
# Layouts


def _color_tensor(color, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(color, dtype=like.dtype, device=like.device)


def composite(rgb: torch.Tensor, m: torch.Tensor, color) -> torch.Tensor:
    """``rgb * m + color * (1 - m)`` for ``rgb [..., H, W, 3]`` and ``m [..., H, W]``: exactly ``color`` where
    m == 0."""
    c = _color_tensor(color, rgb)
    a = m.unsqueeze(-1)
    return torch.where(a > 0, rgb * a + c * (1.0 - a), c.expand_as(rgb))


def _resize_hw(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear resize of ``[H, W, C]`` (antialiased when shrinking). Linear with non-negative weights, so exact zeros
    stay zero and premultiplied colour never exceeds its alpha."""
    if x.shape[0] == h and x.shape[1] == w:
        return x
    down = h < x.shape[0] or w < x.shape[1]
    y = F.interpolate(x.permute(2, 0, 1).unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False,
                      antialias=down)
    return y[0].permute(1, 2, 0)


def layout_train(rgb: torch.Tensor, m: torch.Tensor, color, size: int = 512,
                 width: float = INFERENCE_WIDTH) -> torch.Tensor:
    """The training layout for one image (``rgb [H, W, 3]``, ``m [H, W]``), :mod:`dreamcache.core.placement`: crop to
    the mask's bounding box, scale (aspect kept) so its width is ``width * size`` (height capped at ``size``),
    centre it on a ``size x size`` canvas of ``color``.

    The crop is resampled with premultiplied alpha, so no colour of the photo's background bleeds into the edge and
    every pixel the resized mask does not reach is exactly ``color``."""
    box = bounding_box(m)
    if box is None:
        raise DreamCacheError("No subject found (the mask is empty); give a box or points.")
    x0, y0, x1, y1 = box
    nw, nh = subject_size(x1 - x0, y1 - y0, size, width)
    crop_m = m[y0:y1, x0:x1].unsqueeze(-1)
    both = _resize_hw(torch.cat([rgb[y0:y1, x0:x1] * crop_m, crop_m], dim=-1), nh, nw)
    premul, alpha = both[..., :3], both[..., 3:].clamp(0.0, 1.0)
    c = _color_tensor(color, rgb)
    region = torch.where(alpha > 0, (premul + c * (1.0 - alpha)).clamp(0.0, 1.0), c.expand_as(premul))
    canvas = c.expand(size, size, 3).clone()
    left, top = subject_offset(size, nw, nh)
    canvas[top:top + nh, left:left + nw] = region
    return canvas


def make_reference(images: torch.Tensor, masks: torch.Tensor, layout: str = "train", size: int = 512,
                   background="#ffffff",
                   width: float = INFERENCE_WIDTH) -> torch.Tensor:
    """The reference batch from images and their final masks ``[B, H, W]``.

    ``train``: each subject cropped, scaled to ``width`` of the side (:mod:`dreamcache.core.placement`) and centred on a
    ``size`` square of the background colour (what the adapters were trained on); ``keep``: the same canvas with the
    background painted over.
    Alpha is composited on white first; gray becomes RGB.
    """
    if layout not in LAYOUTS:
        raise DreamCacheError(f"Unknown layout '{layout}'; use one of {', '.join(LAYOUTS)}.")
    color = parse_color(background)
    rgb = to_rgb_on_white(as_image_batch(images))
    if tuple(masks.shape) != tuple(rgb.shape[:3]):
        raise DreamCacheError(f"The masks {tuple(masks.shape)} do not match the images {tuple(rgb.shape[:3])}; this is "
                              "a bug, please report it.")
    masks = masks.to(rgb.device, rgb.dtype)
    if layout == "keep":
        return composite(rgb, masks, color)
    if int(size) < 8:
        raise DreamCacheError(f"Output size {size} is too small; use 512 for SD1.5/2.1 or 1024 for SDXL.")
    return torch.stack([layout_train(rgb[i], masks[i], color, int(size), width) for i in range(rgb.shape[0])])


def sam_prompts(prompt_mode: str, width: int, height: int, box_x: int = 0, box_y: int = 0, box_width: int = 0,
                box_height: int = 0,
                positive_points: str = "", negative_points: str = ""):
    """Validated SAM prompts in pixels of the input image: ``(box, points, labels)``.

    ``box`` mode: the box, plus any points given (negative points carve parts out of it); ``points`` mode: at least one
    positive point; ``auto`` and ``mask``: no prompts."""
    if prompt_mode not in ("box", "points"):
        return None, None, None
    pos = parse_points(positive_points, "positive_points")
    neg = parse_points(negative_points, "negative_points")
    check_points(pos, width, height, "positive_points")
    check_points(neg, width, height, "negative_points")
    box = box_from_xywh(box_x, box_y, box_width, box_height, width, height) if prompt_mode == "box" else None
    if prompt_mode == "points" and not pos:
        raise DreamCacheError("prompt_mode 'points' needs at least one positive point; write them as x,y pixel pairs, "
                              "e.g. 120,80; 200,150.")
    points = pos + neg
    labels = [1] * len(pos) + [0] * len(neg)
    return box, (points or None), (labels or None)


# ---------------------------------------------------------------------------------------------------------------------
# Photos of any size: SubjectMask's whole pass

#: SubjectMask finds and refines the mask on a copy of the photo whose longer side is at most this (or twice the
#: output size, if larger): SAM itself sees 1024 pixels and the train layout at most ``size``, so a 6000x4000 photo is
#: read at full size only to shrink it, to resize the subject's crop and to write the full-size MASK output.
WORK_SIDE = 2048
#: The train layout resamples the subject from a crop at most this many times its size on the canvas.
CROP_OVERSAMPLE = 4
#: Rows composited at a time for the keep layout (bounded temporaries for huge photos).
_STRIP_ROWS = 256


def _scale_prompts(box, points, sx: float, sy: float):
    box = None if box is None else (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    points = None if points is None else [(x * sx, y * sy) for x, y in points]
    return box, points


def _upsample_mask(m: torch.Tensor, h: int, w: int, hard: bool) -> torch.Tensor:
    """A working-size mask ``[h', w']`` at the photo's size (bilinear; a hard mask stays hard, cut at 0.5)."""
    if tuple(m.shape) == (h, w):
        return m
    up = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    return up.ge_(0.5) if hard else up.clamp_(0.0, 1.0)  # in place: the photo-sized output is the only allocation


def _train_from_photo(photo: torch.Tensor, small_mask: torch.Tensor, full_mask: torch.Tensor, color,
                      size: int, work_side: int) -> torch.Tensor:
    """:func:`layout_train` of one full-size photo ``[H, W, C]``, reading only the subject's crop (shrunk to at most
    ``CROP_OVERSAMPLE`` times its size on the canvas before anything is allocated)."""
    h, w = int(photo.shape[0]), int(photo.shape[1])
    box = bounding_box(full_mask)
    if box is None:
        box = bounding_box(small_mask)
        sh, sw = small_mask.shape
        box = (math.floor(box[0] * w / sw), math.floor(box[1] * h / sh), math.ceil(box[2] * w / sw),
               math.ceil(box[3] * h / sh))
    x0, y0, x1, y1 = box
    nw, nh = subject_size(x1 - x0, y1 - y0, size)
    side = max(work_side, CROP_OVERSAMPLE * max(nw, nh))  # a photo that fits the working size is read as is
    crop = shrink(photo[None, y0:y1, x0:x1], side)
    crop_m = shrink(full_mask[None, y0:y1, x0:x1, None], side)[0, ..., 0]
    return layout_train(to_rgb_on_white(crop)[0], crop_m.clamp(0.0, 1.0), color, size)


def _keep_from_photo(photo: torch.Tensor, full_mask: torch.Tensor, color) -> torch.Tensor:
    """:func:`composite` of one full-size photo, a strip of rows at a time (only the output is photo-sized)."""
    h, w = int(photo.shape[0]), int(photo.shape[1])
    out = torch.empty((h, w, 3), dtype=torch.float32, device=photo.device)
    for r in range(0, h, _STRIP_ROWS):
        rows = slice(r, min(h, r + _STRIP_ROWS))
        out[rows] = composite(to_rgb_on_white(photo[None, rows])[0], full_mask[rows], color)
    return out


def subject_reference(images: torch.Tensor, prompt_mode: str, mask: torch.Tensor | None = None,
                      invert_mask: bool = False, segment: Callable | None = None, prompts=(None, None, None),
                      threshold: float = 0.5, grow: int = 0, feather: int = 0, layout: str = "train", size: int = 512,
                      background="#ffffff", work_side: int = WORK_SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """A photo (batch) of any size in, DreamCache's reference out: ``(reference IMAGE, final masks)``. SubjectMask,
    the evaluation and the trainer's previews all prepare their reference here.

    The photo is shrunk first (:func:`~.image.shrink`, longer side ``max(work_side, 2 * size)``); the mask is found,
    thresholded, grown and feathered there (grow and feather scaled to match their pixels of the photo), then brought
    to the photo's size for the MASK output; the train layout reads only the subject's crop of the full photo. So
    memory beyond the photo itself stays a small multiple of its mask, and the result is today's full-size one within
    the resizes' own error: the subject found (:func:`subject_probabilities`), its mask thresholded, grown and
    feathered (:func:`refine_masks`), laid out on the background. ``segment`` is SAM: ``segment(rgb)``, or
    ``segment(rgb, box=, points=, labels=)`` when ``prompts`` = ``(box, points, labels)`` (pixels of the photo) holds
    any."""
    from .finite import check_segmenter, check_subject_image, check_subject_mask_input

    if layout not in LAYOUTS:
        raise DreamCacheError(f"Unknown layout '{layout}'; use one of {', '.join(LAYOUTS)}.")
    if layout == "train" and int(size) < 8:
        raise DreamCacheError(f"Output size {size} is too small; use 512 for SD1.5/2.1 or 1024 for SDXL.")
    images = as_image_batch(images)
    check_subject_image(images)
    check_subject_mask_input(mask)
    color = parse_color(background)
    b, h, w, _ = images.shape
    small = shrink(images, max(int(work_side), 2 * int(size)))
    sh, sw = int(small.shape[1]), int(small.shape[2])
    sx, sy = sw / w, sh / h
    seg = None
    if segment is not None:
        box, points = _scale_prompts(prompts[0], prompts[1], sx, sy)
        kw = dict(box=box, points=points, labels=prompts[2]) if any(p is not None for p in prompts) else {}

        def seg(rgb):
            probs = segment(rgb, **kw)
            check_segmenter(probs)
            return probs

    probs = subject_probabilities(small, prompt_mode, mask=mask, invert_mask=invert_mask, segment=seg)
    scale = min(sx, sy)
    small_masks = refine_masks(probs, threshold, round(grow * scale), round(feather * scale) if feather else 0)
    masks = torch.empty((b, h, w), dtype=torch.float32, device=small_masks.device)
    refs = []
    for i in range(b):
        masks[i] = _upsample_mask(small_masks[i].float(), h, w, hard=feather == 0)
        if layout == "keep":
            refs.append(_keep_from_photo(images[i], masks[i], color))
        else:
            refs.append(_train_from_photo(images[i], small_masks[i], masks[i], color, int(size),
                                          max(int(work_side), 2 * int(size))))
    return torch.stack(refs) if b > 1 else refs[0][None], masks
