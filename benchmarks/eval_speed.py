"""How long the DreamBench evaluation takes, measured on full-size random-weight models (real shapes, real timings).

    python benchmarks/eval_speed.py [--res 512] [--device cpu|cuda] [--steps-a 1] [--steps-b 2] [--comfyui PATH]
                                    [--out FILE.json]

Builds SD1.5's U-Net (benchmarks/bench.py), a full-size CLIP-L text encoder and SD VAE, a random 5-layer adapter and
random DINO ViT-S/16 and CLIP ViT-B/32 metric models (transformers configs of those sizes), then times the
evaluation's own functions on one real DreamBench photo: SubjectMask preprocessing, BuildFeatureCache +
ApplyDreamCache, one image at ``--steps-a`` and at ``--steps-b`` sampling steps (combined guidance, and the baseline's
plain CFG), and scoring. The per-step cost is the difference of the two runs divided by the step difference; the
rest of an image (VAE decode, noise, setup) is what remains. The 50-step figure is an extrapolation from those
measured parts, and the output says so. Needs ComfyUI (COMFYUI_PATH or --comfyui) and transformers; no weight files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from dreamcache.comfy.env import import_comfyui  # noqa: E402


def full_clip_and_vae(seed: int = 0):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    from bench import random_init_

    clip = comfy.sd.CLIP(
        target=comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    )
    random_init_(clip.cond_stage_model, seed)
    ddconfig = {
        "double_z": True,
        "z_channels": 4,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    import logging

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # ComfyUI lists every (deliberately) missing VAE key
    try:
        vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": ddconfig}})
    finally:
        logging.getLogger().setLevel(level)
    random_init_(vae.first_stage_model, seed + 1)
    return clip, vae


def full_metric_models(folder: Path):
    """Random DINO ViT-S/16 and CLIP ViT-B/32 (the real sizes) saved like the downloaded models."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_metric_models import make_tokenizer

    vit = ViTConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=224,
        patch_size=16,
    )
    ViTModel(vit, add_pooling_layer=False).save_pretrained(folder / "dino")
    ViTImageProcessor().save_pretrained(folder / "dino")
    tok, vocab = make_tokenizer(77)
    cfg = CLIPConfig(
        text_config={"vocab_size": vocab, "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0},
        vision_config={"patch_size": 32},
        projection_dim=512,
    )  # CLIPConfig's defaults are ViT-B/32's sizes; a small vocabulary changes nothing else
    CLIPModel(cfg).save_pretrained(folder / "clip")
    CLIPImageProcessor().save_pretrained(folder / "clip")
    tok.save_pretrained(folder / "clip")
    return folder / "dino", folder / "clip"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps-a", type=int, default=1)
    ap.add_argument("--steps-b", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dreambench", default=str(ROOT.parent / "shared" / "dreambench"))
    ap.add_argument("--comfyui")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = args.device == "cpu"
    import_comfyui(args.comfyui, cpu=cpu)
    if cpu:
        torch.set_flush_denormal(True)
    import comfy.model_management as mm
    from bench import build_model

    from dreamcache.apps.eval.cli import load_scorers
    from dreamcache.apps.eval.generate import Generator, Method, SamplingSettings, load_reference
    from dreamcache.apps.eval.metrics import score_images
    from dreamcache.comfy.model import model_channels_at
    from dreamcache.core.adapter import DreamCacheAdapter
    from dreamcache.core.adapter_io import AdapterFile
    from dreamcache.core.layers import default_layers

    dtype = torch.float32 if cpu else torch.float16
    t0 = time.perf_counter()
    model = build_model("sd15", dtype, mm.get_torch_device())
    clip, vae = full_clip_and_vae()
    layers = default_layers("sd1")
    channels = {r: model_channels_at(model, r) for r in layers}
    module = DreamCacheAdapter(channels)
    module.reset_reference_init(0)
    adapter = AdapterFile(
        "random", channels, {r: {k: v.clone() for k, v in module.layer(r).state_dict().items()} for r in layers}, "sd1"
    )
    tmp = Path(tempfile.mkdtemp(prefix="eval_speed_"))
    dino_dir, clip_dir = full_metric_models(tmp)
    build_s = time.perf_counter() - t0
    res = {
        "config": {
            "res": args.res,
            "device": args.device,
            "dtype": str(dtype),
            "threads": args.threads,
            "torch": torch.__version__,
            "steps": [args.steps_a, args.steps_b],
        },
        "build_seconds": build_s,
        "load_average_at_start": os.getloadavg(),
    }

    cpu_seconds = {}

    def timed(fn, key=None):
        """Wall seconds of ``fn()``; the process's CPU seconds (all threads) go to ``cpu_seconds[key]``. On a shared
        machine the wall time includes waiting for the cores; CPU time does not."""
        if not cpu:
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        if not cpu:
            torch.cuda.synchronize()
        if key is not None:
            cpu_seconds[key] = time.process_time() - c
        return out, time.perf_counter() - t

    photo = Path(args.dreambench) / "dog" / "00.jpg"
    ref, res["reference_seconds"] = timed(lambda: load_reference(photo, "dog", "none", args.res))
    prompt = "a dog in the jungle"
    for name, method in (("dreamcache", Method("random", adapter)), ("baseline", Method("baseline"))):
        times = {}
        for steps in (args.steps_a, args.steps_b):
            gen = Generator(model, clip, vae, SamplingSettings(steps=steps, resolution=args.res))
            gen.encode(prompt), gen.encode("")
            (patched, _), t_cache = timed(lambda: gen.model_for(method, ref), f"{name}.cache")
            images, times[steps] = timed(lambda: gen.sample(patched, method, prompt, [1]), f"{name}.{steps}")
            print(f"{name}: {steps} step(s): {times[steps]:.1f} s (cache pass + apply {t_cache:.1f} s)", flush=True)
        per_step = (times[args.steps_b] - times[args.steps_a]) / (args.steps_b - args.steps_a)
        fixed = times[args.steps_a] - args.steps_a * per_step
        res[name] = {
            "seconds": {str(k): v for k, v in times.items()},
            "per_step": per_step,
            "per_image_fixed": fixed,
            "cache_pass_and_apply": t_cache if method.adapter is not None else 0.0,
            "extrapolated_50_step_image": fixed + 50 * per_step,
        }
        c_a, c_b = cpu_seconds[f"{name}.{args.steps_a}"], cpu_seconds[f"{name}.{args.steps_b}"]
        cpu_step = (c_b - c_a) / (args.steps_b - args.steps_a)
        cpu_fixed = c_a - args.steps_a * cpu_step
        res[name].update({
            "cpu_seconds": {str(k): cpu_seconds[f"{name}.{k}"] for k in times},
            "cpu_per_step": cpu_step,
            "cpu_per_image_fixed": cpu_fixed,
            "cpu_cache_pass_and_apply": cpu_seconds.get(f"{name}.cache", 0.0) if method.adapter is not None else 0.0,
            "cpu_extrapolated_50_step_image": cpu_fixed + 50 * cpu_step,
        })
    scorers = load_scorers(str(dino_dir), str(clip_dir), args.device, 32)
    gen8 = [images[0]] * 8
    _, t_score = timed(lambda: score_images(scorers, gen8, [prompt] * 8, ["dog"] * 8, {"dog": ref.photo}), "score")
    res["scoring_seconds_per_image"] = t_score / 8
    res["cpu_scoring_seconds_per_image"] = cpu_seconds["score"] / 8
    for name in ("dreamcache", "baseline"):
        r = res[name]
        per100 = (
            100 * (r["extrapolated_50_step_image"] + res["scoring_seconds_per_image"])
            + r["cache_pass_and_apply"]
            + res["reference_seconds"]
        )
        r["extrapolated_per_100_images_hours"] = per100 / 3600
        cpu100 = (100 * (r["cpu_extrapolated_50_step_image"] + res["cpu_scoring_seconds_per_image"])
                  + r["cpu_cache_pass_and_apply"])
        r["cpu_hours_per_100_images"] = cpu100 / 3600
        print(f"{name}: CPU {r['cpu_per_step']:.1f} s per step, {r['cpu_per_image_fixed']:.1f} s per image besides "
              f"the steps, {cpu100 / 3600:.1f} CPU-hours per 100 images (all threads summed)")
        print(
            f"{name}: {r['per_step']:.1f} s per step, {r['per_image_fixed']:.1f} s per image besides the steps; "
            f"extrapolated: {r['extrapolated_50_step_image'] / 60:.1f} min per 50-step image, "
            f"{per100 / 3600:.1f} h per 100 images"
        )
    print(
        f"scoring: {res['scoring_seconds_per_image']:.2f} s per image; reference preprocessing "
        f"{res['reference_seconds']:.2f} s"
    )
    res["load_average_at_end"] = os.getloadavg()  # a shared machine's other work slows every figure above
    out = Path(args.out or ROOT / "bench_out" / f"eval_speed_{args.device}_{args.res}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
