"""Training speed, live against a precomputed set, at full model size with random weights (issue 22).

    python benchmarks/train_speed.py [--res 256] [--batch 1] [--steps 3] [--warmup 1] [--variants 2]
                                     [--threads N] [--comfyui PATH] [--out bench_out/train_speed_<res>.json]

Builds the full-size SD1.5 U-Net (bench.py's), a full-size CLIP-L text encoder and the full-size SD VAE, all with
random weights (the shapes are real, so the timings are), a small synthetic dataset, and a precomputed set of it
(``python -m dreamcache.data precompute``'s function); then, in one process and interleaved (live, precomputed,
live, ...):

1. images/s of the trainer's own ``train_step`` for a live run and for a run from the precomputed set;
2. the time split of one step: data loading, VAE (target and reference), text encoding, the cache pass, U-Net
   forward (with the adapters), backward, optimizer (live), and reading + assembling the stored sample
   (precomputed);
3. peak memory of each mode's steps (the process's RSS sampled every 2 ms; both runs share the loaded models);
4. disk space of a precomputed set per 1000 items at SD1.5 512² and SDXL 1024², computed from the tensor shapes and
   dtypes (not measured: no such set is written).

CPU only here (fp32). Not a test: nothing is asserted on time.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench import build_model, random_init_  # noqa: E402
from rss import PeakRSS  # noqa: E402

from dreamcache.comfy.env import import_comfyui  # noqa: E402

SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def full_sd15(seed: int = 0):
    """(model, clip, vae): full-size SD1.5 U-Net, CLIP-L and SD VAE, random weights, fp32 on the CPU."""
    import logging

    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    model = build_model("sd15", torch.float32, torch.device("cpu"))
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ComfyUI lists every (deliberately) missing weight
    try:
        clip = comfy.sd.CLIP(target=target)
        vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": SD_VAE}})
    finally:
        logging.getLogger().setLevel(level)
    random_init_(clip.cond_stage_model, seed + 1)
    random_init_(vae.first_stage_model, seed + 2)
    clip.cond_stage_model.requires_grad_(False)
    vae.first_stage_model.requires_grad_(False)
    return model, clip, vae


def synthetic_dataset(root: Path, objects: int, images: int, size: int, seed: int = 0) -> Path:
    """Coloured ellipses (the subjects, exactly their masks) on noisy backgrounds, with captions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for o in range(objects):
        d = root / f"obj{o:02d}"
        d.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 255, 3)
        for n in range(images):
            cx, cy, rx, ry = rng.uniform(0.35, 0.65) * size, rng.uniform(0.35, 0.65) * size, \
                rng.uniform(0.15, 0.3) * size, rng.uniform(0.15, 0.3) * size
            mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
            img = (rng.uniform(60, 200, (1, 1, 3)) + rng.normal(0, 12, (size, size, 3))).clip(0, 255)
            img[mask] = colour
            Image.fromarray(img.astype(np.uint8)).save(d / f"{n}_generation.png")
            Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(d / f"{n}_mask.png")
            (d / f"{n}_caption.txt").write_text(f"a photo of object {o} on a table, view {n}\n", encoding="utf-8")
    return root


