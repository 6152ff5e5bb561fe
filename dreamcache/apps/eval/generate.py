"""Generation for the evaluation through the functions the nodes use.

Per subject: the photo (EXIF orientation applied, as ComfyUI's LoadImage does) -> SubjectMask's preprocessing
(:mod:`dreamcache.core.subject`: a mask from a file or SAM, threshold, the training layout on white) ->
BuildFeatureCache -> ApplyDreamCache (:func:`dreamcache.comfy.pipeline.personalise`); per prompt: CLIPTextEncode,
then DualGuidanceSampler's guider and sampling and VAEDecode (:func:`dreamcache.comfy.pipeline.render`).
The "no adapter" baseline samples the same checkpoint with ComfyUI's plain CFG guider at s_T.
Needs ComfyUI imported first (:func:`dreamcache.comfy.env.import_comfyui`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ...core import subject as subject_prep
from ...core.adapter_io import AdapterFile
from ...core.errors import DreamCacheError
from ...core.image import from_uint8, to_uint8
from ...core.layers import NATIVE_RESOLUTION

MASK_MODES = ("auto", "files", "sam", "none")
BASELINE = "baseline"


@dataclass
class SamplingSettings:
    """The reference settings of DreamCache's DreamBench runs (DDIM 50 steps, eta 0, s_T 7.5, s_I 0.4, combined)."""

    steps: int = 50
    sampler: str = "ddim"  # ComfyUI's ddim: eta 0
    scheduler: str = "ddim_uniform"
    text_scale: float = 7.5
    image_scale: float = 0.4
    mode: str = "combined"
    strength: float = 1.0
    resolution: int = 0  # 0 = the family's native size
    negative: str = ""
    cache_seed: int = 0
    layout: str = "train"  # SubjectMask's layout of the reference
    threshold: float = 0.5

    def check(self):
        import comfy.samplers

        from ...core.guidance import check_scales

        if self.sampler not in comfy.samplers.SAMPLER_NAMES:
            raise DreamCacheError(
                f"--sampler {self.sampler} is not one of ComfyUI's samplers "
                f"({', '.join(comfy.samplers.SAMPLER_NAMES[:8])}, ...)."
            )
        if self.scheduler not in comfy.samplers.SCHEDULER_NAMES:
            raise DreamCacheError(
                f"--scheduler {self.scheduler} is not one of {', '.join(comfy.samplers.SCHEDULER_NAMES)}."
            )
        if self.steps < 1:
            raise DreamCacheError(f"--steps {self.steps} must be at least 1.")
        if self.resolution and (self.resolution < 64 or self.resolution % 8):
            raise DreamCacheError(f"--resolution {self.resolution} must be a multiple of 8 and at least 64.")
        if self.layout not in subject_prep.LAYOUTS:
            raise DreamCacheError(f"--layout {self.layout} is not one of {', '.join(subject_prep.LAYOUTS)}.")
        check_scales(self.text_scale, self.image_scale, self.mode)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Method:
    """One row of the results: an adapter, or the base model alone (``adapter`` None)."""

    name: str
    adapter: AdapterFile | None = None
    path: str = ""


