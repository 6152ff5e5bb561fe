#!/usr/bin/env bash
# Issue 16's GPU measurements, as one script a CUDA machine runs as is (about 10 minutes on one H200):
#   COMFYUI_PATH=/path/to/ComfyUI bash benchmarks/gpu_check.sh [OUT_DIR]
# Writes one JSON per run into OUT_DIR (default bench_out/gpu; a relative path is from the repo root) and prints the
# markdown tables and a summary. No weights needed. Without a CUDA GPU it says so and exits 2.
set -u
PY=${PYTHON:-$(command -v python || command -v python3)}
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-bench_out/gpu}" && cd "${1:-bench_out/gpu}" && pwd)  # a relative OUT_DIR: from the repo root
run() {  # name, then bench.py arguments
  local name=$1; shift
  echo "=== $name: $*"
  timeout 900 "$PY" benchmarks/bench.py --device cuda --warmup 5 --repeats 20 --attention pytorch "$@" \
    --out "$OUT/$name.json" || echo "!!! $name failed (exit $?)"
}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check.sh: $PY has no CUDA GPU to use (torch.cuda.is_available() is False); run it on a GPU machine." >&2
  exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
run sd15_fp16_b1 --family sd15 --res 512 --dtype fp16 --ops
run sd15_fp16_b4 --family sd15 --res 512 --dtype fp16 --batch 4
run sdxl_fp16_b1 --family sdxl --res 1024 --dtype fp16
run sd21_fp16_b1 --family sd21 --res 512 --dtype fp16
run sd15_bf16_b1 --family sd15 --res 512 --dtype bf16
run sd15_fp16_b1_compile --family sd15 --res 512 --dtype fp16 --compile --warmup 3 --repeats 10
echo "targets (issue 16): SD1.5 eval <= 1.06 at batch 1 and 4, joint <= 1.06 x CFG, combined <= 1.10 x CFG, SDXL eval <= 1.06"
"$PY" - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
runs = {n[:-5]: json.load(open(os.path.join(out, n))) for n in sorted(os.listdir(out)) if n.endswith(".json")}
print("| run | eval DC / base | joint / CFG | combined / CFG | cache pass / eval |")
print("|---|---|---|---|---|")
for n, r in runs.items():
    q = r["ratios"]
    print(f"| {n} | " + " | ".join(f"{q[k]:.3f}" for k in ("eval_dreamcache / eval_base", "step_joint / step_cfg",
                                                              "step_combined / step_cfg", "cache_pass / eval_base")) + " |")
e, c = runs.get("sd15_fp16_b1"), runs.get("sd15_fp16_b1_compile")
if e and c:  # what torch.compile gains: compiled time / eager time of the same measure
    for k in ("eval_base", "eval_dreamcache", "step_cfg", "step_joint", "step_combined"):
        print(f"compiled / eager, {k}: {c['timings_s'][k]['median'] / e['timings_s'][k]['median']:.3f}")
PYEOF
