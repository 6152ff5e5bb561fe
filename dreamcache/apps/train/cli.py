"""``python -m dreamcache.train``: parse the command line (:mod:`.config`), load ComfyUI and the checkpoint, run the
:class:`~.loop.Trainer`. Its own module so that the trainer can import the configuration without a cycle."""
from __future__ import annotations

import os
import sys

import torch

from ...core.errors import DreamCacheError
from .config import build_parser, config_from_args, load_state, log_path, resolve_resume


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .parallel import DistContext, setup

    ctx = DistContext.single()
    try:
        ctx = setup(args.device, args.dist_backend, args.dist_timeout)  # single process unless started by torchrun
        state = None
        if args.resume:
            state = load_state(resolve_resume(args.resume, getattr(args, "out", None)))
        cfg = config_from_args(args, state.config if state else None, ctx.world_size,
                               int(state.extra.get("world_size", 1)) if state else 1)
        from ...comfy.env import import_comfyui

        cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
        if ctx.enabled:
            cpu = ctx.device.type == "cpu"
        elif args.device == "cuda" and not torch.cuda.is_available():
            raise DreamCacheError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu (slow) "
                                  "or fix the CUDA install.")
        import_comfyui(args.comfyui, cpu=cpu)
        if cpu:
            torch.set_flush_denormal(True)  # denormal floats slow x86 CPUs down by orders of magnitude
        from ...comfy import loading
        from . import loop

        precision = loop.resolve_precision(cfg.precision, "cpu" if cpu else "cuda")
        model, clip, vae = loading.load_checkpoint(cfg.checkpoint, dtype=loop.WEIGHT_DTYPES[precision])
        t = loop.Trainer(model, clip, vae, cfg, checkpoint_name=os.path.basename(cfg.checkpoint), state=state,
                            dist=ctx)
        if args.estimate:
            from .estimate import estimate, report_lines

            report = estimate(t, timed_steps=max(1, args.estimate_steps))
            if ctx.is_main:
                print("\n".join(report_lines(report)))
            ctx.close()
            return 0
        t.run()
        ctx.close()  # every rank waits here for the others (rank 0 may still be writing the final files)
        if ctx.is_main:
            print(f"done: {t.step} steps; adapter at {cfg.out}; loss log at {log_path(cfg.out)}")
        return 0
    except DreamCacheError as e:
        print(f"error: {ctx.prefix()}{e}", file=sys.stderr)
        return 2
    finally:
        ctx.close(finished=False)  # (after an error: no waiting for ranks that may be gone)