def save_png(rgb: np.ndarray, path: Path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(rgb).save(tmp, format="PNG")
    os.replace(tmp, path)


def mask_file_for(masks_dir: Path, subject: str, photo: Path) -> Path | None:
    """``<masks>/<subject>/<stem>.png`` or ``<stem>_mask.png`` (white = subject)."""
    for name in (f"{photo.stem}_mask.png", f"{photo.stem}.png", f"{photo.stem}_mask.jpg"):
        f = masks_dir / subject / name
        if f.is_file() and f != photo:
            return f
    return None


def resolve_mask_mode(mode: str, masks_dir: str | None, sam: object | None) -> str:
    if mode not in MASK_MODES:
        raise DreamCacheError(f"--mask-mode {mode} is not one of {', '.join(MASK_MODES)}.")
    if mode == "auto":
        return "files" if masks_dir else ("sam" if sam is not None else "none")
    if mode == "sam" and sam is None:
        raise DreamCacheError(
            "--mask-mode sam needs a SAM checkpoint; pass --sam models/sams/sam_vit_b_01ec64.pth (or use --masks DIR)."
        )
    if mode == "files" and not masks_dir:
        raise DreamCacheError(
            "--mask-mode files needs --masks DIR with <subject>/<NN>_mask.png files (white = subject)."
        )
    return mode


class Segmenter:
    """SubjectMask's SAM 'auto' mode as a callable ``[B, H, W, 3] -> [B, H, W]`` probabilities."""

    def __init__(self, sam):
        from ...comfy import sam as sam_glue

        self.sam = sam
        self._segment = partial(sam_glue.segment, sam, mode="auto")

    def __call__(self, images_rgb: torch.Tensor) -> torch.Tensor:
        return self._segment(images_rgb)

    def mask(self, rgb: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """A bool mask of the most salient object of one uint8 picture (all False when SAM finds nothing)."""
        probs = self(from_uint8(rgb))
        return (probs[0] > threshold).cpu().numpy()


@dataclass
class Reference:
    photo: np.ndarray  # (H, W, 3) uint8, EXIF-corrected: what DINO / CLIP-I compare against
    mask: np.ndarray | None  # (H, W) bool, the subject in the photo (None without masks)
    image: torch.Tensor  # IMAGE [1, S, S, 3]: SubjectMask's output, BuildFeatureCache's input
    path: Path


def load_reference(
    photo_path: Path,
    subject: str,
    mask_mode: str,
    size: int,
    layout: str = "train",
    masks_dir: Path | None = None,
    segment: Segmenter | None = None,
    threshold: float = 0.5,
) -> Reference:
    """The reference as the nodes would make it: LoadImage -> SubjectMask (mask file or SAM auto) -> IMAGE."""
    from ..data import load_mask, load_rgb

    photo = load_rgb(photo_path)
    images = from_uint8(photo)
    if mask_mode == "none":
        return Reference(photo, None, images, photo_path)
    if mask_mode == "files":
        f = mask_file_for(Path(masks_dir), subject, photo_path)
        if f is None:
            raise DreamCacheError(
                f"No mask for {subject}/{photo_path.name} in '{masks_dir}'; put "
                f"{subject}/{photo_path.stem}_mask.png there "
                "(white = subject) or use --mask-mode sam / none."
            )
        ref, masks = subject_prep.subject_reference(images, "mask", mask=torch.from_numpy(load_mask(f)).float()[None],
                                                    threshold=threshold, layout=layout, size=size)
    elif mask_mode == "sam":
        ref, masks = subject_prep.subject_reference(images, "auto", segment=segment, threshold=threshold,
                                                    layout=layout, size=size)
    else:
        raise DreamCacheError(f"Unknown mask mode '{mask_mode}'.")
    return Reference(photo, (masks[0] > 0.5).cpu().numpy(), ref, photo_path)


class Generator:
    """Images of the protocol from one checkpoint (``model``, ``clip``, ``vae`` as ComfyUI's loader gives them)."""

    def __init__(self, model, clip, vae, settings: SamplingSettings):
        from ...comfy.model import model_family

        self.model, self.clip, self.vae = model, clip, vae
        self.settings = settings
        settings.check()
        self.family = model_family(model)
        self.size = settings.resolution or NATIVE_RESOLUTION.get(self.family, 512)
        self._text: dict[str, list] = {}

    def encode(self, text: str):
        """CLIPTextEncode (memoised per prompt)."""
        if text not in self._text:
            self._text[text] = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        return self._text[text]

    def model_for(self, method: Method, reference: Reference | None):
        """BuildFeatureCache + ApplyDreamCache for an adapter; the plain model for the baseline."""
        from ...comfy.pipeline import personalise

        if method.adapter is None:
            return self.model, None
        s = self.settings
        return personalise(self.model, self.vae, self.clip, reference.image, method.adapter, self.size,
                           seed=s.cache_seed, strength=s.strength)

    def guider(self, model, method: Method, prompt: str):
        import comfy.samplers

        from ...comfy.guidance import make_guider

        s = self.settings
        pos, neg = self.encode(prompt), self.encode(s.negative)
        if method.adapter is None:
            g = comfy.samplers.CFGGuider(model)
            g.set_conds(pos, neg)
            g.set_cfg(s.text_scale)
            return g
        return make_guider(model, pos, neg, s.text_scale, s.image_scale, s.mode)

    def sample(self, model, method: Method, prompt: str, seeds: list[int]) -> list[np.ndarray]:
        """One sampler call for ``len(seeds)`` images, each from its own seed's noise (as a batch of single
        KSampler runs would draw it); returns uint8 pictures."""
        from ...comfy.pipeline import render

        s = self.settings
        pixels = render(self.guider(model, method, prompt), self.vae, self.size, seeds, s.steps, s.sampler, s.scheduler)
        return [to_uint8(p) for p in pixels]
