"""``python -m dreamcache.data synth``'s engine: render captions with a checkpoint through ComfyUI's sampler,
segment the subject with a pluggable masker, write the reference dataset layout. Resumable: finished items
(all three files present) and recorded rejections are skipped; every item has its own seed."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..core.errors import DreamCacheError
from .data import SynthSettings, derive_seed, item_done, mask_problem, object_id_for, write_item
from .progress import progress_bar

REJECTED = "synth_rejected.jsonl"
SETTINGS = "synth_settings.json"


def render(model, clip, vae, prompt: str, s: SynthSettings, seed: int, negative_cond=None) -> torch.Tensor:
    """One picture ``[H, W, 3]`` in 0..1 (ComfyUI's KSampler path: CFG, sampler, scheduler)."""
    import comfy.sample

    if s.width % 8 or s.height % 8 or min(s.width, s.height) < 64:
        raise DreamCacheError(f"Synthesis size {s.width}x{s.height} must be multiples of 8 and at least 64.")
    with torch.inference_mode():
        latent = torch.zeros([1, 4, s.height // 8, s.width // 8])
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        neg = negative_cond
        if neg is None:
            neg = clip.encode_from_tokens_scheduled(clip.tokenize(s.negative))
        samples = comfy.sample.sample(model, noise, s.steps, s.cfg, s.sampler, s.scheduler, pos, neg, latent,
                                      seed=seed, disable_pbar=True)
        return vae.decode(samples)[0, ..., :3].float().clamp(0, 1).cpu()


def _rejected(root: Path) -> set[tuple[str, int]]:
    path = root / REJECTED
    out = set()
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
                out.add((d["object_id"], int(d["n"])))
            except (ValueError, KeyError, TypeError):
                continue
    return out


def synthesize(model, clip, vae, captions: list[str], out: str | os.PathLike, masker,
               settings: SynthSettings | None = None,
               progress: bool = True) -> dict:
    """Render ``images_per_caption`` pictures per caption into ``out`` (skipping finished items); returns counts."""
    import comfy.samplers

    s = settings or SynthSettings()
    if s.sampler not in comfy.samplers.KSampler.SAMPLERS:
        raise DreamCacheError(f"Unknown sampler '{s.sampler}'; use one of ComfyUI's, e.g. euler, dpmpp_2m.")
    if s.scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise DreamCacheError(f"Unknown scheduler '{s.scheduler}'; use one of "
                              f"{', '.join(comfy.samplers.KSampler.SCHEDULERS)}.")
    if s.images_per_caption < 1:
        raise DreamCacheError("--images-per-caption must be at least 1.")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / SETTINGS).write_text(json.dumps({**{k: v for k, v in vars(s).items() if k != "extra"}, **s.extra},
                                            indent=2), encoding="utf-8")
    rejected = _rejected(root)
    jobs = [(c, n) for c in captions for n in range(s.images_per_caption)]
    counts = {"written": 0, "skipped": 0, "rejected": 0}
    neg = None
    for caption, n in progress_bar(jobs, progress, "synthesising", total=len(jobs)):
        oid = object_id_for(caption)
        if item_done(root, oid, n) or (oid, n) in rejected:
            counts["skipped"] += 1
            continue
        if neg is None:
            with torch.inference_mode():
                neg = clip.encode_from_tokens_scheduled(clip.tokenize(s.negative))
        prompt = caption + s.prompt_suffix
        seed = derive_seed(s.seed, "synth", oid, n) % (2**53)
        image = render(model, clip, vae, prompt, s, seed, neg)
        mask = torch.as_tensor(masker(image, prompt)).bool()
        if mask.shape != image.shape[:2]:
            raise DreamCacheError(f"The masker returned a {tuple(mask.shape)} mask for a {tuple(image.shape[:2])} "
                                  "picture; it must return (H, W).")
        why = mask_problem(mask)
        if why is not None:
            with open(root / REJECTED, "a", encoding="utf-8") as f:
                f.write(json.dumps({"object_id": oid, "n": n, "caption": prompt, "seed": seed, "reason": why}) + "\n")
            counts["rejected"] += 1
            continue
        write_item(root, oid, n, image, mask, prompt)
        counts["written"] += 1
    return counts
