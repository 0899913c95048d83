"""The CUDA build of the lattice kernels run on a GPU: skipped where there is none (CI has none; these
tests were run on a lent GPU machine, see the README). The device lattice against the CPU build of the
same source (same points, weights, products and calibration; vertex numbering differs, so products are
compared, not vertex arrays), and both frontends' operators and marginals on device arrays against their
CPU twins, the dense kernel and finite differences."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

cp = pytest.importorskip("cupy", reason="CuPy is not installed: the CUDA build is compiled (nvcc), not run")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA build is compiled (nvcc), not run", allow_module_level=True)

from pyro.contrib.gp import kernels as gpk  # noqa: E402

from kernels_cuda.cpu import CpuLattice  # noqa: E402
from kernels_cuda.dispatch import memory_limit  # noqa: E402
from kernels_cuda.gpu import GpuLattice  # noqa: E402
from pyro_scalegp import lattice as pl  # noqa: E402
from scalegp import lattice as sl  # noqa: E402
from tests.reference import kernel_matrix  # noqa: E402
from tests.test_lattice_numpyro import _data  # noqa: E402
from tests.test_lattice_pyro import _problem, assert_gradients_match_finite_differences  # noqa: E402

CUDA = torch.device("cuda")
TOL = {np.float64: 1e-10, np.float32: 1e-4}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _pair(n, d, order, dtype, seed=0, name="rbf"):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(n, d)) / np.sqrt(d) * 2.0).astype(dtype)
    st = sl.stencil(name, order)
    scale = sl.elevation_scale(d, st).astype(dtype)
    coef = np.asarray(st.coef, dtype)
    return CpuLattice(z, scale, order), GpuLattice(cp.asarray(z), cp.asarray(scale), order), coef, rng


@pytest.mark.parametrize("d,order,dtype", [(2, 1, np.float64), (8, 1, np.float64), (8, 3, np.float32),
                                           (20, 2, np.float64), (5, 2, np.float32)])
def test_device_lattice_equals_the_cpu_build(d, order, dtype):
    host, dev, coef, rng = _pair(4000, d, order, dtype, seed=d)
    # the GPU contracts multiply-adds (FMA), the CPU build does not: in float32 a point within rounding of a
    # simplex boundary may land in the next simplex (its weights there are ~0, so products barely change)
    same = ((cp.asnumpy(dev.rank) == host.rank) & (cp.asnumpy(dev.greedy) == host.greedy)).all(1)
    if dtype == np.float64:
        assert same.all() and dev.m == host.m
    else:
        assert same.mean() > 0.999 and abs(dev.m - host.m) <= 0.001 * host.m
    np.testing.assert_allclose(cp.asnumpy(dev.bary)[same], host.bary[same], rtol=0,
                               atol=1e-12 if dtype == np.float64 else 1e-5)
    # every point's vertices are distinct and the neighbour table points inside the lattice
    vid = cp.asnumpy(dev.vid)
    assert vid.min() == 0 and vid.max() == dev.m - 1
    assert all(len(set(row)) == d + 1 for row in vid[:200])
    nbr = cp.asnumpy(dev.nbr)
    assert nbr.shape == (dev.m, d + 1, 2 * order) and nbr.min() >= -1 and nbr.max() < dev.m
    V = rng.normal(size=(host.n, 8)).astype(dtype)
    out = cp.asnumpy(dev.filter(cp.asarray(V), coef))
    ref = host.filter(V, coef)
    assert _rel(out, ref) < TOL[dtype]
    if dtype == np.float64:
        assert (nbr >= 0).sum() == (host.nbr >= 0).sum()
        # vertex values agree up to the numbering: compare their sorted row sums
        vals_d, vals_h = cp.asnumpy(dev.splat_blur(cp.asarray(V), coef)), host.splat_blur(V, coef)
        assert _rel(np.sort(vals_d.sum(1)), np.sort(vals_h.sum(1))) < TOL[dtype]


@pytest.mark.parametrize("order", [1, 2])
def test_device_draws_factor_the_device_filter(order):
    # W^T C^T (the exact draws of N(0, K)) times its transpose is the filter W^T C^T C W, on the device's numbering
    _, dev, coef, _ = _pair(300, 4, order, np.float64)
    Rt = dev.blur_slice(cp.eye(dev.m), coef)
    assert _rel(cp.asnumpy(Rt @ Rt.T), cp.asnumpy(dev.filter(cp.eye(300), coef))) < 1e-12


@pytest.mark.parametrize("d,order", [(3, 1), (8, 2)])
def test_device_calibration_equals_the_cpu_build(d, order):
    host, dev, coef, rng = _pair(3000, d, order, np.float64, seed=10 + d)
    cal_h, cal_d = host.calibrate(coef, exact=True), dev.calibrate(coef, exact=True)
    assert cal_d.exact
    np.testing.assert_allclose(cp.asnumpy(cal_d.diagonal()), cal_h.diagonal(), rtol=1e-11)
    w = rng.dirichlet(np.ones(d + 1), size=host.n)
    np.testing.assert_allclose(cp.asnumpy(cal_d.gram_times(cp.asarray(w))), cal_h.gram_times(w), rtol=1e-10,
                               atol=1e-12 * np.abs(cal_h.gram_times(w)).max())
    np.testing.assert_allclose(cp.asnumpy(cal_d.gram()), cal_h.gram(), rtol=1e-10, atol=1e-14)
    # Rademacher probes (signs hashed from vertex ids, numbered differently on the GPU): an unbiased estimate
    probe = cp.asnumpy(dev.calibrate(coef, exact=False, probes=256).diagonal()) / cal_h.diagonal()
    assert not np.allclose(probe, 1.0)
    assert abs(np.median(probe) - 1) < 0.05 and np.median(np.abs(probe - 1)) < 0.15


def test_device_lattice_at_scale_and_in_float32_agrees():
    host, dev, coef, rng = _pair(200_000, 8, 1, np.float64, seed=3)
    V = rng.normal(size=(host.n, 4))
    assert _rel(cp.asnumpy(dev.filter(cp.asarray(V), coef)), host.filter(V, coef)) < 1e-10
    host32, dev32, coef32, _ = _pair(200_000, 8, 1, np.float32, seed=3)
    out32 = cp.asnumpy(dev32.filter(cp.asarray(V.astype(np.float32)), coef32))
    assert _rel(out32, host.filter(V, coef)) < 1e-4


# ---- Pyro frontend -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,order", [("rbf", 1), ("matern32", 2), ("exponential", 1), ("matern52", 3)])
def test_pyro_operator_on_cuda_equals_cpu_values_and_gradients(name, order):
    X, kern = _problem(1500, 4, name)
    V = torch.randn(1500, 3, generator=torch.Generator().manual_seed(2), dtype=X.dtype)
    U = torch.randn(1500, 3, generator=torch.Generator().manual_seed(3), dtype=X.dtype)
    kern_d = copy.deepcopy(kern).to(CUDA)

    def run(X, kern, V, U):
        X, V = X.clone().requires_grad_(True), V.clone().requires_grad_(True)
        op = pl.LatticeKernelOperator(X, kern, order=order)
        out = op @ V
        leaves = [X, V, kern.lengthscale_unconstrained, kern.variance_unconstrained]
        return op, out, torch.autograd.grad((U * out).sum(), leaves)

    op_h, out_h, g_h = run(X, kern, V, U)
    op_d, out_d, g_d = run(X.to(CUDA), kern_d, V.to(CUDA), U.to(CUDA))
    assert op_d.lattice.backend == "cuda" and op_h.lattice.backend == "cpu" and out_d.device.type == "cuda"
    assert _rel(out_d.detach().cpu(), out_h.detach()) < 1e-10
    for a, b in zip(g_d, g_h):
        assert a.device.type == "cuda"
        assert _rel(a.cpu(), b) < 1e-8
    # against the dense kernel
    K = kernel_matrix(name, X.numpy(), X.numpy(), 1.3, kern.lengthscale.detach().numpy())
    cos = torch.nn.functional.cosine_similarity(out_d.detach().cpu(), torch.from_numpy(K) @ V, dim=0)
    assert cos.min() > 0.95, cos


def test_pyro_gradients_on_cuda_match_finite_differences():
    X, kern = _problem(150, 3, "rbf")
    X, kern = X.to(CUDA).requires_grad_(True), kern.to(CUDA)
    u = torch.randn(150, 2, dtype=X.dtype, device=CUDA)
    v = torch.randn(150, 2, dtype=X.dtype, device=CUDA)

    def f():
        return (u * (pl.LatticeKernelOperator(X, kern) @ v)).sum()

    assert_gradients_match_finite_differences(f, [X, kern.lengthscale_unconstrained], entries=5)


def test_pyro_operator_float32_symmetric_calibrated_and_on_a_side_stream():
    X, kern = _problem(150, 4, "matern32", dtype=torch.float32)  # small: an exact calibration
    op = pl.LatticeKernelOperator(X.to(CUDA), kern.to(CUDA), order=2)
    assert op.lattice.calibration.exact
    with torch.no_grad():
        A = (op @ torch.eye(150, device=CUDA)).cpu()
    assert A.dtype == torch.float32
    torch.testing.assert_close(A, A.T, rtol=0, atol=1e-5 * A.abs().max())
    torch.testing.assert_close(A.diagonal(), torch.full((150,), 1.3), rtol=1e-4, atol=0)
    # launches go on torch's current stream: a product on a side stream, read there, is the same
    V = torch.randn(150, 4, device=CUDA)
    with torch.no_grad():
        ref = op @ V
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = op @ V
            total = out.sum()
        torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert abs(total.item() - ref.sum().item()) < 1e-3 * ref.abs().sum().item()


def test_pyro_data_reach_cupy_without_copies_and_memory_is_checked_against_the_gpu():
    t = torch.randn(1000, 3, dtype=torch.float64, device=CUDA)
    assert pl._to_backend(t, "cuda").data.ptr == t.data_ptr()
    limit, where = memory_limit("cuda")
    assert where == "GPU" and 0 < limit <= torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(MemoryError, match="GPU"):
        sl.check_memory(10**10, 20, 3, limit=limit, where=where)


def test_pyro_marginal_on_cuda_matches_the_dense_operator_and_the_cpu_prediction():
    X, kern = _problem(300, 3, "rbf", ell_factor=0.6)
    y = torch.sin(2 * X.sum(1)) + 0.3 * torch.randn(300, generator=torch.Generator().manual_seed(7), dtype=X.dtype)
    kern_d, noise = copy.deepcopy(kern).to(CUDA), torch.tensor(0.1, dtype=X.dtype)
    torch.manual_seed(0)
    m = pl.SimplexGPMarginal(kern_d, X.to(CUDA), noise.to(CUDA), cg_tol=1e-4, num_probes=64)
    with torch.no_grad():
        A = (m.op @ torch.eye(300, dtype=X.dtype, device=CUDA)).cpu() + noise * torch.eye(300, dtype=X.dtype)
    ref = torch.distributions.MultivariateNormal(torch.zeros(300, dtype=X.dtype), A).log_prob(y)
    lp = m.log_prob(y)  # y on the host is moved to X's device
    assert lp.device.type == "cuda"
    assert abs(lp.item() - ref.item()) < 0.02 * abs(torch.linalg.slogdet(A)[1].item()) + 1.0, (lp, ref)
    X_new = torch.randn(40, 3, generator=torch.Generator().manual_seed(9), dtype=X.dtype)
    pred_h = pl.SimplexGPMarginal(kern, X, noise, cg_tol=1e-8).predict(y, X_new, variance_rank=20)
    pred_d = pl.SimplexGPMarginal(kern_d, X.to(CUDA), noise.to(CUDA), cg_tol=1e-8).predict(
        y.to(CUDA), X_new.to(CUDA), variance_rank=20)
    assert _rel(pred_d.mean.cpu(), pred_h.mean) < 1e-6
    assert _rel(pred_d.variance.cpu(), pred_h.variance) < 1e-5


# ---- NumPyro frontend ------------------------------------------------------------------------------------------

@pytest.fixture
def jax_gpu(jax_x64):
    import jax

    if not any(dev.platform == "gpu" for dev in jax.devices()):
        pytest.skip("JAX sees no GPU")
    return jax


@pytest.mark.parametrize("kind,order", [("RBF", 1), ("Matern32", 2)])
def test_numpyro_operator_on_gpu_equals_cpu_build_and_torch(jax_gpu, kind, order):
    import jax
    import jax.numpy as jnp

    from numpyro_scalegp import kernels as nk
    from numpyro_scalegp.lattice import LatticeKernelOperator

    X, ell, U, V = _data(800)
    kernel = getattr(nk, kind)(3, variance=1.3, lengthscale=jnp.asarray(ell))
    gpu = jax.devices("gpu")[0]
    op_d = LatticeKernelOperator(jax.device_put(X, gpu), kernel, order=order)
    op_h = LatticeKernelOperator(X, kernel, order=order, backend="cpu")
    assert op_d.backend == "cuda"
    out_d = jax.jit(lambda o, v: o @ v)(op_d, jnp.asarray(V))
    assert next(iter(out_d.devices())).platform == "gpu"
    out_h = op_h @ jnp.asarray(V)
    assert _rel(out_d, out_h) < 1e-10

    def loss(o, v):
        return jnp.sum(U * (o @ v))

    g_d = jax.jit(jax.grad(loss, argnums=(0, 1)))(op_d, jnp.asarray(V))
    g_h = jax.grad(loss, argnums=(0, 1))(op_h, jnp.asarray(V))
    for a, b in ((g_d[0].X, g_h[0].X), (g_d[0].lengthscale, g_h[0].lengthscale),
                 (g_d[0].variance, g_h[0].variance), (g_d[1], g_h[1])):
        assert _rel(a, b) < 1e-8
    # the torch operator on the GPU gives the same product
    tk = {"RBF": gpk.RBF, "Matern32": gpk.Matern32}[kind](
        3, variance=torch.tensor(1.3, dtype=torch.float64), lengthscale=torch.tensor(ell)).to(CUDA)
    with torch.no_grad():
        out_t = pl.LatticeKernelOperator(torch.tensor(X, device=CUDA), tk, order=order) @ torch.tensor(V, device=CUDA)
    assert _rel(out_t.cpu(), out_d) < 1e-10
    # vmap over columns and construction inside jit
    cols = jax.vmap(lambda v: op_d @ v, in_axes=1, out_axes=1)(jnp.asarray(V))
    assert _rel(cols, out_d) < 1e-10
    built = jax.jit(lambda x, v: LatticeKernelOperator(x, kernel, order=order) @ v)(jax.device_put(X, gpu),
                                                                                     jnp.asarray(V))
    assert _rel(built, out_d) < 1e-10


def test_numpyro_marginal_on_gpu_matches_the_cpu_build_and_the_dense_operator(jax_gpu):
    import jax
    import jax.numpy as jnp

    from numpyro_scalegp import kernels as nk
    from numpyro_scalegp.lattice import LatticeKernelOperator, SimplexGPMarginal

    X, ell, _, _ = _data(300, seed=4)
    y = np.sin(2 * X.sum(1)) + 0.3 * np.random.default_rng(5).normal(size=300)
    kernel = nk.RBF(3, variance=1.3, lengthscale=jnp.asarray(ell))
    gpu = jax.devices("gpu")[0]
    key = jax.random.PRNGKey(1)
    m_d = SimplexGPMarginal(kernel, jax.device_put(X, gpu), 0.1, cg_tol=1e-8, num_probes=32, key=key)
    m_h = SimplexGPMarginal(kernel, X, 0.1, cg_tol=1e-8, num_probes=32, key=key, backend="cpu")
    assert m_d.op.backend == "cuda"
    lp_d, lp_h = float(m_d.log_prob(y)), float(m_h.log_prob(y))
    assert abs(lp_d - lp_h) < 1e-6 * abs(lp_h), (lp_d, lp_h)
    A = np.asarray(LatticeKernelOperator(X, kernel, backend="cpu") @ jnp.eye(300)) + 0.1 * np.eye(300)
    ref = float(jax.scipy.stats.multivariate_normal.logpdf(jnp.asarray(y), jnp.zeros(300), jnp.asarray(A)))
    assert abs(lp_d - ref) < 0.02 * abs(np.linalg.slogdet(A)[1]) + 1.0, (lp_d, ref)

    def f(ls):
        k = nk.RBF(3, variance=1.3, lengthscale=ls)
        return SimplexGPMarginal(k, jax.device_put(X, gpu), 0.1, cg_tol=1e-8, num_probes=32, key=key).log_prob(y)

    g = jax.jit(jax.grad(f))(jnp.asarray(ell))
    g_h = jax.grad(lambda ls: SimplexGPMarginal(nk.RBF(3, variance=1.3, lengthscale=ls), X, 0.1, cg_tol=1e-8,
                                                num_probes=32, key=key, backend="cpu").log_prob(y))(jnp.asarray(ell))
    assert _rel(g, g_h) < 1e-5
    X_new = np.random.default_rng(6).normal(size=(30, 3))
    p_d = m_d.predict(y, jax.device_put(X_new, gpu), variance_rank=20)
    p_h = m_h.predict(y, X_new, variance_rank=20)
    assert _rel(p_d.mean, p_h.mean) < 1e-6 and _rel(p_d.variance, p_h.variance) < 1e-5
