"""What torchrun (or any launcher following its contract) told this process: its rank, the number of ranks and its
local rank. Shared by data-parallel training (:mod:`dreamcache.apps.train.parallel`) and sharded synthesis
(:mod:`dreamcache.apps.data.sharding`)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..core.errors import DreamCacheError


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int


def launch_from_env(environ=None) -> Launch | None:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as torchrun (or any launcher following its contract) sets them; None
    when this process was not started by such a launcher."""
    env = os.environ if environ is None else environ
    if not env.get("WORLD_SIZE"):
        return None
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DreamCacheError(
            f"WORLD_SIZE={env.get('WORLD_SIZE')!r}, RANK={env.get('RANK')!r}, LOCAL_RANK={env.get('LOCAL_RANK')!r} "
            "are not whole numbers; start the processes with torchrun."
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DreamCacheError(
            f"RANK {rank} / WORLD_SIZE {world} / LOCAL_RANK {local} are inconsistent; "
            "start the processes with torchrun."
        )
    return Launch(rank, world, local)
