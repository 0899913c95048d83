"""LatticeKernelOperator (JAX): agreement with the torch operator, gradients against finite
differences of its own forward, jit / grad / vmap, and construction inside jit."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from pyro.contrib.gp import kernels as gpk

from numpyro_scalegp import kernels as nk
from numpyro_scalegp.lattice import LatticeKernelOperator
from pyro_scalegp.lattice import LatticeKernelOperator as TorchOperator
from scalegp.domain import DomainWarning


pytestmark = pytest.mark.usefixtures("jax_x64")


def _data(n=150, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), np.array([1.0, 1.4, 2.0])[:d], rng.normal(size=(n, 2)), rng.normal(size=(n, 2))


PAIRS = [(nk.RBF, gpk.RBF, 1), (nk.Matern32, gpk.Matern32, 2), (nk.Exponential, gpk.Exponential, 1)]


@pytest.mark.parametrize("jk,tk,order", PAIRS)
def test_agrees_with_torch_operator_values_and_gradients(jk, tk, order):
    X, ell, U, V = _data()
    op = LatticeKernelOperator(X, jk(3, variance=1.3, lengthscale=jnp.asarray(ell)), order=order)
    out = op @ jnp.asarray(V)

    Xt = torch.tensor(X, requires_grad=True)
    Vt = torch.tensor(V, requires_grad=True)
    kt = tk(3, variance=torch.tensor(1.3, dtype=torch.float64), lengthscale=torch.tensor(ell))
    out_t = TorchOperator(Xt, kt, order=order) @ Vt
    np.testing.assert_allclose(np.asarray(out), out_t.detach().numpy(), rtol=1e-12, atol=1e-12)

    gx_t, gv_t = torch.autograd.grad((torch.tensor(U) * out_t).sum(), (Xt, Vt))
    g_op, g_v = jax.grad(lambda o, v: jnp.sum(U * (o @ v)), argnums=(0, 1))(op, jnp.asarray(V))
    np.testing.assert_allclose(np.asarray(g_op.X), gx_t.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.asarray(g_v), gv_t.numpy(), rtol=1e-9, atol=1e-10)


def test_products_take_the_build_weights_and_gradients_the_gram(monkeypatch):
    """A product that is not differentiated uses the weights and calibration scales of the build; a gradient
    recomputes them, applying the calibration's local Grams by a callback (``_Lattice.gram_times``)."""
    from numpyro_scalegp import lattice as nl

    X, ell, U, V = _data(seed=2)
    op = LatticeKernelOperator(X, nk.RBF(3, variance=1.3, lengthscale=jnp.asarray(ell)))
    calls = []
    real = nl._Lattice.gram_times
    monkeypatch.setattr(nl._Lattice, "gram_times", lambda self, out, w: calls.append(1) or real(self, out, w))
    out = jax.jit(lambda o: o @ jnp.asarray(V))(op)
    assert not calls
    g = jax.grad(lambda o: jnp.sum(U * (o @ jnp.asarray(V))))(op)
    assert calls and np.isfinite(np.asarray(g.X)).all()
    # the build's scales are those of the local Grams: (w^T G w)^(-1/2) at the build's weights
    handle, rank, greedy, w0, s0 = op._lattice
    G = op._keepalive.calibration.gram()
    np.testing.assert_allclose(np.asarray(s0), np.einsum("nk,nkl,nl->n", w0, G, w0) ** -0.5, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(out), np.asarray(op @ jnp.asarray(V)), rtol=1e-14)


def test_host_lattice_data_reach_jax_without_copies():
    """The per-point data of a lattice built on the host are 64-byte aligned, which JAX takes as they are
    (one copy of the Gram blocks of all flights rows took 74 ms)."""
    from kernels_cuda.cpu import aligned_empty
    from numpyro_scalegp.lattice import _Lattice

    for shape, dtype in [((7,), np.float32), ((5, 3, 3), np.float64), (1000, np.int32)]:
        a = aligned_empty(shape, dtype)
        assert a.shape == np.empty(shape).shape and a.dtype == dtype and a.ctypes.data % 64 == 0 and a.flags.c_contiguous
    X, ell, _, _ = _data(seed=3)
    lat = _Lattice(X, ell, "rbf", 1, "cpu")
    arrays = lat.arrays(7)
    assert all(a.dtype == np.float64 and a.ctypes.data % 64 == 0 for a in arrays)
    for a in arrays[1:]:
        assert jnp.asarray(a).unsafe_buffer_pointer() == a.ctypes.data


