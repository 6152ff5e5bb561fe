"""Training from a precomputed set (``--precomputed DIR``, made by ``python -m dreamcache.data precompute``): the
trainer's samples come from :class:`dreamcache.apps.data.precompute.PrecomputedData` and become a
:class:`~.loop.Prepared` here without running the VAE, the text encoder or the cache pass. The noise and timestep
of sample ``p`` are drawn exactly as a live run draws them (:func:`.draws.sample_noise`)."""
from __future__ import annotations

import torch

from ...comfy.frozen import lcm_stack
from ...core.cache import FeatureCache
from ..data import TrainingData
from ..data.precompute import PrecomputedData, check_manifest, dataset_fingerprint, read_manifest
from .draws import sample_noise


def attach_precomputed(trainer, data: TrainingData) -> PrecomputedData:
    """The run's data read from ``trainer.cfg.precomputed``, after checking that the set was made from this
    checkpoint, dataset, resolution, family, layers and augmentation setting (one sentence otherwise)."""
    cfg = trainer.cfg
    folder = cfg.precomputed
    m = read_manifest(folder)
    names = [str(r) for r in trainer.adapter.layers]
    check_manifest(m, folder, family=trainer.family, checkpoint_hash=trainer.checkpoint_hash,
                   dataset_hash=dataset_fingerprint(data.index), items=len(data.index), resolution=cfg.resolution,
                   layers=names, augment=cfg.augment)
    return PrecomputedData(data, folder, m, list(trainer.adapter.layers), names)


def stored_parts(trainer, batch: dict) -> dict:
    """A micro-batch of stored samples as the fields of the trainer's :class:`~.loop.Prepared` (the same noise and
    timesteps as a live run)."""
    device = trainer.device
    latents = batch["latent"].to(device, torch.float32)
    ts, noise, _ = sample_noise(trainer.cfg.seed, batch["position"], latents.shape[1:])
    ctx = lcm_stack([c.float() for c in batch["context"]]).to(device)
    y = None
    if trainer.base.adm_channels:
        y = trainer.vector_cond(batch["pooled"], batch["geometry"], trainer.cfg.resolution)
    data = trainer.data
    cache = FeatureCache(tokens={r: t.to(device) for r, t in batch["cache"].items()},
                         spatial={r: data.spatial[r] for r in batch["cache"]}, references=latents.shape[0],
                         per_image=True, model_family=trainer.family, sigma=data.manifest.sigma)
    return {"latents": latents, "noise": noise.to(device), "t": ts, "context": ctx, "y": y, "cache": cache,
            "positions": list(batch["position"])}
