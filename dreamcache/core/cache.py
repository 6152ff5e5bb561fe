"""The feature cache: the inputs of the patched SpatialTransformers from one pass on the reference.

Stored as tokens ``(B, T, C)`` per layer (the raw (N, C, H, W) input flattened to (N, H·W, C); nothing
normalises it). Several references of one subject are either concatenated along T (``B == 1``, the default:
every generated image attends to all of them) or kept per image (``B == N``: image i of a batch uses
reference i). Saved as ``.safetensors`` with metadata so a subject is cached once and reused or shared.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import torch

from .. import __version__
from .adapter_io import atomic_save_safetensors
from .errors import DreamCacheError
from .files import read_safetensors
from .finite import check_cache
from .layers import FAMILIES, LayerRef, sort_layers

CACHE_FORMAT = "dreamcache.cache"
CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class FeatureCache:
    tokens: dict[LayerRef, torch.Tensor]
    spatial: dict[LayerRef, tuple[int, int]]  # (H, W) of one reference's feature map at that layer
    references: int = 1
    per_image: bool = False
    model_family: str | None = None
    sigma: float | None = None
    seed: int | None = None
    resolution: tuple[int, int] | None = None  # (H, W) in pixels of the reference as encoded
    conditioning: str = "empty prompt"
    adapter: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        validate_tokens(self.tokens, self.spatial, self.references, self.per_image, "this cache")

    @property
    def layers(self) -> tuple[LayerRef, ...]:
        return tuple(sort_layers(self.tokens))

    @property
    def batch(self) -> int:
        """Cache batch: 1 (one set of tokens for every image) or the number of per-image references."""
        return self.references if self.per_image else 1

    def channels(self, ref: LayerRef) -> int:
        return int(self.tokens[ref].shape[-1])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tokens.values())

    def numel(self) -> int:
        return sum(t.numel() for t in self.tokens.values())

    def to(self, device=None, dtype=None) -> "FeatureCache":
        return replace(self, tokens={r: t.to(device=device, dtype=dtype) for r, t in self.tokens.items()})

    def describe(self) -> str:
        mode = "per image" if self.per_image else ("concatenated" if self.references > 1 else "single")
        res = f"{self.resolution[1]}x{self.resolution[0]}" if self.resolution else "?"
        return (
            f"DreamCache cache: {self.references} reference(s) ({mode}), {len(self.tokens)} layers, "
            f"{self.numel():,} values ({self.nbytes() / 1e6:.1f} MB), family {self.model_family or 'unknown'}, "
            f"reference {res}, sigma {self.sigma if self.sigma is not None else '?'}, seed {self.seed}"
        )


def validate_tokens(tokens, spatial, references, per_image, source):
    if not tokens:
        raise DreamCacheError(f"{source} holds no layers; build it again with BuildFeatureCache.")
    if references < 1:
        raise DreamCacheError(f"{source} says it holds {references} references; build it again.")
    for ref, t in tokens.items():
        if ref not in spatial:
            raise DreamCacheError(f"{source} has no spatial size for layer {ref}; build it again.")
        h, w = spatial[ref]
        expect_b, expect_t = (references, h * w) if per_image else (1, references * h * w)
        if t.dim() != 3 or t.shape[0] != expect_b or t.shape[1] != expect_t or not t.is_floating_point():
            raise DreamCacheError(
                f"{source} layer {ref} has tokens {tuple(t.shape)} {t.dtype}, expected ({expect_b}, {expect_t}, C) "
                "float for "
                f"{references} reference(s) of {h}x{w}; build it again."
            )


def from_captures(captures: dict[LayerRef, torch.Tensor], per_image: bool = False, **meta) -> FeatureCache:
    """Turn captured SpatialTransformer inputs ``(N, C, H, W)`` into a cache (tokens flattened, never normalised)."""
    tokens, spatial, n = {}, {}, None
    for ref, x in captures.items():
        if x.dim() != 4:
            raise DreamCacheError(f"Captured input of {ref} has shape {tuple(x.shape)}, expected (N, C, H, W).")
        if n is None:
            n = x.shape[0]
        t = x.flatten(2).transpose(1, 2)  # (N, H*W, C)
        tokens[ref] = t.contiguous() if per_image else t.reshape(1, -1, t.shape[-1]).contiguous()
        spatial[ref] = (int(x.shape[2]), int(x.shape[3]))
    return FeatureCache(tokens=tokens, spatial=spatial, references=int(n or 0), per_image=per_image, **meta)


def concat_caches(caches: list[FeatureCache]) -> FeatureCache:
    """Concatenate the references of several caches of one subject (same model family and layers)."""
    if not caches:
        raise DreamCacheError("No caches to combine.")
    first = caches[0]
    for c in caches[1:]:
        if set(c.tokens) != set(first.tokens):
            raise DreamCacheError("Caches to combine hold different layers; build them with the same adapter.")
        if c.model_family != first.model_family:
            raise DreamCacheError(f"Caches to combine come from different model families ({first.model_family} vs "
                                  f"{c.model_family}).")
        for r in first.tokens:
            if c.spatial[r] != first.spatial[r] or c.channels(r) != first.channels(r):
                raise DreamCacheError(f"Caches to combine differ at layer {r} ({c.spatial[r]} vs {first.spatial[r]}); "
                                      "build them at the same resolution.")
    tokens = {}
    for r in first.tokens:
        tokens[r] = torch.cat([c.tokens[r].reshape(1, -1, c.channels(r)).to(first.tokens[r].dtype) for c in caches],
                              dim=1)
    return replace(first, tokens=tokens, references=sum(c.references for c in caches), per_image=False,
                   seed=first.seed, extra={**first.extra, "combined_from": len(caches)})


def _meta_of(cache: FeatureCache) -> dict[str, str]:
    layers = [
        {"module": r.module, "block_index": r.block_index, "channels": cache.channels(r),
         "spatial": list(cache.spatial[r])}
        for r in cache.layers
    ]
    meta = {
        "format": CACHE_FORMAT,
        "format_version": str(CACHE_FORMAT_VERSION),
        "layers": json.dumps(layers),
        "references": str(cache.references),
        "per_image": "true" if cache.per_image else "false",
        "model_family": cache.model_family or "unknown",
        "sigma": json.dumps(cache.sigma),
        "seed": json.dumps(cache.seed),
        "resolution": json.dumps(list(cache.resolution) if cache.resolution else None),
        "conditioning": cache.conditioning,
        "adapter": cache.adapter or "",
        "extra": json.dumps(cache.extra),
        "written_by": f"ComfyUI-DreamCache {__version__}",
    }
    return meta


def check_cache_matches(cache: FeatureCache, channels: dict[LayerRef, int], adapter_name: str):
    """One clear error when ``cache`` lacks a layer of the adapter (``channels``: its layers and channel counts) or
    holds another channel count there."""
    missing = [str(r) for r in sort_layers(channels) if r not in cache.tokens]
    if missing:
        raise DreamCacheError(
            f"The cache has no features for layer(s) {', '.join(missing)} of adapter '{adapter_name}' "
            f"(it was built for '{cache.adapter or 'another adapter'}'); rebuild the cache with this adapter.")
    for r in sort_layers(channels):
        if cache.channels(r) != channels[r]:
            raise DreamCacheError(
                f"Cache layer {r} has {cache.channels(r)} channels but adapter '{adapter_name}' expects {channels[r]}; "
                "the cache was built on another model family, rebuild it on this model.")


def save_cache(cache: FeatureCache, path: str, dtype: torch.dtype | None = None):
    if dtype is not None:  # fp16 tops out at 65504: an overflowing cache is refused instead of saved as inf
        check_cache({r: t.to(dtype) for r, t in cache.tokens.items()}, f"the cache in {str(dtype).split('.')[-1]}",
                    "Save DreamCache Cache", "its values exceed that type's range", "save it in fp32 or bf16")
    tensors = {f"cache.{r.module}.transformer_blocks.{r.block_index}": (t if dtype is None else t.to(dtype)) for r,
               t in cache.tokens.items()}
    atomic_save_safetensors(tensors, path, _meta_of(cache))


def load_cache(path: str, name: str | None = None) -> FeatureCache:
    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise DreamCacheError(f"Cache file '{path}' does not exist; save one with DreamCacheSave first.")
    raw, meta = read_safetensors(path, name, "the file is damaged or not a cache")
    if meta.get("format") != CACHE_FORMAT:
        raise DreamCacheError(f"'{name}' is not a DreamCache cache file (its metadata format is "
                              f"{meta.get('format')!r}); pick a file written by DreamCacheSave.")
    try:
        version = int(meta.get("format_version", ""))
        layers = json.loads(meta["layers"])
        references = int(meta["references"])
        per_image = {"true": True, "false": False}[meta["per_image"]]
        family = meta.get("model_family", "unknown")
        sigma = json.loads(meta.get("sigma", "null"))
        seed = json.loads(meta.get("seed", "null"))
        resolution = json.loads(meta.get("resolution", "null"))
        extra = json.loads(meta.get("extra", "{}"))
        spatial, tokens = {}, {}
        for d in layers:
            ref = LayerRef(d["module"], int(d["block_index"]))
            spatial[ref] = (int(d["spatial"][0]), int(d["spatial"][1]))
            key = f"cache.{ref.module}.transformer_blocks.{ref.block_index}"
            if key not in raw:
                raise DreamCacheError(f"'{name}' lists layer {ref} in its metadata but has no tensor '{key}'; the file "
                                      "is damaged, save the cache again.")
            tokens[ref] = raw.pop(key)
            if tokens[ref].shape[-1] != int(d["channels"]):
                raise DreamCacheError(f"'{name}' layer {ref} has {tokens[ref].shape[-1]} channels but its metadata "
                                      f"says {d['channels']}; save the cache again.")
    except DreamCacheError:
        raise
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise DreamCacheError(f"'{name}' has missing or unreadable cache metadata ({type(e).__name__}: {e}); save the "
                              "cache again with DreamCacheSave.") from None
    if version > CACHE_FORMAT_VERSION or version < 1:
        raise DreamCacheError(f"'{name}' uses cache format version {version}, which this pack does not read "
                              f"({CACHE_FORMAT_VERSION}); update ComfyUI-DreamCache or rebuild the cache.")
    if raw:
        raise DreamCacheError(f"'{name}' holds tensors its metadata does not list ({', '.join(sorted(raw)[:3])}); the "
                              "file is damaged, save the cache again.")
    if family not in FAMILIES:
        family = None
    validate_tokens(tokens, spatial, references, per_image, f"'{name}'")
    check_cache(tokens, f"cache file '{name}'", "Load DreamCache Cache")
    return FeatureCache(
        tokens=tokens, spatial=spatial, references=references, per_image=per_image, model_family=family, sigma=sigma,
                        seed=seed,
        resolution=tuple(resolution) if resolution else None, conditioning=meta.get("conditioning", ""),
                        adapter=meta.get("adapter") or None,
        extra=extra if isinstance(extra, dict) else {},
    )
