"""Adapter files: strict, safe loading of the reference .pt and the pack's .safetensors (no ComfyUI needed).

Protects: every key recognised (unknown/missing/mis-shaped keys are errors that name them), weights_only loading
(a pickle with code is refused), conversion .pt -> .safetensors with metadata is lossless, parameter counts.
"""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dreamcache.core.adapter import DreamCacheAdapter, layer_parameter_count
from dreamcache.core.adapter_io import ADAPTER_FORMAT, convert_adapter, read_adapter, save_adapter
from dreamcache.core.errors import DreamCacheError
from dreamcache.core.layers import SD_LAYERS, SDXL_LAYERS, LayerRef

SD_CHANNELS = {"middle_block.1": 1280, "output_blocks.4.1": 1280, "output_blocks.6.1": 640, "output_blocks.8.1": 640,
               "output_blocks.10.1": 320}


def small_adapter(seed=0, channels=None):
    channels = channels or {LayerRef("middle_block.1"): 16, LayerRef("output_blocks.4.1"): 16,
                            LayerRef("output_blocks.10.1"): 8}
    a = DreamCacheAdapter(channels)
    a.reset_reference_init(seed)
    return a


def test_parameter_count_of_the_released_layer_set():
    """6C²+4C per layer; the five SD layers hold 25,207,040 parameters (50.4 MB in fp16)."""
    assert layer_parameter_count(320) == 6 * 320 * 320 + 4 * 320
    total = sum(layer_parameter_count(SD_CHANNELS[r.module]) for r in SD_LAYERS)
    assert total == 25_207_040
    meta = DreamCacheAdapter({r: SD_CHANNELS[r.module] for r in SD_LAYERS}, device="meta")
    assert meta.parameter_count() == 25_207_040
    assert total * 2 / 1e6 == pytest.approx(50.41, abs=0.01)


def test_reference_pt_loads_with_weights_only_and_names_its_layers(golden_path):
    af = read_adapter(str(golden_path / "golden_public_adapter.pt"))
    assert af.layers == SD_LAYERS
    assert af.family is None  # a reference .pt cannot say its base model
    assert af.channels[LayerRef("output_blocks.10.1")] == 32 and af.channels[LayerRef("middle_block.1")] == 64
    assert sum(len(p) for p in af.tensors.values()) == 45


def test_pt_equals_golden_adapter_tensors(golden, golden_path):
    _, T = golden
    af = read_adapter(str(golden_path / "golden_public_adapter.pt"))
    for ref in af.layers:
        for p, t in af.tensors[ref].items():
            assert torch.equal(t, T["adapter." + ref.key_prefix + p])


def test_convert_pt_to_safetensors_roundtrip(tmp_path):
    a = small_adapter()
    torch.save(a.reference_state_dict(), tmp_path / "ref.pt")
    convert_adapter(str(tmp_path / "ref.pt"), str(tmp_path / "out.safetensors"), family="sd2")
    b = read_adapter(str(tmp_path / "out.safetensors"))
    assert b.family == "sd2" and b.metadata["format"] == ADAPTER_FORMAT
    assert json.loads(b.metadata["layers"])[0] == {"module": "middle_block.1", "block_index": 0, "channels": 16}
    rebuilt = b.build()
    for k, v in a.reference_state_dict().items():
        assert torch.equal(v, rebuilt.reference_state_dict()[k])


def test_fp16_conversion_halves_size(tmp_path):
    a = small_adapter()
    torch.save(a.reference_state_dict(), tmp_path / "ref.pt")
    convert_adapter(str(tmp_path / "ref.pt"), str(tmp_path / "f.safetensors"))
    convert_adapter(str(tmp_path / "ref.pt"), str(tmp_path / "h.safetensors"), dtype=torch.float16)
    b = read_adapter(str(tmp_path / "h.safetensors"))
    assert all(t.dtype == torch.float16 for p in b.tensors.values() for t in p.values())
    # the tensor data is half the fp32 file's (the JSON header and metadata are about the same size in both)
    payload = 4 * a.parameter_count()
    full, half = (tmp_path / "f.safetensors").stat().st_size, (tmp_path / "h.safetensors").stat().st_size
    assert full - half == pytest.approx(payload / 2, abs=256), (full, half, payload)
    # the values are the fp32 weights rounded to fp16, nothing else
    sd = a.reference_state_dict()
    for ref in b.layers:
        for p, t in b.tensors[ref].items():
            assert torch.equal(t, sd[ref.key_prefix + p].half()), ref.key_prefix + p


def _save_pt(tmp_path, sd, name="x.pt"):
    torch.save(sd, tmp_path / name)
    return str(tmp_path / name)


def test_unknown_key_is_an_error_naming_it(tmp_path):
    sd = small_adapter().reference_state_dict()
    sd["diffusion_model.middle_block.1.transformer_blocks.0.attn_mem.to_z.weight"] = torch.zeros(16, 16)
    with pytest.raises(DreamCacheError, match=r"unrecognised key.*to_z"):
        read_adapter(_save_pt(tmp_path, sd))


