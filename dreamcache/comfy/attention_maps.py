"""Attention maps in ComfyUI: a recording clone of a DreamCache MODEL, and the overlays drawn from a recording."""

from __future__ import annotations

import torch

from ..core.attention_maps import AttentionRecorder, mark_point, overlay, point_map, reference_subject, subject_map
from ..core.errors import DreamCacheError
from ..core.finite import check_show_inputs
from ..core.layers import layer_name, resolve_layer
from ..core.patch import DreamCachePatch
from .apply_patch import comfy_attention, find_patch, install_patch


def patched_layers(patch: DreamCachePatch) -> list:
    seen = []
    for e in patch.entries:
        for ref in e.adapter.layers:
            if ref not in seen:
                seen.append(ref)
    return seen


def record_attention(model, layer: str, step_percent: float):
    """(a clone of ``model`` that records the adapter attention of ``layer`` at ``step_percent`` of the schedule,
    the recorder). The input model is untouched and keeps running without any recording."""
    old = find_patch(model)
    if old is None:
        raise DreamCacheError(
            "This MODEL has no DreamCache patch; connect the MODEL output of Apply DreamCache to the recorder."
        )
    ref = resolve_layer(layer, patched_layers(old))
    recorder = AttentionRecorder(ref, step_percent)
    patch = DreamCachePatch(list(old.entries), attention=comfy_attention, models=old.models_list, recorder=recorder)
    return install_patch(model.clone(), patch, old), recorder


def _images(images, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise DreamCacheError(f"The {what} must be an IMAGE batch (batch, height, width, channels).")
    return images[..., :3].float().cpu()


def show_attention(
    recorder,
    latent,
    image,
    reference,
    point_x: float,
    point_y: float,
    subject: int = 1,
    reference_mask=None,
    opacity: float = 0.55,
):
    """(generated image with the subject map and the point, reference with the point's map), as IMAGE batches:
    one generated overlay per latent of the batch, and per latent one reference overlay per cached reference."""
    if not isinstance(recorder, AttentionRecorder):
        raise DreamCacheError("The attention input must come from DreamCache Attention Recorder.")
    rec = recorder.get(subject)
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if samples is None:
        raise DreamCacheError("Connect the LATENT output of the sampler that used the recorder's MODEL.")
    batch = rec.probs.shape[0]
    if samples.shape[0] != batch or (rec.latent is not None and tuple(samples.shape[-2:]) != rec.latent):
        raise DreamCacheError(
            f"The LATENT ({samples.shape[0]} × {tuple(samples.shape[-2:])}) is not the one recorded ({batch} × "
            f"{rec.latent}); "
            "connect the LATENT of the sampler that used the recorder's MODEL."
        )
    gen, ref_img = _images(image, "image"), _images(reference, "reference")
    check_show_inputs(rec.probs, gen, ref_img, reference_mask, point_x, point_y)  # nothing non-finite is drawn
    if gen.shape[0] not in (1, batch):
        raise DreamCacheError(
            f"The image batch has {gen.shape[0]} images but the recording has {batch}; connect the decoded sampler "
            f"output."
        )
    n_refs = batch if rec.per_image else rec.references
    if ref_img.shape[0] not in (1, n_refs):
        raise DreamCacheError(
            f"The reference batch has {ref_img.shape[0]} images but the cache holds {n_refs} references."
        )
    if rec.per_image:
        subj = [
            reference_subject(
                rec.ref_grid,
                1,
                mask=None if reference_mask is None else reference_mask[min(b, reference_mask.shape[0] - 1)],
                image=ref_img[min(b, ref_img.shape[0] - 1)][None],
            )
            for b in range(batch)
        ]
        smap = torch.cat([subject_map(_one(rec, b), subj[b]) for b in range(batch)])
    else:
        mask = None if reference_mask is None else reference_mask.float().cpu()
        smap = subject_map(
            rec,
            reference_subject(
                rec.ref_grid, rec.references, mask=mask, image=ref_img.expand(rec.references, -1, -1, -1)
            ),
        )
    gen = gen.expand(batch, -1, -1, -1)
    image_map = mark_point(overlay(gen, smap, opacity), point_x, point_y)
    pmap, _ = point_map(rec, point_x, point_y)  # (B, R, h, w)
    outs = []
    for b in range(batch):
        for r in range(pmap.shape[1]):
            img = ref_img[b if rec.per_image and ref_img.shape[0] > 1 else min(r, ref_img.shape[0] - 1)]
            outs.append(overlay(img[None], pmap[b, r][None], opacity))
    return image_map.clamp(0, 1), torch.cat(outs).clamp(0, 1), describe(recorder, rec)


def _one(rec, b):
    from dataclasses import replace

    return replace(rec, probs_sum=rec.probs_sum[b : b + 1])


def describe(recorder, rec) -> str:
    step = f"step {recorder.step + 1} of {recorder.steps}" if recorder.step is not None else "a direct model call"
    sigma = "?" if recorder.sigma is None else f"{recorder.sigma:.4g}"
    grid = f"{rec.grid[0]}×{rec.grid[1]}"
    return f"{rec.name}: layer {layer_name(recorder.layer)} ({grid} tokens), {step}, sigma {sigma}"
