"""Framework-free core of scalegp (numpy only), shared by ``pyro_scalegp`` and ``numpyro_scalegp``:
expert partitioning, the combination rules of product-of-experts predictions, datasets, and the
errors of hyperparameter values outside a computation's domain."""
from .combine import COMBINE_RULES, combine, tree_sum
from .datasets import RegressionData, gp_draws, load_flights
from .domain import DomainError, DomainWarning, JitterWarning
from .partition import Experts, balanced_tree, partition, tree_leaves

__all__ = [
    "COMBINE_RULES", "combine", "tree_sum", "RegressionData", "gp_draws", "load_flights",
    "Experts", "balanced_tree", "partition", "tree_leaves", "DomainError", "DomainWarning", "JitterWarning",
]
