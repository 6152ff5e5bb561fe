"""The training data stream: a map-style dataset indexed by sample position, its collate function and loader."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...core.errors import DreamCacheError
from .augment import AugmentConfig, RefAugment, augment_reference, prepare_target
from .layout import DatasetIndex, Item, load_mask, load_rgb
from .seeds import rng_for


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
    and picks one of its images at random (as the authors' GenDataset does). Everything about sample p depends
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
        augment = RefAugment.draw(self.cfg, rng)  # drawn either way, so that --no-augment changes nothing else
        return SamplePlan(int(position), obj, item, drop, augment if self.cfg.augment else RefAugment.identity())

    def item(self, plan: SamplePlan) -> Item:
        return self.index.objects[plan.object_index][1][plan.item_index]

    def __getitem__(self, position: int) -> dict:
        plan = self.plan(position)
        it = self.item(plan)
        rgb = load_rgb(it.image)
        mask = load_mask(it.mask)
        if mask.shape != rgb.shape[:2]:
            raise DreamCacheError(f"{it.name}: mask and image sizes differ; run 'python -m dreamcache.data check "
                                  f"{self.index.root}'.")
        target, geom = prepare_target(rgb, self.cfg.resolution)
        reference = augment_reference(rgb, mask, self.cfg, plan.augment)
        caption = "" if plan.drop_caption else it.caption.read_text(encoding="utf-8").strip()
        return {"position": plan.position, "name": it.name, "target": target, "reference": reference,
                "caption": caption,
                "geometry": geom}


def collate(samples: list[dict]) -> dict:
    if "latent" in samples[0]:  # samples of a precomputed set
        from .precompute import collate_precomputed

        return collate_precomputed(samples)
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
        data, batch_size=batch_size, sampler=PositionSampler(start_position), collate_fn=collate,
                                         num_workers=num_workers,
        persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers > 0 else None)
    return iter(loader)
