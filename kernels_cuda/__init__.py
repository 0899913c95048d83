"""Permutohedral-lattice kernels: one source compiled for CUDA and for the CPU (see issue 3).

``sgp_lattice.h`` holds splat / blur / slice (and the lattice build) as per-element
``__host__ __device__`` functions; ``sgp_lattice_cpu.cpp`` runs them in OpenMP loops behind a C ABI
(compiled on first use, cached, loaded by ctypes: :mod:`kernels_cuda.cpu`), ``sgp_lattice.cu``
wraps them in ``__global__`` launchers run through CuPy (:mod:`kernels_cuda.gpu`). The CUDA path is
compiled by nvcc in the tests and its dispatch is tested with CuPy mocked; it is not run in CI (CI has no
GPU); ``tests/test_lattice_cuda.py`` runs it where there is one (it passed on an H200, see the README).
"""
from __future__ import annotations

from .dispatch import build_lattice

__all__ = ["build_lattice"]
