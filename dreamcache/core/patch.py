"""The DreamCache model patch, written against ComfyUI's transformer-block hook contract (no ComfyUI import).

ComfyUI's BasicTransformerBlock runs, per call and with one shared ``extra`` dict::

    a = attn1(norm1(x));  a = attn1_output_patch...(a, extra);  x = a + x;  x = middle_patch...(x, extra)

No hook sees the un-normalised x next to a. DreamCache needs both (``norm2_mem`` reads the true x), so:

* :class:`OutputHook` (``attn1_output_patch``) stashes ``a`` in ``extra`` and returns a zero, so the block's
  own residual gives ``0 + x == x`` exactly;
* :class:`MiddleHook` (``middle_patch``) takes that exact x and the stashed a, and returns
  ``x + linear_cat([a, attn_mem(norm2_mem(x), r)])`` (or ``x + a`` for rows whose image condition is off).

:class:`ModelWrapper` (a DIFFUSION_MODEL wrapper) plans each model call once: which adapters are active at this
sigma, which batch rows have the image condition on, the cached K/V for this device and dtype. It also puts the
output hook last and the middle hook first in their lists, so other packs' hooks see the block exactly as if it
were ``x + a`` then ``x + linear_cat(...)``. All three objects are shared by every clone (``__deepcopy__``
returns self) and are immutable apart from the K/V memo.
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
from .finite import RunCheck, check_layer, checked_apply_model
from .layers import LayerRef
from .regional import batch_index, check_layer_weights, mask_kind, prepare_mask, token_grid, token_weights

#: transformer_options key a guider sets: tuple of bools, image condition on/off per cond position.
SWITCH_KEY = "dreamcache_image"
#: transformer_options key that switches every DreamCache patch off (the cache pass sets it).
DISABLE_KEY = "dreamcache_disable"
#: transformer_options key under which the wrapper leaves its per-call plan.
PLAN_KEY = "dreamcache_plan"
#: Keyword argument of the diffusion model through which the APPLY_MODEL pre-planner hands over
#: ((batch, device, dtype), plan). An argument, not a transformer_options entry: torch.compile guards on it even where
#: ComfyUI tells the compiler to ignore transformer_options (0.33's TorchCompileModel), so a compiled graph is never
#: reused for a call with another plan (another sigma range state, branch layout, subject set or strength).
PLAN_ARG = "dreamcache_plan"
_STASH = "dreamcache_attn1_out"


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
    """What one adapter layer does in one model call."""

    __slots__ = ("layer", "k", "v", "strength", "entry", "ref", "mask", "mask_rows", "folded")

    def __init__(self, layer, k, v, strength, entry=None, ref=None, mask=None, mask_rows=None, folded=None):
        self.layer, self.k, self.v, self.strength = layer, k, v, strength
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


class _Shared:
    """Base of the hook objects: shared across clones, movable by ComfyUI's model_patches_to."""

    def __init__(self, patch: "DreamCachePatch"):
        self.patch = patch

    def __deepcopy__(self, memo):
        return self

    def to(self, device_or_dtype):
        self.patch.to(device_or_dtype)
        return self


class OutputHook(_Shared):
    """attn1_output_patch: stash a, return zero so the block's residual hands the middle hook the exact x."""

    dreamcache_hook = "output"

    def models(self):
        return list(self.patch.models_list)

    def __call__(self, a, extra):
        plan = extra.get(PLAN_KEY)
        if plan is None:  # called without our wrapper (another pack ran the model directly): plan here
            plan = self.patch.plan(extra, a.shape[0], a.device, a.dtype, ordered=False)
            extra[PLAN_KEY] = plan
        if (extra.get("block"), extra.get("block_index", 0)) not in plan.layers:
            return a
        extra[_STASH] = a
        return plan.zero if plan.ordered else torch.zeros_like(a)


class MiddleHook(_Shared):
    """middle_patch: x + linear_cat([a, attn_mem(norm2_mem(x), r)]) on rows with the image on, x + a elsewhere."""

    dreamcache_hook = "middle"

    def __call__(self, x, extra):
        a = extra.pop(_STASH, None)
        if a is None:
            return x
        out = self.patch.update(x, a, extra)
        if extra[PLAN_KEY].check:  # only while diagnosing a non-finite prediction (core.finite), never normally
            check_layer(extra[PLAN_KEY].layers[(extra.get("block"), extra.get("block_index", 0))], x, a, out)
        return out


