"""The ComfyUI-facing side of the DreamCache patch: the objects ComfyUI calls, the keys they use, and a typed view
of the data ComfyUI hands them (no ComfyUI import; the math they run is :class:`.patch.DreamCachePatch`).

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
were ``x + a`` then ``x + linear_cat(...)``. :class:`PrePlanWrapper` (an APPLY_MODEL wrapper) makes that plan one
level up when it can, so a compiled diffusion model receives it as a guarded argument. All four objects are shared
by every clone (``__deepcopy__`` returns self) and hold nothing but their patch.
"""
from __future__ import annotations

import torch

from .finite import check_layer, checked_apply_model

#: transformer_options key a guider sets: tuple of bools, image condition on/off per cond position.
SWITCH_KEY = "dreamcache_image"
#: transformer_options key that switches every DreamCache patch off (the cache pass sets it).
DISABLE_KEY = "dreamcache_disable"
#: transformer_options key under which the wrapper leaves its per-call plan for the block hooks.
PLAN_OPTION = "dreamcache_call_plan"
#: Keyword argument of the diffusion model through which the APPLY_MODEL pre-planner hands over
#: ((batch, device, dtype), plan). An argument, not a transformer_options entry: torch.compile guards on it even where
#: ComfyUI tells the compiler to ignore transformer_options (0.33's TorchCompileModel), so a compiled graph is never
#: reused for a call with another plan (another sigma range state, branch layout, subject set or strength).
PLAN_ARG = "dreamcache_plan"
#: ``extra`` key where the output hook leaves attn1's output for the middle hook of the same block.
STASH_OPTION = "dreamcache_attn1_out"


class HookData:
    """Typed view of a dict ComfyUI hands DreamCache: a block hook's ``extra`` (the model call's transformer_options
    plus the block's place) or a model call's ``transformer_options``. Every key DreamCache reads or writes there is
    named once, here."""

    __slots__ = ("d",)

    def __init__(self, d: dict):
        self.d = d

    # ---- written by ComfyUI -----------------------------------------------------------------------------------------
    @property
    def layer(self) -> tuple:
        """``(block, block_index)``: the transformer block running, as :attr:`.layers.LayerRef.hook_key`."""
        return (self.d.get("block"), self.d.get("block_index", 0))

    @property
    def n_heads(self) -> int:
        return self.d["n_heads"]

    @property
    def original_shape(self):
        """The shape of the model's input latent."""
        return self.d.get("original_shape")

    @property
    def latent_size(self) -> tuple[int, int] | None:
        """(height, width) of the input latent, None when ComfyUI did not say."""
        shape = self.original_shape
        return (int(shape[-2]), int(shape[-1])) if shape is not None and len(shape) >= 4 else None

    @property
    def activations_shape(self):
        """The shape of the transformer's input at this block (its token grid)."""
        return self.d.get("activations_shape")

    @property
    def cond_or_uncond(self):
        """Per chunk of the batch, the position of its cond in the ``calc_cond_batch`` call (0 positive, 1 negative)."""
        return self.d.get("cond_or_uncond")

    @property
    def sigma(self) -> float | None:
        """This call's noise level (one host read), None when ComfyUI did not pass it."""
        sig = self.d.get("sigmas")
        return float(sig.max()) if isinstance(sig, torch.Tensor) and sig.numel() else None

    @property
    def sample_sigmas(self):
        """The whole schedule of the sampling run (None outside a sampler)."""
        return self.d.get("sample_sigmas")

    @property
    def patches(self) -> dict | None:
        return self.d.get("patches")

    # ---- written by DreamCache ----------------------------------------------------------------------------------
    @property
    def image_switch(self) -> tuple | None:
        """The guider's image condition on/off per cond position (:data:`SWITCH_KEY`)."""
        return self.d.get(SWITCH_KEY)

    @property
    def disabled(self) -> bool:
        return bool(self.d.get(DISABLE_KEY))

    @property
    def plan(self):
        """This call's :class:`.patch.CallPlan` (None before the wrapper or a hook made it)."""
        return self.d.get(PLAN_OPTION)

    @plan.setter
    def plan(self, plan):
        self.d[PLAN_OPTION] = plan

    def stash(self, a: torch.Tensor):
        self.d[STASH_OPTION] = a

    def take_stash(self) -> torch.Tensor | None:
        return self.d.pop(STASH_OPTION, None)


class _Shared:
    """Base of the hook objects: shared across clones, movable by ComfyUI's model_patches_to."""

    def __init__(self, patch):  # a patch.DreamCachePatch (not imported: the patch imports this module)
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
        h = HookData(extra)
        plan = h.plan
        if plan is None:  # called without our wrapper (another pack ran the model directly): plan here
            plan = h.plan = self.patch.plan(extra, a.shape[0], a.device, a.dtype, ordered=False)
        if h.layer not in plan.layers:
            return a
        h.stash(a)
        return plan.zero if plan.ordered else torch.zeros_like(a)


class MiddleHook(_Shared):
    """middle_patch: x + linear_cat([a, attn_mem(norm2_mem(x), r)]) on rows with the image on, x + a elsewhere."""

    dreamcache_hook = "middle"

    def __call__(self, x, extra):
        h = HookData(extra)
        a = h.take_stash()
        if a is None:
            return x
        out = self.patch.update(x, a, extra)
        if h.plan.check:  # only while diagnosing a non-finite prediction (core.finite), never normally
            check_layer(h.plan.layers[h.layer], x, a, out)
        return out


class ModelWrapper(_Shared):
    """DIFFUSION_MODEL wrapper: plan the call once and order the hooks; never mutates the caller's dicts."""

    dreamcache_hook = "wrapper"

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        to = transformer_options
        pre = kwargs.pop(PLAN_ARG, None)
        if pre is not None and pre[0] == (x.shape[0], x.device, x.dtype):
            plan = pre[1]  # planned outside a compiled diffusion model (see PrePlanWrapper)
        elif HookData(to).disabled:
            return executor(x, timesteps, context, y, control, to, **kwargs)
        else:
            plan = self.patch.plan(to, x.shape[0], x.device, x.dtype, ordered=True)
        to = dict(to)
        h = HookData(to)
        h.plan = plan
        if h.patches:
            to["patches"] = self.patch.ordered_patches(h.patches)
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
        if HookData(to).disabled or base is None or not hasattr(base, "get_dtype"):
            return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
        dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
        plan = self.patch.plan(to, x.shape[0], x.device, dtype, ordered=True)
        kwargs[PLAN_ARG] = ((x.shape[0], x.device, dtype), plan)
        # the first call of each sampling run checks its prediction for NaN/inf (one host read per run, core.finite)
        return checked_apply_model(self.patch, executor, x, t, c_concat, c_crossattn, control, to, kwargs, PLAN_ARG,
                                   DISABLE_KEY)
