"""benchmarks/bench.py runs end to end and reports the sizes the issue states: 25,207,040 adapter parameters for
SD1.5, an fp16 adapter file of 50.4 MB, a cache whose size follows the layers' token counts, and FLOPs added per
evaluation equal to the adapter's own matmuls (K/V memoised). The arithmetic is the point, so the script runs on a
narrow SD1.5-shaped U-Net (``--model-channels 32``: every size scales with the width) at 64 px, and the stated
full-size numbers are checked through the same formulas at width 320. Protects the benchmark script from silent
breakage (CI, without ComfyUI, skips it) and the reported numbers from drifting. Timings are not asserted.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import COMFYUI, NO_COMFY, ROOT, TEST_THREADS

#: (tokens at 64 px, channels as a multiple of the base width) of SD1.5's five DreamCache layers: middle_block.1
#: (1x1, 4w), output_blocks.4.1 (2x2, 4w), 6.1 and 8.1 (4x4, 2w), 10.1 (8x8, w).
LAYERS_64PX = [(1, 4), (4, 4), (16, 2), (16, 2), (64, 1)]


def adapter_parameters(width: int) -> int:
    """Per layer of C channels: norm2_mem (2C), to_q/to_k/to_v (3C²), to_out (C² + C), linear_cat (2C² + C)."""
    return sum(6 * (m * width) ** 2 + 4 * m * width for _, m in LAYERS_64PX)


def cache_values(width: int) -> int:
    return sum(n * m * width for n, m in LAYERS_64PX)


def added_flops(width: int) -> int:
    """Exactly the adapter's matmuls with K/V memoised: per layer to_q (2·N·C²), the two halves of linear_cat with
    to_out folded into the second (2·N·C² each; issue 16: to_out is no longer a separate matmul) and the attention's
    two matmuls (2·N·M·C each, M = N cached tokens). A K/V projection recomputed per call, or any other extra matmul
    in the hot path, would break the equality."""
    return sum(6 * n * (m * width) ** 2 + 4 * n * n * m * width for n, m in LAYERS_64PX)


def test_the_stated_full_size_numbers_follow_from_the_formulas():
    """SD1.5 (width 320): 25,207,040 adapter parameters, 47,360 cache values at 64 px (3,031,040 at 512 px),
    173,757,440 FLOPs added per evaluation at 64 px."""
    assert adapter_parameters(320) == 25_207_040
    assert cache_values(320) == 1 * 1280 + 4 * 1280 + 16 * 640 + 16 * 640 + 64 * 320 == 47_360
    assert cache_values(320) * 64 == 3_031_040
    assert added_flops(320) == 173_757_440


@pytest.mark.skipif(COMFYUI is None, reason=NO_COMFY)
def test_bench_runs_and_reports_the_stated_sizes(tmp_path):
    width = 32
    out = tmp_path / "bench.json"
    env = {**os.environ, "COMFYUI_PATH": str(COMFYUI)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--family", "sd15", "--res", "64",
                           "--model-channels", str(width), "--warmup", "0", "--repeats", "1", "--threads",
                           TEST_THREADS, "--flops", "--out", str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert set(r["ratios"]) == {"eval_dreamcache / eval_base", "step_joint / step_cfg", "step_combined / step_cfg",
                                "cache_pass / eval_base"}
    assert all(math.isfinite(v) and v > 0 for v in r["ratios"].values())
    params = adapter_parameters(width)
    assert r["memory"]["adapter_params"] == params
    # fp16 file = 2 bytes per parameter + a small safetensors header; fp32 = 4 bytes
    assert 2 * params < r["sizes_bytes"]["adapter_fp16"] < 2 * params + 64_000
    assert 4 * params < r["sizes_bytes"]["adapter_fp32"] < 4 * params + 64_000
    values = cache_values(width)
    assert r["memory"]["cache_values"] == values
    assert values * 2 < r["sizes_bytes"]["cache_fp16"] < values * 2 + 16_000
    assert r["flops"]["added"] == added_flops(width)
    assert "| eval_dreamcache / eval_base |" in proc.stdout and "GFLOP" in proc.stdout


def test_gpu_benchmarks_without_a_gpu_say_so_in_one_sentence(tmp_path):
    """A GPU run started where torch sees no CUDA GPU (bench.py --device cuda, gpu_check.sh): one clear line and a
    non-zero exit, not ComfyUI's traceback six times over. Needs no ComfyUI (the check comes first)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the no-GPU message cannot be shown here")
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"} | {"PYTHON": sys.executable}
    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--device", "cuda"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert bench.returncode == 2 and "sees no CUDA GPU" in bench.stderr and "Traceback" not in bench.stderr
    script = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert script.returncode == 2 and "no CUDA GPU" in script.stderr, script.stdout + script.stderr
    assert "===" not in script.stdout  # no benchmark was started
