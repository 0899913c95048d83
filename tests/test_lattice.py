"""Framework-free lattice maths (scalegp.lattice): the coverage criterion against closed forms,
stencils, elevation scales, the memory estimate and input validation."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import erf

from scalegp import lattice as sl


@pytest.mark.parametrize("order", [1, 2, 3])
def test_coverage_spacing_rbf_closed_form(order):
    # spatial coverage erf(a / sqrt 2) with a = s (2r+1) / 2; spectral (a unit Gaussian) erf(pi / (s sqrt 2))
    assert abs(sl.coverage_spacing("rbf", order) - np.sqrt(2 * np.pi / (2 * order + 1))) < 2e-3


@pytest.mark.parametrize("order", [1, 2, 3])
def test_coverage_spacing_exponential_closed_form(order):
    # k = exp(-|x|): spatial coverage 1 - exp(-a); spectrum 1 / (1 + w^2): (2 / pi) arctan(pi / s)
    def gap(s):
        return (1 - np.exp(-s * (2 * order + 1) / 2)) - 2 / np.pi * np.arctan(np.pi / s)

    assert abs(sl.coverage_spacing("exponential", order) - brentq(gap, 1e-2, 20)) < 5e-3


@pytest.mark.parametrize("name", sl.KERNELS)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_stencil_is_the_sampled_kernel(name, order):
    st = sl.stencil(name, order)
    full = st.full()
    assert full.shape == (2 * order + 1,)
    np.testing.assert_allclose(full, full[::-1])
    assert abs(full.sum() - 1) < 1e-14 and np.all(np.diff(st.coef) < 0)
    prof = sl.kernel_profile(name, st.spacing * np.arange(order + 1))
    np.testing.assert_allclose(st.coef / st.coef[0], prof / prof[0], rtol=1e-12)
    t = np.arange(-order, order + 1)
    assert abs(st.variance - (t**2 * full).sum()) < 1e-14
    assert sl.stencil(name, order) is st  # cached


def test_elevation_scale_reduces_to_adams_for_binomial_variance():
    class Binomial:  # [1, 2, 1] / 4 per pass has variance 1/2; two passes, plus 1/6 from splat + slice
        variance = 0.25

    d = 5
    expected = (d + 1) * np.sqrt(2 / 3) / np.sqrt((np.arange(d) + 1) * (np.arange(d) + 2))
    np.testing.assert_allclose(sl.elevation_scale(d, Binomial), expected)


def test_memory_estimate_and_check():
    small = sl.memory_estimate(1000, 4, 1)
    assert small < sl.memory_estimate(1000, 8, 1) < sl.memory_estimate(1000, 8, 3) < sl.memory_estimate(2000, 8, 3)
    assert sl.memory_estimate(1000, 4, 1, ncols=8) > small
    assert sl.check_memory(1000, 4, 1, limit=10 * small) == small
    with pytest.raises(MemoryError, match=r"N=1000000000, d=20"):
        sl.check_memory(10**9, 20, 3, limit=2**30)


@pytest.mark.parametrize("n", [1, 63, 64, 640, 1000])
def test_column_extremes_match_numpy(n):
    X = np.random.default_rng(n).normal(size=(n, 5))
    for A in (X, np.asfortranarray(X), X[:, ::2], X.astype(np.float32)):
        hi, lo = sl.column_extremes(A)
        np.testing.assert_array_equal(hi, A.max(axis=0))
        np.testing.assert_array_equal(lo, A.min(axis=0))
    # a NaN anywhere, in the wide blocks or the remaining rows, reaches its column
    for row in {0, n // 2, n - 1}:
        B = X.copy()
        B[row, 3] = np.nan
        hi, lo = sl.column_extremes(B)
        assert np.isnan(hi[3]) and np.isnan(lo[3]) and np.isfinite(np.delete(hi, 3)).all()


def test_validation_names_the_argument():
    X = np.random.default_rng(0).normal(size=(10, 3))
    for bad, arg in [
        ((np.zeros((0, 3)), 1.0, 1.0, "rbf", 1), "X"),
        ((np.zeros((4, 0)), 1.0, 1.0, "rbf", 1), "X"),
        ((np.where(np.eye(10, 3) > 0, np.nan, X), 1.0, 1.0, "rbf", 1), "X"),
        ((X[0], 1.0, 1.0, "rbf", 1), "X"),
        ((X, -1.0, 1.0, "rbf", 1), "lengthscale"),
        ((X, np.ones(2), 1.0, "rbf", 1), "lengthscale"),
        ((X, 1.0, -2.0, "rbf", 1), "variance"),
        ((X, 1.0, 1.0, "periodic", 1), "kernel"),
        ((X, 1.0, 1.0, "rbf", 0), "order"),
        ((X, 1.0, 1.0, "rbf", 1.5), "order"),
        ((X * 1e12, 1.0, 1.0, "rbf", 1), "X"),
    ]:
        with pytest.raises(ValueError, match=arg):
            sl.validate_inputs(*bad)
    X2, ell = sl.validate_inputs(X, 2.0, 1.0, "matern52", 2)
    np.testing.assert_array_equal(ell, [2.0, 2.0, 2.0])
