"""Backend dispatch: the CPU or the CUDA build of the lattice, and the array module of each."""
from __future__ import annotations

__all__ = ["array_module", "build_lattice", "memory_limit"]


def array_module(backend: str):
    """The array module of a backend's lattices: numpy for ``"cpu"``, CuPy for ``"cuda"`` (a clear
    ``RuntimeError`` where CuPy is missing)."""
    if backend == "cpu":
        import numpy

        return numpy
    if backend == "cuda":
        from .gpu import _cupy

        return _cupy()
    raise ValueError(f"backend: must be 'cpu' or 'cuda', got {backend!r}")


def build_lattice(z, scale, order: int, *, backend: str = "cpu"):
    """Build the lattice of the scaled points ``z`` (``N x d``): a :class:`~kernels_cuda.cpu.CpuLattice`
    for ``backend="cpu"`` (numpy arrays) or a :class:`~kernels_cuda.gpu.GpuLattice` for ``"cuda"``
    (CuPy arrays)."""
    if backend == "cpu":
        from .cpu import CpuLattice

        return CpuLattice(z, scale, order)
    if backend == "cuda":
        from .gpu import GpuLattice

        return GpuLattice(z, scale, order)
    raise ValueError(f"backend: must be 'cpu' or 'cuda', got {backend!r}")


def memory_limit(backend: str) -> tuple:
    """``(limit, where)`` for :func:`scalegp.lattice.check_memory`: ``(None, "host")`` for ``"cpu"`` (the
    host memory available), the current GPU's free bytes and ``"GPU"`` for ``"cuda"``."""
    if backend == "cuda":
        return int(array_module("cuda").cuda.runtime.memGetInfo()[0]), "GPU"
    array_module(backend)  # a clear error for an unknown backend
    return None, "host"
