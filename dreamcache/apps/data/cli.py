"""``python -m dreamcache.data``: ``check`` a dataset, ``synth`` one, ``precompute`` its frozen parts (ComfyUI is
imported only by ``synth`` and ``precompute``)."""
from __future__ import annotations

import argparse
import os

from ...core.errors import DreamCacheError
from .captions import combine_captions, dedupe, read_lines
from .layout import validate_dataset
from .masks import MASKERS
from .writer import SynthSettings


def cmd_check(args) -> int:
    index = validate_dataset(args.root, check_files=not args.quick, progress=not args.no_progress, report=args.report)
    print(f"ok: {index.describe()}")
    return 0


def captions_from_args(args) -> list[str]:
    if args.captions:
        caps = read_lines(args.captions)
    elif args.objects and args.contexts:
        caps = combine_captions(read_lines(args.objects), read_lines(args.contexts), args.template,
                                args.contexts_per_object, args.seed)
    else:
        raise DreamCacheError("synth needs captions: pass --captions FILE, or --objects FILE with --contexts FILE.")
    caps = dedupe(caps)
    if args.limit:
        caps = caps[: args.limit]
    if not caps:
        raise DreamCacheError("The caption list is empty after removing blank lines, comments and duplicates; add "
                              "captions.")
    return caps


def cmd_synth(args) -> int:
    from .sharding import synth_process

    shard = synth_process(args.shard, cpu=args.cpu)  # --shard I/N and/or torchrun's ranks (one GPU each)
    captions = captions_from_args(args)
    masker = MASKERS[args.masks](args)
    from ...comfy.env import import_comfyui

    import_comfyui(args.comfyui, cpu=True if args.cpu else None)
    from ...comfy.loading import load_checkpoint
    from .synth import synthesize

    model, clip, vae = load_checkpoint(args.checkpoint)
    settings = SynthSettings(width=args.width, height=args.height, steps=args.steps, cfg=args.cfg,
                             sampler=args.sampler, scheduler=args.scheduler,
                             negative=args.negative, prompt_suffix=args.prompt_suffix,
                             images_per_caption=args.images_per_caption, seed=args.seed,
                             extra={"checkpoint": os.path.basename(args.checkpoint), "masks": getattr(masker,
                                                                                                      "describe",
                                                                                                      args.masks)})
    report = synthesize(model, clip, vae, captions, args.out, masker, settings, progress=not args.no_progress,
                        shard=shard)
    print(f"{f'shard {shard[0]}/{shard[1]}: ' if shard else ''}{report['written']} written, "
          f"{report['skipped']} already done, {report['rejected']} rejected (see synth_rejected.jsonl); "
          f"dataset at {args.out}")
    return 0


