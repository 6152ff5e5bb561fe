"""Estimate before spending (``python -m dreamcache.train ... --estimate``): build everything, run a few timed steps
on the chosen device, print images/s, peak memory and the projected wall time of the requested run on 1, 4 and 8
devices, and exit without writing an adapter. The training progress bar shows the same ETA
(:func:`projected_seconds`, one function for both).

The projection for N devices assumes data-parallel training scales linearly (each device keeps the measured
images/s, the global batch is split over them); communication and input loading make real runs slower, so it is a
lower bound on the wall time.
"""
from __future__ import annotations

import math
import resource
import sys
import time

import torch

from .batch import global_batch

DEVICES = (1, 4, 8)


def projected_seconds(images_per_second: float, steps: int, batch: int, devices: int = 1) -> float:
    """Wall time of ``steps`` optimizer steps of ``batch`` images at ``images_per_second`` per device, on
    ``devices`` devices (linear scaling assumed)."""
    if not images_per_second > 0:
        return math.inf
    return max(0, steps) * batch / (images_per_second * devices)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    seconds = int(round(seconds))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d {h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s"


def peak_memory_mib(device: torch.device) -> tuple[float, str]:
    """Peak memory so far: allocated GPU memory on CUDA, else the process's peak resident set size."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20, "GPU memory allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 2**20 if sys.platform == "darwin" else rss / 1024), "process RSS (CPU)"


def estimate(trainer, timed_steps: int = 3, warmup_steps: int = 1) -> dict:
    """Run ``warmup_steps`` + ``timed_steps`` training steps (nothing is written) and measure them."""
    cfg = trainer.cfg
    world = trainer.dist.world_size
    batch = global_batch(cfg, world)
    remaining = max(0, cfg.steps - trainer.step)
    for _ in range(warmup_steps):
        trainer.train_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    t0 = time.perf_counter()
    for _ in range(timed_steps):
        trainer.train_step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    dt = time.perf_counter() - t0
    ips_all = batch * timed_steps / dt if dt > 0 else math.inf
    ips = ips_all / world  # per device
    peak, kind = peak_memory_mib(trainer.device)
    return {"device": str(trainer.device), "ranks": world, "precision": cfg.precision, "global_batch": batch,
            "timed_steps": timed_steps, "seconds_per_step": dt / timed_steps, "images_per_second": ips,
            "peak_memory_mib": peak, "peak_memory_kind": kind, "steps": remaining,
            "precomputed": bool(cfg.precomputed),
            "projected_seconds": {n: projected_seconds(ips, remaining, batch, n) for n in DEVICES}}


def report_lines(r: dict) -> list[str]:
    lines = [f"estimate on {r['device']} ({r['precision']}, {'precomputed set' if r['precomputed'] else 'live'}): "
             f"{r['images_per_second']:.3f} images/s per device, {r['seconds_per_step']:.3f} s per step of "
             f"{r['global_batch']} images ({r['timed_steps']} timed steps after a warm-up), peak memory "
             f"{r['peak_memory_mib']:.0f} MiB ({r['peak_memory_kind']})"]
    for n, s in r["projected_seconds"].items():
        lines.append(f"  {r['steps']} steps on {n} device{'s' if n > 1 else ''}: {format_duration(s)} "
                     f"({s / 3600:.2f} h{', linear scaling assumed' if n > 1 else ''})")
    lines.append("nothing written (--estimate); drop --estimate to train")
    return lines
