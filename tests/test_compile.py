"""DreamCache under torch.compile (issue 16), on the tiny SD1 model on the CPU.

Protects: a patched diffusion model compiles as one graph with no graph break (``torch._dynamo.explain``); under
ComfyUI's own TorchCompileModel mechanism (``set_torch_compile_wrapper``, what the node calls) combined guidance
compiles once and never again from one sampling step to the next (a counting backend); the compiled model gives
the eager output. The plan is made outside the compiled diffusion model (PrePlanWrapper), so the graph sees the
same memoised plan every step. ComfyUI's CPU default attention (sub-quadratic) calls psutil and breaks graphs by
itself, so these tests use its PyTorch attention, as a GPU install does. The Inductor test is the slow one (it
compiles C++ on the CPU); the others use Dynamo with the eager backend.
"""
from __future__ import annotations

import os

import pytest
import torch

SIGMAS = [9.0, 5.0, 2.0, 0.0]


@pytest.fixture
def pytorch_attention(sd1, monkeypatch):
    import comfy.ldm.modules.attention as A

    monkeypatch.setattr(A, "optimized_attention", A.attention_pytorch)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(sd1, batch=2):
    core = sd1.core
    patched = core.comfy.apply_patch.apply_dreamcache(sd1.model, sd1.adapter, sd1.cache)
    patch = core.comfy.apply_patch.find_patch(patched)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = sd1.positive[0][0].expand(batch, -1, -1)
    to = patch.transformer_options({"sigmas": torch.full((batch,), 5.0), "cond_or_uncond": [0, 1]})
    return patched, patch, x, torch.full((batch,), 500.0), ctx, to


def _sample(sd1, model, sigmas):
    import comfy.samplers

    g = sd1.core.comfy.guidance.make_guider(model, sd1.positive, sd1.negative, 7.5, 3.0, "combined")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return g.sample(x, torch.zeros_like(x), comfy.samplers.sampler_object("euler"), torch.tensor(sigmas),
                        disable_pbar=True, seed=0)


def test_patched_diffusion_model_compiles_without_graph_break(sd1, pytorch_attention):
    _, patch, x, t, ctx, to = _inputs(sd1)
    dm = sd1.model.model.diffusion_model
    with torch.inference_mode():
        ex = torch._dynamo.explain(dm)(x, t, context=ctx, transformer_options=dict(to))
    in_ours = [b for b in ex.break_reasons if any("dreamcache" in f.filename for f in b.user_stack)]
    assert not in_ours, [b.reason for b in in_ours]
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [b.reason for b in ex.break_reasons]


def test_torch_compile_model_node_compiles_once_across_steps_and_branches(sd1, pytorch_attention):
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    patched, *_ = _inputs(sd1)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = patched.clone()
    set_torch_compile_wrapper(compiled, backend=counting_backend)  # what TorchCompileModel does, our backend
    _sample(sd1, compiled, SIGMAS[:1] + [0.0])  # one step of combined guidance: compiles
    after_first = len(graphs)
    assert after_first >= 1
    got = _sample(sd1, compiled, SIGMAS)  # three more steps, other sigmas, all three branches: no recompilation
    assert len(graphs) == after_first, f"recompiled {len(graphs) - after_first} times between sampling steps"
    want = _sample(sd1, patched, SIGMAS)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.skipif(not os.environ.get("DREAMCACHE_INDUCTOR_TEST"),
                    reason="Inductor compiles C++ (~145 s on 2 CPU cores); set DREAMCACHE_INDUCTOR_TEST=1 to run it")
def test_inductor_compiled_patched_model_matches_eager(sd1, pytorch_attention):
    """Inductor on the CPU (compiles C++; the slowest test here): the compiled patched U-Net equals eager to 1e-5."""
    _, patch, x, t, ctx, to = _inputs(sd1)
    dm = sd1.model.model.diffusion_model
    compiled = torch.compile(dm, backend="inductor")
    with torch.inference_mode():
        want = dm(x, t, context=ctx, transformer_options=dict(to))
        got = compiled(x, t, context=ctx, transformer_options=dict(to))
        base = dm(x, t, context=ctx)
    assert (got - want).abs().max().item() <= 1e-5
    assert (want - base).abs().max().item() > 1e-4  # DreamCache did change the output (the check can fail)
