"""Permutohedral-lattice kernels: one source compiled for CUDA and for the CPU (see issue 3)."""
