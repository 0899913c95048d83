"""scalegp for Pyro: scalable Gaussian-process components on torch."""
from scalegp import Experts, balanced_tree, partition

__all__ = ["Experts", "balanced_tree", "partition"]
