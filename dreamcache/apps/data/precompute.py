"""Precomputed training sets (``python -m dreamcache.data precompute``): the frozen parts run once per item.

Only the adapters learn, so everything the frozen VAE, text encoder and U-Net compute for an item is the same at
every step; a precomputed set stores it (the functions are :class:`dreamcache.comfy.frozen.FrozenParts`', the
trainer's own), per item of the dataset, in dataset order:

* ``{i}.latent``: the target's VAE latent (``process_latent_in`` applied, float32); the target is not augmented;
* ``{i}.context`` and, for SDXL, ``{i}.pooled``: the caption's text encoding (float32); ``{i}.geometry``: the
  target's original size and crop (SDXL's size conditioning); the empty prompt (caption dropout, the cache pass)
  is stored once in ``common.safetensors``;
* ``{i}.cache.{v}.{layer}``: the feature cache of ``variants`` reference variants ``v``: variant ``v`` of item
  ``name`` is augmented with the draw of ``rng_for(seed, "reference", name, v)`` and noised at t=1 with
  :func:`reference_noise` ``(seed, name, v)`` (with ``augment`` off there is one variant, the un-augmented
  reference of :meth:`RefAugment.identity`, and a live run with ``--no-augment`` uses exactly that reference and
  noise, so the two runs see the same numbers).

Files: ``common.safetensors`` (the empty prompt) and ``chunk-NNNNNN.safetensors`` (``chunk_size`` items each), every
one written atomically and carrying the set's :class:`Manifest` in its metadata, so a run that stops is resumed by
running the command again (finished chunks are kept) and processes with ``--shard I/N`` or under torchrun take every
N-th chunk. The trainer opens a set with :func:`open_precomputed`, which refuses, in one sentence, a set made from
another checkpoint, dataset, resolution, family or layer set, or an unfinished one.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from ...core.errors import DreamCacheError
from ...core.layers import LayerRef, parse_layer
from ..progress import progress_bar
from .augment import AugmentConfig, RefAugment, TargetGeometry, augment_reference, prepare_target
from .layout import CAPTION_SUFFIX, IMAGE_SUFFIX, MASK_SUFFIX, DatasetIndex, load_mask, load_rgb
from .seeds import rng_for, torch_generator
from .sharding import shard_jobs

PRECOMPUTED_FORMAT = "dreamcache.precomputed"
PRECOMPUTED_VERSION = 1
COMMON_FILE = "common.safetensors"
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


def chunk_file(index: int) -> str:
    return f"chunk-{index:06d}.safetensors"


def default_folder(data: str, family: str, resolution: int) -> str:
    """Beside the dataset (never inside it, where it would look like an object): ``<data>.precomputed-<family>-<R>``."""
    return f"{os.path.abspath(data).rstrip(os.sep)}.precomputed-{family}-{resolution}"


def dataset_fingerprint(index: DatasetIndex) -> str:
    """SHA-256 of the dataset's item names and the byte sizes of each item's three files (a changed, added or removed
    item changes it; reading every picture is not needed)."""
    h = hashlib.sha256()
    for it in index.items:
        sizes = [os.path.getsize(it.path(s)) for s in (IMAGE_SUFFIX, CAPTION_SUFFIX, MASK_SUFFIX)]
        h.update(f"{it.name}:{sizes[0]}:{sizes[1]}:{sizes[2]}\n".encode())
    return h.hexdigest()


def reference_noise(seed: int, name: str, variant: int, shape) -> torch.Tensor:
    """The noise of the cache pass (t=1) for variant ``variant`` of item ``name``."""
    return torch.randn(tuple(shape), generator=torch_generator(seed, "reference-noise", name, int(variant)))


def variant_augment(cfg: AugmentConfig, seed: int, name: str, variant: int) -> RefAugment:
    """The augmentation of reference variant ``variant`` of item ``name`` (identity when ``cfg.augment`` is off)."""
    if not cfg.augment:
        return RefAugment.identity()
    return RefAugment.draw(cfg, rng_for(seed, "reference", name, int(variant)))


def pick_variant(seed: int, position: int, variants: int) -> int:
    """Which stored variant sample ``position`` of a run uses (seeded by the run's seed and the position)."""
    if variants <= 1:
        return 0
    return int(rng_for(seed, "variant", int(position)).integers(variants))


@dataclass(frozen=True)
class Manifest:
    """What a precomputed set was made from and how; every file of the set carries it."""

    family: str
    checkpoint: str  # file name, for messages
    checkpoint_hash: str  # dreamcache.comfy.frozen.checkpoint_fingerprint (the weights)
    dataset_hash: str
    items: int
    resolution: int
    layers: tuple[str, ...]
    spatial: tuple[tuple[int, int], ...]  # (h, w) of each layer's cache
    variants: int
    augment: bool
    seed: int
    precision: str
    storage_dtype: str
    sigma: float
    chunk_size: int
    empty_tokens: int = 0

    def to_metadata(self) -> dict[str, str]:
        return {"format": PRECOMPUTED_FORMAT, "format_version": str(PRECOMPUTED_VERSION),
                "manifest": json.dumps(asdict(self), sort_keys=True)}

    @classmethod
    def from_metadata(cls, meta: dict, where: str) -> "Manifest":
        if meta.get("format") != PRECOMPUTED_FORMAT:
            raise DreamCacheError(f"'{where}' is not part of a precomputed training set (format "
                                  f"{meta.get('format')!r}); pass the folder written by python -m dreamcache.data "
                                  "precompute.")
        if int(meta.get("format_version", "0")) > PRECOMPUTED_VERSION:
            raise DreamCacheError(f"'{where}' was written by a newer ComfyUI-DreamCache; update the pack or "
                                  "precompute the set again.")
        try:
            d = json.loads(meta["manifest"])
            d = {f.name: d[f.name] for f in fields(cls) if f.name in d}
            d["layers"] = tuple(d["layers"])
            d["spatial"] = tuple(tuple(x) for x in d["spatial"])
            return cls(**d)
        except (KeyError, ValueError, TypeError) as e:
            raise DreamCacheError(f"'{where}' has an unreadable manifest ({type(e).__name__}); the set is damaged, "
                                  "precompute it again.") from None

    @property
    def chunks(self) -> int:
        return (self.items + self.chunk_size - 1) // self.chunk_size

    @property
    def layer_refs(self) -> list[LayerRef]:
        return [parse_layer(s) for s in self.layers]


def _header(path: str) -> dict:
    from ...core.files import read_safetensors

    return read_safetensors(path, os.path.basename(path), "the precomputed set is damaged; precompute it again",
                            tensors=False)[1]


def _save(path: str, tensors: dict, manifest: Manifest, extra: dict | None = None):
    from ...core.adapter_io import atomic_save_safetensors

    meta = manifest.to_metadata()
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    atomic_save_safetensors(tensors, path, meta)


# ---- writing ---------------------------------------------------------------------------------------------------------

def precompute(frozen, index: DatasetIndex, out: str, manifest: Manifest, layers: list[LayerRef],
               cfg: AugmentConfig, shard: tuple[int, int] | None = None, progress: bool = True,
               storage_dtype: torch.dtype | None = None) -> dict:
    """Write the chunks of ``index`` that this ``shard`` owns into ``out`` (finished ones are skipped); returns
    ``{"written": chunks, "skipped": chunks, "chunks": total}``. ``frozen``: a :class:`FrozenParts`."""
    os.makedirs(out, exist_ok=True)
    common = os.path.join(out, COMMON_FILE)
    _check_folder(out, manifest)
    frozen.ensure_loaded()
    ctx, pooled = frozen.empty_prompt()
    if not os.path.isfile(common):  # every shard may write it: the same bytes, renamed atomically
        t = {"empty.context": ctx[0].float().cpu()}
        if pooled[0] is not None and frozen.base.adm_channels:
            t["empty.pooled"] = pooled[0].float().cpu()
        _save(common, t, manifest)
    items = index.items
    mine = shard_jobs(list(range(manifest.chunks)), shard)
    written = skipped = 0
    for c in progress_bar(mine, progress, "precomputing"):
        path = os.path.join(out, chunk_file(c))
        if os.path.isfile(path):
            skipped += 1
            continue
        tensors = {}
        for i in range(c * manifest.chunk_size, min(len(items), (c + 1) * manifest.chunk_size)):
            tensors.update(_item_tensors(frozen, items[i], i, manifest, layers, cfg, storage_dtype))
        _save(path, tensors, manifest, {"chunk": c})
        written += 1
    return {"written": written, "skipped": skipped, "chunks": manifest.chunks}


@torch.no_grad()
def _item_tensors(frozen, item, i: int, manifest: Manifest, layers, cfg: AugmentConfig, storage_dtype) -> dict:
    rgb, mask = load_rgb(item.image), load_mask(item.mask)
    if mask.shape != rgb.shape[:2]:
        raise DreamCacheError(f"{item.name}: mask and image sizes differ; run 'python -m dreamcache.data check'.")
    target, geom = prepare_target(rgb, manifest.resolution)
    frozen.ensure_loaded()
    out = {f"{i}.latent": frozen.encode_pixels(target[None])[0].float().cpu()}
    context, pooled = frozen.encode_text([item.caption.read_text(encoding="utf-8").strip()])
    out[f"{i}.context"] = context[0].float().cpu()
    if pooled[0] is not None and frozen.base.adm_channels:
        out[f"{i}.pooled"] = pooled[0].float().cpu()
    out[f"{i}.geometry"] = torch.tensor([geom.original_width, geom.original_height, geom.crop_top, geom.crop_left],
                                        dtype=torch.int64)
    refs = torch.stack([augment_reference(rgb, mask, cfg, variant_augment(cfg, manifest.seed, item.name, v))
                        for v in range(manifest.variants)])
    ref_latents = frozen.encode_pixels(refs)
    noise = torch.stack([reference_noise(manifest.seed, item.name, v, ref_latents.shape[1:])
                         for v in range(manifest.variants)]).to(ref_latents.device)
    frozen.ensure_loaded()
    cache = frozen.build_cache(ref_latents, noise, layers, manifest.resolution)
    for v in range(manifest.variants):
        for r, name in zip(layers, manifest.layers):
            t = cache.tokens[r][v]
            out[f"{i}.cache.{v}.{name}"] = (t if storage_dtype is None else t.to(storage_dtype)).cpu()
    return out


def run_precompute(model, clip, vae, data: str, out: str | None = None, *, checkpoint_name: str = "",
                   resolution: int = 0, layers: list[LayerRef] | None = None, variants: int = 4, augment: bool = True,
                   seed: int = 0, precision: str = "auto", storage: str = "keep", chunk_size: int = 64,
                   shard: tuple[int, int] | None = None, progress: bool = True, validate: bool = True
                   ) -> tuple[str, dict]:
    """Precompute the set of dataset ``data`` for the loaded checkpoint (``model`` a ModelPatcher, ``clip``, ``vae``);
    returns the folder and :func:`precompute`'s report."""
    from ...comfy.frozen import WEIGHT_DTYPES, FrozenParts, checkpoint_fingerprint, resolve_precision
    from ...comfy.loading import check_supported
    from ...comfy.model import model_channels_at
    from ...core.adapter_io import STORAGE_DTYPES
    from ...core.layers import NATIVE_RESOLUTION, default_layers, sort_layers
    from .layout import validate_dataset

    family = check_supported(model, checkpoint_name or "the model")
    if clip is None or vae is None:
        raise DreamCacheError("Precomputing needs the checkpoint's CLIP and VAE as well as its U-Net; load a full "
                              "checkpoint.")
    if variants < 1 or chunk_size < 1:
        raise DreamCacheError(f"--variants {variants} and --chunk-size {chunk_size} must be at least 1.")
    if not augment and variants != 1:
        variants = 1  # without augmentation every variant would be the same reference
    resolution = resolution or NATIVE_RESOLUTION[family]
    cfg = AugmentConfig(resolution=resolution, augment=augment)
    layers = sort_layers(layers or default_layers(family))
    missing = [str(r) for r in layers if model_channels_at(model, r) is None]
    if missing:
        raise DreamCacheError(f"This model has no transformer block at {', '.join(missing)}; pick layers it has "
                              "(--layers).")
    device = torch.device(model.load_device)
    precision = resolve_precision(precision, device.type)
    frozen = FrozenParts(model, clip, vae, device, family, None if precision == "fp32" else WEIGHT_DTYPES[precision])
    index = validate_dataset(data, check_files=validate, progress=progress)
    out = out or default_folder(data, family, resolution)
    latent = resolution // 8
    frozen.ensure_loaded()  # the feature map size of each layer at this resolution: one pass on a blank latent
    probe = frozen.build_cache(torch.zeros(1, 4, latent, latent, device=device),
                               torch.zeros(1, 4, latent, latent, device=device), layers, resolution)
    spatial = tuple(tuple(probe.spatial[r]) for r in layers)
    ctx, _ = frozen.empty_prompt()
    manifest = Manifest(family=family, checkpoint=os.path.basename(checkpoint_name or ""),
                        checkpoint_hash=checkpoint_fingerprint(model, clip, vae),
                        dataset_hash=dataset_fingerprint(index), items=len(index), resolution=resolution,
                        layers=tuple(str(r) for r in layers), spatial=spatial, variants=int(variants),
                        augment=bool(augment), seed=int(seed), precision=precision, storage_dtype=storage,
                        sigma=float(probe.sigma), chunk_size=int(chunk_size), empty_tokens=int(ctx.shape[1]))
    report = precompute(frozen, index, out, manifest, layers, cfg, shard=shard, progress=progress,
                        storage_dtype=STORAGE_DTYPES[storage])
    return out, report


def _check_folder(out: str, manifest: Manifest):
    """A folder that already holds another set is refused (resuming a set needs the same settings)."""
    for f in sorted(Path(out).glob("*.safetensors")):
        if f.name != COMMON_FILE and not f.name.startswith("chunk-"):
            continue
        have = Manifest.from_metadata(_header(str(f)), str(f))
        if have != manifest:
            diff = [k.name for k in fields(Manifest) if getattr(have, k.name) != getattr(manifest, k.name)]
            raise DreamCacheError(f"'{out}' holds a precomputed set made with other settings ({', '.join(diff)}); "
                                  "pick another --out, or delete that folder to start again.")
        return


# ---- reading ---------------------------------------------------------------------------------------------------------

def read_manifest(folder: str) -> Manifest:
    common = os.path.join(folder, COMMON_FILE)
    if not os.path.isfile(common):
        raise DreamCacheError(f"'{folder}' is not a precomputed training set (no {COMMON_FILE}); make one with "
                              "python -m dreamcache.data precompute.")
    return Manifest.from_metadata(_header(common), common)


def check_manifest(m: Manifest, folder: str, *, family: str, checkpoint_hash: str, dataset_hash: str, items: int,
                   resolution: int, layers: list[str], augment: bool):
    """One sentence for the first way the set at ``folder`` does not fit the run; nothing when it fits."""
    where = f"The precomputed set '{folder}'"
    again = "precompute it again for this run (python -m dreamcache.data precompute) or drop --precomputed"
    if m.family != family:
        raise DreamCacheError(f"{where} was made with an {FAMILY_LABELS.get(m.family, m.family)} model but this run "
                              f"trains {FAMILY_LABELS.get(family, family)}; {again}.")
    if m.checkpoint_hash != checkpoint_hash:
        raise DreamCacheError(f"{where} was made with another checkpoint ('{m.checkpoint}', weights "
                              f"{m.checkpoint_hash[:12]}) than this run's (weights {checkpoint_hash[:12]}); {again}.")
    if m.items != items or m.dataset_hash != dataset_hash:
        raise DreamCacheError(f"{where} was made from another state of the dataset ({m.items} items, hash "
                              f"{m.dataset_hash[:12]}; now {items} items, hash {dataset_hash[:12]}); {again}.")
    if m.resolution != resolution:
        raise DreamCacheError(f"{where} was made at {m.resolution} px but this run trains at {resolution} px; "
                              f"{again}.")
    missing = [name for name in layers if name not in m.layers]
    if missing:
        raise DreamCacheError(f"{where} holds the cache of {', '.join(m.layers)} but this run trains "
                              f"{', '.join(missing)}; {again}.")
    if m.augment != augment:
        raise DreamCacheError(f"{where} was made {'with' if m.augment else 'without'} reference augmentation but this "
                              f"run trains {'with' if augment else 'without'} it; {again}, or "
                              f"{'drop' if augment else 'pass'} --no-augment.")
    missing_chunks = [c for c in range(m.chunks) if not os.path.isfile(os.path.join(folder, chunk_file(c)))]
    if missing_chunks:
        raise DreamCacheError(f"{where} is unfinished ({m.chunks - len(missing_chunks)} of {m.chunks} chunks); run "
                              "the same precompute command again to finish it.")


class PrecomputedData(torch.utils.data.Dataset):
    """The samples of a run read from a precomputed set: position ``p`` is the live run's sample ``p`` (the same
    object, item and caption dropout from ``data.plan``; the same noise and timestep are drawn by the trainer), with
    the stored latent, text encoding and the cache of variant :func:`pick_variant` ``(seed, p)``."""

    def __init__(self, data, folder: str, manifest: Manifest, layers: list[LayerRef], layer_names: list[str]):
        self.data = data  # the TrainingData of the run (plan, index, seed, cfg)
        self.index, self.cfg, self.seed = data.index, data.cfg, data.seed
        self.folder, self.manifest = folder, manifest
        self.layers, self.layer_names = list(layers), list(layer_names)
        self._offsets = np.cumsum([0] + [len(its) for _, its in self.index.objects])
        self._handles: dict = {}
        from safetensors.torch import load_file

        common = load_file(os.path.join(folder, COMMON_FILE))
        self.empty_context = common["empty.context"]
        self.empty_pooled = common.get("empty.pooled")
        spatial = dict(zip(manifest.layers, manifest.spatial))
        self.spatial = {r: tuple(spatial[n]) for r, n in zip(self.layers, self.layer_names)}

    def __len__(self) -> int:
        return len(self.data)

    def __getstate__(self):  # DataLoader workers open their own file handles
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d

    def plan(self, position: int):
        return self.data.plan(position)

    def _file(self, item: int):
        from safetensors import safe_open

        c = item // self.manifest.chunk_size
        if c not in self._handles:
            self._handles[c] = safe_open(os.path.join(self.folder, chunk_file(c)), "pt")
        return self._handles[c]

    def __getitem__(self, position: int) -> dict:
        plan = self.data.plan(position)
        i = int(self._offsets[plan.object_index]) + plan.item_index
        it = self.data.item(plan)
        f = self._file(i)
        v = pick_variant(self.seed, position, self.manifest.variants)
        g = f.get_tensor(f"{i}.geometry").tolist()
        sample = {"position": plan.position, "name": it.name, "latent": f.get_tensor(f"{i}.latent"),
                  "geometry": TargetGeometry(int(g[0]), int(g[1]), int(g[2]), int(g[3])),
                  "cache": {r: f.get_tensor(f"{i}.cache.{v}.{n}") for r, n in zip(self.layers, self.layer_names)}}
        if plan.drop_caption:
            sample["context"], sample["pooled"] = self.empty_context[None], self.empty_pooled
        else:
            sample["context"] = f.get_tensor(f"{i}.context")[None]
            sample["pooled"] = f.get_tensor(f"{i}.pooled") if self.empty_pooled is not None else None
        return sample


def collate_precomputed(samples: list[dict]) -> dict:
    return {
        "position": [s["position"] for s in samples],
        "name": [s["name"] for s in samples],
        "latent": torch.stack([s["latent"] for s in samples]),
        "context": [s["context"] for s in samples],
        "pooled": [s["pooled"] for s in samples],
        "geometry": [s["geometry"] for s in samples],
        "cache": {r: torch.stack([s["cache"][r] for s in samples]) for r in samples[0]["cache"]},
    }


def bytes_per_item(latent_shape, context_shape, pooled: int, cache_shapes: list, variants: int,
                   cache_bytes: int) -> int:
    """Disk bytes of one item (tensor data only; the file headers add a little): latent, context, pooled and
    geometry in float32 / int64, the cache of ``variants`` variants at ``cache_bytes`` per value."""
    n = int(np.prod(latent_shape)) * 4 + int(np.prod(context_shape)) * 4 + pooled * 4 + 4 * 8
    return n + variants * sum(int(np.prod(s)) for s in cache_shapes) * cache_bytes