class ModelWrapper(_Shared):
    """DIFFUSION_MODEL wrapper: plan the call once and order the hooks; never mutates the caller's dicts."""

    dreamcache_hook = "wrapper"

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        to = transformer_options
        pre = kwargs.pop(PLAN_ARG, None)
        if pre is not None and pre[0] == (x.shape[0], x.device, x.dtype):
            plan = pre[1]  # planned outside a compiled diffusion model (see PrePlanWrapper)
        elif to.get(DISABLE_KEY):
            return executor(x, timesteps, context, y, control, to, **kwargs)
        else:
            plan = self.patch.plan(to, x.shape[0], x.device, x.dtype, ordered=True)
        to = dict(to)
        to[PLAN_KEY] = plan
        patches = to.get("patches")
        if patches:
            to["patches"] = self.patch.ordered_patches(patches)
        return executor(x, timesteps, context, y, control, to, **kwargs)


class PrePlanWrapper(_Shared):
    """APPLY_MODEL wrapper: plans the call before the diffusion model runs, with the batch, device and dtype that
    ``BaseModel._apply_model`` will give it. When the diffusion model is compiled (``torch.compile``, ComfyUI's
    TorchCompileModel) this keeps the plan, its memo look-ups and the one host read of sigma out of the compiled
    graph: the graph sees the same plan object every step (no recompilation, no graph break). The plan travels as
    the diffusion model's keyword argument ``PLAN_ARG`` (popped again by :class:`ModelWrapper`), so the compiler's
    guards cover it: a new plan shape (sigma range on/off, another branch layout, other subjects) compiles anew
    instead of reusing a graph built for another plan."""

    dreamcache_hook = "preplan"

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        to = transformer_options if transformer_options is not None else {}
        base = getattr(executor, "class_obj", None)
        if to.get(DISABLE_KEY) or base is None or not hasattr(base, "get_dtype"):
            return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
        dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
        plan = self.patch.plan(to, x.shape[0], x.device, dtype, ordered=True)
        kwargs[PLAN_ARG] = ((x.shape[0], x.device, dtype), plan)
        # the first call of each sampling run checks its prediction for NaN/inf (one host read per run, core.finite)
        return checked_apply_model(self.patch, executor, x, t, c_concat, c_crossattn, control, to, kwargs, PLAN_ARG,
                                   DISABLE_KEY)


class DreamCachePatch:
    """Everything DreamCache adds to one model: its entries, their K/V memo and the three hook objects."""

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
        if to.get(DISABLE_KEY):
            return _EMPTY
        coc = to.get("cond_or_uncond")
        switch = to.get(SWITCH_KEY)
        sigma = None
        if self._sigma_ranged:
            sig = to.get("sigmas")
            sigma = float(sig.max()) if isinstance(sig, torch.Tensor) and sig.numel() else None
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
        shape = extra.get("original_shape")
        latent = (int(shape[-2]), int(shape[-1])) if shape is not None and len(shape) >= 4 else None
        memo = not torch.compiler.is_compiling()
        key = (w.entry, w.ref, n_tokens, latent, torch.device(device), dtype)
        hit = self._weights.get(key) if memo else None
        if hit is None:
            grid = token_grid(n_tokens, extra.get("activations_shape"), shape)
            hit = token_weights(w.mask, grid, latent or grid, w.strength, device, dtype)
            if memo:
                self._weights[key] = hit
        return hit

    def update(self, x: torch.Tensor, a: torch.Tensor, extra: dict) -> torch.Tensor:
        plan: CallPlan = extra[PLAN_KEY]
        works = plan.layers[(extra.get("block"), extra.get("block_index", 0))]
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
        heads = extra["n_heads"]
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
        upd = mix_weighted(as_, fused, [w.strength for w in works], weights)
        if plan.record is not None and plan.record[0] == (extra.get("block"), extra.get("block_index", 0)):
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
