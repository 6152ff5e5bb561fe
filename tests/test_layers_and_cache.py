"""Layer naming, the cache container and its files, reference preparation, and the capture hooks (no ComfyUI).

Protects: the ComfyUI block ids of the five paper layers; caches keep the raw (un-normalised) inputs flattened to
tokens, concatenate multi-reference tokens, save/load with checked metadata; IMAGE with alpha/gray/odd sizes is
handled; captures stop the pass early and leave no hook behind.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dreamcache.core.cache import FeatureCache, concat_caches, from_captures, load_cache, save_cache
from dreamcache.core.capture import StopPass, capture_inputs, run_and_capture
from dreamcache.core.errors import DreamCacheError
from dreamcache.core.image import fit_reference, to_rgb_on_white
from dreamcache.core.layers import SD_LAYERS, LayerRef, sort_layers


def test_paper_layers_and_comfy_block_ids():
    assert [r.hook_key for r in SD_LAYERS] == [(("middle", 0), 0), (("output", 4), 0), (("output", 6), 0), (("output",
                                                                                                             8), 0),
                                               (("output", 10), 0)]
    # the paper's rule: the middle transformer and every second decoder transformer (SD's are output_blocks.3-11)
    decoder = [f"output_blocks.{i}.1" for i in range(3, 12)]
    assert SD_LAYERS == (LayerRef("middle_block.1"), *(LayerRef(m) for i, m in enumerate(decoder) if i % 2 == 1))
    assert LayerRef("input_blocks.7.1", 1).hook_key == (("input", 7), 1)
    assert sort_layers([LayerRef("output_blocks.10.1"), LayerRef("middle_block.1"),
                        LayerRef("input_blocks.1.1")])[0].module == "input_blocks.1.1"
    with pytest.raises(DreamCacheError):
        LayerRef("output_blocks.x")


def _caps(n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {LayerRef("middle_block.1"): torch.randn(n, 16, 2, 2, generator=g),
            LayerRef("output_blocks.10.1"): torch.randn(n, 8, 4, 4, generator=g)}


def test_from_captures_flattens_without_normalising():
    caps = _caps(2)
    c = from_captures(caps)
    x = caps[LayerRef("output_blocks.10.1")]
    t = c.tokens[LayerRef("output_blocks.10.1")]
    assert t.shape == (1, 2 * 16, 8)  # two references concatenated along the tokens
    assert torch.equal(t[0, :16], x[0].flatten(1).T) and torch.equal(t[0, 16:], x[1].flatten(1).T)
    p = from_captures(caps, per_image=True)
    assert p.tokens[LayerRef("output_blocks.10.1")].shape == (2, 16, 8) and p.batch == 2
    assert c.numel() == 2 * (16 * 4 + 8 * 16)


def test_save_load_roundtrip_and_dtype(tmp_path):
    c = from_captures(_caps(), model_family="sd2", sigma=0.0413, seed=7, resolution=(512, 512), adapter="a.pt")
    save_cache(c, str(tmp_path / "c.safetensors"))
    d = load_cache(str(tmp_path / "c.safetensors"))
    assert d.model_family == "sd2" and d.seed == 7 and d.resolution == (512, 512)
    assert d.adapter == "a.pt" and d.sigma == 0.0413
    for r in c.tokens:
        assert torch.equal(c.tokens[r], d.tokens[r])
    save_cache(c, str(tmp_path / "h.safetensors"), dtype=torch.float16)
    h = load_cache(str(tmp_path / "h.safetensors"))
    assert all(t.dtype == torch.float16 for t in h.tokens.values())


def test_cache_file_errors(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(DreamCacheError, match="not a DreamCache cache file"):
        load_cache(str(tmp_path / "a.safetensors"))
    c = from_captures(_caps())
    save_cache(c, str(tmp_path / "ok.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ok.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    bad = dict(meta, references="3")
    save_file(tensors, str(tmp_path / "refs.safetensors"), metadata=bad)
    with pytest.raises(DreamCacheError, match="'refs.safetensors' layer .* expected"):
        load_cache(str(tmp_path / "refs.safetensors"))
    bad = dict(meta)
    del bad["layers"]
    save_file(tensors, str(tmp_path / "nolayers.safetensors"), metadata=bad)
    with pytest.raises(DreamCacheError, match="missing or unreadable cache metadata"):
        load_cache(str(tmp_path / "nolayers.safetensors"))
    layers = json.loads(meta["layers"])
    layers[0]["channels"] = 99
    save_file(tensors, str(tmp_path / "ch.safetensors"), metadata=dict(meta, layers=json.dumps(layers)))
    with pytest.raises(DreamCacheError, match="channels but its metadata says 99"):
        load_cache(str(tmp_path / "ch.safetensors"))
    save_file(tensors, str(tmp_path / "v.safetensors"), metadata=dict(meta, format_version="7"))
    with pytest.raises(DreamCacheError, match="version 7"):
        load_cache(str(tmp_path / "v.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(DreamCacheError, match="could not be read"):
        load_cache(str(tmp_path / "junk.safetensors"))


def test_concat_caches():
    a, b = from_captures(_caps(1, 0), model_family="sd1"), from_captures(_caps(2, 1), model_family="sd1")
    c = concat_caches([a, b])
    r = LayerRef("middle_block.1")
    assert c.references == 3 and c.tokens[r].shape == (1, 12, 16)
    assert torch.equal(c.tokens[r][:, :4], a.tokens[r])
    with pytest.raises(DreamCacheError, match="different model families"):
        concat_caches([a, from_captures(_caps(), model_family="sd2")])


def test_feature_cache_rejects_inconsistent_tokens():
    r = LayerRef("middle_block.1")
    with pytest.raises(DreamCacheError, match="expected"):
        FeatureCache(tokens={r: torch.zeros(1, 5, 4)}, spatial={r: (2, 2)})


def test_rgb_on_white_handles_alpha_gray_and_channels():
    rgba = torch.zeros(1, 4, 4, 4)
    rgba[..., 3] = 0.0  # fully transparent black -> white
    assert torch.equal(to_rgb_on_white(rgba), torch.ones(1, 4, 4, 3))
    rgba[..., :3] = 0.2
    rgba[..., 3] = 1.0
    assert torch.allclose(to_rgb_on_white(rgba), torch.full((1, 4, 4, 3), 0.2))
    gray = torch.full((2, 4, 4, 1), 0.5)
    assert to_rgb_on_white(gray).shape == (2, 4, 4, 3)
    with pytest.raises(DreamCacheError, match="5 channels"):
        to_rgb_on_white(torch.zeros(1, 4, 4, 5))


def test_fit_reference_fits_the_cache_pass_resolution():
    img = torch.zeros(1, 100, 50, 3)  # black, tall
    pad = fit_reference(img, 64, "pad")
    assert pad.shape == (1, 64, 64, 3)
    assert torch.allclose(pad[0, :, :8], torch.ones(64, 8, 3), atol=1e-4)  # white bars left and right
    assert pad[0, 32, 32].max() < 0.01  # subject kept in the centre
    assert fit_reference(img, 64, "stretch").max() < 0.01
    assert fit_reference(img, 64, "crop").shape == (1, 64, 64, 3)
    keep = fit_reference(torch.rand(1, 101, 77, 3), 0)
    assert keep.shape == (1, 96, 72, 3)
    with pytest.raises(DreamCacheError, match="at least 64x64"):
        fit_reference(torch.rand(1, 60, 60, 3), 0)
    with pytest.raises(DreamCacheError, match="multiple of 8"):
        fit_reference(img, 100)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.ran_c = 0

    def forward(self, x):
        x = self.a(x)
        x = self.b(x)
        self.ran_c += 1
        return self.c(x)


def test_capture_stops_early_and_removes_hooks():
    toy = _Toy()
    x = torch.randn(2, 4)
    got = run_and_capture({"a": toy.a, "b": toy.b}, lambda: toy(x))
    assert torch.equal(got["a"], x) and torch.equal(got["b"], toy.a(x))
    assert toy.ran_c == 0  # the pass stopped before the rest of the model ran
    assert not toy.a._forward_pre_hooks and not toy.b._forward_pre_hooks
    toy(x)
    assert toy.ran_c == 1


def test_capture_reports_layers_never_reached_and_cleans_up_on_error():
    toy = _Toy()
    extra = torch.nn.Linear(4, 4)
    with pytest.raises(DreamCacheError, match="never reached extra"):
        run_and_capture({"a": toy.a, "extra": extra}, lambda: toy(torch.randn(1, 4)))
    with pytest.raises(RuntimeError):
        with capture_inputs({"a": toy.a}):
            raise RuntimeError("boom")
    assert not toy.a._forward_pre_hooks and not extra._forward_pre_hooks
    with pytest.raises(StopPass):
        with capture_inputs({"a": toy.a}):
            toy(torch.randn(1, 4))