def cache_shapes(family: str, res: int) -> list[tuple[int, int]]:
    """(tokens, channels) of the default layers' cache at ``res`` px: SD1/SD2 middle_block.1 (res/64, 1280),
    output_blocks.4.1 (res/32, 1280), 6.1 and 8.1 (res/16, 640), 10.1 (res/8, 320); SDXL middle_block.1 and
    output_blocks.1.1 (res/32, 1280), 3.1 and 5.1 (res/16, 640)."""
    if family == "sdxl":
        grid = [(res // 32, 1280), (res // 32, 1280), (res // 16, 640), (res // 16, 640)]
    else:
        grid = [(res // 64, 1280), (res // 32, 1280), (res // 16, 640), (res // 16, 640), (res // 8, 320)]
    return [(s * s, c) for s, c in grid]


def disk_per_1k_items() -> dict:
    from dreamcache.apps.data.precompute import bytes_per_item

    rows = {}
    for label, family, res, ctx, pooled in (("SD1.5 512²", "sd1", 512, (77, 768), 0),
                                            ("SDXL 1024²", "sdxl", 1024, (77, 2048), 1280)):
        for variants in (1, 4):
            for dtype, nbytes in (("fp16", 2), ("fp32", 4)):
                b = bytes_per_item((4, res // 8, res // 8), ctx, pooled, cache_shapes(family, res), variants, nbytes)
                rows[f"{label}, {variants} variant(s), cache {dtype}"] = {"bytes_per_item": b,
                                                                         "gb_per_1k_items": b * 1000 / 1e9}
    return rows


def timed_split(t) -> dict:
    """One step of ``t`` (accumulate 1) with each phase timed separately (the same computation as train_step)."""
    from dreamcache.apps.train.draws import sample_noise
    from dreamcache.apps.train.loop import Prepared

    out = {}

    def lap(name, t0):
        out[name] = time.perf_counter() - t0

    t0 = time.perf_counter()
    batch = t.next_batch()
    lap("data loading", t0)
    with torch.no_grad():
        if "latent" in batch:
            t0 = time.perf_counter()
            prep = t.prepare(batch)
            lap("assemble stored sample", t0)
        else:
            t0 = time.perf_counter()
            latents = t.encode_pixels(batch["target"])
            ref = t.encode_pixels(batch["reference"])
            lap("VAE (target + reference)", t0)
            t0 = time.perf_counter()
            ctx, pooled = t.encode_text(batch["caption"])
            lap("text encoding", t0)
            t0 = time.perf_counter()
            ts, noise, ref_noise = sample_noise(t.cfg.seed, batch["position"], latents.shape[1:])
            cache = t.build_cache(ref, ref_noise)
            lap("cache pass", t0)
            prep = Prepared(latents, noise, ts, ctx, None, cache, list(batch["position"]))
    t0 = time.perf_counter()
    loss = t.loss(prep)
    lap("U-Net forward", t0)
    t0 = time.perf_counter()
    loss.backward()
    lap("backward", t0)
    t0 = time.perf_counter()
    t.optimizer_step()
    lap("optimizer", t0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed train_step calls per mode")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", type=int, default=2, help="reference variants in the precomputed set")
    ap.add_argument("--objects", type=int, default=4, help="objects in the synthetic dataset")
    ap.add_argument("--images", type=int, default=2, help="images per object")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--comfyui")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import_comfyui(args.comfyui, cpu=True)
    torch.set_flush_denormal(True)
    from dreamcache.apps.data.precompute import run_precompute
    from dreamcache.apps.train.config import TrainConfig
    from dreamcache.apps.train.loop import Trainer

    t_build = time.perf_counter()
    model, clip, vae = full_sd15()
    build_s = time.perf_counter() - t_build
    work = Path(tempfile.mkdtemp(prefix="dreamcache-train-speed-"))
    data = synthetic_dataset(work / "data", objects=args.objects, images=args.images, size=args.res)
    items = args.objects * args.images
    t0 = time.perf_counter()
    folder, report = run_precompute(model, clip, vae, str(data), str(work / "set"), checkpoint_name="random_sd15",
                                    resolution=args.res, variants=args.variants, augment=True, progress=False)
    precompute_s = time.perf_counter() - t0
    set_bytes = sum(f.stat().st_size for f in Path(folder).iterdir())

    def trainer(name, **kw):
        cfg = TrainConfig(data=str(data), out=str(work / f"{name}.safetensors"), steps=10**6, batch_size=args.batch,
                          resolution=args.res, num_workers=0, progress=False, save_every=0, seed=0, init="reference",
                          **kw)
        return Trainer(model, clip, vae, cfg, checkpoint_name="random_sd15", log=lambda *a: None)

    runs = {"live": trainer("live"), "precomputed": trainer("pre", precomputed=folder)}
    for t in runs.values():
        for _ in range(args.warmup):
            t.train_step()
    steps = {k: [] for k in runs}
    peaks = {k: [] for k in runs}
    for _ in range(args.steps):
        for k, t in runs.items():
            rss = PeakRSS()
            with rss:
                start = rss.proc.memory_info().rss
                t0 = time.perf_counter()
                t.train_step()
                steps[k].append(time.perf_counter() - t0)
            peaks[k].append((rss.peak / 2**20, (rss.peak - start) / 2**20))
    splits = {k: [] for k in runs}
    for _ in range(2):
        for k, t in runs.items():
            splits[k].append(timed_split(t))
    result = {"config": {"model": "SD1.5 full size, random weights (U-Net, CLIP-L, SD VAE)", "res": args.res,
                         "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                         "variants": args.variants, "torch": torch.__version__, "device": "cpu", "dtype": "fp32",
                         "build_seconds": build_s},
              "load_average_at_end": os.getloadavg(),
              "precompute": {"items": items, "seconds": precompute_s, "seconds_per_item": precompute_s / items,
                             "bytes_on_disk": set_bytes, "chunks": report["chunks"]},
              "modes": {}, "disk_per_1k_items_computed": disk_per_1k_items()}
    for k in runs:
        med = statistics.median(steps[k])
        split = {p: statistics.median(s[p] for s in splits[k]) for p in splits[k][0]}
        result["modes"][k] = {"step_seconds": {"median": med, "min": min(steps[k]), "max": max(steps[k])},
                              "images_per_second": args.batch / med,
                              "peak_rss_mib": max(p for p, _ in peaks[k]),
                              "peak_rss_increase_mib": max(d for _, d in peaks[k]),
                              "split_seconds": split}
    live, pre = result["modes"]["live"], result["modes"]["precomputed"]
    result["speedup"] = pre["images_per_second"] / live["images_per_second"]
    print(f"SD1.5 full size, random weights, CPU fp32, {args.res}², batch {args.batch}, {args.threads} threads")
    print("| | live | precomputed |\n|---|---|---|")
    print(f"| images/s (train_step, median of {args.steps}) | {live['images_per_second']:.4f} | "
          f"{pre['images_per_second']:.4f} (x{result['speedup']:.2f}) |")
    print(f"| step, s (min-max) | {live['step_seconds']['median']:.2f} ({live['step_seconds']['min']:.2f}-"
          f"{live['step_seconds']['max']:.2f}) | {pre['step_seconds']['median']:.2f} ({pre['step_seconds']['min']:.2f}-"
          f"{pre['step_seconds']['max']:.2f}) |")
    print(f"| peak RSS, MiB (increase during a step) | {live['peak_rss_mib']:.0f} "
          f"(+{live['peak_rss_increase_mib']:.0f}) | {pre['peak_rss_mib']:.0f} (+{pre['peak_rss_increase_mib']:.0f}) |")
    phases = list(dict.fromkeys(list(live["split_seconds"]) + list(pre["split_seconds"])))
    for p in phases:
        a, b = live["split_seconds"].get(p), pre["split_seconds"].get(p)
        print(f"| {p}, s | {'' if a is None else f'{a:.3f}'} | {'' if b is None else f'{b:.3f}'} |")
    print(f"precompute: {precompute_s:.1f} s for {items} items x {args.variants} variants ({set_bytes / 1e6:.1f} MB)")
    print(f"load average at the end (1, 5, 15 min): {os.getloadavg()}")
    for k, v in result["disk_per_1k_items_computed"].items():
        print(f"disk per 1000 items (computed from shapes), {k}: {v['gb_per_1k_items']:.2f} GB")
    out = args.out or f"bench_out/train_speed_{args.res}.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
