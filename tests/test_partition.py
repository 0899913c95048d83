"""scalegp.partition / Experts / balanced_tree and scalegp.combine against the reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scalegp import COMBINE_RULES, Experts, balanced_tree, combine, partition, tree_leaves, tree_sum
from tests import reference


def _X(N=500, d=3, seed=0):
    return np.random.default_rng(seed).uniform(-2, 2, size=(N, d))


@pytest.mark.parametrize("method", ["kdtree", "random"])
@pytest.mark.parametrize("c", [1, 2, 3])
@pytest.mark.parametrize("N, n", [(500, 50), (503, 64), (97, 10)])
def test_experts_equal_sizes_and_duplication(method, c, N, n):
    X = _X(N)
    ex = partition(X, expert_size=n, method=method, duplication=c, seed=1)
    assert ex.index.shape[1] == n and ex.index.dtype == np.int64
    for row in ex.index:  # no expert holds a point twice
        assert len(np.unique(row)) == n
    counts = np.bincount(ex.index.ravel(), minlength=N)
    assert counts.min() >= c  # every point in >= c distinct experts
    # each expert takes c whole stripes (>= N // E points each); only the rest is topped up at
    # random (so a point may get more than one extra placement)
    E = ex.num_experts
    assert 0 <= ex.index.size - c * N <= E * (n - c * (N // E))
    assert ex.index.min() >= 0 and ex.index.max() < N


def test_num_experts_option():
    ex = partition(_X(400), num_experts=8, method="random")
    assert ex.num_experts == 8 and ex.expert_size == 50
    assert sorted(ex.index.ravel().tolist()) == list(range(400))


def test_kdtree_experts_span_the_space():
    X = _X(4096, 2, seed=3)
    ex = partition(X, expert_size=256, method="kdtree", seed=0)
    for row in ex.index:  # every expert takes points from every quadrant ...
        pts = X[row]
        for sx in (-1, 1):
            for sy in (-1, 1):
                assert ((np.sign(pts[:, 0]) == sx) & (np.sign(pts[:, 1]) == sy)).sum() >= 40
        assert (pts.max(0) - pts.min(0) > 3.5).all()  # ... and spans nearly the whole box
    # whereas a contiguous KD-tree cell (the first 256 points of the cell order) would not
    rand = partition(X, expert_size=256, method="random", seed=0)
    assert rand.num_experts == ex.num_experts


def test_seeds_reproducible():
    X = _X()
    for method in ("kdtree", "random"):
        a = partition(X, expert_size=50, method=method, duplication=2, seed=7)
        b = partition(X, expert_size=50, method=method, duplication=2, seed=7)
        c = partition(X, expert_size=50, method=method, duplication=2, seed=8)
        assert np.array_equal(a.index, b.index) and not np.array_equal(a.index, c.index)


def test_communication_expert():
    X = _X(400)
    ex = partition(X, expert_size=60, method="kdtree", communication=True, seed=0)
    comm = ex.communication
    assert len(comm) == 30 and len(np.unique(comm)) == 30
    for row in ex.index:  # every augmented expert = communication set + its own points
        assert np.array_equal(row[:30], comm) and len(np.unique(row)) == 60
        assert not np.isin(row[30:], comm).any()
    own = np.concatenate([row[30:] for row in ex.index])
    assert set(own.tolist()) | set(comm.tolist()) == set(range(400))


def test_partition_value_errors():
    X = _X(50)
    cases = [
        ("method", dict(expert_size=10, method="grid")),
        ("duplication", dict(expert_size=10, duplication=0)),
        ("expert_size, num_experts", dict()),
        ("expert_size, num_experts", dict(expert_size=10, num_experts=5)),
        ("expert_size", dict(expert_size=0)),
        ("expert_size", dict(expert_size=101, duplication=2)),
        ("num_experts", dict(num_experts=0)),
        ("num_experts", dict(num_experts=51)),
        ("duplication", dict(num_experts=2, duplication=3)),
        ("communication", dict(num_experts=5, communication=True)),
        ("communication", dict(expert_size=10, communication=10)),
    ]
    for name, kwargs in cases:
        with pytest.raises(ValueError, match=name):
            partition(X, **kwargs)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="X"):
        partition(bad, expert_size=10)
    with pytest.raises(ValueError, match="X"):
        partition(np.zeros((2, 3, 4)), expert_size=1)
    with pytest.raises(ValueError, match="experts"):
        Experts(np.arange(5))
    with pytest.raises(ValueError, match="experts"):
        Experts(np.zeros((2, 3)))  # float indices
    with pytest.raises(ValueError, match="experts"):
        Experts(np.zeros((3, 2), dtype=int), tree=(0, 1))
    with pytest.raises(ValueError, match="experts"):
        Experts(np.arange(6).reshape(3, 2)).check(5)
    with pytest.raises(ValueError, match="branching"):
        balanced_tree(4, [0])
    with pytest.raises(ValueError, match="num_leaves"):
        balanced_tree(0, [2])


def test_trees():
    tree = balanced_tree(10, [2, 3])
    assert sorted(tree_leaves(tree)) == list(range(10)) and len(tree) == 2
    assert all(len(child) <= 3 for child in tree)
    assert tree_leaves(balanced_tree(5, [])) == list(range(5))
    nested = [[[0, 1], [2, 3]], [[4, 5]]]
    ex = Experts.from_any(nested)
    assert ex.index.tolist() == [[0, 1], [2, 3], [4, 5]] and ex.tree == ((0, 1), (2,))
    assert Experts.from_any(ex) is ex and Experts.from_any(np.arange(4).reshape(2, 2)).tree is None
    assert ex.with_tree([1]).tree == ((0, 1, 2),)


@pytest.mark.parametrize("rule", COMBINE_RULES)
@pytest.mark.parametrize("branching", [None, [2], [3, 2], [2, 2, 2]])
def test_combine_equals_reference_flat_and_tree(rule, branching):
    rng = np.random.default_rng(0)
    E, T = 9, 17
    means = rng.normal(size=(E, T))
    prior_var = rng.uniform(1.0, 2.0, size=T)
    variances = prior_var * rng.uniform(0.05, 0.95, size=(E, T))
    prior_mean = rng.normal(size=T)
    tree = None if branching is None else balanced_tree(E, branching)
    mu_ref, var_ref = reference.combine_reference(rule, list(means), list(variances), prior_mean, prior_var)
    for xp, conv in ((np, np.asarray), (torch, lambda a: torch.tensor(a, dtype=torch.float64))):
        mu, var = combine(xp, rule, conv(means), conv(variances), conv(prior_mean), conv(prior_var), tree=tree)
        np.testing.assert_allclose(np.asarray(mu), mu_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(var), var_ref, rtol=1e-12)
    with pytest.raises(ValueError, match="combine"):
        combine(np, "moe", means, variances, prior_mean, prior_var)


def test_tree_sum_equals_flat_sum():
    values = np.random.default_rng(1).normal(size=(12, 4))
    for branching in ([2], [3, 2], [2, 2, 3], [12]):
        np.testing.assert_allclose(tree_sum(values, balanced_tree(12, branching)), values.sum(0), rtol=1e-13)


def test_local_experts():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (1000, 3))
    e = partition(X, expert_size=100, method="local")
    assert e.index.shape[1] == 100
    assert set(np.unique(e.index)) == set(range(1000))
    assert all(len(set(row)) == 100 for row in e.index)
    # local: experts are much tighter than random groups of the same size
    spread = np.mean([X[row].std(0).mean() for row in e.index])
    assert spread < 0.7 * X.std(0).mean()
    e2 = partition(X, expert_size=100, method="local", duplication=2)
    assert all(len(set(row)) == 100 for row in e2.index)
    counts = np.bincount(e2.index.ravel(), minlength=1000)
    assert counts.min() == 2 and counts.max() <= 3
    ec = partition(X, expert_size=100, method="local", communication=True)
    assert ec.communication.shape == (50,) and ec.index.shape[1] == 100
    assert all(np.array_equal(row[:50], ec.communication) for row in ec.index)
    assert set(np.unique(ec.index)) == set(range(1000))
    with pytest.raises(ValueError, match="expert_size"):
        partition(X, expert_size=5000, method="local")
