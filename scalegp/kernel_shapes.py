"""Checks that a kernel's hyperparameters and columns fit the inputs it is given, framework-free:
both frontends read the shapes off their own kernels and raise the same messages.

.. note:: Cost: ``O(1)``, shapes only (static, so also for values JAX traces).
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["check_active_columns", "check_lengthscale_shape"]


def check_lengthscale_shape(shape: Sequence[int], input_dim: int) -> None:
    """``ValueError`` naming ``lengthscale`` unless ``shape`` is that of a scalar or of one
    lengthscale per input dimension (``(1,)`` or ``(input_dim,)``); elementwise maths would
    otherwise broadcast it against the columns or fail with a message that names neither."""
    shape = tuple(shape)
    if len(shape) > 1 or (len(shape) == 1 and shape[0] not in (1, input_dim)):
        raise ValueError(f"lengthscale: expected a scalar or shape ({input_dim},), got shape {shape}")


def check_active_columns(active_dims: Sequence[int], columns: int, name: str = "X") -> None:
    """``ValueError`` naming ``name`` if the kernel reads a column (``active_dims``) that the
    ``columns`` columns of ``name`` lack (JAX's indexing would clamp it to the last one)."""
    dims = [int(a) for a in active_dims]
    if dims and max(dims) >= columns:
        raise ValueError(f"{name}: the kernel reads columns {dims} but {name} has {columns}")
