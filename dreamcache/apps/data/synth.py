"""``python -m dreamcache.data synth``'s engine: render captions with a checkpoint through ComfyUI's sampler,
segment the subject with a pluggable masker, write the reference dataset layout. Resumable: finished items
(all three files present) and recorded rejections are skipped; every item has its own seed.

Sharded (``shard=(I, N)``, ``--shard I/N`` or torchrun's ranks): shard I renders every N-th item of the item list
(:func:`dreamcache.apps.data.sharding.shard_jobs`) into the same folder; item names do not depend on the shard, so
shards never collide, and the union of the shards is the unsharded run. Each shard records its rejections in its
own ``synth_rejected-shardIofN.jsonl`` (no two processes append to one file); every run skips the rejections of
all of them, and a shard that finishes merges them all into ``synth_rejected.jsonl``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ...core.errors import DreamCacheError
from ..progress import progress_bar
from .captions import caption_key, object_id_for
from .layout import item_done
from .masks import mask_problem
from .seeds import derive_seed
from .sharding import shard_jobs
from .writer import SynthSettings, write_item

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


def _rejected_records(root: Path) -> dict[tuple[str, int], str]:
    """Every recorded rejection, of the unsharded run and of every shard: (object_id, n) -> its JSON line."""
    out = {}
    for path in [root / REJECTED, *sorted(root.glob("synth_rejected-shard*.jsonl"))]:
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    d = json.loads(line)
                    out.setdefault((d["object_id"], int(d["n"])), line)
                except (ValueError, KeyError, TypeError):
                    continue
    return out


def _rejected(root: Path) -> set[tuple[str, int]]:
    return set(_rejected_records(root))


def shard_rejected_name(shard: tuple[int, int]) -> str:
    return f"synth_rejected-shard{shard[0]}of{shard[1]}.jsonl"


def merge_rejected(root: str | os.PathLike) -> int:
    """Write the union of every rejected list into ``synth_rejected.jsonl`` (atomically); if another shard added
    rejections meanwhile, merge again, so the last shard to finish leaves the complete list. Returns its length."""
    root = Path(root)
    for _ in range(5):
        records = _rejected_records(root)
        tmp = root / f".partial-{os.getpid()}-{REJECTED}"
        tmp.write_text("".join(records[k] + "\n" for k in sorted(records)), encoding="utf-8")
        os.replace(tmp, root / REJECTED)
        if set(_rejected_records(root)) == set(records):
            break
    return len(records)


def _write_settings(root: Path, settings: dict, shard):
    """``synth_settings.json``; the shards of one folder must all render with the same settings."""
    path = root / SETTINGS
    if shard is not None and path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if isinstance(old, dict):
            diff = [f"{k} {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                    if old.get(k) != settings.get(k)]
            if diff:
                raise DreamCacheError(f"'{path}' was written with other settings than shard {shard[0]}/{shard[1]} uses "
                                      f"({'; '.join(diff[:6])}); every shard of one dataset must render with the same "
                                      "options, or use another --out.")
    tmp = root / f".partial-{os.getpid()}-{SETTINGS}"
    tmp.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def synthesize(model, clip, vae, captions: list[str], out: str | os.PathLike, masker,
               settings: SynthSettings | None = None,
               progress: bool = True, shard: tuple[int, int] | None = None) -> dict:
    """Render ``images_per_caption`` pictures per caption into ``out`` (skipping finished items); returns counts.
    ``shard``: (I, N) renders only shard I of N (see the module docstring)."""
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
    _write_settings(root, {**{k: v for k, v in vars(s).items() if k != "extra"}, **s.extra}, shard)
    rejected = _rejected(root)
    owners: dict[str, str] = {}
    for c in captions:  # two captions in one folder would overwrite each other's items (every shard sees the same list)
        other = owners.setdefault(object_id_for(c), c)
        if caption_key(other) != caption_key(c):
            raise DreamCacheError(f"Captions '{other}' and '{c}' map to the same object folder '{object_id_for(c)}'; "
                                  "reword one of them.")
    jobs = shard_jobs([(c, n) for c in captions for n in range(s.images_per_caption)], shard)
    rejected_file = root / (REJECTED if shard is None else shard_rejected_name(shard))
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
            with open(rejected_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"object_id": oid, "n": n, "caption": prompt, "seed": seed, "reason": why}) + "\n")
            counts["rejected"] += 1
            continue
        write_item(root, oid, n, image, mask, prompt)
        counts["written"] += 1
    if shard is not None:
        merge_rejected(root)
    return counts
