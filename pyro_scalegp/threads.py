"""Torch's intra-op thread count, set for one block of code."""
from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["torch_threads"]


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
