"""Assigning training points to GP experts (Ng & Deisenroth, section 3.1).

Framework-free numpy, shared by :mod:`pyro_scalegp` and :mod:`numpyro_scalegp`.

Every expert holds the same number of points so that experts batch into one
``(E, n, n)`` Cholesky. Three schemes:

* ``"random"``: a random permutation of the points is dealt out to the experts.
* ``"kdtree"``: the paper's scheme. A KD-tree (median splits along the widest
  coordinate) divides the input space into ``regions`` cells; the points of
  each cell are shuffled and dealt round-robin into ``E`` groups, and expert
  ``k`` takes group ``k`` of every cell, so each expert covers the whole input
  space rather than one neighbourhood.
* ``"local"``: local experts. The points are ordered cell by cell along the
  same KD-tree, with cells of about ``n`` points, and cut into windows of ``n``
  consecutive points; with duplication ``c`` the windows start every ``n / c``
  points (cyclically), so neighbouring experts overlap. Not the paper's
  assignment, but each expert then models one neighbourhood finely, which
  predicts better with the BCM-type rules on data such as the flights.

With duplication ``c`` every point is placed in ``c`` distinct experts (the
"shared data" of section 3.1, which smooths the block-diagonal approximation).
When ``c * N`` does not divide into equal experts, the shortfall of each expert
is filled with further points drawn (without repetition inside that expert)
from the others, so no point is ever dropped; the filled-in points appear
more than ``c`` times.

.. note:: Cost: ``O(c N log N)`` time (the KD-tree's median splits) and
   ``O(c N)`` memory for the index array.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np

Tree = Union[int, tuple]

__all__ = ["Experts", "partition", "balanced_tree", "tree_leaves"]


@dataclass(frozen=True)
class Experts:
    """The experts' index sets, optionally arranged in a tree.

    :param index: integer array ``(E, n)``; row ``k`` holds the training rows of
        expert ``k``. With a communication expert these are the *augmented*
        experts (their own points plus the communication set).
    :param communication: ``(n_c,)`` indices of the global communication
        expert used by GRBCM (Liu et al., 2018), or ``None``.
    :param tree: nested tuples of leaf numbers describing the hierarchy
        (paper section 3.4); ``None`` means one level, all experts children of
        the root. The tree only decides the order in which expert terms are
        summed and where they are computed, never the value.
    """

    index: np.ndarray
    communication: np.ndarray | None = None
    tree: Tree | None = field(default=None)

    def __post_init__(self):
        index = np.asarray(self.index)
        if index.ndim != 2 or index.shape[0] < 1 or index.shape[1] < 1:
            raise ValueError(
                f"experts: expected an integer array of shape (E, n) with E, n >= 1, got shape {index.shape}"
            )
        if not np.issubdtype(index.dtype, np.integer):
            raise ValueError(f"experts: index must be integers, got dtype {index.dtype}")
        object.__setattr__(self, "index", index.astype(np.int64, copy=False))
        if self.communication is not None:
            comm = np.asarray(self.communication, dtype=np.int64).reshape(-1)
            object.__setattr__(self, "communication", comm)
        if self.tree is not None:
            leaves = sorted(tree_leaves(self.tree))
            if leaves != list(range(index.shape[0])):
                raise ValueError(
                    f"experts: tree must hold every leaf 0..{index.shape[0] - 1} exactly once, got {leaves[:10]}..."
                )

    @property
    def num_experts(self) -> int:
        return int(self.index.shape[0])

    @property
    def expert_size(self) -> int:
        return int(self.index.shape[1])

    def with_tree(self, branching: Sequence[int]) -> "Experts":
        """The same experts arranged in a balanced tree with the given branching per level."""
        return Experts(self.index, self.communication, balanced_tree(self.num_experts, branching))

    def check(self, num_data: int) -> None:
        """Raise ``ValueError`` unless every index lies in ``[0, num_data)``."""
        for name, arr in (("experts", self.index), ("experts.communication", self.communication)):
            if arr is None or arr.size == 0:
                continue
            if arr.min() < 0 or arr.max() >= num_data:
                raise ValueError(
                    f"{name}: indices must lie in [0, {num_data}) for {num_data} data points, "
                    f"got range [{arr.min()}, {arr.max()}]"
                )

    @classmethod
    def from_any(cls, experts) -> "Experts":
        """Accept an :class:`Experts`, an ``(E, n)`` integer array, or a nested list
        (a tree) whose leaves are equal-length index arrays."""
        if isinstance(experts, Experts):
            return experts
        if isinstance(experts, (list, tuple)) and experts and _is_nested(experts):
            leaves: list = []
            tree = _flatten_tree(experts, leaves)
            return cls(np.stack([np.asarray(leaf) for leaf in leaves]), None, tree)
        return cls(np.asarray(experts))


def _is_nested(obj) -> bool:
    """True when obj is a list of lists/arrays whose leaves are 1-D index arrays at depth >= 2."""
    first = obj[0]
    return isinstance(first, (list, tuple)) and len(first) > 0 and not np.isscalar(first[0])


def _flatten_tree(node, leaves: list) -> Tree:
    if isinstance(node, (list, tuple)) and len(node) > 0 and not np.isscalar(node[0]):
        return tuple(_flatten_tree(child, leaves) for child in node)
    leaves.append(np.asarray(node))
    return len(leaves) - 1


def tree_leaves(tree: Tree) -> list[int]:
    """Leaf numbers of a tree in left-to-right order."""
    if isinstance(tree, (int, np.integer)):
        return [int(tree)]
    return [leaf for child in tree for leaf in tree_leaves(child)]


def balanced_tree(num_leaves: int, branching: Sequence[int]) -> Tree:
    """A tree over leaves ``0..num_leaves-1`` whose level ``l`` splits each node into
    ``branching[l]`` children of (nearly) equal leaf counts; the last level holds the leaves."""
    if num_leaves < 1:
        raise ValueError(f"num_leaves: must be >= 1, got {num_leaves}")
    for b in branching:
        if int(b) < 1:
            raise ValueError(f"branching: every entry must be >= 1, got {list(branching)}")

    def build(leaves: np.ndarray, level: int) -> Tree:
        if level == len(branching) or len(leaves) == 1:
            return tuple(int(i) for i in leaves) if len(leaves) > 1 else int(leaves[0])
        parts = [p for p in np.array_split(leaves, min(int(branching[level]), len(leaves))) if len(p)]
        return tuple(build(p, level + 1) for p in parts)

    return build(np.arange(num_leaves), 0)


def _kdtree_order(X: np.ndarray, regions: int, rng: np.random.Generator) -> np.ndarray:
    """Points ordered region by region: ``regions`` cells (a power of two) from median
    splits along the widest coordinate, each cell shuffled."""
    cells = [np.arange(X.shape[0])]
    while len(cells) < regions:
        nxt = []
        for cell in cells:
            if len(cell) < 2:
                nxt.append(cell)
                continue
            pts = X[cell]
            dim = int(np.argmax(pts.max(0) - pts.min(0)))
            half = len(cell) // 2
            order = np.argpartition(pts[:, dim], half)
            nxt.extend([cell[order[:half]], cell[order[half:]]])
        cells = nxt
    return np.concatenate([rng.permutation(cell) for cell in cells])


def _local_experts(X: np.ndarray, n: int, c: int, rng: np.random.Generator) -> Experts:
    """Windows of ``n`` consecutive points in KD-tree order, starting every ``n // c`` points
    and wrapping around, so every point lies in ``c`` experts (``c + 1`` near the wrap when
    ``n // c`` does not divide ``N``)."""
    N = X.shape[0]
    regions = 1 << max(0, int(math.floor(math.log2(max(1, N // n)))))
    order = _kdtree_order(X, regions, rng)
    step = max(1, n // c)
    starts = np.arange(0, N, step)
    return Experts(order[(starts[:, None] + np.arange(n)[None, :]) % N])


def partition(
    X,
    *,
    expert_size: int | None = None,
    num_experts: int | None = None,
    method: str = "kdtree",
    duplication: int = 1,
    regions: int | None = None,
    communication: bool | int = False,
    seed: int = 0,
) -> Experts:
    """Split ``N`` training inputs among equal-size experts.

    :param X: inputs, array-like ``(N, d)`` (or ``(N,)``); only used for its
        size with ``method="random"``.
    :param expert_size: points per expert ``n`` (give this or ``num_experts``).
    :param num_experts: number of experts ``E``.
    :param method: ``"kdtree"`` (paper section 3.1), ``"random"`` or ``"local"``.
    :param duplication: ``c``, the number of distinct experts each point joins.
    :param regions: KD-tree cells (rounded down to a power of two); default
        about ``n / 8`` so that each expert takes about 8 points per cell.
    :param communication: GRBCM's communication expert. ``True`` takes a global
        random subset of size ``n // 2`` (or give its size as an int); its points
        join every other expert, so each augmented expert holds its own points
        plus the communication set, and has size ``expert_size``.
    :param seed: seed of the random choices; the same seed gives the same experts.
    :returns: :class:`Experts` with ``index`` of shape ``(E, n)``.
    """
    X = np.asarray(X)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise ValueError(f"X: expected shape (N, d), got {X.shape}")
    N = X.shape[0]
    if N < 1:
        raise ValueError("X: needs at least one point")
    if method not in ("kdtree", "random", "local"):
        raise ValueError(f"method: unknown partition method {method!r}; use 'kdtree', 'random' or 'local'")
    if not np.isfinite(X).all():
        raise ValueError("X: contains NaN or inf")
    c = int(duplication)
    if c < 1:
        raise ValueError(f"duplication: must be >= 1, got {duplication}")
    if (expert_size is None) == (num_experts is None):
        raise ValueError("expert_size, num_experts: give exactly one of them")
    rng = np.random.default_rng(seed)

    comm_idx = None
    if communication:
        if expert_size is None:
            raise ValueError("communication: needs expert_size (the augmented experts' size)")
        n_c = int(expert_size) // 2 if communication is True else int(communication)
        if not 1 <= n_c < int(expert_size) or n_c >= N:
            raise ValueError(
                f"communication: size {n_c} must be in [1, expert_size={expert_size}) and below N={N}"
            )
        comm_idx = np.sort(rng.choice(N, n_c, replace=False))
        rest = np.setdiff1d(np.arange(N), comm_idx)
        local = partition(
            X[rest], expert_size=int(expert_size) - n_c, method=method, duplication=c,
            regions=regions, seed=seed + 1,
        )
        index = np.concatenate([np.broadcast_to(comm_idx, (local.num_experts, n_c)), rest[local.index]], 1)
        return Experts(index, comm_idx)

    if expert_size is not None:
        n = int(expert_size)
        if n < 1:
            raise ValueError(f"expert_size: must be >= 1, got {expert_size}")
        if n > c * N:
            raise ValueError(f"expert_size: {n} exceeds duplication * N = {c * N}")
        E = math.ceil(c * N / n)
        while c * math.ceil(N / E) > n:
            E += 1
    else:
        E = int(num_experts)
        if E < 1:
            raise ValueError(f"num_experts: must be >= 1, got {num_experts}")
        if E > N:
            raise ValueError(f"num_experts: {E} experts for only N={N} points")
        n = c * math.ceil(N / E)
    if c > E:
        raise ValueError(f"duplication: {c} exceeds the number of experts {E}")

    if method == "local":
        if n > N:
            raise ValueError(f"expert_size: local experts of {n} points need at least {n} points, got N={N}")
        return _local_experts(X, n, c, rng)
    if method == "random":
        order = rng.permutation(N)
    else:
        if regions is None:
            regions = max(1, n // (8 * c))
        regions = 1 << max(0, int(math.floor(math.log2(max(1, int(regions))))))
        order = _kdtree_order(X, regions, rng)

    # stripe k = order[k::E] takes ~1/E of every KD-tree cell; expert k takes the
    # stripes k, k+s, ..., k+(c-1)s (distinct since (c-1)s < E), s = E // c.
    stripes = [order[k::E] for k in range(E)]
    shift = E // c
    index = np.empty((E, n), dtype=np.int64)
    for k in range(E):
        own = np.concatenate([stripes[(k + j * shift) % E] for j in range(c)])
        short = n - len(own)
        if short > 0:
            mask = np.ones(N, dtype=bool)
            mask[own] = False
            own = np.concatenate([own, rng.choice(np.flatnonzero(mask), short, replace=False)])
        index[k] = own
    return Experts(index)
