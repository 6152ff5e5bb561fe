"""The batch arithmetic of a training run, in one place: the global batch (images per optimizer step over all ranks)
and, from the command line and a resumed run, each rank's ``--batch-size`` and ``--accumulate``."""
from __future__ import annotations

from ...core.errors import DreamCacheError


def global_batch(cfg, world_size: int = 1) -> int:
    """Images per optimizer step over all ranks: ``world_size x cfg.batch_size x cfg.accumulate`` (``cfg``: a
    TrainConfig, or anything with those two fields)."""
    return world_size * cfg.batch_size * cfg.accumulate


def _largest_divisor_at_most(n: int, limit: int) -> int:
    for b in range(min(n, max(1, limit)), 0, -1):
        if n % b == 0:
            return b
    return 1


def resolve_batch(args, saved=None, world_size: int = 1, saved_world_size: int = 1):
    """Per-rank ``batch_size`` and ``accumulate`` from the command line (``args``; --global-batch is optional) and,
    when resuming, the saved run (whose global batch is kept: ``saved`` is its TrainConfig, ``saved_world_size``
    the ranks it ran on). Sets ``args.batch_size`` / ``args.accumulate`` where they follow; raises when the global
    batch does not split. Without --global-batch and without resuming nothing changes."""
    given_b = getattr(args, "batch_size", None)
    given_a = getattr(args, "accumulate", None)
    given_g = getattr(args, "global_batch", None)
    if saved is not None:
        g = global_batch(saved, saved_world_size)
        if given_g is not None and given_g != g:
            raise DreamCacheError(
                f"A resumed run keeps its global batch of {g} images, but --global-batch {given_g} was given; drop it, "
                "or start a new run from this adapter with --init-from."
            )
        prefer_b = saved.batch_size
        if given_b is None and given_a is None and world_size == saved_world_size:
            return  # the run goes on as it was
    elif given_g is not None:
        g = given_g
        prefer_b = g  # as large as the rank's share allows, i.e. --accumulate 1 unless it is given
    else:
        return
    if g < 1 or g % world_size:
        raise DreamCacheError(
            f"The global batch of {g} images does not split over {world_size} ranks; use a number of ranks that "
            f"divides it{' (the run was saved with ' + str(saved_world_size) + ')' if saved is not None else ''}, "
            "or another --global-batch."
        )
    share = g // world_size
    if given_b is not None and given_a is not None:
        if given_b * given_a != share:
            raise DreamCacheError(
                f"--batch-size {given_b} x --accumulate {given_a} x {world_size} ranks = "
                f"{given_b * given_a * world_size} images "
                f"per step, but the global batch is {g}; give only one of them and the other is derived."
            )
        b, a = given_b, given_a
    elif given_b is not None:
        if share % given_b:
            raise DreamCacheError(
                f"--batch-size {given_b} does not divide the {share} images each of {world_size} ranks takes per step "
                f"(global batch {g}); pick a divisor of {share}."
            )
        b, a = given_b, share // given_b
    elif given_a is not None:
        if share % given_a:
            raise DreamCacheError(
                f"--accumulate {given_a} does not divide the {share} images each of {world_size} ranks takes per step "
                f"(global batch {g}); pick a divisor of {share}."
            )
        b, a = share // given_a, given_a
    else:
        b = _largest_divisor_at_most(share, prefer_b)
        a = share // b
    args.batch_size, args.accumulate = b, a