def test_missing_key_is_an_error_naming_it(tmp_path):
    sd = small_adapter().reference_state_dict()
    del sd["diffusion_model.output_blocks.4.1.transformer_blocks.0.attn_mem.to_k.weight"]
    with pytest.raises(DreamCacheError, match=r"output_blocks\.4\.1 is missing 'attn_mem\.to_k\.weight'"):
        read_adapter(_save_pt(tmp_path, sd))


def test_misshaped_key_is_an_error_naming_it(tmp_path):
    sd = small_adapter().reference_state_dict()
    sd["diffusion_model.output_blocks.10.1.transformer_blocks.0.linear_cat.weight"] = torch.zeros(8, 8)
    with pytest.raises(DreamCacheError, match=r"output_blocks\.10\.1 linear_cat\.weight has shape \(8, 8\), expected "
                                              r"\(8, 16\)"):
        read_adapter(_save_pt(tmp_path, sd))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(DreamCacheError, match="never unpickled|could not be read as a PyTorch tensor file"):
        read_adapter(str(path))
    assert "this must never run" not in capsys.readouterr().out


def test_torch_save_of_custom_object_is_refused(tmp_path):
    torch.save({"diffusion_model.middle_block.1.transformer_blocks.0.norm2_mem.weight": torch.nn.Linear(2, 2)},
               tmp_path / "m.pt")
    with pytest.raises(DreamCacheError, match="never unpickled"):
        read_adapter(str(tmp_path / "m.pt"))


def test_corrupt_and_foreign_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(DreamCacheError, match="could not be read as safetensors"):
        read_adapter(str(tmp_path / "junk.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DreamCacheError, match="could not be read as a PyTorch tensor file"):
        read_adapter(str(tmp_path / "junk.pt"))
    save_file({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 4)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(DreamCacheError, match="is not a DreamCache adapter"):
        read_adapter(str(tmp_path / "lora.safetensors"))
    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "something.else"})
    with pytest.raises(DreamCacheError, match="not a DreamCache adapter"):
        read_adapter(str(tmp_path / "other.safetensors"))
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(DreamCacheError, match="not a dict of tensors"):
        read_adapter(str(tmp_path / "list.pt"))
    with pytest.raises(DreamCacheError, match="does not exist"):
        read_adapter(str(tmp_path / "missing.safetensors"))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DreamCacheError, match="extension '.txt'"):
        read_adapter(str(tmp_path / "a.txt"))


def test_metadata_is_checked(tmp_path):
    a = small_adapter()
    save_adapter(str(tmp_path / "ok.safetensors"), a, family="sd1")
    assert read_adapter(str(tmp_path / "ok.safetensors")).family == "sd1"
    sd = a.reference_state_dict()
    save_file(sd, str(tmp_path / "newer.safetensors"), metadata={"format": ADAPTER_FORMAT, "format_version": "99"})
    with pytest.raises(DreamCacheError, match="version 99"):
        read_adapter(str(tmp_path / "newer.safetensors"))
    lie = {"format": ADAPTER_FORMAT, "format_version": "1", "layers": json.dumps([{"module": "middle_block.1",
                                                                                   "block_index": 0, "channels": 16}])}
    save_file(sd, str(tmp_path / "lie.safetensors"), metadata=lie)
    with pytest.raises(DreamCacheError, match="metadata lists layers"):
        read_adapter(str(tmp_path / "lie.safetensors"))
    save_file(sd, str(tmp_path / "fam.safetensors"), metadata={"format": ADAPTER_FORMAT, "base_family": "sd9"})
    with pytest.raises(DreamCacheError, match="unknown base family 'sd9'"):
        read_adapter(str(tmp_path / "fam.safetensors"))
    # a bare safetensors with reference key names is accepted (family unknown)
    save_file(sd, str(tmp_path / "bare.safetensors"))
    assert read_adapter(str(tmp_path / "bare.safetensors")).family is None


def test_convert_refuses_a_contradicting_family(tmp_path):
    a = small_adapter()
    save_adapter(str(tmp_path / "sd1.safetensors"), a, family="sd1")
    with pytest.raises(DreamCacheError, match="says it is for 'sd1', not 'sdxl'"):
        convert_adapter(str(tmp_path / "sd1.safetensors"), str(tmp_path / "x.safetensors"), family="sdxl")


def test_layer_set_comes_from_the_keys(tmp_path):
    chans = {r: 8 for r in SDXL_LAYERS}
    a = small_adapter(channels=chans)
    torch.save(a.reference_state_dict(), tmp_path / "xl.pt")
    assert read_adapter(str(tmp_path / "xl.pt")).layers == SDXL_LAYERS
    # a non-zero transformer block index is kept
    chans = {LayerRef("output_blocks.1.1", 1): 8}
    b = small_adapter(channels=chans)
    torch.save(b.reference_state_dict(), tmp_path / "idx.pt")
    assert read_adapter(str(tmp_path / "idx.pt")).layers == (LayerRef("output_blocks.1.1", 1),)


def test_identity_init_makes_linear_cat_pass_a_through():
    a = small_adapter()
    a.make_identity()
    layer = a.layer(LayerRef("middle_block.1"))
    x = torch.randn(2, 5, 16)
    other = torch.randn(2, 5, 16)
    assert torch.equal(layer.linear_cat(torch.cat([x, other], -1)), x)
