"""Sharded synthesis (``python -m dreamcache.data synth --shard I/N``, or under torchrun): the item list is split
round-robin (:func:`shard_jobs`); see :mod:`dreamcache.apps.data.synth`."""
from __future__ import annotations

import socket

import torch

from ...core.errors import DreamCacheError
from ..launcher import launch_from_env


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` (0 <= I < N) -> (I, N)."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        i, n = -1, 0
    if n < 1 or not 0 <= i < n:
        raise DreamCacheError(
            f"--shard {text!r} is not understood; write I/N with 0 <= I < N, e.g. --shard 0/4 ... --shard 3/4."
        )
    return i, n


def synth_shard(explicit: str | None, environ=None) -> tuple[int, int] | None:
    """The shard of this synthesis process: ``--shard I/N`` and/or torchrun's RANK/WORLD_SIZE. Both together nest
    (torchrun's ranks split shard I further): shard ``I*W + RANK`` of ``N*W``."""
    shard = parse_shard(explicit)
    launch = launch_from_env(environ)
    if launch is None or launch.world_size == 1:
        return shard
    if shard is None:
        return launch.rank, launch.world_size
    return shard[0] * launch.world_size + launch.rank, shard[1] * launch.world_size


def synth_process(explicit: str | None, cpu: bool = False) -> tuple[int, int] | None:
    """A synthesis process's shard; under torchrun with GPUs it also takes GPU ``LOCAL_RANK`` (before ComfyUI is
    imported, so ComfyUI's model management uses it)."""
    shard = synth_shard(explicit)
    launch = launch_from_env()
    if launch is not None and launch.world_size > 1 and not cpu and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise DreamCacheError(
                f"Synthesis rank {launch.rank} (local rank {launch.local_rank} on {socket.gethostname()}) has no GPU: "
                f"that machine has {count}; start at most {count} processes there (torchrun --nproc_per_node {count})."
            )
        torch.cuda.set_device(launch.local_rank)
    return shard


def shard_jobs(jobs: list, shard: tuple[int, int] | None) -> list:
    """Round-robin share of ``jobs`` (every N-th item from I): balanced, and the union of all shards is ``jobs``."""
    if shard is None:
        return list(jobs)
    i, n = shard
    return list(jobs[i::n])
