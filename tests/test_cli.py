"""``python -m dreamcache convert|info`` (no ComfyUI): the documented way to turn the released .pt into the
pack's safetensors format. Protects: lossless conversion with recorded family, refusal to overwrite, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from dreamcache.core.adapter_io import read_adapter

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, "-m", "dreamcache", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_convert_and_info(golden_path, tmp_path):
    src = golden_path / "golden_public_adapter.pt"
    dst = tmp_path / "adapter.safetensors"
    r = run("convert", src, dst, "--family", "sd2")
    assert r.returncode == 0, r.stderr
    assert "5 layers" in r.stdout and "base family sd2" in r.stdout
    a, b = read_adapter(str(src)), read_adapter(str(dst))
    assert b.family == "sd2"
    for ref in a.layers:
        for p, t in a.tensors[ref].items():
            assert torch.equal(t, b.tensors[ref][p])
    r = run("convert", src, dst)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run("info", dst)
    info = json.loads(r.stdout)
    assert info["kind"] == "adapter" and info["family"] == "sd2" and len(info["layers"]) == 5
    r = run("convert", src, tmp_path / "h.safetensors", "--dtype", "fp16")
    assert r.returncode == 0 and "unknown" in r.stdout
    assert (tmp_path / "h.safetensors").stat().st_size < dst.stat().st_size * 0.6


def test_convert_errors(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    r = run("convert", tmp_path / "bad.pt")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "could not be read" in r.stderr
    assert "Traceback" not in r.stderr


def test_info_on_a_cache(tmp_path):
    from dreamcache.core.cache import from_captures, save_cache
    from dreamcache.core.layers import LayerRef

    save_cache(from_captures({LayerRef("middle_block.1"): torch.randn(1, 8, 2, 2)}, model_family="sd1"),
               str(tmp_path / "c.safetensors"))
    info = json.loads(run("info", tmp_path / "c.safetensors").stdout)
    assert info["kind"] == "cache" and info["layers"] == {"middle_block.1": [1, 4, 8]}
