"""``python -m dreamcache``: command-line tools that need no ComfyUI (convert, info).

Other subcommands (``run``, training) register themselves in :data:`COMMANDS` from their own modules. This module
and ``--help`` need no torch: commands import it when they run, and a Python without it gets one line saying to
use ComfyUI's Python (:func:`dreamcache.apps.commands.missing_module_message`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ... import __version__
from ...core.errors import DreamCacheError
from ..commands import run_main

#: ``--dtype`` choices: the keys of core.adapter_io.STORAGE_DTYPES, spelled out so that --help needs no torch.
DTYPE_CHOICES = ("fp16", "bf16", "fp32", "keep")


def cmd_convert(args) -> int:
    from ...core.adapter_io import STORAGE_DTYPES, convert_adapter, read_adapter

    dst = args.dst or os.path.splitext(args.src)[0] + ".safetensors"
    if os.path.abspath(dst) == os.path.abspath(args.src):
        raise DreamCacheError(f"Refusing to overwrite the source file '{args.src}'; give another output name.")
    if os.path.exists(dst) and not args.force:
        raise DreamCacheError(f"'{dst}' already exists; pass --force to overwrite it.")
    af = convert_adapter(args.src, dst, family=args.family, dtype=STORAGE_DTYPES[args.dtype])
    written = read_adapter(dst)
    print(f"wrote {dst}: {len(written.layers)} layers, {written.parameter_count():,} parameters, "
          f"base family {written.family or 'unknown'}, {os.path.getsize(dst) / 1e6:.1f} MB")
    if written.family is None:
        print("note: the base family is unknown (a reference .pt cannot say it); pass --family sd2 for the released SD "
              "2.1-base adapter.")
    return 0 if af else 1


def _is_cache(path: str) -> bool:
    from ...core.cache import CACHE_FORMAT
    from ...core.files import SAFETENSORS_EXTENSIONS, read_safetensors

    if not path.lower().endswith(SAFETENSORS_EXTENSIONS):
        return False
    try:
        return read_safetensors(path, path, "not a cache", tensors=False)[1].get("format") == CACHE_FORMAT
    except DreamCacheError:
        return False


def cmd_info(args) -> int:
    if _is_cache(args.file):
        from ...core.cache import load_cache

        c = load_cache(args.file)
        info = {"kind": "cache", "summary": c.describe(), "layers": {str(r): list(c.tokens[r].shape) for r in c.layers}}
    else:
        from ...core.adapter_io import read_adapter
        from ...core.provenance import adapter_summary

        a = read_adapter(args.file)
        info = {"kind": "adapter", "family": a.family or "unknown", "parameters": a.parameter_count(),
                "layers": {str(r): a.channels[r] for r in a.layers},
                "training": {k: v for k, v in adapter_summary(a.metadata, a.family).items() if v is not None},
                "metadata": {k: v for k, v in a.metadata.items() if k != "layers"}}
    print(json.dumps(info, indent=2))
    if info.get("family") == "unknown":  # on stderr, so that stdout stays one JSON document
        print(f"note: the base family is unknown (a reference .pt cannot record it); the released adapter is for SD "
              f"2.1-base: pick base_family sd2 in DreamCache Loader, or record it with `python -m dreamcache convert "
              f"{args.file} --family sd2`.", file=sys.stderr)
    return 0


def cmd_card(args) -> int:
    from ...core.adapter_io import read_adapter
    from ...core.provenance import adapter_summary, model_card

    a = read_adapter(args.file)
    name = os.path.splitext(os.path.basename(args.file))[0]
    text = model_card(name, adapter_summary(a.metadata, a.family), [str(r) for r in a.layers], a.parameter_count(),
                      base_model=args.base_model, license=args.license)
    if args.out is None:
        print(text)
        return 0
    if os.path.exists(args.out) and not args.force:
        raise DreamCacheError(f"'{args.out}' already exists; pass --force to overwrite it.")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


def _add_card(sub):
    p = sub.add_parser("card", help="write a model card (Markdown, Hugging Face front matter) from an adapter's "
                                    "metadata")
    p.add_argument("file", help="a trained adapter (.safetensors)")
    p.add_argument("--out", help="Markdown file to write, e.g. README.md (default: print it)")
    p.add_argument("--base-model", help="Hugging Face id of the base model for the front matter, e.g. "
                                        "stable-diffusion-v1-5/stable-diffusion-v1-5")
    p.add_argument("--license", default="other", help="license id for the front matter (default: other)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=cmd_card)


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert a reference .pt adapter to the pack's .safetensors format (lossless, "
                                       "strict)")
    p.add_argument("src", help="adapter file to read (.pt from the reference code, or .safetensors)")
    p.add_argument("dst", nargs="?", help="output .safetensors (default: next to src)")
    p.add_argument("--family", choices=["sd1", "sd2", "sdxl"],
                   help="base model family to record (the released adapter is sd2)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="keep", help="storage precision (fp16 halves the size)")
    p.add_argument("--force", action="store_true", help="overwrite dst if it exists")
    p.set_defaults(func=cmd_convert)


def _add_info(sub):
    p = sub.add_parser("info", help="describe an adapter or a cache file")
    p.add_argument("file")
    p.set_defaults(func=cmd_info)


def _add_run(sub):
    from .runner import add_parser

    add_parser(sub)


#: name -> function(subparsers) that adds the subcommand.
COMMANDS = {"convert": _add_convert, "info": _add_info, "card": _add_card, "run": _add_run}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreamcache",
                                     description=f"ComfyUI-DreamCache {__version__} command-line tools",
                                     epilog="Training has its own commands: python -m dreamcache.data check|synth, "
                                            "python -m dreamcache.train (see docs/training.md).")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv=None) -> int:
    return run_main(build_parser(), argv)
