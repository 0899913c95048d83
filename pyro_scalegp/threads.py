"""Torch's intra-op thread count and its handling of subnormal numbers, set for one block of code."""
from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["flushing_subnormals", "torch_threads"]


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads; the caller's count is restored afterwards,
    also when the block raises."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _flushing() -> bool:
    """Whether the CPU flushes subnormal numbers to zero now (torch has no getter: a product of the
    subnormal 1e-310 comes out as 0 exactly when it does)."""
    return bool(torch.tensor(1e-310, dtype=torch.float64).mul(1.0) == 0)


@contextmanager
def flushing_subnormals():
    """Run the block with subnormal numbers (below 2.2e-308) flushed to zero on the CPU
    (``torch.set_flush_denormal``), then the mode the caller had. Float64 arithmetic on them takes
    10-20x longer: with the short lengthscales of local experts on the flights the HGP's prediction took
    3.6 s instead of 1.8 (30,000 rows, 5,000 test points), its value and gradient 1.2 s instead of 0.44
    (100,000 rows); the results move by less than 1e-307. Threads started inside the block inherit the mode."""
    previous = _flushing()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)
