"""The random draws of a training sample that the trainer makes itself (the data pipeline draws the rest): the
timestep, the noise and the cache pass's noise of sample position ``p``, seeded by ``(seed, p)``; a live run and a
run from a precomputed set draw them with this one function."""
from __future__ import annotations

import torch

from ..data import torch_generator

TIMESTEPS = 1000


def sample_noise(seed: int, positions, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t, noise, reference noise)`` of each sample position: t uniform in 0..999 (int64), two N(0, 1) tensors."""
    noise, ref_noise, ts = [], [], []
    for p in positions:
        g = torch_generator(seed, "noise", p)
        ts.append(int(torch.randint(0, TIMESTEPS, (1,), generator=g)))
        noise.append(torch.randn(tuple(shape), generator=g))
        ref_noise.append(torch.randn(tuple(shape), generator=g))
    return torch.tensor(ts, dtype=torch.long), torch.stack(noise), torch.stack(ref_noise)
