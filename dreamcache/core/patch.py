"""The DreamCache model patch: what one model call does (:meth:`DreamCachePatch.plan`) and the update of a patched
transformer block (:meth:`DreamCachePatch.update`), with the memos that keep sampling cheap (K/V, folded weights,
zero, token weights, plans). No ComfyUI import.

The objects ComfyUI calls (the two block hooks and the two model wrappers) and the keys they read are in
:mod:`.hooks`; the block math in :mod:`.block`; masks and layer weights in :mod:`.regional`. Every call site reads
ComfyUI's hook data through :class:`.hooks.HookData`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .adapter import DreamCacheAdapter
from .attention import sdpa_attention
from .block import (
    fold_output,
    fuse,
    fuse_folded,
    memory_attention,
    memory_attention_heads,
    mix_weighted,
    project_memory,
)
from .cache import FeatureCache, check_cache_matches
from .errors import DreamCacheError
from .finite import RunCheck
from .hooks import HookData, MiddleHook, ModelWrapper, OutputHook, PrePlanWrapper
from .layers import LayerRef
from .regional import batch_index, check_layer_weights, mask_kind, prepare_mask, token_grid, token_weights

#: The strength range DreamCache accepts (1 = the method as trained).
STRENGTH_RANGE = (-1.0, 3.0)


def check_strength(strength: float):
    lo, hi = STRENGTH_RANGE
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and lo <= strength <= hi):
        raise DreamCacheError(f"DreamCache strength {strength} is out of range; use a value between {lo:g} and {hi:g} "
                              "(1 = the method as trained).")


@dataclass(frozen=True, eq=False)
class PatchEntry:
    """One adapter + cache applied to the model, with its strength and sigma range (inclusive), an optional mask
    ((B, H, W) in [0, 1]: where the subject applies) and optional weights per layer (missing layers: 1)."""

    adapter: DreamCacheAdapter
    cache: FeatureCache
    strength: float = 1.0
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    name: str = "DreamCache"
    mask: torch.Tensor | None = None
    layer_weights: dict | None = None

    def __post_init__(self):
        if self.mask is not None:
            m = prepare_mask(self.mask)
            kind = mask_kind(m)
            object.__setattr__(self, "mask", None if kind == "none" else m)  # one everywhere = no mask
            object.__setattr__(self, "_mask_off", kind == "zero")
        weights = check_layer_weights(dict(self.layer_weights or {}), self.adapter.layers)
        object.__setattr__(self, "layer_weights", weights)
        check_strength(self.strength)
        check_cache_matches(self.cache, self.adapter.channels, self.name)

    def active_at(self, sigma: float | None) -> bool:
        return sigma is None or self.sigma_end <= sigma <= self.sigma_start

    @property
    def mask_off(self) -> bool:
        """A mask that is zero everywhere: the subject is off (the base model exactly)."""
        return getattr(self, "_mask_off", False)

    def scale(self, ref: LayerRef) -> float:
        """λ·s at this layer (exactly s where λ = 1)."""
        lam = self.layer_weights.get(ref, 1.0)
        return self.strength if lam == 1.0 else lam * self.strength


class _Work:
    """What one adapter layer does in one model call. ``scale``: λ·s, the layer weight times the strength."""

    __slots__ = ("layer", "k", "v", "scale", "entry", "ref", "mask", "mask_rows", "folded")

    def __init__(self, layer, k, v, scale, entry=None, ref=None, mask=None, mask_rows=None, folded=None):
        self.layer, self.k, self.v, self.scale = layer, k, v, scale
        self.folded = folded  # (W_a, W_oᵀ, b) of block.fold_output; None when trainable (the unfolded math)
        self.entry, self.ref = entry, ref  # entry index and layer (masked subjects and the recorder need them)
        self.mask = mask  # the entry's mask ((B, H, W), None: unmasked)
        self.mask_rows = mask_rows  # None: one mask for every row; else the mask index of each computed row


class CallPlan:
    __slots__ = ("layers", "rows", "ordered", "zero", "record", "check")

    def __init__(self, layers, rows, ordered, zero, record=None, check=False):
        self.layers = layers  # {(block, block_index): [_Work, ...]}
        self.rows = rows  # None: every row; a slice (one run of chunks) or a LongTensor of the rows with the image on
        self.ordered = ordered  # True when the wrapper put our hooks in place (a 0-d zero is then safe)
        self.zero = zero
        self.record = record  # None, or (hook key, rows of the computed rows to record) when the recorder records
        self.check = check  # True only while diagnosing a non-finite prediction (core.finite): check every layer


_EMPTY = CallPlan({}, None, True, None)


class DreamCachePatch:
    """Everything DreamCache adds to one model: its entries, their memos and the four hook objects of
    :mod:`.hooks` (two block hooks, two model wrappers)."""

    def __init__(self, entries: list[PatchEntry], attention=None, models=(), trainable: bool = False, recorder=None):
        """``trainable=True`` (training): K/V are recomputed every call with autograd on, so gradients reach
        ``to_k``/``to_v``; the default memoises them per device and dtype without gradients (sampling).
        ``recorder`` (an :class:`~.attention_maps.AttentionRecorder`, opt-in) keeps the adapter attention of one
        layer at one step; without it nothing is recorded and nothing is computed for it."""
        if not entries:
            raise DreamCacheError("A DreamCache patch needs at least one adapter and cache.")
        self.trainable = trainable
        self.recorder = recorder
        self.entries = tuple(entries)
        self.attention = attention or sdpa_attention
        self.models_list = tuple(models)
        self.layers: dict[tuple, list[tuple[int, LayerRef]]] = {}
        for i, e in enumerate(self.entries):
            for ref in e.adapter.layers:
                self.layers.setdefault(ref.hook_key, []).append((i, ref))
        self._kv: dict = {}
        self._zero: dict = {}
        self._weights: dict = {}
        self._folded: dict = {}
        self._plans: dict = {}
        # whether any entry has a sigma range: only then does a model call read sigma (one host sync per call)
        self._sigma_ranged = any(e.sigma_start != math.inf or e.sigma_end != 0.0 for e in self.entries)
        self.output_hook = OutputHook(self)
        self.middle_hook = MiddleHook(self)
        self.wrapper = ModelWrapper(self)
        self.preplan = PrePlanWrapper(self)
        self.run_check = RunCheck()

    def __deepcopy__(self, memo):
        return self

    # ---- model management -------------------------------------------------------------------------------
    def to(self, device_or_dtype):
        """ComfyUI calls this with the load/offload device and the weight dtype (which may be fp8: ignored,
        everything is cast at use). Moving to another device drops the K/V memo of the old one."""
        if isinstance(device_or_dtype, (torch.device, str)):
            dev = torch.device(device_or_dtype)
            self._kv = {k: v for k, v in self._kv.items() if k[2] == dev}
            self._zero = {k: v for k, v in self._zero.items() if k[0] == dev}
            self._weights = {k: v for k, v in self._weights.items() if k[-2] == dev}
            self._folded = {k: v for k, v in self._folded.items() if k[2] == dev}
            self._plans = {}
        return self

    def kv(self, entry_index: int, ref: LayerRef, device, dtype):
        if self.trainable:
            e = self.entries[entry_index]
            return project_memory(e.adapter.layer(ref), e.cache.tokens[ref].to(device=device, dtype=dtype))
        key = (entry_index, ref, torch.device(device), dtype)
        hit = self._kv.get(key)
        if hit is None:
            e = self.entries[entry_index]
            with torch.no_grad():
                tokens = e.cache.tokens[ref].to(device=device, dtype=dtype)
                hit = project_memory(e.adapter.layer(ref), tokens)
            self._kv[key] = hit
        return hit

    def folded(self, entry_index: int, ref: LayerRef, device, dtype):
        """linear_cat's halves with to_out folded in (:func:`~.block.fold_output`), once per device and dtype."""
        key = (entry_index, ref, torch.device(device), dtype)
        hit = self._folded.get(key)
        if hit is None:
            hit = self._folded[key] = fold_output(self.entries[entry_index].adapter.layer(ref), device, dtype)
        return hit

    def zero(self, device, dtype):
        key = (torch.device(device), dtype)
        z = self._zero.get(key)
        if z is None:
            z = self._zero[key] = torch.zeros((), device=device, dtype=dtype)
        return z

    def transformer_options(self, base: dict | None = None) -> dict:
        """``transformer_options`` carrying this patch, for calling a U-Net's ``forward`` directly (outside a
        ComfyUI sampler, e.g. in training): the hooks in the patch lists and the model wrapper."""
        to = dict(base or {})
        patches = dict(to.get("patches", {}))
        patches["attn1_output_patch"] = list(patches.get("attn1_output_patch", [])) + [self.output_hook]
        patches["middle_patch"] = [self.middle_hook] + list(patches.get("middle_patch", []))
        to["patches"] = patches
        wrappers = dict(to.get("wrappers", {}))
        wrappers["diffusion_model"] = {**wrappers.get("diffusion_model", {}), "dreamcache": [self.wrapper]}
        to["wrappers"] = wrappers
        return to

    # ---- per call -----------------------------------------------------------------------------------------
    def plan(self, to: dict, batch: int, device, dtype, ordered: bool) -> CallPlan:
        """What this model call does. Sampling calls repeat the same shapes and branches, so the plan is memoised
        per (batch, device, dtype, branches, active entries) and a repeat costs a dict lookup and no tensor op.
        sigma is read (``sig.max()``, one host sync per model call) only when an entry has a sigma range."""
        h = HookData(to)
        if h.disabled:
            return _EMPTY
        coc = h.cond_or_uncond
        switch = h.image_switch
        sigma = h.sigma if self._sigma_ranged else None
        active = tuple(e.active_at(sigma) and not e.mask_off for e in self.entries)
        if self.trainable:
            return self._plan(to, coc, switch, active, batch, device, dtype, ordered)
        key = (batch, torch.device(device), dtype, ordered, tuple(coc) if coc else None,
               None if switch is None else tuple(bool(s) for s in switch), active)
        hit = self._plans.get(key)
        if hit is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            hit = self._plans[key] = self._plan(to, coc, switch, active, batch, device, dtype, ordered)
        if self.recorder is not None and hit.layers:
            record = self.recorder.plan(to, coc, switch, hit.rows, batch, hit.layers)
            if record is not None:
                return CallPlan(hit.layers, hit.rows, hit.ordered, hit.zero, record)
        return hit

    def _plan(self, to, coc, switch, active, batch, device, dtype, ordered) -> CallPlan:
        rows = None
        if switch is not None and coc:
            on = [bool(switch[c]) if c < len(switch) else True for c in coc]
            if not any(on):
                return _EMPTY
            if not all(on):
                per = batch // len(coc)
                first, last = on.index(True), len(on) - 1 - on[::-1].index(True)
                if all(on[first:last + 1]):  # the usual case: one run of chunks -> a slice, no gather/scatter copies
                    rows = slice(first * per, (last + 1) * per)
                else:
                    rows = torch.tensor([c * per + i for c, flag in enumerate(on) if flag for i in range(per)],
                                        device=device, dtype=torch.long)
        if not any(active):
            return _EMPTY
        n_rows = batch if rows is None else (rows.stop - rows.start if isinstance(rows, slice) else int(rows.numel()))
        chunk = batch // len(coc) if coc else batch
        mask_rows = {}
        for i, e in enumerate(self.entries):
            if active[i] and e.mask is not None:
                idx = batch_index(e.mask.shape[0], batch, chunk, device)
                if idx is not None and rows is not None:
                    idx = idx[rows] if isinstance(rows, slice) else idx.index_select(0, rows)
                mask_rows[i] = idx
        layers = {}
        for key, items in self.layers.items():
            works = []
            for i, ref in items:
                if not active[i]:
                    continue
                e = self.entries[i]
                if e.layer_weights.get(ref, 1.0) == 0.0:
                    continue  # layer weight 0: this layer runs the base block exactly
                k, v = self.kv(i, ref, device, dtype)
                if e.cache.per_image and e.cache.batch > 1:
                    if chunk != e.cache.batch:
                        raise DreamCacheError(
                            f"The cache holds {e.cache.batch} per-image references but the batch has {chunk} latents; "
                            "use a batch of the same size or build a concatenated cache."
                        )
                    idx = torch.arange(batch, device=device) % chunk
                    if rows is not None:
                        idx = idx[rows] if isinstance(rows, slice) else idx.index_select(0, rows)
                    k, v = k.index_select(0, idx), v.index_select(0, idx)
                elif n_rows > 1:
                    k, v = k.expand(n_rows, -1, -1), v.expand(n_rows, -1, -1)
                folded = None if self.trainable else self.folded(i, ref, device, dtype)
                works.append(_Work(e.adapter.layer(ref), k, v, e.scale(ref), i, ref, e.mask, mask_rows.get(i), folded))
            if works:
                layers[key] = works
        if self.trainable and self.recorder is not None:
            record = self.recorder.plan(to, coc, switch, rows, batch, layers)
            return CallPlan(layers, rows, ordered, self.zero(device, dtype) if ordered else None, record)
        return CallPlan(layers, rows, ordered, self.zero(device, dtype) if ordered else None)

    def token_weights(self, w: _Work, n_tokens: int, extra: dict, device, dtype):
        """w·λ·s per token of this layer for a masked subject, (B_mask, N, 1), memoised per grid, device and
        dtype (so it is computed once per sampling run, not per call). Inside a compiled graph they are computed in
        the graph (a few fused pooling ops), so the memo never changes what the compiler guarded."""
        h = HookData(extra)
        latent = h.latent_size
        memo = not torch.compiler.is_compiling()
        key = (w.entry, w.ref, n_tokens, latent, torch.device(device), dtype)
        hit = self._weights.get(key) if memo else None
        if hit is None:
            grid = token_grid(n_tokens, h.activations_shape, h.original_shape)
            hit = token_weights(w.mask, grid, latent or grid, w.scale, device, dtype)
            if memo:
                self._weights[key] = hit
        return hit

    def update(self, x: torch.Tensor, a: torch.Tensor, extra: dict) -> torch.Tensor:
        h = HookData(extra)
        plan: CallPlan = h.plan
        works = plan.layers[h.layer]
        if a.shape != x.shape:
            raise DreamCacheError(
                f"Another patch changed the token layout between self-attention and its output ({tuple(a.shape)} vs "
                f"{tuple(x.shape)}); "
                "apply that node before ApplyDreamCache or disable it for these layers."
            )
        rows = plan.rows
        if rows is None:
            xs, as_ = x, a
        elif isinstance(rows, slice):
            xs, as_ = x[rows], a[rows]
        else:
            xs, as_ = x.index_select(0, rows), a.index_select(0, rows)
        heads = h.n_heads
        # Below, everything is read from the plan's works (not from self.entries / self.trainable): under 0.33's
        # TorchCompileModel only the plan, a guarded argument, tells one compiled graph from another.
        if works[0].folded is None:  # trainable: the unfolded math, gradients reach to_out
            fused = [fuse(w.layer, as_, memory_attention(w.layer, xs, w.k, w.v, heads, self.attention)) for w in works]
        else:
            fused = [fuse_folded(w.folded, as_,
                                 memory_attention_heads(w.layer, xs, w.k, w.v, heads, self.attention)) for w in works]
        weights = [None] * len(works)
        for j, w in enumerate(works):
            if w.mask is not None:
                ws = self.token_weights(w, x.shape[1], extra, x.device, x.dtype)
                weights[j] = ws if w.mask_rows is None else ws.index_select(0, w.mask_rows)
        upd = mix_weighted(as_, fused, [w.scale for w in works], weights)
        if plan.record is not None and plan.record[0] == h.layer:
            self.recorder.observe(self, works, xs, plan.record[1:], heads, extra)
        if rows is None:
            return x + upd
        out = x + a  # rows with the image off: exactly the base block (a + x == x + a in IEEE arithmetic)
        if isinstance(rows, slice):
            out[rows] = xs + upd
        else:
            out.index_copy_(0, rows, xs + upd)
        return out

    def ordered_patches(self, patches: dict) -> dict:
        """A copy of ``patches`` with our output hook last and our middle hook first (others keep their order)."""
        out = patches
        lst = patches.get("attn1_output_patch")
        if lst and lst[-1] is not self.output_hook and any(p is self.output_hook for p in lst):
            out = dict(out)
            out["attn1_output_patch"] = [p for p in lst if p is not self.output_hook] + [self.output_hook]
        lst = patches.get("middle_patch")
        if lst and lst[0] is not self.middle_hook and any(p is self.middle_hook for p in lst):
            out = dict(out) if out is patches else out
            out["middle_patch"] = [self.middle_hook] + [p for p in lst if p is not self.middle_hook]
        return out
