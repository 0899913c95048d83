"""LatticeKernelOperator (torch): against the dense kernel, its own exact symmetry / PSD /
calibration, gradients against finite differences of its own forward, linear_operator plumbing."""
from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pyro
import pytest
import torch
from pyro.contrib.gp import kernels as gpk
from pyro.infer import MCMC, NUTS, Predictive
from pyro.ops.integrator import potential_grad

import kernels_cuda.cpu
import kernels_cuda.dispatch
from pyro_scalegp.lattice import LatticeKernelOperator, SimplexGPMarginal
from scalegp import lattice as sl
from scalegp.domain import DomainError, DomainWarning
from tests.reference import gp_predict, kernel_matrix

KERNELS = {"rbf": gpk.RBF, "exponential": gpk.Exponential, "matern32": gpk.Matern32, "matern52": gpk.Matern52}


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    yield
    torch.set_default_dtype(old)


def _problem(n, d, name="rbf", seed=0, variance=1.3, ell_factor=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    ell = ell_factor * (0.8 + 0.4 * torch.rand(d, generator=g, dtype=dtype)) * d**0.5
    kern = KERNELS[name](d, variance=torch.tensor(variance, dtype=dtype), lengthscale=ell)
    return X, kern


def _dense(kern, name, X):
    return torch.from_numpy(kernel_matrix(name, X.numpy(), X.numpy(), kern.variance.item(),
                                          kern.lengthscale.detach().numpy()))


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0)


