"""The paper's metrics: DINO (ViT-S/16 global embedding = CLS token), CLIP-I and CLIP-T (ViT-B/32 projected
embeddings), each a cosine similarity, averaged over the protocol's pairs; masked variants on the subjects alone.

Models come from ``transformers`` (ComfyUI already requires it, so evaluating adds no dependency; it reads the
model folders users already have, and each model's own image processor and tokenizer come with it). They are read
from a local folder or the user's Hugging Face cache with ``local_files_only=True``: this module never downloads.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ...core.errors import DreamCacheError

DINO_ID = "facebook/dino-vits16"
CLIP_ID = "openai/clip-vit-base-patch32"
METRICS = ("dino", "clip_i", "clip_t")
MASKED_METRICS = ("dino_masked", "clip_i_masked")
ALL_METRICS = METRICS + MASKED_METRICS
LABELS = {
    "dino": "DINO",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "dino_masked": "DINO (masked)",
    "clip_i_masked": "CLIP-I (masked)",
}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise DreamCacheError(
            "The metrics need the 'transformers' package (a ComfyUI requirement); install ComfyUI's "
            "requirements.txt in this Python."
        ) from None
    return transformers


def missing_model_message(model_id: str, option: str) -> str:
    return (
        f"The metric model {model_id} is not on this machine; download it once elsewhere (huggingface-cli download "
        f"{model_id}) and pass its folder with {option}, or put it in the Hugging Face cache "
        f"({os.environ.get('HF_HUB_CACHE') or '~/.cache/huggingface/hub'}); evaluation never downloads."
    )


def _load(loader, source: str, model_id: str, option: str, **kw):
    """``loader.from_pretrained`` from a local folder, or from the HF cache by id, never from the network."""
    if source != model_id and not os.path.isdir(source):
        raise DreamCacheError(
            f"{option} '{source}' is not a folder; pass the folder that holds {model_id}'s config.json "
            "and weights, or leave it out to use the Hugging Face cache."
        )
    try:
        return loader.from_pretrained(source, local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        logging.debug("loading %s from %s failed: %s", model_id, source, e)
        if source == model_id:
            raise DreamCacheError(missing_model_message(model_id, option)) from None
        raise DreamCacheError(
            f"{option} '{source}' does not hold a loadable {model_id} ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); pass the folder of the "
            "downloaded model (config.json, weights, processor files)."
        ) from None


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _features(out) -> torch.Tensor:
    """transformers 4.x returns the projected features, 5.x an output whose pooler_output holds them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of ``a`` with the row of ``b`` at the same position (``b`` may be one row)."""
    return (normalize(a) * normalize(b)).sum(-1)


class Embedder:
    """Batched image (and text) embeddings of one metric model on ``device``; results are L2-normalised, fp32, CPU."""

    model_id: str  # the Hugging Face id the model is looked up as
    option: str  # the command-line option that names a local folder for it

    def __init__(
        self, source: str | None = None, device=None, batch_size: int = 32, dtype=None, option: str | None = None
    ):
        self.device = pick_device(device)
        self.batch_size = int(batch_size)
        self.dtype = dtype or torch.float32
        self.option = option or self.option
        tf = _transformers()
        src = source or self.model_id
        self.processor = _load(tf.AutoImageProcessor, src, self.model_id, self.option)
        model = self._load_model(tf, src)
        self.model = model.to(self.device, self.dtype).eval()

    def _load_model(self, tf, src):
        raise NotImplementedError

    def _batches(self, seq):
        for i in range(0, len(seq), self.batch_size):
            yield seq[i : i + self.batch_size]

    @torch.inference_mode()
    def images(self, images: list) -> torch.Tensor:
        out = []
        for chunk in self._batches(list(images)):
            pixels = self.processor(images=[_as_pil(im) for im in chunk], return_tensors="pt")["pixel_values"]
            out.append(normalize(self._image_features(pixels.to(self.device, self.dtype))).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


class DinoEmbedder(Embedder):
    """DINO ViT-S/16: the CLS token of the last layer (after the final LayerNorm), the global embedding of DINO."""

    model_id = DINO_ID
    option = "--dino"

    def _load_model(self, tf, src):
        model = _load(tf.ViTModel, src, self.model_id, self.option, add_pooling_layer=False)
        self.dim = model.config.hidden_size
        return model

    def _image_features(self, pixels):
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


class ClipEmbedder(Embedder):
    """CLIP ViT-B/32: the projected image and text embeddings (``get_image_features`` / ``get_text_features``)."""

    model_id = CLIP_ID
    option = "--clip"

    def _load_model(self, tf, src):
        self.tokenizer = _load(tf.AutoTokenizer, src, self.model_id, self.option)
        model = _load(tf.CLIPModel, src, self.model_id, self.option)
        self.dim = model.config.projection_dim
        return model

    def _image_features(self, pixels):
        return _features(self.model.get_image_features(pixel_values=pixels))

    @torch.inference_mode()
    def texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        max_len = min(
            int(getattr(self.tokenizer, "model_max_length", 77) or 77),
            self.model.config.text_config.max_position_embeddings,
        )
        for chunk in self._batches(list(texts)):
            tok = self.tokenizer(list(chunk), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            feats = self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            )
            out.append(normalize(_features(feats)).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def _as_pil(im):
    from PIL import Image

    if isinstance(im, Image.Image):
        return im.convert("RGB")
    if isinstance(im, np.ndarray):
        return Image.fromarray(im.astype(np.uint8)).convert("RGB")
    if isinstance(im, torch.Tensor):  # [H, W, 3] float 0..1
        return Image.fromarray((im.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()).convert("RGB")
    raise TypeError(type(im))


def on_white(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The subject alone: ``rgb`` (H, W, 3 uint8) where ``mask`` (H, W bool) is set, white elsewhere."""
    out = np.full_like(rgb, 255)
    out[mask] = rgb[mask]
    return out


