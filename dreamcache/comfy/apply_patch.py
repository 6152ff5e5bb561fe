"""ApplyDreamCache: patch a ModelPatcher clone through list patches and two keyed wrappers (core/hooks.py).

* ``attn1_output_patch`` + ``middle_patch`` (lists: every other pack's patches still run),
* a keyed ``DIFFUSION_MODEL`` wrapper that plans the call and orders the hooks, and a keyed ``APPLY_MODEL``
  wrapper that makes the plan one level up, so a compiled diffusion model gets it as a guarded argument (both nest
  with other wrappers),
* the adapter as its own ModelPatcher, returned by the hook's ``models()`` so ComfyUI loads and offloads it
  with the U-Net and accounts its memory. The cache stays on the CPU; its K/V live on the compute device only
  while the model is loaded.
The input model is never touched: everything happens on ``model.clone()``.
"""
from __future__ import annotations

import math

from ..core.adapter_io import AdapterFile
from ..core.cache import FeatureCache
from ..core.errors import DreamCacheError
from ..core.patch import DreamCachePatch, PatchEntry, check_strength
from ..core.regional import parse_layer_weights
from .model import check_adapter_fits, check_cache_fits, compute_dtype

WRAPPER_KEY = "dreamcache"


def comfy_attention(q, k, v, heads, attn_precision=None):
    """ComfyUI's optimized attention for the current device, looked up at call time (follows --use-*-attention).

    One exception: on a CPU, ComfyUI falls back to its memory-saving sub-quadratic / split kernels unless PyTorch
    attention is enabled. For the adapter's cross-attention its own ``attention_pytorch`` (PyTorch SDPA: a fused,
    blockwise flash kernel on the CPU, so the same O(N) memory) is 3.4x faster at SD1.5 512² (0.18 s against 0.60 s
    for 4096x4096 tokens, see benchmarks/README.md), so that variant is used there."""
    from comfy.ldm.modules import attention

    fn = attention.attention_pytorch if cpu_chunked_attention(q.device) else attention.optimized_attention
    return fn(q, k, v, heads, attn_precision=attn_precision)


def cpu_chunked_attention(device) -> bool:
    """True when ComfyUI runs its memory-saving sub-quadratic or split attention on this CPU device (its CPU default
    unless PyTorch attention is enabled)."""
    from comfy.ldm.modules import attention

    return device.type == "cpu" and attention.optimized_attention in (attention.attention_sub_quad,
                                                                      attention.attention_split)


def find_patch(model) -> DreamCachePatch | None:
    """The DreamCache patch already on ``model`` (found by the hooks' marker, not by class identity)."""
    for p in model.model_options.get("transformer_options", {}).get("patches", {}).get("attn1_output_patch", []):
        if getattr(p, "dreamcache_hook", None) == "output":
            return p.patch
    return None


def is_patched(model) -> bool:
    return find_patch(model) is not None


def _without_ours(lst):
    return [p for p in lst if getattr(p, "dreamcache_hook", None) is None]


def build_adapter_patcher(model, adapter: AdapterFile):
    """The adapter as an nn.Module in the model's compute dtype, wrapped in a ModelPatcher on the model's devices."""
    import comfy.model_patcher
    import comfy.ops

    module = adapter.build(operations=comfy.ops.manual_cast, device=model.offload_device, dtype=compute_dtype(model))
    return module, comfy.model_patcher.ModelPatcher(module, load_device=model.load_device,
                                                    offload_device=model.offload_device)


def apply_dreamcache(model, adapter: AdapterFile, cache: FeatureCache, strength: float = 1.0,
                     start_percent: float = 0.0, end_percent: float = 1.0, mask=None, layer_weights=None):
    """A patched clone of ``model``. Applying again adds another adapter+cache (their updates are summed).
    ``mask`` (a MASK) limits the subject to a region; ``layer_weights`` ({LayerRef: w} or text such as
    ``"middle=1, output_4=0.8"``) scales it per layer."""

    check_strength(strength)
    if not (0.0 <= start_percent <= end_percent <= 1.0):
        raise DreamCacheError(f"start_percent {start_percent} and end_percent {end_percent} must satisfy 0 <= start <= "
                              "end <= 1.")
    check_adapter_fits(model, adapter)
    check_cache_fits(model, cache, adapter)
    ms = model.get_model_object("model_sampling")
    sigma_start = math.inf if start_percent <= 0.0 else float(ms.percent_to_sigma(start_percent))
    sigma_end = 0.0 if end_percent >= 1.0 else float(ms.percent_to_sigma(end_percent))

    if isinstance(layer_weights, str):
        layer_weights = parse_layer_weights(layer_weights, adapter.layers)
    module, adapter_patcher = build_adapter_patcher(model, adapter)
    entry = PatchEntry(module, cache, float(strength), sigma_start, sigma_end, name=adapter.name, mask=mask,
                       layer_weights=layer_weights)

    m = model.clone()
    old = find_patch(m)
    entries = (old.entries if old else ()) + (entry,)
    models = (old.models_list if old else ()) + (adapter_patcher,)
    recorder = old.recorder if old else None
    patch = DreamCachePatch(list(entries), attention=comfy_attention, models=models, recorder=recorder)
    return install_patch(m, patch, old)


def install_patch(m, patch: DreamCachePatch, old: DreamCachePatch | None):
    """Put ``patch``'s hooks and wrapper on the clone ``m`` in place of ``old``'s (if any); returns ``m``."""
    import comfy.patcher_extension

    patches = m.model_options["transformer_options"].setdefault("patches", {})
    if old is not None:
        for name in ("attn1_output_patch", "middle_patch"):
            if name in patches:
                patches[name] = _without_ours(patches[name])
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
        m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    m.set_model_attn1_output_patch(patch.output_hook)
    m.set_model_patch(patch.middle_hook, "middle_patch")
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, patch.wrapper)
    # plans each call outside the diffusion model, so a compiled diffusion model sees a memoised plan (issue 16)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, patch.preplan)
    return m
