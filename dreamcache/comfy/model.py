"""Facts about a loaded ComfyUI model that DreamCache needs: family, compute dtype, the layers it has."""
from __future__ import annotations

import logging

import torch

from ..core.adapter_io import AdapterFile
from ..core.cache import FeatureCache, check_cache_matches
from ..core.errors import DreamCacheError
from ..core.layers import LayerRef

FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", None: "an unknown family"}


def model_family(model) -> str | None:
    """'sd1', 'sd2', 'sdxl' from ComfyUI's model config class, or None for anything else."""
    import comfy.supported_models as sm

    cfg = getattr(getattr(model, "model", None), "model_config", None)
    if cfg is None:
        return None
    if isinstance(cfg, sm.SD15):
        return "sd1"
    if isinstance(cfg, sm.SD20):
        return "sd2"
    if isinstance(cfg, sm.SDXL) or type(cfg).__name__ in ("SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B"):
        return "sdxl"
    return None


def compute_dtype(model) -> torch.dtype:
    """The dtype the U-Net computes in (storage may be fp8 with a manual-cast compute dtype)."""
    base = model.model
    dt = getattr(base, "manual_cast_dtype", None)
    return dt if dt is not None else base.get_dtype()


def model_channels_at(model, ref: LayerRef) -> int | None:
    """Channel count of ``diffusion_model.<module>.transformer_blocks.<i>``, or None if the model has no such block."""
    try:
        st = model.get_model_object(f"diffusion_model.{ref.module}")
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    blocks = getattr(st, "transformer_blocks", None)
    if blocks is None or len(blocks) <= ref.block_index:
        return None
    block = blocks[ref.block_index]
    norm = getattr(block, "norm1", None)
    if norm is None or not hasattr(norm, "normalized_shape"):
        return None
    return int(norm.normalized_shape[0])


def check_adapter_fits(model, adapter: AdapterFile) -> str | None:
    """Raise one clear error if the adapter's layers or channels do not fit the model; return the model family."""
    family = model_family(model)
    problems = []
    for ref in adapter.layers:
        have = model_channels_at(model, ref)
        if have is None:
            problems.append(f"the model has no transformer block at {ref}")
        elif have != adapter.channels[ref]:
            problems.append(f"layer {ref} has {adapter.channels[ref]} channels in the adapter but {have} in the model")
    if problems:
        trained = FAMILY_NAMES[adapter.family] if adapter.family else "another model"
        raise DreamCacheError(
            f"Adapter '{adapter.name}' (for {trained}) does not fit this {FAMILY_NAMES[family]} model: "
            + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
            + "; load an adapter trained for this model family."
        )
    if adapter.family and family and adapter.family != family:
        raise DreamCacheError(
            f"Adapter '{adapter.name}' was trained for {FAMILY_NAMES[adapter.family]} but this model is "
            f"{FAMILY_NAMES[family]}; "
            "load an adapter trained for this model family."
        )
    return family


def check_init_fits(model, adapter: AdapterFile) -> str | None:
    """``--init-from``: an adapter of another family may start a run when every tensor fits (SD1.x and SD2.x share
    their channel widths, 320/640/1280). Raises one sentence naming the first layer that does not fit; returns one
    line to show when the adapter comes from another (or an unrecorded) family, None when it is this family's."""
    family = model_family(model)
    for ref in adapter.layers:  # U-Net order: the first mismatch is the one named
        have = model_channels_at(model, ref)
        if have is None or have != adapter.channels[ref]:
            what = (f"the model has no transformer block at {ref}" if have is None else
                    f"layer {ref} has {adapter.channels[ref]} channels in the adapter but {have} in the model")
            raise DreamCacheError(
                f"--init-from '{adapter.name}' (for {FAMILY_NAMES[adapter.family]}) cannot start a "
                f"{FAMILY_NAMES[family]} run: {what}; start from an adapter of this family, or drop --init-from.")
    if adapter.family == family:
        return None
    origin = FAMILY_NAMES[adapter.family] if adapter.family else "an unrecorded family"
    return (f"starting from '{adapter.name}' ({origin}) on this {FAMILY_NAMES[family]} model: all "
            f"{len(adapter.layers)} layers fit (same channel widths); its origin is recorded in the new adapter.")


def check_cache_fits(model, cache: FeatureCache, adapter: AdapterFile):
    family = model_family(model)
    if cache.model_family and family and cache.model_family != family:
        raise DreamCacheError(
            f"This cache was built with a {FAMILY_NAMES[cache.model_family]} model but the model here is "
            f"{FAMILY_NAMES[family]}; "
            "rebuild the cache with BuildFeatureCache on this model."
        )
    check_cache_matches(cache, adapter.channels, adapter.name)
    if cache.model_family is None and family is not None:
        logging.info("DreamCache: the cache does not record its model family; assuming it matches (%s).", family)
