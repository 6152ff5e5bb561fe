"""Segment Anything (SAM) for SubjectMask: safe checkpoint loading, variant detection from tensor shapes, and
prompted mask prediction with SamPredictor's exact preprocessing.

``segment_anything`` is imported lazily, only when a SAM is loaded or run, so the rest of the pack works without
it. Pure torch: ComfyUI's device management lives in :mod:`dreamcache.comfy.sam`.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

from .errors import DreamCacheError
from .files import read_tensor_file
from .placement import bounding_box

INSTALL_HINT = "pip install segment-anything"

#: Auto mode: a first-pass mask counts as confident when SAM's IoU head scores it within this of the best one.
CONFIDENT_MARGIN = 0.05
#: Auto mode: a mask covering more than this fraction of the picture is the background, not a subject.
MAX_SUBJECT_AREA = 0.95


@dataclass(frozen=True)
class SamVariant:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    builder: str  # segment_anything function that builds it without weights
    file: str  # the official checkpoint
    size: str


VARIANTS: dict[str, SamVariant] = {
    "vit_b": SamVariant("vit_b", 768, 12, 12, "build_sam_vit_b", "sam_vit_b_01ec64.pth", "375 MB"),
    "vit_l": SamVariant("vit_l", 1024, 24, 16, "build_sam_vit_l", "sam_vit_l_0b3195.pth", "1.25 GB"),
    "vit_h": SamVariant("vit_h", 1280, 32, 16, "build_sam_vit_h", "sam_vit_h_4b8939.pth", "2.56 GB"),
}

_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_BLOCK_RE = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


def require_segment_anything():
    """The ``segment_anything`` module, or a DreamCacheError saying what to install."""
    try:
        import segment_anything
    except ImportError as e:
        raise DreamCacheError(
            f"SAM needs the segment-anything package, which could not be imported ({e}); run '{INSTALL_HINT}' with "
            "ComfyUI's Python, "
            "or use prompt_mode 'mask' with any segmenter's MASK."
        ) from None
    return segment_anything


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def read_state_dict(path: str, name: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: safetensors, or ``torch.load(weights_only=True)`` (nothing else is ever unpickled)."""
    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise DreamCacheError(f"SAM checkpoint '{path}' does not exist; put SAM checkpoints in ComfyUI/models/sams.")
    sd, _ = read_tensor_file(path, name, "the file is damaged or not a SAM checkpoint; use the official SAM .pth or a "
                                         ".safetensors conversion",
                             "is not a SAM checkpoint format; use the official .pth or a .safetensors file")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DreamCacheError(f"'{name}' does not hold a plain dict of tensors, so it is not a SAM checkpoint; use "
                              f"{VARIANTS['vit_b'].file} or another official one.")
    return sd


def detect_variant(sd: dict[str, torch.Tensor], name: str = "checkpoint") -> str:
    """``vit_b`` / ``vit_l`` / ``vit_h`` from the image encoder's embedding width and block count (never the file
    name)."""
    official = ", ".join(v.file for v in VARIANTS.values())
    patch = sd.get(_PATCH_KEY)
    if not isinstance(patch, torch.Tensor) or patch.dim() != 4 or not any(k.startswith("mask_decoder.") for k in sd):
        raise DreamCacheError(f"'{name}' is not a Segment Anything checkpoint (no SAM image encoder and mask decoder "
                              f"weights); use one of {official}.")
    embed_dim = int(patch.shape[0])
    depth = len({int(m.group(1)) for k in sd for m in [_BLOCK_RE.match(k)] if m})
    for v in VARIANTS.values():
        if (v.embed_dim, v.depth) == (embed_dim, depth):
            rel = sd.get("image_encoder.blocks.0.attn.rel_pos_h")
            if isinstance(rel, torch.Tensor) and rel.dim() == 2 and rel.shape[1] * v.num_heads != embed_dim:
                break
            return v.name
    raise DreamCacheError(
        f"'{name}' has a SAM-like image encoder of width {embed_dim} with {depth} blocks, which is none of ViT-B (768, "
        "12), ViT-L (1024, 24) "
        f"or ViT-H (1280, 32); use one of {official} (SAM-HQ, MobileSAM and SAM 2 files are not supported)."
    )


def build_empty(variant: str, device: str | torch.device = "meta") -> torch.nn.Module:
    """The variant's ``segment_anything.modeling.Sam`` built without a checkpoint (on the meta device by default: no
    memory,
    no random init)."""
    sa = require_segment_anything()
    builder = getattr(sa, VARIANTS[variant].builder)
    with torch.device(device):
        return builder()


