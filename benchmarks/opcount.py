"""Count the aten operations DreamCache adds to one evaluation of a diffusion model (CPU, no GPU needed).

On a GPU at SD sizes an evaluation is launch-bound: every aten operation is (at least) one kernel launch, so the
number of operations DreamCache adds per patched layer is what its GPU overhead follows. This counts them with a
``TorchDispatchMode`` (every aten call that reaches a kernel, views and in-place ops included) on one forward of
the U-Net, base and patched (K/V already memoised, as every sampling step after the first), and attributes the
patched model's operations to DreamCache's own code: the per-call plan (``plan``, once per model call) and the
per-layer update (``update``, once per patched layer).

    from benchmarks.opcount import count_ops
    r = count_ops(diffusion_model, patch, x, t, context)   # {"base", "dreamcache", "added", "per_layer", ...}

``python benchmarks/bench.py --ops`` prints the same count for a full-size model.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SKIP = {"aten::detach", "aten::alias"}  # autograd bookkeeping that no kernel runs for


class OpCounter(TorchDispatchMode):
    """Counts aten operations, optionally per label (``label`` is set by the caller around a region)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.views = 0  # ops that only make a view (no kernel runs on a GPU)
        self.by_label: dict[str, Counter] = {}
        self.label: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name not in _SKIP:
            self.ops[name] += 1
            if self.label == "update" and func.is_view:
                self.views += 1
            if self.label is not None:
                self.by_label.setdefault(self.label, Counter())[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class _Labelled:
    """Wraps a bound method so the ops it runs are counted under ``label`` (and the number of calls kept)."""

    def __init__(self, counter: OpCounter, label: str, fn):
        self.counter, self.label, self.fn, self.calls = counter, label, fn, 0

    def __call__(self, *args, **kwargs):
        prev, self.counter.label = self.counter.label, self.label
        self.calls += 1
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.counter.label = prev


def count_ops(dm, patch, x, t, context, transformer_options: dict | None = None, **kwargs) -> dict:
    """Operations of one forward of ``dm`` without and with ``patch`` (a :class:`DreamCachePatch`).

    Returns ``base`` and ``dreamcache`` (totals), ``added`` (their difference), ``layers`` (patched layers that
    ran), ``plan`` (ops of the per-call plan), ``update`` (ops of all per-layer updates), ``per_layer``
    (``added - plan`` over ``layers``: what one patched layer costs, its share of the block included) and the
    per-op breakdown ``update_ops`` of one layer (averaged)."""
    base_to = dict(transformer_options or {})
    to = patch.transformer_options(base_to)
    with torch.inference_mode():
        dm(x, t, context=context, transformer_options=dict(to), **kwargs)  # memoise K/V (the first step's work)
        c_base = OpCounter()
        with c_base:
            dm(x, t, context=context, transformer_options=dict(base_to), **kwargs)
        c = OpCounter()
        plan, update = _Labelled(c, "plan", patch.plan), _Labelled(c, "update", patch.update)
        patch.plan, patch.update = plan, update  # instance attributes shadow the methods for this forward only
        try:
            with c:
                dm(x, t, context=context, transformer_options=dict(to), **kwargs)
        finally:
            del patch.plan, patch.update
    n_plan = sum(c.by_label.get("plan", Counter()).values())
    n_update = sum(c.by_label.get("update", Counter()).values())
    layers = update.calls
    added = c.total - c_base.total
    upd = c.by_label.get("update", Counter())
    return {
        "base": c_base.total, "dreamcache": c.total, "added": added, "layers": layers, "plan_calls": plan.calls,
        "plan": n_plan, "update": n_update,
        "per_layer": (added - n_plan) / layers if layers else 0.0,
        "update_views_per_layer": c.views / layers if layers else 0.0,
        "update_ops": {k: v / max(layers, 1) for k, v in sorted(upd.items())},
        "other_added": dict(sorted((c.ops - c_base.ops - upd - c.by_label.get("plan", Counter())).items())),
    }


def format_ops(r: dict) -> str:
    lines = [f"aten ops of one U-Net forward: base {r['base']}, DreamCache {r['dreamcache']} (+{r['added']}); "
             f"{r['layers']} patched layers, plan {r['plan']} ops per model call, "
             f"{r['per_layer']:.1f} added ops per patched layer ({r['update_views_per_layer']:.1f} of them views)"]
    lines.append("  per layer, inside update: " + ", ".join(f"{k.removeprefix('aten::')} {v:g}"
                                                           for k, v in r["update_ops"].items()))
    if r["other_added"]:
        lines.append("  outside update and plan: " + ", ".join(f"{k.removeprefix('aten::')} {v}"
                                                             for k, v in r["other_added"].items()))
    return "\n".join(lines)