def test_hyperparameter_gradients_match_finite_differences():
    X, ell, U, V = _data(seed=1)

    def f(ell_, var_):
        op = LatticeKernelOperator(X, nk.Matern52(3, variance=var_, lengthscale=jnp.asarray(ell_)), order=2)
        return float(jnp.sum(U * (op @ jnp.asarray(V))))

    op = LatticeKernelOperator(X, nk.Matern52(3, variance=1.3, lengthscale=jnp.asarray(ell)), order=2)
    g = jax.grad(lambda o: jnp.sum(U * (o @ jnp.asarray(V))))(op)
    eps = 1e-6
    for i in range(3):
        e = np.zeros(3)
        e[i] = eps
        fd = (f(ell + e, 1.3) - f(ell - e, 1.3)) / (2 * eps)
        assert abs(float(g.lengthscale[i]) - fd) < 1e-6 * max(1, abs(fd))
    fd = (f(ell, 1.3 + eps) - f(ell, 1.3 - eps)) / (2 * eps)
    assert abs(float(g.variance) - fd) < 1e-6 * max(1, abs(fd))


def test_jit_vmap_and_vector_products():
    X, ell, _, V = _data(seed=2)
    op = LatticeKernelOperator(X, nk.RBF(3, variance=0.7, lengthscale=jnp.asarray(ell)))
    V = jnp.asarray(V)
    eager = op @ V
    np.testing.assert_allclose(jax.jit(lambda o, v: o @ v)(op, V), eager, rtol=1e-13)
    np.testing.assert_allclose(jax.vmap(lambda c: op @ c, in_axes=1, out_axes=1)(V), eager, rtol=1e-13)
    np.testing.assert_allclose(op @ V[:, 0], eager[:, 0], rtol=1e-13)
    dense = jax.vmap(lambda c: op @ c, in_axes=1, out_axes=1)(jnp.eye(150))
    np.testing.assert_allclose(jnp.diagonal(dense), op.diagonal(), rtol=1e-12)
    np.testing.assert_allclose(dense, dense.T, atol=1e-13)


def test_built_inside_jit_equals_eager():
    X, ell, U, V = _data(seed=3)
    k = nk.Matern32(3, variance=0.9, lengthscale=jnp.asarray(ell))
    eager = LatticeKernelOperator(X, k, order=2) @ jnp.asarray(V)
    g_eager = jax.grad(lambda kk: jnp.sum(U * (LatticeKernelOperator(X, kk, order=2) @ jnp.asarray(V))))(k)

    @jax.jit
    def traced(x, kk, v):  # the lattice is built by a host callback when this runs
        return LatticeKernelOperator(x, kk, order=2) @ v

    np.testing.assert_allclose(traced(jnp.asarray(X), k, jnp.asarray(V)), eager, rtol=1e-12, atol=1e-13)
    g = jax.jit(jax.grad(lambda kk: jnp.sum(U * traced(jnp.asarray(X), kk, jnp.asarray(V)))))(k)
    np.testing.assert_allclose(g.lengthscale, g_eager.lengthscale, rtol=1e-10)
    np.testing.assert_allclose(g.variance, g_eager.variance, rtol=1e-10)
    # vmapped over lengthscales, the traced build runs once per batch element: one lattice each
    ells = jnp.asarray([ell, 1.5 * ell[::-1]])
    batched = jax.jit(jax.vmap(lambda e: traced(jnp.asarray(X), nk.Matern32(3, variance=0.9, lengthscale=e),
                                                jnp.asarray(V))))(ells)
    for e, b in zip(ells, batched):
        np.testing.assert_allclose(b, LatticeKernelOperator(X, nk.Matern32(3, variance=0.9, lengthscale=e), order=2)
                                   @ jnp.asarray(V), rtol=1e-12, atol=1e-13)
    # values are checked by the host build when the jitted computation runs: bad data fail it, while
    # hyperparameters the lattice cannot hold (a sampler far in a prior's tail) give NaN and a warning
    with pytest.raises(Exception, match="X: contains NaN"):
        traced(jnp.asarray(X).at[4, 1].set(jnp.nan), k, jnp.asarray(V)).block_until_ready()
    with pytest.warns(DomainWarning, match="lengthscale: must be finite and positive"):
        assert np.isnan(traced(jnp.asarray(X), nk.Matern32(3, lengthscale=jnp.asarray(-ell)), jnp.asarray(V))).all()
    with pytest.raises(ValueError, match="lengthscale"):
        traced(jnp.asarray(X), nk.Matern32(3, lengthscale=jnp.ones(2)), jnp.asarray(V))


def test_bad_input():
    X, ell, _, _ = _data()
    k = nk.RBF(3, lengthscale=jnp.asarray(ell))
    with pytest.raises(ValueError, match="X"):
        jax.jit(lambda x: LatticeKernelOperator(x, k) @ jnp.ones(150))(jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match="order"):
        LatticeKernelOperator(X, k, order=0)
    with pytest.raises(ValueError, match="X"):
        LatticeKernelOperator(np.where(np.eye(150, 3) > 0, np.nan, X), k)
    with pytest.raises(ValueError, match="lengthscale"):
        LatticeKernelOperator(X, nk.RBF(3, lengthscale=-1.0))
    with pytest.raises(ValueError, match="kernel"):
        LatticeKernelOperator(X, object())
    with pytest.raises(ValueError, match="backend"):
        LatticeKernelOperator(X, k, backend="tpu")
    with pytest.raises(ValueError, match="v"):
        LatticeKernelOperator(X, k) @ jnp.ones(3)


