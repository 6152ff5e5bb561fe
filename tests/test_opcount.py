"""How many aten operations DreamCache adds to one U-Net evaluation, per patched layer (benchmarks/opcount.py).

Protects the GPU speed work of issue 16: on a GPU at SD sizes an evaluation is launch-bound, so each aten op that
DreamCache adds per patched layer costs a kernel launch. The counts below are the ones reached (see
benchmarks/README.md); an extra op per layer (a cat again, a zero tensor per call, a re-plan) fails the test.
"""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from opcount import count_ops, format_ops  # noqa: E402

#: The most aten ops one patched layer may add (one adapter, strength 1, no mask), and the per-call plan.
MAX_PER_LAYER = 33
MAX_PLAN = 4


def _setup(sd1, batch, **apply):
    core = sd1.core
    patched = core.comfy.apply_patch.apply_dreamcache(sd1.model, sd1.adapter, sd1.cache, **apply)
    patch = core.comfy.apply_patch.find_patch(patched)
    dm = sd1.model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = sd1.positive[0][0].expand(batch, -1, -1)
    t = torch.full((batch,), 500.0)
    to = {"sigmas": torch.full((batch,), 5.0), "cond_or_uncond": [0] * 1}
    return dm, patch, x, t, ctx, to


@pytest.mark.parametrize("batch", [1, 2])
def test_ops_added_per_patched_layer_stay_at_the_reached_count(sd1, batch):
    dm, patch, x, t, ctx, to = _setup(sd1, batch)
    r = count_ops(dm, patch, x, t, ctx, to)
    print(format_ops(r))
    assert r["layers"] == len(sd1.adapter.layers) and r["plan_calls"] == 1
    assert r["per_layer"] <= MAX_PER_LAYER, format_ops(r)
    assert r["plan"] <= MAX_PLAN, format_ops(r)
