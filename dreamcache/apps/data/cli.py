"""``python -m dreamcache.data``: ``check`` a dataset, ``synth`` one (ComfyUI is imported only by ``synth``)."""
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreamcache.data",
                                description="DreamCache training data: check a dataset or synthesise one.")
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
    return p


def main(argv=None) -> int:
    from ..commands import run_main

    return run_main(build_parser(), argv)