def sam_from_state_dict(sd: dict[str, torch.Tensor], name: str = "checkpoint",
                        variant: str | None = None) -> tuple[torch.nn.Module, str]:
    """A ready SAM (fp32, eval, no grad, CPU) from a state dict, loaded strictly; returns ``(model, variant)``."""
    variant = variant or detect_variant(sd, name)
    model = build_empty(variant)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:240]
        raise DreamCacheError(f"'{name}' looks like SAM {variant} but its weights do not fit it ({detail}); "
                              f"re-download the official {VARIANTS[variant].file}.") from None
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise DreamCacheError(f"'{name}' is missing SAM weights (for example '{left[0]}'); re-download the official "
                              f"{VARIANTS[variant].file}.")
    model = model.float().eval()
    model.requires_grad_(False)
    return model, variant


def load_sam(path: str, name: str | None = None) -> tuple[torch.nn.Module, str]:
    """Read, detect and strictly load a SAM checkpoint file; returns ``(model, variant)`` on the CPU."""
    name = name or os.path.basename(path)
    require_segment_anything()
    return sam_from_state_dict(read_state_dict(path, name), name)


# ---------------------------------------------------------------------------------------------------------------------
# Prediction (one image at a time; SamPredictor's preprocessing)


@dataclass
class Embedded:
    features: torch.Tensor  # (1, C, h, w)
    input_size: tuple[int, int]  # (H, W) after ResizeLongestSide
    original_size: tuple[int, int]  # (H, W) of the image


def _model_dtype(sam) -> torch.dtype:
    return next(sam.image_encoder.parameters()).dtype


class EmbeddingCache:
    """The last few image embeddings of one SAM, keyed by the exact pixels SAM sees (a hash of the uint8 image).

    Changing only the prompts, threshold, grow, feather or layout of SubjectMask then re-runs the cheap mask decoder,
    not the image encoder (seconds on a CPU). Features are kept on the CPU (256x64x64 fp32: 4 MB each)."""

    def __init__(self, max_items: int = 4):
        self.max_items = max_items
        self._items: OrderedDict[tuple, Embedded] = OrderedDict()

    def get(self, key: tuple, device) -> Embedded | None:
        emb = self._items.get(key)
        if emb is None:
            return None
        self._items.move_to_end(key)
        return replace(emb, features=emb.features.to(device))

    def put(self, key: tuple, emb: Embedded):
        self._items[key] = replace(emb, features=emb.features.detach().to("cpu"))
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def __len__(self):
        return len(self._items)


@torch.no_grad()
def embed_image(sam, rgb: torch.Tensor, cache: EmbeddingCache | None = None) -> Embedded:
    """Image embedding of ``rgb [H, W, 3]`` float 0..1, preprocessed exactly like ``SamPredictor.set_image``: uint8,
    ResizeLongestSide to the encoder size (PIL), normalise and pad. With a ``cache``, an image seen before is not
    encoded again."""
    from segment_anything.utils.transforms import ResizeLongestSide

    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    arr = (rgb[..., :3].float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    key = None
    if cache is not None:
        key = (hashlib.sha256(arr.tobytes()).hexdigest(), arr.shape, sam.image_encoder.img_size, str(_model_dtype(sam)))
        hit = cache.get(key, sam.device)
        if hit is not None:
            return hit
    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(arr)
    x = torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).contiguous()[None].float()
    features = sam.image_encoder(sam.preprocess(x).to(_model_dtype(sam)))
    emb = Embedded(features, (int(x.shape[-2]), int(x.shape[-1])), (h, w))
    if cache is not None:
        cache.put(key, emb)
    return emb


def _to_input_frame(emb: Embedded, xy: torch.Tensor) -> torch.Tensor:
    (oh, ow), (ih, iw) = emb.original_size, emb.input_size
    out = xy.clone().float()
    out[..., 0] = out[..., 0] * (iw / ow)
    out[..., 1] = out[..., 1] * (ih / oh)
    return out


@torch.no_grad()
def decode(sam, emb: Embedded, points=None, labels=None, box=None, multimask: bool = True) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """Low-resolution mask logits ``(C, 4h, 4w)`` and SAM's predicted IoU ``(C,)`` for pixel prompts in the original
    image frame (``points`` [(x, y)], ``labels`` 1 = subject / 0 = not, ``box`` (x0, y0, x1, y1))."""
    dev = emb.features.device
    pts = None
    if points:
        coords = _to_input_frame(emb, torch.tensor(points, dtype=torch.float32, device=dev))[None]
        pts = (coords, torch.tensor(labels, dtype=torch.int, device=dev)[None])
    boxes = None
    if box is not None:
        boxes = _to_input_frame(emb, torch.tensor(box, dtype=torch.float32, device=dev).view(2, 2)).view(1, 4)
    sparse, dense = sam.prompt_encoder(points=pts, boxes=boxes, masks=None)
    dt = emb.features.dtype
    low, iou = sam.mask_decoder(image_embeddings=emb.features, image_pe=sam.prompt_encoder.get_dense_pe().to(dt),
                                sparse_prompt_embeddings=sparse.to(dt), dense_prompt_embeddings=dense.to(dt),
                                multimask_output=multimask)
    return low[0].float(), iou[0].float()