# ---- arithmetic over pairs ------------------------------------------------------------------------------------------


@dataclass
class Scorers:
    dino: DinoEmbedder
    clip: ClipEmbedder


def score_images(
    scorers: Scorers,
    generated: list[np.ndarray],
    prompts: list[str],
    ref_keys: list[str],
    references: dict[str, np.ndarray],
    generated_masks: list | None = None,
    reference_masks: dict[str, np.ndarray] | None = None,
) -> list[dict[str, float]]:
    """Per generated image: DINO and CLIP-I against its reference (``references[ref_keys[i]]``), CLIP-T against its
    prompt, and the masked DINO / CLIP-I (both images reduced to the subject on white) where both masks exist.
    Each distinct reference and prompt is embedded once."""
    n = len(generated)
    if not (len(prompts) == len(ref_keys) == n):
        raise ValueError("one prompt and one reference key per generated image")
    keys = sorted(set(ref_keys))
    texts = sorted(set(prompts))
    ref_index = torch.tensor([keys.index(k) for k in ref_keys], dtype=torch.long)
    text_index = torch.tensor([texts.index(p) for p in prompts], dtype=torch.long)
    g_dino, g_clip = scorers.dino.images(generated), scorers.clip.images(generated)
    r_dino, r_clip = (
        scorers.dino.images([references[k] for k in keys]),
        scorers.clip.images([references[k] for k in keys]),
    )
    t_clip = scorers.clip.texts(texts)
    rows = [
        {"dino": float(d), "clip_i": float(c), "clip_t": float(t)}
        for d, c, t in zip(
            cosine_rows(g_dino, r_dino[ref_index]),
            cosine_rows(g_clip, r_clip[ref_index]),
            cosine_rows(g_clip, t_clip[text_index]),
        )
    ]
    if generated_masks is None or not reference_masks:
        return rows
    todo = [
        i
        for i in range(n)
        if generated_masks[i] is not None
        and bool(generated_masks[i].any())
        and reference_masks.get(ref_keys[i]) is not None
    ]
    if not todo:
        return rows
    mkeys = sorted({ref_keys[i] for i in todo})
    refs_masked = [on_white(references[k], reference_masks[k]) for k in mkeys]
    gen_masked = [on_white(generated[i], generated_masks[i]) for i in todo]
    mix = torch.tensor([mkeys.index(ref_keys[i]) for i in todo], dtype=torch.long)
    md = cosine_rows(scorers.dino.images(gen_masked), scorers.dino.images(refs_masked)[mix])
    mc = cosine_rows(scorers.clip.images(gen_masked), scorers.clip.images(refs_masked)[mix])
    for j, i in enumerate(todo):
        rows[i]["dino_masked"] = float(md[j])
        rows[i]["clip_i_masked"] = float(mc[j])
    return rows


def mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None and v != "" and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def std(values) -> float | None:
    vals = [float(v) for v in values if v is not None and v != "" and math.isfinite(float(v))]
    if len(vals) < 2:
        return None
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
