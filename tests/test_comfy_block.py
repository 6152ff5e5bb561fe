"""ComfyUI's real BasicTransformerBlock with the DreamCache hooks, against the independent reference block.

Protects: the hooks compute the reference math inside ComfyUI's block (SD1 conv proj_in and SD2 linear layouts,
heads from the block), exactly the base block when off, with norm1 weights near zero, with ComfyUI's optimized
attention; and every node of the pack is registered with a permanent prefixed id, tooltips and a description.
"""
from __future__ import annotations

import zlib

import oracle
import pytest
import torch
from helpers import random_adapter

PERMANENT_IDS = {
    "DreamCacheLoader", "DreamCacheBuildFeatureCache", "DreamCacheApply", "DreamCacheGuider",
                 "DreamCacheDualGuidanceSampler",
    "DreamCacheSave", "DreamCacheLoad", "DreamCacheCombine", "DreamCacheSAMLoader", "DreamCacheSubjectMask",
}


def test_every_node_registered_with_prefix_tooltips_and_description(pack):
    import nodes

    module = f"custom_nodes.{pack.__name__.split('/')[-1]}"
    ours = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if getattr(v, "RELATIVE_PYTHON_MODULE", "") == module}
    assert PERMANENT_IDS <= set(ours), f"node ids are permanent API; missing: {PERMANENT_IDS - set(ours)}"
    for node_id, cls in ours.items():
        assert node_id.startswith("DreamCache"), node_id
        schema = cls.GET_SCHEMA()
        assert schema.category.startswith("DreamCache"), node_id
        assert schema.description and len(schema.description) > 20, node_id
        for i in schema.inputs:
            assert i.tooltip, f"{node_id}.{i.id} has no tooltip"
        for o in schema.outputs:
            assert o.tooltip, f"{node_id} output {o.display_name} has no tooltip"
        info = cls.GET_NODE_INFO_V1()
        assert info["name"] == node_id


def _block_and_options(core, model, ref):
    blk = model.get_model_object(f"diffusion_model.{ref.module}").transformer_blocks[ref.block_index]
    return blk


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_real_block_matches_reference(pack, family):
    from tiny_models import make_model

    core = pack.dreamcache
    model = make_model(family, seed=3)
    adapter = random_adapter(core, model, seed=4)
    for ref in adapter.layers:
        blk = _block_and_options(core, model, ref)
        c = adapter.channels[ref]
        heads = blk.n_heads
        g = torch.Generator().manual_seed(zlib.crc32(ref.module.encode()))  # stable across processes, unlike hash(str)
        x = torch.randn(2, 24, c, generator=g)
        text = torch.randn(2, 7, blk.attn2.to_k.in_features, generator=g)
        caps = {ref: torch.randn(1, c, 3, 4, generator=g) * 2}
        single = core.core.adapter_io.AdapterFile(name=str(ref), channels={ref: c}, tensors={ref: adapter.tensors[ref]})
        entry = core.core.patch.PatchEntry(single.build(), core.core.cache.from_captures(caps))
        patch = core.core.patch.DreamCachePatch([entry], attention=core.comfy.apply_patch.comfy_attention)
        to = {"patches": {"attn1_output_patch": [patch.output_hook], "middle_patch": [patch.middle_hook]},
              "block": ref.comfy_block, "block_index": ref.block_index}

        def run(to):
            def ex(x, ts, ctx, y, control, to, **kw):
                return blk(x, context=ctx, transformer_options=to)
            return patch.wrapper(ex, x, None, text, None, None, to)

        with torch.inference_mode():
            got = run(to)
            base = run({**to, "patches": {}})
            off = run({**to, "cond_or_uncond": [0], "dreamcache_image": (False,)})
        sd = {k: v.float() for k, v in blk.state_dict().items()}
        want = oracle.dreamcache_block(x, text, entry.cache.tokens[ref], sd, adapter.tensors[ref], heads)
        want_base = oracle.dreamcache_block(x, text, None, sd, None, heads)
        assert (got - want).abs().max().item() < 5e-5, ref
        assert (base - want_base).abs().max().item() < 5e-5
        assert torch.equal(off, base)
        assert (got - base).abs().max().item() > 1e-3


def test_real_block_exact_with_norm1_weights_at_zero(pack):
    from tiny_models import make_model

    core = pack.dreamcache
    model = make_model("sd2", seed=5)
    ref = core.core.layers.LayerRef("output_blocks.4.1")
    adapter = random_adapter(core, model, seed=6, layers=[ref])
    blk = _block_and_options(core, model, ref)
    with torch.no_grad():
        blk.norm1.weight[:16] = 0.0
        blk.norm1.weight[16:32] = 1e-9
    c = adapter.channels[ref]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, c, generator=g) * 50
    text = torch.randn(1, 7, blk.attn2.to_k.in_features, generator=g)
    entry = core.core.patch.PatchEntry(adapter.build(), core.core.cache.from_captures({ref: torch.randn(1, c, 2, 2,
                                                                                                        generator=g)}))
    patch = core.core.patch.DreamCachePatch([entry])
    to = {"patches": {"attn1_output_patch": [patch.output_hook], "middle_patch": [patch.middle_hook]},
          "block": ref.comfy_block, "block_index": 0}
    with torch.inference_mode():
        got = patch.wrapper(lambda x, ts, ctx, y, cn, to, **kw: blk(x, context=ctx, transformer_options=to), x, None,
                            text, None, None, to)
    sd = {k: v.double() for k, v in blk.state_dict().items()}
    want = oracle.dreamcache_block(x.double(), text.double(), entry.cache.tokens[ref].double(), sd,
                                           {k: v.double() for k, v in adapter.tensors[ref].items()}, blk.n_heads)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-6


def test_cpu_uses_the_fused_kernel_where_comfy_falls_back_to_sub_quad(pack, monkeypatch):
    """The adapter attention follows ComfyUI's choice, except CPU sub-quad/split -> ComfyUI's attention_pytorch."""
    import comfy.ldm.modules.attention as A

    core = pack.dreamcache
    calls = []
    for name in ("attention_pytorch", "attention_sub_quad", "attention_basic"):
        monkeypatch.setattr(A, name, (lambda n: lambda *a, **k: calls.append(n) or a[0])(name))
    q = torch.zeros(1, 4, 8)
    monkeypatch.setattr(A, "optimized_attention", A.attention_sub_quad)
    core.comfy.apply_patch.comfy_attention(q, q, q, 2)
    monkeypatch.setattr(A, "optimized_attention", A.attention_basic)
    core.comfy.apply_patch.comfy_attention(q, q, q, 2)
    assert calls == ["attention_pytorch", "attention_basic"]