@torch.no_grad()
def upscale(sam, emb: Embedded, low: torch.Tensor) -> torch.Tensor:
    """Probabilities ``[H, W]`` at the original size from one low-resolution logit map (SAM's postprocess_masks)."""
    logits = sam.postprocess_masks(low[None, None], emb.input_size, emb.original_size)[0, 0]
    return torch.sigmoid(logits)


def _valid_low(sam, emb: Embedded, low: torch.Tensor) -> torch.Tensor:
    """The part of low-resolution masks that covers the image (not the padding)."""
    s = low.shape[-1] / sam.image_encoder.img_size
    vh, vw = max(1, round(emb.input_size[0] * s)), max(1, round(emb.input_size[1] * s))
    return low[..., :vh, :vw]


def _low_box(emb: Embedded, valid_mask: torch.Tensor) -> tuple[float, float, float, float] | None:
    """The bounding box of a low-resolution mask, in pixels of the original image."""
    box = bounding_box(valid_mask)
    if box is None:
        return None
    (oh, ow) = emb.original_size
    vh, vw = valid_mask.shape
    sx, sy = ow / vw, oh / vh
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


@torch.no_grad()
def predict_auto(sam, emb: Embedded) -> torch.Tensor:
    """The most salient object: a positive point at the centre (multimask), the largest confident candidate that is
    not the whole frame gives a box, then centre point + box (multimask), the mask SAM's IoU head scores best."""
    oh, ow = emb.original_size
    centre = [((ow - 1) / 2.0, (oh - 1) / 2.0)]
    low, iou = decode(sam, emb, centre, [1], multimask=True)
    valid = _valid_low(sam, emb, low)
    area = (valid > 0).float().mean(dim=(1, 2))
    ok = (area > 0) & (area < MAX_SUBJECT_AREA)
    if not bool(ok.any()):
        return upscale(sam, emb, low[int(iou.argmax())])
    best = float(iou[ok].max())
    confident = ok & (iou >= best - CONFIDENT_MARGIN)
    pick = int(torch.where(confident, area, torch.full_like(area, -1.0)).argmax())
    box = _low_box(emb, valid[pick])
    low2, iou2 = decode(sam, emb, centre, [1], box=box, multimask=True)
    return upscale(sam, emb, low2[int(iou2.argmax())])


@torch.no_grad()
def predict_prompted(sam, emb: Embedded, points=None, labels=None, box=None) -> torch.Tensor:
    """Box and/or points: one mask for unambiguous prompts (a box, or several points), else the best of three by IoU."""
    multimask = box is None and len(points or []) <= 1
    low, iou = decode(sam, emb, points, labels, box, multimask=multimask)
    return upscale(sam, emb, low[int(iou.argmax())])


def predict(sam, rgb: torch.Tensor, mode: str, box=None, points=None, labels=None,
            cache: EmbeddingCache | None = None) -> torch.Tensor:
    """Subject probabilities ``[H, W]`` (on the CPU, float32) for one image ``rgb [H, W, 3]`` in 0..1."""
    if mode not in ("auto", "box", "points"):
        raise DreamCacheError(f"prompt_mode '{mode}' does not use SAM; use auto, box or points.")
    if mode == "points" and not any(label == 1 for label in (labels or [])):
        raise DreamCacheError("prompt_mode 'points' needs at least one positive point; write them as x,y pairs, e.g. "
                              "120,80; 200,150.")
    emb = embed_image(sam, rgb, cache)
    if mode == "auto":
        probs = predict_auto(sam, emb)
    else:
        probs = predict_prompted(sam, emb, points, labels, box if mode == "box" else None)
    return probs.float().cpu()


def predict_batch(sam, images_rgb: torch.Tensor, mode: str, box=None, points=None, labels=None, on_image=None,
                  cache: EmbeddingCache | None = None) -> torch.Tensor:
    """``[B, H, W]`` probabilities for a batch ``[B, H, W, 3]``; ``on_image(i)`` is called before each image (progress,
    interruption)."""
    out = []
    for i in range(images_rgb.shape[0]):
        if on_image is not None:
            on_image(i)
        out.append(predict(sam, images_rgb[i], mode, box=box, points=points, labels=labels, cache=cache))
    return torch.stack(out)
