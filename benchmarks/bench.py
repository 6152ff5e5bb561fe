"""DreamCache cost at full model size with random weights (real architecture, so timings are real).

    python benchmarks/bench.py [--family sd15|sd21|sdxl] [--res 512] [--device cpu|cuda] [--dtype fp32|fp16|bf16]
                               [--warmup 1] [--repeats 3] [--attention comfy-default|pytorch] [--flops] [--mask]
                               [--batch N] [--compile] [--ops]
                               [--comfyui PATH] [--out bench_out/NAME.json]

Measures, with warm-up and repeats (median, min, max):
1. one denoiser evaluation: base vs ApplyDreamCache;
2. one sampling step: plain CFG (2 evaluations) vs DreamCache joint and combined guidance;
3. the cache pass against one base evaluation;
4. memory added by the adapter and the cache: what stays resident (adapter weights, K/V memo, cache; counted from
   the tensors) and the working memory of one evaluation above what was resident when it started (CUDA max
   allocated, or the process's RSS sampled every 2 ms on the CPU);
5. adapter size on disk (fp16 / fp32) and cache size per subject;
6. with --flops, the FLOPs of one U-Net forward with and without DreamCache (what the overhead cannot go below);
7. with --mask, one evaluation with a soft left-half mask on Apply DreamCache against the same without a mask;
8. with --ops, the aten operations DreamCache adds per patched layer and per model call (benchmarks/opcount.py).
``--batch N`` evaluates N latents against a cache built from ONE reference (the cache pass runs on one latent).
``--compile`` puts ComfyUI's torch.compile wrapper (what the TorchCompileModel node does, Inductor) on the base
and the patched model alike; use --warmup 2 or more so the compilation stays out of the timings.
Prints a markdown table of ratios and writes it as JSON. Needs ComfyUI (COMFYUI_PATH or --comfyui); no weight files.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rss import PeakRSS  # noqa: E402

from dreamcache.comfy.env import import_comfyui  # noqa: E402

FAMILIES = {
    "sd15": dict(model="SD15", context_dim=768, use_linear_in_transformer=False, num_heads=8, num_head_channels=-1),
    "sd21": dict(model="SD20", context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64),
    "sdxl": dict(model="SDXL", context_dim=2048, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def unet_config(family: str, model_channels: int = 320) -> dict:
    f = FAMILIES[family]
    cfg = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False,
           "in_channels": 4, "model_channels": model_channels, "use_temporal_attention": False,
           "use_temporal_resblock": False,
           "context_dim": f["context_dim"], "use_linear_in_transformer": f["use_linear_in_transformer"],
           "num_heads": f["num_heads"], "num_head_channels": f["num_head_channels"]}
    if family == "sdxl":
        cfg.update(adm_in_channels=2816, num_classes="sequential", channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2],
                   transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                   transformer_depth_middle=10)
    else:
        cfg.update(adm_in_channels=None, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                   transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
                   transformer_depth_middle=1)
    return cfg


@torch.no_grad()
def random_init_(module: torch.nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            bound = 1.0 / p[0].numel() ** 0.5
            p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-bound, bound, generator=g))
        elif "norm" in name and name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()


def build_model(family: str, dtype, device, model_channels: int = 320):
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm

    cfg = unet_config(family, model_channels)
    mc = getattr(sm, FAMILIES[family]["model"])(cfg)
    mc.unet_config = dict(cfg)
    mc.set_inference_dtype(dtype, None)
    cls = comfy.model_base.SDXL if family == "sdxl" else comfy.model_base.BaseModel
    model = cls(mc, model_type=comfy.model_base.ModelType.EPS, device=torch.device("cpu"))
    random_init_(model.diffusion_model)
    model.diffusion_model.to(dtype)
    model.requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def conditioning(family: str, batch_text: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    dim = FAMILIES[family]["context_dim"]
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
    return [[torch.randn(1, 77, dim, generator=g), extra]]


def measure(guider, latent, sigma, warmup, repeats, device):
    """Time one model evaluation of ``guider`` (a sampler step's work) ``warmup + repeats`` times inside one
    guider.sample call, so model loading and cond encoding are outside the timings. Returns (times, working bytes):
    the peak memory during the timed calls minus the memory in use when they started."""
    import comfy.samplers

    times = []
    peak = {"bytes": 0, "start": 0}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    class Timing(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            sig = sigmas[0] * noise.new_ones([noise.shape[0]])
            for i in range(warmup + repeats):
                if i == warmup:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                        peak["start"] = torch.cuda.memory_allocated()
                    rss = PeakRSS().__enter__() if device.type == "cpu" else None
                    if rss is not None:
                        peak["start"] = rss.peak
                sync()
                t0 = time.perf_counter()
                model_wrap(noise, sig, **extra_args)
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak["bytes"] = torch.cuda.max_memory_allocated()
            else:
                rss.__exit__()
                peak["bytes"] = rss.peak
            return noise

    with torch.inference_mode():
        guider.sample(latent * sigma, torch.zeros_like(latent), Timing(), torch.tensor([sigma, 0.0]),
                      disable_pbar=True, seed=0)
    return times, peak["bytes"] - peak["start"]


def count_flops(model, patch, latent, cond, transformer_options: dict | None = None) -> dict:
    """FLOPs of one U-Net forward, base and with the DreamCache patch (K/V already memoised, so what every sampling
    step pays), counted by torch.utils.flop_counter. Attention is counted through an explicit matmul softmax, since the
    counter does not see the fused CPU SDPA kernel; the FLOPs are the same whichever kernel runs. The patch's
    attention recorder, if any, is kept; ``transformer_options`` are added to the call's (e.g. a sampling
    schedule)."""
    import comfy.ldm.modules.attention as A
    from torch.utils.flop_counter import FlopCounterMode

    def _addmm_flop(self_shape, a_shape, b_shape, out_shape=None, **kw):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    from dreamcache.core.patch import DreamCachePatch

    def explicit(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kw):
        assert mask is None and not skip_reshape and not skip_output_reshape
        b, n, c = q.shape
        d = c // heads
        q, k, v = (t.expand(b, -1, -1).reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        w = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1)
        return (w @ v).transpose(1, 2).reshape(b, n, c)

    dm = model.model.diffusion_model
    p = next(dm.parameters())
    counting = DreamCachePatch(list(patch.entries), attention=explicit, recorder=getattr(patch, "recorder", None))
    x, ctx = latent.to(p), cond[0][0].to(p)
    t = torch.full((x.shape[0],), 500.0, device=p.device)
    ctx = ctx.expand(x.shape[0], -1, -1)
    y = {"y": torch.zeros(1,
                          dm.label_emb[0][0].in_features).to(p)} if dm.num_classes is not None else {}  # SDXL's vector
    saved = A.optimized_attention
    out = {}
    try:
        A.optimized_attention = explicit  # CrossAttention looks the module global up at every call
        with torch.inference_mode():
            to = counting.transformer_options(dict(transformer_options or {}))
            dm(x, t, context=ctx, transformer_options=to, **y)  # memoises K/V, as the first sampling step does
            for name, opts in (("base", dict(transformer_options or {})), ("dreamcache", to)):
                # the folded linear_cat accumulates its second half with an in-place addmm_, which the counter's
                # table lacks: count it with addmm's formula
                fc = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flop})
                with fc:
                    dm(x, t, context=ctx, transformer_options=opts, **y)
                out[name] = fc.get_total_flops()
    finally:
        A.optimized_attention = saved
    out["added"] = out["dreamcache"] - out["base"]
    return out


def stats(ts):
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "n": len(ts)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=list(FAMILIES), default="sd15")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp32 on CPU, fp16 on CUDA")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--attention", choices=["comfy-default", "pytorch"], default="comfy-default",
                    help="ComfyUI's attention for the whole model (ours uses the same): its default for the device, or "
                         "--use-pytorch-cross-attention")
    ap.add_argument("--flops", action="store_true", help="also count the FLOPs of one U-Net forward, base and with "
                                                         "DreamCache")
    ap.add_argument("--mask", action="store_true",
                    help="also time one evaluation with a soft left-half mask on Apply DreamCache")
    ap.add_argument("--batch", type=int, default=1, help="latents per evaluation (the cache keeps one reference)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the diffusion model (ComfyUI's TorchCompileModel wrapper, Inductor), base and "
                         "DreamCache alike")
    ap.add_argument("--ops", action="store_true",
                    help="also count the aten ops DreamCache adds per patched layer (benchmarks/opcount.py)")
    ap.add_argument("--model-channels", type=int, default=320,
                    help="the U-Net's base width (320 in SD1.5/2.1/SDXL); smaller for a quick check of the script, "
                         "whose sizes and FLOPs scale with it (the test suite uses 32)")
    ap.add_argument("--comfyui")
    ap.add_argument("--out", help="JSON file (default bench_out/<family>_<res>_<device>_<dtype>.json)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but this torch sees no CUDA GPU (torch.cuda.is_available() is False): run it on a "
                 "GPU machine with a CUDA build of torch, or pass --device cpu.")
    dtype_name = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    dtype = DTYPES[dtype_name]
    torch.set_num_threads(args.threads)
    import_comfyui(args.comfyui, cpu=args.device == "cpu",
                   **({"use_pytorch_cross_attention": True} if args.attention == "pytorch" else {}))

    import comfy.ldm.modules.attention as comfy_attention
    import comfy.model_management as mm
    import comfy.samplers

    from dreamcache.comfy import apply_patch, cache_pass, guidance
    from dreamcache.comfy.model import model_channels_at
    from dreamcache.core.adapter import DreamCacheAdapter
    from dreamcache.core.adapter_io import adapter_file_of, save_adapter
    from dreamcache.core.cache import save_cache
    from dreamcache.core.layers import default_layers

    device = mm.get_torch_device()
    t_start = time.perf_counter()
    family_core = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}[args.family]
    model = build_model(args.family, dtype, device, args.model_channels)
    layers = default_layers(family_core)
    channels = {r: model_channels_at(model, r) for r in layers}
    module = DreamCacheAdapter(channels)
    module.reset_reference_init(0)
    adapter = adapter_file_of(module, family_core, name="random")
    h = w = args.res // 8
    latent = torch.randn(args.batch, 4, h, w, generator=torch.Generator().manual_seed(2))
    cond, neg = conditioning(args.family, seed=1), conditioning(args.family, seed=3)
    sigma = float(model.get_model_object("model_sampling").sigma(torch.tensor(500.0)))
    results = {"config": {"family": args.family, "res": args.res, "device": str(device), "dtype": dtype_name,
                          "threads": args.threads,
                          "warmup": args.warmup, "repeats": args.repeats, "torch": torch.__version__,
                          "attention": comfy_attention.optimized_attention.__name__, "mask": args.mask,
                          "batch": args.batch, "compile": args.compile, "model_channels": args.model_channels}}

    def single(m):
        g = guidance.PositiveOnlyGuider(m)
        g.inner_set_conds({"positive": cond})
        return g

    def cfg_guider(m):
        g = comfy.samplers.CFGGuider(m)
        g.set_conds(cond, neg)
        g.set_cfg(7.5)
        return g

    # ---- cache pass ------------------------------------------------------------------------------------------
    def cache_once():
        noise = torch.randn(latent[:1].shape, generator=torch.Generator().manual_seed(0))  # ONE reference
        return cache_pass.run_capture_pass(model, latent[:1], noise, cache_pass.pass_sigma(model), cond, layers)

    with torch.inference_mode():
        for _ in range(args.warmup):
            cache_once()
        pass_times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            caps = cache_once()
            if device.type == "cuda":
                torch.cuda.synchronize()
            pass_times.append(time.perf_counter() - t0)
    from dreamcache.core.cache import from_captures

    cache = from_captures({r: c.cpu() for r, c in caps.items()}, model_family=family_core)

    # ---- evaluations and steps -------------------------------------------------------------------------------
    patched = apply_patch.apply_dreamcache(model, adapter, cache)
    base_model = model
    if args.compile:
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        base_model, patched = model.clone(), patched.clone()
        set_torch_compile_wrapper(base_model, backend="inductor")
        set_torch_compile_wrapper(patched, backend="inductor")
    guiders = {
        "eval_base": single(base_model),
        "eval_dreamcache": single(patched),
        "step_cfg": cfg_guider(base_model),
        "step_joint": guidance.make_guider(patched, cond, neg, 7.5, 7.5, "joint"),
        "step_combined": guidance.make_guider(patched, cond, neg, 7.5, 5.0, "combined"),
    }
    if args.mask:  # the subject on the left half, with a soft 1/8-wide edge: every layer runs the masked path
        ramp = torch.linspace(0, 1, args.res)
        mask = ((0.5625 - ramp) * 8).clamp(0, 1).expand(1, args.res, args.res)
        guiders["eval_dreamcache_mask"] = single(apply_patch.apply_dreamcache(model, adapter, cache, mask=mask))
    # Interleaved rounds (A B C D E, A B C D E, ...): slow drift of the machine (other load, allocator state,
    # clock) spreads over every measure instead of biasing whichever ran first. Warm-up in the first round only.
    runs = {k: ([], 0) for k in guiders}
    warmup_s = {}  # wall time of each measure's warm-up calls (with --compile: where the compilation happens)
    for rnd in range(args.repeats):
        for k, g in guiders.items():
            t0 = time.perf_counter()
            ts, peak = measure(g, latent, sigma, args.warmup if rnd == 0 else 0, 1, device)
            if rnd == 0:
                warmup_s[k] = time.perf_counter() - t0 - sum(ts)
            runs[k] = (runs[k][0] + ts, max(runs[k][1], peak))
    kv_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k,
                   v in apply_patch.find_patch(patched)._kv.values())

    # ---- sizes -----------------------------------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as td:
        sizes = {}
        for name, dt in (("adapter_fp32", torch.float32), ("adapter_fp16", torch.float16)):
            p = os.path.join(td, name + ".safetensors")
            save_adapter(p, adapter, family=family_core, dtype=dt)
            sizes[name] = os.path.getsize(p)
        p = os.path.join(td, "cache.safetensors")
        save_cache(cache, p, dtype=torch.float16)
        sizes["cache_fp16"] = os.path.getsize(p)

    base_med = statistics.median(runs["eval_base"][0])
    cfg_med = statistics.median(runs["step_cfg"][0])
    results["timings_s"] = {k: stats(v[0]) for k, v in runs.items()} | {"cache_pass": stats(pass_times)}
    results["working_memory_bytes"] = {k: v[1] for k, v in runs.items()}
    results["warmup_s"] = warmup_s
    results["ratios"] = {
        "eval_dreamcache / eval_base": statistics.median(runs["eval_dreamcache"][0]) / base_med,
        "step_joint / step_cfg": statistics.median(runs["step_joint"][0]) / cfg_med,
        "step_combined / step_cfg": statistics.median(runs["step_combined"][0]) / cfg_med,
        "cache_pass / eval_base": statistics.median(pass_times) / base_med,
    }
    if args.mask:
        masked = statistics.median(runs["eval_dreamcache_mask"][0])
        plain = statistics.median(runs["eval_dreamcache"][0])
        results["ratios"]["eval_dreamcache_mask / eval_dreamcache"] = masked / plain
    results["memory"] = {
        "adapter_params": adapter.parameter_count(),
        "adapter_bytes_in_compute_dtype": adapter.parameter_count() * torch.empty((), dtype=dtype).element_size(),
        "cache_values": cache.numel(),
        "cache_bytes_fp16": cache.numel() * 2,
        "kv_memo_bytes": kv_bytes,
        "cache_bytes_resident": sum(t.numel() * t.element_size() for t in cache.tokens.values()),
        "working_eval_base": runs["eval_base"][1],
        "working_eval_dreamcache": runs["eval_dreamcache"][1],
        "working_added_by_dreamcache": runs["eval_dreamcache"][1] - runs["eval_base"][1],
        "working_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process RSS (sampled)",
    }
    results["sizes_bytes"] = sizes
    if args.flops:
        results["flops"] = count_flops(model, apply_patch.find_patch(patched), latent.to(device), cond)
    if args.ops:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from opcount import count_ops, format_ops

        dm = model.model.diffusion_model
        pp = next(dm.parameters())
        x = latent.to(pp)
        y = {"y": torch.zeros(x.shape[0], dm.label_emb[0][0].in_features).to(pp)} if dm.num_classes is not None else {}
        results["ops"] = count_ops(dm, apply_patch.find_patch(patched), x, torch.full((x.shape[0],), 500.0,
                                   device=pp.device), cond[0][0].to(pp).expand(x.shape[0], -1, -1), **y)
        print(format_ops(results["ops"]))
    results["wall_s"] = time.perf_counter() - t_start

    print(markdown(results))
    stem = f"{args.family}_{args.res}_{device.type}_{dtype_name}_{results['config']['attention']}"
    stem += (f"_b{args.batch}" if args.batch != 1 else "") + ("_compile" if args.compile else "")
    out = args.out or str(ROOT / "bench_out" / f"{stem}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {out}")
    return results


def markdown(r) -> str:
    c = r["config"]
    lines = [f"### {c['family']} {c['res']}² on {c['device']} ({c['dtype']}, {c['threads']} threads, attention "
             f"{c['attention']}, torch {c['torch']}, batch {c.get('batch', 1)}"
             f"{', compiled' if c.get('compile') else ''})", "",
             "| measure | median s | min s | max s |", "|---|---|---|---|"]
    for k, s in r["timings_s"].items():
        lines.append(f"| {k} | {s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    targets = {"eval_dreamcache / eval_base": "≤ 1.10", "step_joint / step_cfg": "≤ 1.12",
               "step_combined / step_cfg": "≤ 1.60", "cache_pass / eval_base": "≤ 1.10"}
    targets["eval_dreamcache_mask / eval_dreamcache"] = "≤ 1.02"
    for k, v in r["ratios"].items():
        lines.append(f"| {k} | {v:.3f} | {targets[k]} |")
    m, s = r["memory"], r["sizes_bytes"]
    lines += ["", "| size / memory | value |", "|---|---|",
              f"| adapter parameters | {m['adapter_params']:,} |",
              f"| adapter file fp16 / fp32 | {s['adapter_fp16'] / 1e6:.1f} MB / {s['adapter_fp32'] / 1e6:.1f} MB |",
              f"| cache per subject (fp16 file) | {s['cache_fp16'] / 1e6:.2f} MB ({m['cache_values']:,} values) |",
              f"| K/V memo on the device | {m['kv_memo_bytes'] / 1e6:.1f} MB |",
              f"| resident: adapter weights ({c['dtype']}) + K/V memo + cache (CPU) | "
              f"{m['adapter_bytes_in_compute_dtype'] / 1e6:.1f} + {m['kv_memo_bytes'] / 1e6:.1f} + "
              f"{m['cache_bytes_resident'] / 1e6:.1f} MB |",
              f"| working memory of one evaluation, base / DreamCache ({m['working_kind']}) | "
              f"{m['working_eval_base'] / 1e6:.0f} MB / {m['working_eval_dreamcache'] / 1e6:.0f} MB "
              f"({m['working_added_by_dreamcache'] / 1e6:+.0f} MB) |",
              f"| wall time of this run | {r['wall_s']:.0f} s |"]
    if c.get("compile") and "warmup_s" in r:
        lines.append("| warm-up calls incl. compilation, " + ", ".join(f"{k} {v:.0f} s" for k, v in
                                                                     r["warmup_s"].items()) + " |")
    if "flops" in r:
        f = r["flops"]
        lines.append(f"| FLOPs of one U-Net forward, base / DreamCache | {f['base'] / 1e9:.1f} / "
                     f"{f['dreamcache'] / 1e9:.1f} GFLOP "
                     f"(+{f['added'] / 1e9:.1f}, {100 * f['added'] / f['base']:.1f}%) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
