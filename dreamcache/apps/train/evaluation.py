"""``python -m dreamcache.train --eval-every K``: score the adapter being trained on a small DreamBench subset.

Every K steps the current adapter (in memory, as trained so far) generates a few images through the evaluation's
generation path (BuildFeatureCache -> ApplyDreamCache -> combined guidance) and DINO / CLIP-I / CLIP-T are
computed. One row per evaluation goes to ``<out stem>.eval.csv`` beside the loss log (and a line to the trainer's
log); images, tables and a grid of each evaluation go to ``<out stem>-eval/stepNNNNNN/``. The random state of the
training is saved and restored around it, so a run with evaluations trains exactly like one without.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import torch

from ...core.errors import DreamCacheError
from ..eval.metrics import ALL_METRICS, LABELS, METRICS
from .config import output_stem

EVAL_FIELDS = ["step", "images", *ALL_METRICS, "seconds"]


def eval_log_path(out: str) -> str:
    return f"{output_stem(out)}.eval.csv"


def eval_dir(out: str, step: int) -> Path:
    return Path(f"{output_stem(out)}-eval") / f"step{step:06d}"


class TrainingEval:
    """What the trainer's evaluations need, prepared once (and checked before training starts)."""

    def __init__(self, cfg, scorers=None, segmenter=None):
        from ..eval.protocol import LIVE_CLASSES, PROMPTS_FILE, find_dreambench, load_protocol, parse_prompts_file

        root = find_dreambench(cfg.eval_dreambench)
        if root is None:
            raise DreamCacheError(
                "--eval-every needs the DreamBench folder; pass --eval-dreambench DIR (the google/dreambooth "
                "dataset/ folder) or set DREAMBENCH_PATH."
            )
        subjects = cfg.eval_subjects
        if not subjects:  # the first object and the first live subject
            classes = parse_prompts_file(root / PROMPTS_FILE)[0]
            subjects = [
                next(n for n, c in classes.items() if c not in LIVE_CLASSES),
                next(n for n, c in classes.items() if c in LIVE_CLASSES),
            ]
        self.protocol = load_protocol(root, list(subjects), int(cfg.eval_prompts), images_per_prompt=1)
        if scorers is None:
            from ..eval.cli import load_scorers

            scorers = load_scorers(cfg.eval_dino, cfg.eval_clip, options=("--eval-dino", "--eval-clip"))
        self.scorers = scorers
        self.segmenter = segmenter
        self.mask_mode = "files" if cfg.eval_masks else "none"

    def __call__(self, trainer) -> dict:
        from ...core.adapter_io import adapter_file_of
        from ..eval.engine import Evaluation
        from ..eval.generate import Generator, Method, SamplingSettings

        cfg = trainer.cfg
        t0 = time.perf_counter()
        name = f"step{trainer.step:06d}"
        af = adapter_file_of(trainer.adapter, trainer.family, name=name)
        settings = SamplingSettings(steps=int(cfg.eval_steps), resolution=int(cfg.resolution))
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            generator = Generator(trainer.model, trainer.clip, trainer.vae, settings)
            ev = Evaluation(
                eval_dir(cfg.out, trainer.step),
                self.protocol,
                [Method(name, af)],
                generator,
                self.scorers,
                self.segmenter,
                mask_mode=self.mask_mode,
                masks_dir=cfg.eval_masks,
                progress=False,
                grid_size=96,
                checkpoint=trainer.checkpoint_name or "",
                log=lambda *a: None,
            )
            result = ev.run()
        trainer._ensure_loaded()
        overall = result["report"]["methods"][name]["overall"]
        row = {
            "step": trainer.step,
            "images": overall["images"],
            "seconds": f"{time.perf_counter() - t0:.2f}",
            **{k: ("" if overall[k] is None else f"{overall[k]:.6f}") for k in ALL_METRICS},
        }
        path = eval_log_path(cfg.out)
        new = not os.path.exists(path)
        with open(path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=EVAL_FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
        trainer.log(
            f"eval at step {trainer.step}: "
            + ", ".join(f"{LABELS[k]} {overall[k]:.4f}" for k in METRICS if overall[k] is not None)
            + f" ({overall['images']} images, {row['seconds']} s; {path})"
        )
        return overall


def evaluate_during_training(trainer) -> dict:
    if getattr(trainer, "_eval", None) is None:
        trainer._eval = TrainingEval(trainer.cfg)
    return trainer._eval(trainer)
