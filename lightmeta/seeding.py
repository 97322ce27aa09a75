"""Counter-based seeding: every random draw is a pure function of (seed, stream, index).

A resumed run, a different number of DDP ranks or a different number of workers therefore
draws exactly the same tasks: nothing depends on how many draws happened before.
"""
from __future__ import annotations

import zlib

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, stream: str, index: int) -> int:
    """A well-mixed 63-bit seed for draw ``index`` of the named ``stream``."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ zlib.crc32(stream.encode()))
    h = _splitmix64(h ^ (index & _MASK64))
    return h & ((1 << 63) - 1)


def generator_for(seed: int, stream: str, index: int) -> torch.Generator:
    """A CPU generator seeded for one (seed, stream, index) draw."""
    return torch.Generator().manual_seed(derive_seed(seed, stream, index))