def cmd_precompute(args) -> int:
    import re

    from ...core.layers import parse_layer
    from .sharding import synth_process

    shard = synth_process(args.shard, cpu=args.cpu)  # --shard I/N and/or torchrun's ranks, as synth
    layers = [parse_layer(x) for x in re.split(r"[,\s]+", args.layers) if x] if args.layers else None
    from ...comfy.env import import_comfyui

    import_comfyui(args.comfyui, cpu=True if args.cpu else None)
    import torch

    if args.cpu or not torch.cuda.is_available():
        torch.set_flush_denormal(True)  # denormal floats slow x86 CPUs down by orders of magnitude
    from ...comfy.frozen import WEIGHT_DTYPES, resolve_precision
    from ...comfy.loading import load_checkpoint
    from .precompute import run_precompute

    precision = resolve_precision(args.precision, "cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    model, clip, vae = load_checkpoint(args.checkpoint, dtype=WEIGHT_DTYPES[precision])
    out, report = run_precompute(model, clip, vae, args.data, args.out, checkpoint_name=args.checkpoint,
                                 resolution=args.resolution, layers=layers, variants=args.variants,
                                 augment=not args.no_augment, seed=args.seed, precision=precision,
                                 storage=args.dtype, chunk_size=args.chunk_size, shard=shard,
                                 progress=not args.no_progress, validate=not args.quick)
    print(f"{f'shard {shard[0]}/{shard[1]}: ' if shard else ''}{report['written']} chunk(s) written, "
          f"{report['skipped']} already done, of {report['chunks']}; precomputed set at {out} "
          f"(train with --precomputed {out})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamcache.data",
                                description="DreamCache training data: check a dataset, synthesise one, or "
                                            "precompute its frozen parts.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate a dataset folder and list every broken item")
    c.add_argument("root")
    c.add_argument("--quick", action="store_true", help="only check that every item has its three files (open nothing)")
    c.add_argument("--report", help="write the full list of problems to this file")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_check)

    s = sub.add_parser("synth", help="render a dataset with a checkpoint through ComfyUI (resumable)")
    s.add_argument("--checkpoint", required=True, help="the checkpoint that renders the images (the paper used SD-XL "
                                                       "base)")
    s.add_argument("--out", required=True, help="dataset folder to create or complete")
    g = s.add_argument_group("captions")
    g.add_argument("--captions", help="text file, one caption per line ('#' comments and blank lines ignored)")
    g.add_argument("--objects", help="text file of objects, combined with --contexts")
    g.add_argument("--contexts", help="text file of contexts ('on a wooden table', ...)")
    g.add_argument("--template", default="{object} {context}", help="how an object and a context make a caption")
    g.add_argument("--contexts-per-object", type=int, help="use this many seeded contexts per object (default: all)")
    g.add_argument("--limit", type=int, help="use only the first N captions (after de-duplication)")
    g = s.add_argument_group("rendering")
    g.add_argument("--images-per-caption", type=int, default=1)
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--cfg", type=float, default=3.5)
    g.add_argument("--sampler", default="euler")
    g.add_argument("--scheduler", default="normal")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--prompt-suffix", default="", help="appended to every caption, e.g. ', on a plain white "
                                                       "background' (saved in the caption)")
    g.add_argument("--seed", type=int, default=0)
    g = s.add_argument_group("masks")
    g.add_argument("--masks", choices=sorted(MASKERS), default="sam",
                   help="sam (SubjectMask's SAM) or none-white-bg (threshold a near-white background)")
    g.add_argument("--sam", help="SAM checkpoint (models/sams/sam_vit_b_01ec64.pth ...)")
    g.add_argument("--sam-mode", choices=["auto", "box"], default="auto")
    g.add_argument("--sam-box", help="x0,y0,x1,y1 box prompt in pixels, or fractions 0-1 of the picture")
    g.add_argument("--white-threshold", type=float, default=0.94,
                   help="none-white-bg: a channel value >= this is white")
    s.add_argument("--comfyui", help="ComfyUI folder (default: COMFYUI_PATH or the ComfyUI this pack is installed in)")
    s.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    s.add_argument("--shard", help="render only shard I of N (I/N, 0-based) into the same --out; under torchrun "
                                   "each rank takes its own shard (with --shard too, torchrun's ranks split shard I "
                                   "further); each shard is resumable")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_synth)

    q = sub.add_parser("precompute", help="run the frozen VAE, text encoder and cache pass once over a dataset and "
                                          "store them for training with --precomputed (resumable, --shard aware)")
    q.add_argument("--checkpoint", required=True, help="the base checkpoint the adapters will be trained on")
    q.add_argument("--data", required=True, help="the dataset folder (as for python -m dreamcache.train --data)")
    q.add_argument("--out", help="folder of the set (default: beside the dataset, "
                                 "<data>.precomputed-<family>-<size>)")
    q.add_argument("--resolution", type=int, default=0, help="training size (default: 512 for SD1/SD2, 1024 for SDXL)")
    q.add_argument("--layers", help="comma-separated SpatialTransformer paths whose cache is stored (default: the "
                                    "family's set)")
    q.add_argument("--variants", type=int, default=4, help="augmented reference variants stored per item (default 4; "
                                                           "1 with --no-augment)")
    q.add_argument("--no-augment", action="store_true", help="store the un-augmented reference only (train with "
                                                             "--no-augment)")
    q.add_argument("--seed", type=int, default=0, help="seed of the variants' augmentations and cache-pass noise")
    q.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="as the trainer's --precision (auto: bf16/fp16 on CUDA, fp32 on the CPU)")
    q.add_argument("--dtype", choices=["keep", "fp16", "bf16", "fp32"], default="keep",
                   help="storage precision of the caches (keep: as computed; fp16 halves an fp32 set)")
    q.add_argument("--chunk-size", type=int, default=64, help="items per file (default 64)")
    q.add_argument("--shard", help="compute only shard I of N (I/N) of the chunks, as synth --shard")
    q.add_argument("--quick", action="store_true", help="do not open every picture to validate the dataset first")
    q.add_argument("--comfyui", help="ComfyUI folder (default: COMFYUI_PATH or the ComfyUI this pack is installed in)")
    q.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_precompute)
    return p


def main(argv=None) -> int:
    from ..commands import run_main

    return run_main(build_parser(), argv)