def test_kernel_active_dims_select_the_columns():
    X, kern = _problem(300, 2)
    wide = torch.cat([torch.randn(300, 1, generator=torch.Generator().manual_seed(3)), X], 1)[:, [1, 0, 2]]
    picked = gpk.RBF(2, variance=kern.variance, lengthscale=kern.lengthscale, active_dims=[0, 2])
    V = torch.randn(300, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(LatticeKernelOperator(wide, picked) @ V, LatticeKernelOperator(X, kern) @ V,
                               rtol=1e-12, atol=1e-12)


# cosine similarity of products with the dense kernel (4 random columns, worst column), measured on
# N=800 standard-normal inputs with lengthscales ~ sqrt(d); the floors are a little under the values
# measured at these seeds (e.g. rbf d=2 r=1: 0.9958; rbf d=5 r=1: 0.9863; matern52 d=3 r=1: 0.9656;
# exponential d=2 r=1: 0.9367)
@pytest.mark.parametrize("name,d,order,floor", [
    ("rbf", 2, 1, 0.99), ("rbf", 2, 3, 0.995), ("rbf", 5, 1, 0.98), ("rbf", 5, 2, 0.985),
    ("matern52", 3, 1, 0.96), ("matern32", 3, 2, 0.95), ("exponential", 2, 1, 0.93), ("exponential", 4, 1, 0.93),
])
def test_products_match_dense_kernel(name, d, order, floor):
    X, kern = _problem(800, d, name)
    op = LatticeKernelOperator(X, kern, order=order)
    V = torch.randn(800, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cos = _cos(op @ V, _dense(kern, name, X) @ V)
    assert cos.min() > floor, cos


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_symmetric_psd_and_calibrated(dtype):
    X, kern = _problem(150, 4, "matern32")
    op = LatticeKernelOperator(X.to(dtype), kern, order=2)
    with torch.no_grad():
        A = op @ torch.eye(150, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert A.dtype == dtype
    torch.testing.assert_close(A, A.T, rtol=0, atol=tol * A.abs().max())
    torch.testing.assert_close(A.diagonal(), torch.full((150,), 1.3, dtype=dtype), rtol=tol * 10, atol=0)
    assert torch.linalg.eigvalsh(A.double()).min() > -1e-10 * (1 if dtype == torch.float64 else 1e5)
    torch.testing.assert_close(op.diagonal(), A.diagonal(), rtol=tol * 10, atol=0)
    u, v = torch.randn(150, dtype=dtype), torch.randn(150, dtype=dtype)
    with torch.no_grad():
        assert abs(u @ (op @ v) - v @ (op @ u)) <= tol * (u.abs() @ (A.abs() @ v.abs()))


def test_float32_agrees_with_float64():
    X, kern = _problem(500, 3)
    V = torch.randn(500, 3)
    with torch.no_grad():
        a64 = LatticeKernelOperator(X, kern) @ V
        a32 = LatticeKernelOperator(X.float(), kern) @ V.float()
    assert a32.dtype == torch.float32
    assert _cos(a32.double(), a64).min() > 0.9999


@pytest.mark.parametrize("name,order,probes", [("rbf", 1, False), ("matern32", 2, False), ("exponential", 1, False),
                                               ("rbf", 1, True)])
def test_gradients_match_finite_differences_of_forward(name, order, probes, monkeypatch):
    if probes:
        _probe_calibrated(monkeypatch)
    n, d = 120, 3
    X, kern = _problem(n, d, name, ell_factor=0.7)
    X.requires_grad_(True)
    params = dict(kern.named_parameters())
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g).requires_grad_(True)

    def f():
        return (u * (LatticeKernelOperator(X, kern, order=order) @ v)).sum()

    assert_gradients_match_finite_differences(f, [X, params["lengthscale_unconstrained"],
                                                  params["variance_unconstrained"], v], entries=7)


def assert_gradients_match_finite_differences(f, leaves, entries: int, eps: float = 1e-6):
    """The autograd gradient of the scalar ``f()`` in each tensor of ``leaves`` against central
    differences, at about ``entries`` entries of each (relative error 1e-6, absolute where below 1)."""
    grads = torch.autograd.grad(f(), leaves)
    for t, gr in zip(leaves, grads):
        for i in range(0, t.numel(), max(1, t.numel() // entries)):
            with torch.no_grad():
                t.view(-1)[i] += eps
                fp = f().item()
                t.view(-1)[i] -= 2 * eps
                fm = f().item()
                t.view(-1)[i] += eps
            fd = (fp - fm) / (2 * eps)
            assert abs(gr.reshape(-1)[i].item() - fd) < 1e-6 * max(1.0, abs(fd)), (tuple(t.shape), i)


def test_entries_for_preconditioner():
    X, kern = _problem(100, 2)
    op = LatticeKernelOperator(X, kern, order=2)
    with torch.no_grad():
        A = op @ torch.eye(100)
        rows, cols = torch.tensor([3, 7, 3, 50]), torch.tensor([[0], [3], [99]])
        torch.testing.assert_close(op._get_indices(rows, cols), A[rows, cols], rtol=1e-12, atol=0)
        torch.testing.assert_close(op[torch.tensor([5, 9])].to_dense(), A[[5, 9]], rtol=1e-12, atol=1e-15)


def _product_widths(monkeypatch) -> list:
    """The number of columns of every product the CPU lattice computes from now on, appended as they run."""
    widths = []
    real = kernels_cuda.cpu.CpuLattice.filter
    monkeypatch.setattr(kernels_cuda.cpu.CpuLattice, "filter",
                        lambda self, v, *a, **k: widths.append(v.shape[1] if v.ndim == 2 else 1) or real(self, v, *a, **k))
    return widths


def test_entries_take_few_product_columns_and_none_on_the_diagonal(monkeypatch):
    """A pivoted Cholesky's backward asks for all N rows of its k pivot columns: k product columns, not N;
    entries on the diagonal take none."""
    X, kern = _problem(300, 2)
    op = LatticeKernelOperator(X, kern)
    widths = _product_widths(monkeypatch)
    with torch.no_grad():
        A = op @ torch.eye(300)
        rows, cols = torch.arange(300)[:, None], torch.tensor([[4, 17, 4, 250]])
        widths.clear()
        torch.testing.assert_close(op._get_indices(rows, cols), A[rows, cols], rtol=1e-12, atol=0)
        torch.testing.assert_close(op._get_indices(cols.T, rows.T), A[cols.T, rows.T], rtol=1e-12, atol=0)
        assert widths == [3, 3]
        # the diagonal (GPyTorch's predictive variances of a block of rows) is _diagonal's: no product
        idx = torch.arange(40, 240)
        torch.testing.assert_close(op._get_indices(idx, idx), A.diagonal()[idx], rtol=1e-12, atol=0)  # exact calibration
        assert widths == [3, 3]
    variance = kern.variance_unconstrained
    (grad,) = torch.autograd.grad(LatticeKernelOperator(X, kern)._get_indices(idx, idx).sum(), variance)
    torch.testing.assert_close(grad, 200 * kern.variance.detach())  # d(200 exp(u)) / du


def test_marginal_gradient_makes_no_product_wider_than_its_probes_or_pivots(monkeypatch):
    """log_prob and its backward apply the operator to at most max(1 + num_probes, precond_rank) columns at
    once (CG and SLQ, the preconditioner's pivots): the preconditioner's backward once took one column per
    training point (23 s for a gradient on 5,000 flights rows, 0.08 s now)."""
    X, kern, y, noise = _marginal_problem(2000)  # linear_operator preconditions from 2,000 rows up
    widths = _product_widths(monkeypatch)
    m = SimplexGPMarginal(kern, X, noise, num_probes=8)
    assert m.precond_rank == 15
    m.log_prob(y).backward()
    assert widths and max(widths) <= 15 and kern.lengthscale_unconstrained.grad.abs().min() > 0


def test_lattice_built_once_and_reused(monkeypatch):
    calls, grams = [], []
    real = kernels_cuda.dispatch.build_lattice
    monkeypatch.setattr("pyro_scalegp.lattice.build_lattice", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_calibrate = kernels_cuda.cpu.CpuLattice.calibrate
    monkeypatch.setattr(kernels_cuda.cpu.CpuLattice, "calibrate",
                        lambda self, *a, **k: grams.append(1) or real_calibrate(self, *a, **k))
    X, kern = _problem(200, 3)
    X.requires_grad_(True)
    op = LatticeKernelOperator(X, kern, order=1)
    V = torch.randn(200, 8)
    out = op @ V
    op.matmul(V[:, 0])
    out.sum().backward()
    assert X.grad is not None and len(calls) == 1 and len(grams) == 1  # one build, one calibration


def _probe_calibrated(monkeypatch):
    """Make every lattice use the Rademacher-probe calibration (as lattices too large for the exact one do)."""
    monkeypatch.setattr(kernels_cuda.cpu.CpuLattice, "calibrate",
                        functools.partialmethod(kernels_cuda.cpu.CpuLattice.calibrate, exact=False))


def test_probe_calibration_diagonal_and_products(monkeypatch):
    # per point, the probe estimate of the diagonal has relative error ~ sqrt(2/256) = 0.088 (correlated between
    # nearby points); the operator stays exactly symmetric, its diagonal near the variance, its products near the
    # dense kernel's (measured at this seed: median |diag / variance - 1| 0.05, max 0.28; worst cosine 0.974 vs
    # 0.983 with the exact calibration)
    X, kern = _problem(400, 3, "matern52")
    V = torch.randn(400, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = LatticeKernelOperator(X, kern) @ torch.eye(400)
        _probe_calibrated(monkeypatch)
        A = LatticeKernelOperator(X, kern) @ torch.eye(400)
    assert not torch.allclose(A, exact)  # the probe path did run
    torch.testing.assert_close(A, A.T, rtol=0, atol=1e-12 * A.abs().max())
    ratio = A.diagonal() / kern.variance.detach()
    assert (ratio - 1).abs().median() < 0.09 and (ratio - 1).abs().max() < 0.45 and abs(ratio.mean() - 1) < 0.05
    K = _dense(kern, "matern52", X)
    assert _cos(A @ V, K @ V).min() > _cos(exact @ V, K @ V).min() - 0.03


def test_inv_quad_logdet_matches_dense():
    from linear_operator import settings

    X, kern = _problem(300, 3, "matern52")
    op = LatticeKernelOperator(X, kern, order=1)
    A = (op @ torch.eye(300)).detach() + 0.1 * torch.eye(300)
    y = torch.randn(300, generator=torch.Generator().manual_seed(5))
    with settings.max_cholesky_size(0), settings.num_trace_samples(32), settings.cg_tolerance(1e-4):
        inv_quad, logdet = op.add_diagonal(torch.tensor(0.1)).inv_quad_logdet(y[:, None], logdet=True)
    torch.testing.assert_close(inv_quad, y @ torch.linalg.solve(A, y), rtol=1e-3, atol=0)
    assert abs(logdet - torch.linalg.slogdet(A)[1]) < 0.03 * abs(torch.linalg.slogdet(A)[1]) + 1.0


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
def test_gpytorch_exact_gp_trains_and_predicts_with_the_operator():
    """The operator as the covariance of a GPyTorch ``ExactGP`` (the kernel a Pyro module inside it): the
    exact marginal log likelihood and its gradient in the lengthscales are those of the dense matrix of our
    operator, and GPyTorch's predictions the dense posterior as GPyTorch forms it: solves with the operator
    on the training inputs, cross and test blocks from one on training and test inputs together."""
    import gpytorch
    X, kern = _problem(250, 2, "matern52")
    Xt = torch.randn(40, 2, generator=torch.Generator().manual_seed(8))
    y = torch.sin(2 * X[:, 0]) + 0.1 * torch.randn(250, generator=torch.Generator().manual_seed(9))

    class Model(gpytorch.models.ExactGP):
        def __init__(self):
            super().__init__(X, y, gpytorch.likelihoods.GaussianLikelihood())
            self.kernel = kern

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(torch.zeros(len(x)), LatticeKernelOperator(x, self.kernel))

    model = Model()
    noise = model.likelihood.noise.detach()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    value = mll(model(X), y)
    (grad,) = torch.autograd.grad(value, kern.lengthscale_unconstrained)
    A = LatticeKernelOperator(X, kern) @ torch.eye(250)
    ref = torch.distributions.MultivariateNormal(torch.zeros(250), A + noise * torch.eye(250)).log_prob(y) / 250
    (grad_ref,) = torch.autograd.grad(ref, kern.lengthscale_unconstrained)
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-12)
    assert grad.abs().min() > 0
    # the same through CG and stochastic Lanczos quadrature, GPyTorch's path for large N: the gradient reaches
    # the lengthscales through the operator's representation
    torch.manual_seed(0)  # GPyTorch's probes
    with gpytorch.settings.max_cholesky_size(0), gpytorch.settings.num_trace_samples(256), \
            gpytorch.settings.cg_tolerance(1e-5):
        (grad_cg,) = torch.autograd.grad(mll(model(X), y), kern.lengthscale_unconstrained)
    assert torch.linalg.norm(grad_cg - grad_ref) < 0.1 * torch.linalg.norm(grad_ref)  # 256 probes: 3% here

    model.eval()
    with torch.no_grad():
        pred = model.likelihood(model(Xt))
        J = LatticeKernelOperator(torch.cat([X, Xt]), kern) @ torch.eye(290)
    Knn, Ktn, Ktt = A.detach() + noise * torch.eye(250), J[250:, :250], J[250:, 250:]
    torch.testing.assert_close(pred.mean, Ktn @ torch.linalg.solve(Knn, y), rtol=1e-8, atol=1e-10)
    cov = Ktt - Ktn @ torch.linalg.solve(Knn, Ktn.T) + noise * torch.eye(40)
    torch.testing.assert_close(pred.covariance_matrix, cov, rtol=1e-6, atol=1e-8)
    # past max_cholesky_size GPyTorch solves by preconditioned CG (a pivoted Cholesky of our diagonal and
    # entries); its CG stalls near a relative residual of 1e-6 here even on the dense matrix: tolerance 1e-5
    model.train()
    model.eval()
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(0), gpytorch.settings.eval_cg_tolerance(1e-5):
        mean_cg = model(Xt).mean
    torch.testing.assert_close(mean_cg, pred.mean, rtol=0, atol=1e-4)


def test_bad_input():
    X, kern = _problem(10, 2)
    with pytest.raises(ValueError, match="X"):
        LatticeKernelOperator(torch.zeros(0, 2), kern)
    with pytest.raises(ValueError, match="X"):
        LatticeKernelOperator(torch.zeros(5, 0), gpk.RBF(0))
    Xn = X.clone()
    Xn[3, 1] = float("nan")
    with pytest.raises(ValueError, match="X"):
        LatticeKernelOperator(Xn, kern)
    with pytest.raises(ValueError, match="kernel"):
        LatticeKernelOperator(X, gpk.Periodic(2))
    with pytest.raises(ValueError, match="order"):
        LatticeKernelOperator(X, kern, order=0)
    with pytest.raises(ValueError, match="backend"):
        LatticeKernelOperator(X, kern, backend="tpu")
    with pytest.raises(ValueError, match="lengthscale"):
        sl.validate_inputs(X.numpy(), np.array([1.0, -1.0]), 1.0, "rbf", 1)
    with pytest.raises(ValueError, match="variance"):
        sl.validate_inputs(X.numpy(), 1.0, 0.0, "rbf", 1)
    with pytest.raises(MemoryError, match="GiB"):
        sl.check_memory(10**9, 20, 3, limit=2**30)


def _marginal_problem(n=300, seed=0):
    X, kern = _problem(n, 3, "rbf", ell_factor=0.6)
    g = torch.Generator().manual_seed(seed + 7)
    y = torch.sin(2 * X.sum(1)) + 0.3 * torch.randn(n, generator=g)
    return X, kern, y, torch.tensor(0.1)


def _dense_joint(op, X_new=None):
    jo = op if X_new is None else op.joint(X_new)
    with torch.no_grad():
        return jo @ torch.eye(jo.shape[0])


def test_marginal_log_prob_matches_dense_operator():
    X, kern, y, noise = _marginal_problem(200)
    torch.manual_seed(0)
    m = SimplexGPMarginal(kern, X, noise, cg_tol=1e-4, num_probes=64)
    A = _dense_joint(m.op) + noise * torch.eye(200)
    ref = torch.distributions.MultivariateNormal(torch.zeros(200), A).log_prob(y)
    lp = m.log_prob(y)
    # inverse quadratic by CG (tight); log-determinant by SLQ with 64 probes (a few percent)
    assert abs(lp - ref) < 0.02 * abs(torch.linalg.slogdet(A)[1]) + 1.0, (lp, ref)
    # gradient wrt the lengthscales (SLQ makes it a stochastic estimate) against the dense operator's
    p = dict(kern.named_parameters())["lengthscale_unconstrained"]
    g = torch.autograd.grad(SimplexGPMarginal(kern, X, noise, cg_tol=1e-4, num_probes=256).log_prob(y), p)[0]
    A = LatticeKernelOperator(X, kern) @ torch.eye(200) + noise * torch.eye(200)
    g_ref = torch.autograd.grad(torch.distributions.MultivariateNormal(torch.zeros(200), A).log_prob(y), p)[0]
    assert (g - g_ref).norm() < 0.15 * g_ref.norm() + 1.0, (g, g_ref)


def test_marginal_bad_input_names_the_argument():
    """As the NumPyro twin's test_bad_input: the noise and the observations, which linear_operator's CG
    would otherwise meet as NaN products (RuntimeError) or torch's argument validation."""
    X, kern, y, noise = _marginal_problem(50)
    for bad in (-0.1, 0.0, float("nan"), torch.ones(2)):
        with pytest.raises(ValueError, match="noise"):
            SimplexGPMarginal(kern, X, bad)
    m = SimplexGPMarginal(kern, X, noise)
    with pytest.raises(ValueError, match="y: expected shape"):
        m.log_prob(y[:10])
    with pytest.raises(ValueError, match="y: contains NaN"):
        m.log_prob(torch.where(torch.arange(50) == 3, float("nan"), y))


def test_prior_samples_and_marginal_samples_have_the_operators_covariance():
    # exact: the draws are R^T eps with R^T R the operator's matrix, to round-off; then by Monte Carlo, the draws'
    # covariance (and the marginal's, with its noise and mean)
    X, kern = _problem(30, 3, "matern32")
    op = LatticeKernelOperator(X, kern)
    with torch.no_grad():
        K = op.to_dense()
        Rt = op.variance.sqrt() * op.lattice.s0[:, None] * op.lattice.blur_slice(torch.eye(op.lattice.impl.m))
    torch.testing.assert_close(Rt @ Rt.T, K, rtol=1e-12, atol=1e-13)
    torch.manual_seed(0)
    f = op.prior_samples(40000)
    assert f.shape == (40000, 30) and not f.requires_grad
    torch.testing.assert_close(f.T @ f / 40000, K, rtol=0, atol=0.05 * K.diagonal().max().item())
    g = torch.Generator().manual_seed(3)
    torch.testing.assert_close(op.prior_samples(2, generator=g), op.prior_samples(2, generator=torch.Generator().manual_seed(3)))
    m = SimplexGPMarginal(kern, X, torch.tensor(0.3), mean=2.0)
    y = m.sample((200, 100))
    assert y.shape == (200, 100, 30)
    cov = torch.cov(y.reshape(-1, 30).T)
    torch.testing.assert_close(cov, K + 0.3 * torch.eye(30), rtol=0, atol=0.05 * K.diagonal().max().item())
    assert abs(y.mean().item() - 2.0) < 0.05


def test_marginal_under_nuts_rejects_lengthscales_the_lattice_cannot_hold():
    # NUTS's step-size search from a large step proposes lengthscales of 0 and inf, and spans of 1e49
    # lengthscales, beyond the lattice's 32-bit coordinates: called directly those raise DomainError; under
    # NUTS the step is rejected (a NaN potential energy) with a DomainWarning and the run goes on
    X, kern, y, noise = _marginal_problem(60)
    with pytest.raises(DomainError, match="X: inputs span .* lengthscales"):
        SimplexGPMarginal(gpk.RBF(3, lengthscale=torch.full((3,), 1e-9)), X, noise)
    with pytest.warns(DomainWarning, match="lengthscale: must be finite and positive"):
        _, energy = potential_grad(
            lambda z: -SimplexGPMarginal(gpk.RBF(3, lengthscale=z["ell"]), X, noise).log_prob(y),
            {"ell": torch.tensor([1.0, math.inf, 1.0])})
    assert torch.isnan(energy)

    def model(X, y):
        ell = pyro.sample("ell", pyro.distributions.LogNormal(torch.zeros(3), 1.0).to_event(1))
        noise = pyro.sample("noise", pyro.distributions.LogNormal(-2.0, 1.0))
        pyro.sample("y", SimplexGPMarginal(gpk.RBF(3, lengthscale=ell), X, noise), obs=y)

    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model, step_size=1e3, max_tree_depth=3), warmup_steps=5, num_samples=3, disable_progbar=True)
    with pytest.warns(DomainWarning, match="HMC/NUTS rejects this step"):
        mcmc.run(X, y)
    samples = mcmc.get_samples()
    assert samples["ell"].shape == (3, 3) and torch.isfinite(samples["ell"]).all()
    draws = Predictive(model, samples)(X, None)["y"]  # the marginal's own draws at the unobserved site
    assert draws.shape == (3, 60) and torch.isfinite(draws).all()


def test_marginal_solver_options_and_fewer_points_than_the_default_preconditioner_rank():
    X, kern, y, noise = _marginal_problem(6)
    for kwargs, name in (({"cg_tol": 0.0}, "cg_tol"), ({"num_probes": 0}, "num_probes"),
                         ({"max_cg_iter": 2.5}, "max_cg_iter"), ({"precond_rank": -1}, "precond_rank"),
                         ({"precond_rank": 7}, "precond_rank: at most N = 6"), ({"precond_rank": 2.0}, "precond_rank")):
        with pytest.raises(ValueError, match=name):
            SimplexGPMarginal(kern, X, noise, **kwargs)
    # precond_rank=None is 15 capped at N (as the NumPyro marginal's); the log-determinant is the SLQ estimate
    m = SimplexGPMarginal(kern, X, noise, num_probes=256)
    assert m.precond_rank == 6 and SimplexGPMarginal(kern, X, noise, precond_rank=3).precond_rank == 3
    A = _dense_joint(m.op) + noise * torch.eye(6)
    ref = torch.distributions.MultivariateNormal(torch.zeros(6), A).log_prob(y)
    torch.manual_seed(1)
    assert abs(m.log_prob(y) - ref) < 0.05 * abs(torch.linalg.slogdet(A)[1]) + 0.05, (m.log_prob(y), ref)


def test_marginal_predict_warns_when_cg_stops_before_its_tolerance():
    X, kern, y, noise = _marginal_problem()
    X_new = torch.randn(20, 3, generator=torch.Generator().manual_seed(9))
    with pytest.warns(RuntimeWarning, match=r"max_cg_iter=2 iterations .* above cg_tol=1e-12"):
        SimplexGPMarginal(kern, X, noise, cg_tol=1e-12, max_cg_iter=2).predict(y, X_new, variance_rank=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SimplexGPMarginal(kern, X, noise, cg_tol=1e-6).predict(y, X_new, variance_rank=5)


def test_marginal_predict_neighbor_variances_bound_and_reach_the_exact_gp():
    X, kern, y, noise = _marginal_problem()
    X_new = torch.randn(40, 3, generator=torch.Generator().manual_seed(9))
    m = SimplexGPMarginal(kern, X, noise, cg_tol=1e-8)
    ell = kern.lengthscale.detach().numpy()
    _, exact = gp_predict("rbf", X.numpy(), y.numpy(), X_new.numpy(), 1.3, ell, 0.1)
    exact = torch.as_tensor(exact)
    full = m.predict(y, X_new, noiseless=True, neighbors=300)
    torch.testing.assert_close(full.variance, exact, rtol=0, atol=1e-9)
    few, more = (m.predict(y, X_new, noiseless=True, neighbors=j).variance for j in (10, 60))
    assert torch.all(more >= exact - 1e-10) and torch.all(few >= more - 1e-10) and torch.all(few <= 1.3)
    assert (few - exact).max() > 1e-4
    noisy = m.predict(y, X_new, neighbors=10)
    torch.testing.assert_close(noisy.variance, few + noise, rtol=0, atol=1e-12)
    torch.testing.assert_close(noisy.mean, m.predict(y, X_new, variance_rank=5).mean, rtol=0, atol=1e-12)
    for bad in (0, 301, 2.5, True):
        with pytest.raises(ValueError, match="neighbors"):
            m.predict(y, X_new, neighbors=bad)
    with pytest.raises(ValueError, match="neighbors or variance_rank, not both"):
        m.predict(y, X_new, neighbors=5, variance_rank=5)


def test_marginal_predict_progress_bar_counts_every_test_point(capsys):
    X, kern, y, noise = _marginal_problem()
    X_new = torch.randn(40, 3, generator=torch.Generator().manual_seed(9))
    m = SimplexGPMarginal(kern, X, noise, cg_tol=1e-6)
    quiet = m.predict(y, X_new, chunk=16)
    assert capsys.readouterr().err == ""
    shown = m.predict(y, X_new, chunk=16, progress_bar=True)  # 3 chunks of CG solves: 16 + 16 + 8 points
    last = capsys.readouterr().err.split("\r")[-1]
    assert "Simplex-GP variances: 100%" in last and "40/40" in last
    torch.testing.assert_close(shown.variance, quiet.variance, rtol=0, atol=0)
    m.predict(y, X_new, neighbors=10, progress_bar=True)
    last = capsys.readouterr().err.split("\r")[-1]
    assert "neighbour variances: 100%" in last and "40/40" in last


def test_marginal_predict_matches_dense_joint_posterior():
    X, kern, y, noise = _marginal_problem()
    X_new = torch.randn(40, 3, generator=torch.Generator().manual_seed(9))
    m = SimplexGPMarginal(kern, X, noise, cg_tol=1e-5)
    pred = m.predict(y, X_new)
    assert isinstance(pred, pyro.distributions.Independent) and pred.event_shape == (40,)
    J = _dense_joint(m.op, X_new)
    Kxx, Ksx = J[:300, :300] + noise * torch.eye(300), J[300:, :300]
    mean = Ksx @ torch.linalg.solve(Kxx, y)
    var = kern.variance.detach() - (Ksx * torch.linalg.solve(Kxx, Ksx.T).T).sum(1) + noise
    # equal up to the CG tolerance (1e-5 relative residual)
    torch.testing.assert_close(pred.mean, mean, rtol=0, atol=1e-3)
    torch.testing.assert_close(pred.variance, var, rtol=0, atol=1e-3)
    f = m.predict(y, X_new, noiseless=True)
    torch.testing.assert_close(f.variance, var - noise, rtol=0, atol=1e-3)
    # preconditioned CG to a tight tolerance: equal to the dense posterior to rounding
    tight = SimplexGPMarginal(kern, X, noise, cg_tol=1e-10)
    torch.testing.assert_close(tight.predict(y, X_new, chunk=16).mean, mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(tight.predict(y, X_new, chunk=16).variance, var, rtol=0, atol=1e-7)
    # Lanczos (LOVE) variances: never below the exact ones, and exact with the whole Krylov space
    love = [tight.predict(y, X_new, variance_rank=r) for r in (10, 300)]
    torch.testing.assert_close(love[0].mean, mean, rtol=0, atol=1e-7)
    assert torch.all(love[0].variance >= var - 1e-9) and torch.all(love[1].variance >= var - 1e-9)
    assert (love[0].variance - var).max() > 1e-6  # 10 steps do not span the cross-covariances
    torch.testing.assert_close(love[1].variance, var, rtol=0, atol=1e-6)
    for bad in (0, 301, 2.5):
        with pytest.raises(ValueError, match="variance_rank"):
            m.predict(y, X_new, variance_rank=bad)
    with pytest.raises(ValueError, match="chunk"):
        m.predict(y, X_new, chunk=0)
    with pytest.raises(ValueError, match="X_new"):
        m.predict(y, torch.randn(4, 2))
    with pytest.raises(ValueError, match="y"):
        m.predict(y[:10], X_new)
