"""Backend dispatch: the CPU or the CUDA build of the lattice."""
from __future__ import annotations

__all__ = ["build_lattice"]


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
