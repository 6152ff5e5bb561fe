"""``python -m dreamcache.eval``: the DreamBench protocol as a command (see docs/evaluation.md)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

from ...core.errors import DreamCacheError
from .generate import MASK_MODES, SamplingSettings

PACK_ROOT = Path(__file__).resolve().parents[3]


def _int_list_or_count(text: str):
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    try:
        return [int(x) for x in re.split(r"[,\s]+", text) if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is neither a count nor a list of prompt indices such as 0,3,7"
        ) from None


def _names(text: str) -> list[str]:
    return [x for x in re.split(r"[,\s]+", text) if x]


def build_parser() -> argparse.ArgumentParser:
    d = SamplingSettings()
    p = argparse.ArgumentParser(
        prog="python -m dreamcache.eval",
        description="Evaluate DreamCache adapters on DreamBench like the paper: 30 subjects x 25 prompts x 4 images, "
        "DINO / CLIP-I / CLIP-T (and masked variants), tables beside the paper's Table 2, image grids. "
        "Resumable; --shard I/N splits the work, --merge writes the tables from all shards.",
    )
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--checkpoint", help="base checkpoint (.safetensors / .ckpt) loaded with ComfyUI's loader")
    g.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="an adapter file (.safetensors or reference .pt); repeat for several",
    )
    g.add_argument(
        "--baseline",
        action="store_true",
        help="also evaluate the checkpoint without an adapter (plain CFG at --text-scale)",
    )
    g.add_argument(
        "--dreambench",
        help="the DreamBench folder (google/dreambooth dataset/: <subject>/NN.jpg and prompts_and_classes.txt); "
        "default $DREAMBENCH_PATH",
    )
    g.add_argument(
        "--out",
        required=True,
        help="output folder (images, scores, tables, grids); rerun with the same folder to resume",
    )
    g = p.add_argument_group("protocol (defaults: the paper's)")
    g.add_argument("--subjects", type=_names, help="comma-separated subject names (default: all 30)")
    g.add_argument(
        "--prompts", type=_int_list_or_count, help="the first N prompts, or a list of indices 0..24 (default: all 25)"
    )
    g.add_argument(
        "--images-per-prompt", type=int, default=4, help="images per prompt (default 4: 3,000 images in all)"
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base of the per-image seeds derived from (subject, prompt, index) (default 0)",
    )
    g.add_argument(
        "--reference-image",
        default="",
        help="which photo of each subject is the reference: a name, stem or index (default: the first, 00.jpg)",
    )
    g = p.add_argument_group("reference preprocessing (SubjectMask)")
    g.add_argument(
        "--mask-mode",
        choices=MASK_MODES,
        default="auto",
        help="files: masks from --masks; sam: SAM auto mode (--sam); none: the whole photo; auto (default): "
             "files if --masks, "
        "else sam if --sam, else none. Masks also enable the masked metrics (with SAM for the generated images).",
    )
    g.add_argument("--masks", help="folder with <subject>/<stem>_mask.png (white = subject) for the reference photos")
    g.add_argument(
        "--sam",
        help="a Segment Anything checkpoint (e.g. models/sams/sam_vit_b_01ec64.pth) for --mask-mode sam and "
             "the masked metrics",
    )
    g.add_argument(
        "--layout",
        choices=["train", "keep"],
        default=d.layout,
        help="SubjectMask layout of the reference (default train)",
    )
    g = p.add_argument_group("sampling (defaults: the reference DreamBench settings)")
    g.add_argument("--steps", type=int, default=d.steps, help=f"sampling steps (default {d.steps})")
    g.add_argument("--sampler", default=d.sampler, help=f"ComfyUI sampler (default {d.sampler}: DDIM, eta 0)")
    g.add_argument("--scheduler", default=d.scheduler, help=f"ComfyUI scheduler (default {d.scheduler})")
    g.add_argument("--text-scale", type=float, default=d.text_scale, help=f"s_T (default {d.text_scale})")
    g.add_argument(
        "--image-scale",
        type=float,
        default=d.image_scale,
        help=f"s_I (default {d.image_scale}, the DreamBench runs'; the demo uses 5.0)",
    )
    g.add_argument("--mode", choices=["combined", "joint"], default=d.mode, help="guidance (default combined)")
    g.add_argument("--strength", type=float, default=d.strength, help="ApplyDreamCache strength (default 1)")
    g.add_argument("--resolution", type=int, default=0, help="image side (default: 512 for SD1/SD2, 1024 for SDXL)")
    g.add_argument("--negative", default=d.negative, help="negative prompt (default empty)")
    g.add_argument("--cache-seed", type=int, default=d.cache_seed, help="BuildFeatureCache's seed (default 0)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="images of one prompt per sampler call (default 1; more is faster on a GPU, "
        "images may then differ in the last bits from batch 1)",
    )
    g = p.add_argument_group("metrics")
    g.add_argument("--dino", help="folder of facebook/dino-vits16 (default: the Hugging Face cache)")
    g.add_argument("--clip", help="folder of openai/clip-vit-base-patch32 (default: the Hugging Face cache)")
    g.add_argument("--metrics-device", default="auto", help="where the metric models run (auto: CUDA when present)")
    g.add_argument("--metrics-batch", type=int, default=32, help="images per metric-model batch (default 32)")
    g.add_argument("--no-metrics", action="store_true", help="only generate (score later with the same command)")
    g = p.add_argument_group("scale and output")
    g.add_argument(
        "--shard", help="I/N: this process takes the I-th of N disjoint parts of the images (e.g. one per GPU)"
    )
    g.add_argument(
        "--merge",
        action="store_true",
        help="write the tables and grids from every shard's scores in --out (no generation)",
    )
    g.add_argument("--grid-size", type=int, default=128, help="side of one image in the grids (default 128)")
    g.add_argument("--no-grids", action="store_true", help="do not write the image grids")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument(
        "--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to generate (auto: CUDA when present)"
    )
    g.add_argument("--comfyui", help="ComfyUI folder (default: COMFYUI_PATH or the ComfyUI this pack is installed in)")
    p.set_defaults(func=run_command)
    return p


def settings_from_args(args) -> SamplingSettings:
    return SamplingSettings(
        steps=args.steps,
        sampler=args.sampler,
        scheduler=args.scheduler,
        text_scale=args.text_scale,
        image_scale=args.image_scale,
        mode=args.mode,
        strength=args.strength,
        resolution=args.resolution,
        negative=args.negative,
        cache_seed=args.cache_seed,
        layout=args.layout,
    )


def load_scorers(dino: str | None, clip: str | None, device="auto", batch_size: int = 32, options=("--dino", "--clip")):
    """Both metric models (from the folders, else the Hugging Face cache; errors name ``options``)."""
    from .metrics import ClipEmbedder, DinoEmbedder, Scorers

    return Scorers(
        DinoEmbedder(dino, device, batch_size, option=options[0]),
        ClipEmbedder(clip, device, batch_size, option=options[1]),
    )


def run_command(args) -> int:
    from .engine import Evaluation, method_names, write_report
    from .protocol import find_dreambench, load_protocol, parse_shard

    out = Path(args.out)
    shard = parse_shard(args.shard)
    if args.merge:
        data = write_report(out, dreambench=args.dreambench, grids=not args.no_grids, grid_size=args.grid_size)
        print_summary(data, out)
        return 0
    root = find_dreambench(args.dreambench)
    if root is None:
        raise DreamCacheError(
            "No DreamBench folder; pass --dreambench DIR (the google/dreambooth repository's dataset/ folder) "
            "or set DREAMBENCH_PATH."
        )
    protocol = load_protocol(root, args.subjects, args.prompts, args.images_per_prompt, args.seed, args.reference_image)
    if not args.checkpoint:
        raise DreamCacheError(
            "Evaluation needs --checkpoint (the base model the adapters were trained for); see python -m "
            "dreamcache.eval --help."
        )
    if not args.adapter and not args.baseline:
        raise DreamCacheError("Nothing to evaluate; pass --adapter FILE (repeatable) and/or --baseline.")
    if args.batch_size < 1 or args.metrics_batch < 1:
        raise DreamCacheError("--batch-size and --metrics-batch must be at least 1.")
    settings = settings_from_args(args)

    from ...core.adapter_io import read_adapter
    from .generate import BASELINE, Method, resolve_mask_mode

    names = method_names(args.adapter, args.baseline)
    methods = [Method(BASELINE)] if args.baseline else []
    methods += [Method(n, read_adapter(p), p) for n, p in zip(names[len(methods) :], args.adapter)]
    mask_mode = resolve_mask_mode(args.mask_mode, args.masks, args.sam)
    if mask_mode == "none":
        logging.warning(
            "DreamCache eval: no subject masks (--masks or --sam); the reference is the whole photo on white padding, "
            "and the masked metrics are not computed."
        )

    import torch

    from ...comfy.env import import_comfyui

    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DreamCacheError(
            "--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu (slow) or fix the CUDA install."
        )
    scorers = (
        None if args.no_metrics else load_scorers(args.dino, args.clip, args.metrics_device, args.metrics_batch)
    )  # fail early
    import_comfyui(args.comfyui, cpu=cpu)
    if cpu:
        torch.set_flush_denormal(True)
    from ...comfy import loading
    from .generate import Generator, Segmenter

    segmenter = None
    if args.sam:
        from ...comfy import sam as sam_glue

        segmenter = Segmenter(sam_glue.load_sam_model(args.sam, os.path.basename(args.sam)))
    model, clip, vae = loading.load_checkpoint(args.checkpoint)
    generator = Generator(model, clip, vae, settings)
    ev = Evaluation(
        out,
        protocol,
        methods,
        generator,
        scorers,
        segmenter,
        shard,
        mask_mode,
        args.masks or None,
        args.batch_size,
        progress=not args.no_progress,
        grid_size=args.grid_size,
        grids=not args.no_grids,
        checkpoint=os.path.basename(args.checkpoint),
        log=print,
    )
    t0 = time.perf_counter()
    result = ev.run()
    print(
        f"done in {time.perf_counter() - t0:.1f} s: {result['generated']} images generated, {result['scored']} scored, "
        f"{result['rows']} scores in {ev.scores_path()}"
    )
    if "report" in result:
        print_summary(result["report"], out)
    else:
        print(
            f"shard {shard[0]}/{shard[1]} finished; when all shards are done: python -m dreamcache.eval --out "
            f"{out} --merge"
        )
    return 0


def print_summary(data: dict, out: Path):
    from .metrics import LABELS, METRICS

    c = data["completeness"]
    print(f"{c['found']} of {c['expected']} images scored; tables in {out / 'results.md'} and {out / 'results.json'}")
    for m, t in data["methods"].items():
        o = t["overall"]
        print(f"  {m}: " + ", ".join(f"{LABELS[k]} {o[k]:.3f}" for k in METRICS if o[k] is not None))


def main(argv=None) -> int:
    from ..commands import run_main

    return run_main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
