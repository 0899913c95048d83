"""Framework-free core of scalegp (numpy only), shared by ``pyro_scalegp`` and ``numpyro_scalegp``:
expert partitioning, the combination rules of product-of-experts predictions, and datasets."""
from .combine import COMBINE_RULES, combine, tree_sum
from .datasets import RegressionData, gp_draws, load_flights
from .partition import Experts, balanced_tree, partition, tree_leaves

__all__ = [
    "COMBINE_RULES", "combine", "tree_sum", "RegressionData", "gp_draws", "load_flights",
    "Experts", "balanced_tree", "partition", "tree_leaves",
]
