"""scalegp for NumPyro: scalable Gaussian-process components on JAX."""
from scalegp import Experts, balanced_tree, partition

from . import kernels

__all__ = ["Experts", "balanced_tree", "partition", "kernels"]