def test_cpu_build_under_an_accelerator_backend_goes_through_host_copies(monkeypatch):
    """With JAX's default backend an accelerator, the CPU build's callbacks are pure_callbacks (their
    operands copied to the host) instead of buffer_callbacks (XLA's buffers, on the accelerator there):
    same products, values and gradients, built eagerly or inside jit."""
    from numpyro_scalegp import lattice as nl

    X, ell, U, V = _data(seed=5)
    k = nk.RBF(3, variance=0.8, lengthscale=jnp.asarray(ell))
    f = lambda x, kk: jnp.sum(U * (LatticeKernelOperator(x, kk, backend="cpu") @ jnp.asarray(V)))  # noqa: E731
    ref = (f(jnp.asarray(X), k), jax.grad(f, argnums=(0, 1))(jnp.asarray(X), k))
    calls = []
    pure = jax.pure_callback
    monkeypatch.setattr(jax, "pure_callback", lambda *a, **kw: calls.append(1) or pure(*a, **kw))
    monkeypatch.setattr(nl, "buffer_callback", None)  # any buffer_callback would fail
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    got = jax.jit(lambda x, kk: (f(x, kk), jax.grad(f, argnums=(0, 1))(x, kk)))(jnp.asarray(X), k)
    assert calls  # the build and the products
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(ref[1])):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_dropped_lattice_is_rebuilt(monkeypatch):
    """A lattice built inside jit and dropped from the host registry before its products run is rebuilt
    from the same (X, lengthscale), with the same products."""
    from numpyro_scalegp import lattice as nl

    X, ell, _, V = _data(seed=4)
    k = nk.RBF(3, variance=0.8, lengthscale=jnp.asarray(ell))
    traced = jax.jit(lambda x, kk, v: LatticeKernelOperator(x, kk) @ v)
    ref = LatticeKernelOperator(X, k) @ jnp.asarray(V)
    builds = []

    class Counting(nl._Lattice):
        def __init__(self, *args):
            builds.append(1)
            super().__init__(*args)

    monkeypatch.setattr(nl, "_Lattice", Counting)
    monkeypatch.setattr(nl, "_REGISTRY", nl._Registry(keep=0))  # keeps nothing: every lookup rebuilds
    np.testing.assert_allclose(traced(jnp.asarray(X), k, jnp.asarray(V)), ref, rtol=1e-12, atol=1e-13)
    assert len(builds) == 2  # the build, then the rebuild for the product


def test_cross_matmul_in_both_frontends_approximates_the_kernel_and_agrees():
    """``K(X_new, X) @ rhs`` from the joint lattice: the joint operator's block, close to the exact
    cross-covariance, the same in Pyro and NumPyro; a mis-shaped ``X_new`` is named."""
    from tests.reference import kernel_matrix

    X, ell, _, _ = _data(300)
    X_new, rhs = np.random.default_rng(3).normal(size=(40, 3)), np.random.default_rng(4).normal(size=(300, 2))
    op = LatticeKernelOperator(X, nk.Matern32(3, variance=1.3, lengthscale=jnp.asarray(ell)), order=2)
    cross = op.cross_matmul(X_new, jnp.asarray(rhs))
    joint = np.asarray(op.joint(X_new) @ jnp.eye(340))
    np.testing.assert_allclose(np.asarray(cross), joint[300:, :300] @ rhs, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(op.cross_matmul(X_new, jnp.asarray(rhs[:, 0]))), np.asarray(cross)[:, 0],
                               rtol=1e-12, atol=1e-14)
    exact = kernel_matrix("matern32", X_new, X, 1.3, ell) @ rhs
    cosine = (np.asarray(cross) * exact).sum(0) / np.linalg.norm(cross, axis=0) / np.linalg.norm(exact, axis=0)
    assert cosine.min() > 0.97, cosine

    kt = gpk.Matern32(3, variance=torch.tensor(1.3, dtype=torch.float64), lengthscale=torch.tensor(ell))
    with torch.no_grad():
        cross_t = TorchOperator(torch.tensor(X), kt, order=2).cross_matmul(torch.tensor(X_new), torch.tensor(rhs))
    np.testing.assert_allclose(cross_t.numpy(), np.asarray(cross), rtol=1e-10, atol=1e-12)
    for bad in (X_new[:, :2], X_new[0]):
        with pytest.raises(ValueError, match="X_new"):
            op.cross_matmul(bad, jnp.asarray(rhs))
        with pytest.raises(ValueError, match="X_new"):
            TorchOperator(torch.tensor(X), kt, order=2).cross_matmul(torch.tensor(bad), torch.tensor(rhs))
