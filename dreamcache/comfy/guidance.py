"""DreamCache's guidance inside ComfyUI's guider API; the formulas themselves are :mod:`dreamcache.core.guidance`.

combined: e = e(∅,∅) + s_I·(e(c_I,∅) − e(∅,∅)) + s_T·(e(c_I,c_T) − e(c_I,∅))   (three evaluations)
joint:    e = e(∅,∅) + s·(e(c_I,c_T) − e(∅,∅))                                 (two; s_I = s_T = s)

The image condition is switched per branch through ``transformer_options[SWITCH_KEY]``, indexed by the cond's
position in each ``calc_cond_batch`` call. Every call holds at most a positive (index 0) and a negative (index 1),
so other packs' patches that read ``cond_or_uncond`` as cond/uncond keep working; when the model carries no
attention patch but ours, the three branches of combined guidance run as one batched call (except where that is
slower: see :func:`batch_three`).
"""
from __future__ import annotations

import math

import comfy.samplers

from ..core.errors import DreamCacheError
from ..core.guidance import MODES, check_scales, combined_guidance
from ..core.hooks import SWITCH_KEY
from .apply_patch import cpu_chunked_attention, is_patched

__all__ = ["MODES", "check_scales", "DreamCacheGuider", "PositiveOnlyGuider", "make_guider", "with_switch",
           "only_our_patches", "batch_three"]


def with_switch(model_options: dict, switch: tuple) -> dict:
    mo = dict(model_options)
    to = dict(mo.get("transformer_options", {}))
    to[SWITCH_KEY] = tuple(switch)
    mo["transformer_options"] = to
    return mo


def only_our_patches(model_options: dict) -> bool:
    """True when batching three conds in one call cannot confuse another pack's cond/uncond indexing."""
    if "model_function_wrapper" in model_options or "sampler_calc_cond_batch_function" in model_options:
        return False
    to = model_options.get("transformer_options", {})
    if any(to.get("patches_replace", {}).values()):
        return False
    for lst in to.get("patches", {}).values():
        for p in lst:
            if getattr(p, "dreamcache_hook", None) is None:
                return False
    return True


def batch_three(model_options: dict, device) -> bool:
    """Run the three branches of combined guidance as one call: only when no other pack's patch could misread
    ``cond_or_uncond``, and when batching is not slower. On a CPU with ComfyUI's sub-quadratic/split attention a
    batch of three costs more than a batch of two plus a single evaluation (SD1.5 512²: 28.2 s against 17.3 + 8.6 s;
    with PyTorch attention 16.8 s against 11.3 + 6.1 s, see benchmarks/README.md), so there the branches are split."""
    return only_our_patches(model_options) and not cpu_chunked_attention(device)


class DreamCacheGuider(comfy.samplers.CFGGuider):
    def set_conds(self, positive, negative):
        self.inner_set_conds({"positive": positive, "negative": negative})

    def set_scales(self, text_scale: float, image_scale: float, mode: str = "combined"):
        check_scales(text_scale, image_scale, mode)
        self.text_scale, self.image_scale, self.mode = float(text_scale), float(image_scale), mode
        self.cfg = self.text_scale

    def _calc(self, conds, x, timestep, model_options):
        if "sampler_calc_cond_batch_function" in model_options:
            args = {"conds": conds, "input": x, "sigma": timestep, "model": self.inner_model,
                    "model_options": model_options}
            return model_options["sampler_calc_cond_batch_function"](args)
        return comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)

    def _pre_cfg(self, conds, out, x, timestep, model_options):
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds, "conds_out": out, "cond_scale": self.text_scale, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            out = fn(args)
        return out

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        pos, neg = self.conds.get("positive"), self.conds.get("negative")
        if neg is None:
            raise DreamCacheError("DreamCache guidance needs a negative conditioning (the text-unconditional branch).")
        s_t, s_i = self.text_scale, self.image_scale
        if self.mode == "joint" or math.isclose(s_t, s_i):
            # e(∅,∅) + s (e(c_I,c_T) − e(∅,∅)): the positive branch with the image, the negative without
            mo = with_switch(model_options, (True, False))
            e_it, e_00 = self._pre_cfg([pos, neg], self._calc([pos, neg], x, timestep, mo), x, timestep, mo)
            return comfy.samplers.cfg_function(self.inner_model, e_it, e_00, s_t, x, timestep, model_options=mo,
                                               cond=pos, uncond=neg)
        mo_on = with_switch(model_options, (True, True))
        if batch_three(model_options, x.device):
            e_it, e_i0, e_00 = self._calc([pos, neg, neg], x, timestep, with_switch(model_options, (True, True, False)))
        else:
            e_it, e_i0 = self._calc([pos, neg], x, timestep, mo_on)
            # position 1 (a negative) alone, image off: e(∅,∅)
            e_00 = self._calc([None, neg], x, timestep, with_switch(model_options, (True, False)))[1]
        e_it, e_i0 = self._pre_cfg([pos, neg], [e_it, e_i0], x, timestep, mo_on)
        # the text term through ComfyUI's cfg_function (so sampler_cfg_function and post-CFG hooks apply to it)
        text = comfy.samplers.cfg_function(self.inner_model, e_it, e_i0, s_t, x, timestep, model_options=mo_on,
                                           cond=pos, uncond=neg)
        return combined_guidance(e_00, e_i0, e_it, s_i, s_t, text_guided=text)


class PositiveOnlyGuider(comfy.samplers.CFGGuider):
    """Evaluates its conds as they are, in one ``calc_cond_batch`` call, with no CFG arithmetic and no uncond (even
    if a pack disabled the cfg=1 shortcut); returns the first one's prediction. ``keys``: which conds, in order
    (default the positive); ``transformer_options`` are merged into the call's; ``last`` keeps every prediction of
    the latest call."""

    def __init__(self, model_patcher, keys=("positive",), transformer_options: dict | None = None):
        super().__init__(model_patcher)
        self.keys, self.extra_options, self.last = tuple(keys), dict(transformer_options or {}), None

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        if self.extra_options:
            model_options = dict(model_options)
            model_options["transformer_options"] = {**model_options.get("transformer_options", {}),
                                                    **self.extra_options}
        self.last = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds[k] for k in self.keys], x, timestep,
                                                   model_options)
        return self.last[0]


def make_guider(model, positive, negative, text_scale: float, image_scale: float,
                mode: str = "combined") -> DreamCacheGuider:
    if not is_patched(model):
        raise DreamCacheError("This MODEL has no DreamCache patch; connect the MODEL output of ApplyDreamCache (or use "
                              "a plain KSampler).")
    check_scales(text_scale, image_scale, mode)
    g = DreamCacheGuider(model)
    g.set_conds(positive, negative)
    g.set_scales(text_scale, image_scale, mode)
    return g
