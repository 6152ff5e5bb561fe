"""Seeded randomness: every random decision of the data pipeline comes from generators seeded by ``(seed, keys)``."""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed from ``seed`` and integer/string keys (stable across runs, platforms and processes)."""
    words = [int(seed) & 0xFFFFFFFFFFFFFFFF]
    for k in keys:
        if isinstance(k, str):
            words.append(int.from_bytes(hashlib.sha1(k.encode()).digest()[:8], "little"))
        else:
            words.append(int(k) & 0xFFFFFFFFFFFFFFFF)
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def rng_for(seed: int, *keys) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *keys))
