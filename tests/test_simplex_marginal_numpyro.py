"""SimplexGPMarginal (NumPyro): log_prob against the dense float64 reference on the operator's own
matrix, the SLQ and gradient estimators against their dense formulas with the same probes,
gradients against finite differences and the dense exact gradient, predict against the dense
posterior, agreement with the Pyro marginal, SVI under jit, bad input."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_scalegp import kernels as nk
from numpyro_scalegp.lattice import LatticeKernelOperator, SimplexGPMarginal, _pivoted_cholesky
from scalegp import krylov
from scalegp.domain import DomainError, DomainWarning
from tests.reference import gp_predict, log_marginal

pytestmark = pytest.mark.usefixtures("jax_x64")

ELL = np.array([1.0, 1.2, 0.9])


def _problem(n=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = np.sin(2 * X.sum(1)) + 0.3 * rng.normal(size=n)
    return X, y, nk.RBF(3, variance=1.3, lengthscale=jnp.asarray(ELL))


def _dense(op):
    return np.asarray(op @ jnp.eye(op.shape[0]))


def _dense_log_prob(X, y, kernel, noise, mean=0.0):
    """Exact log N(y | mean, K_lattice + noise I) on the operator's dense matrix, differentiable."""
    K = LatticeKernelOperator(X, kernel) @ jnp.eye(len(y))
    return jax.scipy.stats.multivariate_normal.logpdf(jnp.asarray(y), mean + jnp.zeros(len(y)),
                                                      K + noise * jnp.eye(len(y)))


def test_log_prob_matches_dense_reference():
    X, y, k = _problem()
    m = SimplexGPMarginal(k, X, 0.1)
    A = _dense(m.op) + 0.1 * np.eye(200)
    ref = log_marginal(_dense(m.op), y, 0.1)
    logdet = np.linalg.slogdet(A)[1]
    vals = np.array([float(SimplexGPMarginal(k, X, 0.1, cg_tol=1e-6, num_probes=64, key=jax.random.PRNGKey(s))
                           .log_prob(y)) for s in range(4)])
    # each estimate within the SLQ tolerance of 64 probes (measured standard deviation 1.2 here); their
    # mean closer (the estimator is unbiased)
    assert np.all(np.abs(vals - ref) < 0.02 * abs(logdet) + 1.0), (vals, ref)
    assert abs(vals.mean() - ref) < 2.0, (vals, ref)
    # the quadratic term is exact up to CG: the gradient with respect to a constant mean is sum(A^-1 (y - m))
    g_mean = jax.grad(lambda mu: SimplexGPMarginal(k, X, 0.1, mean=mu, cg_tol=1e-10).log_prob(y))(0.2)
    np.testing.assert_allclose(g_mean, np.linalg.solve(A, y - 0.2).sum(), rtol=1e-7)


def test_float32():
    X, y, k = _problem()
    ref = log_marginal(_dense(LatticeKernelOperator(X, k)), y, 0.1)  # float64
    jax.config.update("jax_enable_x64", False)  # the jax_x64 fixture restores the setting afterwards
    try:
        m = SimplexGPMarginal(k, X.astype(np.float32), 0.1, cg_tol=1e-4, num_probes=64)
        lp = m.log_prob(y.astype(np.float32))
        g = jax.grad(lambda ell: SimplexGPMarginal(nk.RBF(3, variance=1.3, lengthscale=ell), X.astype(np.float32),
                                                    0.1, num_probes=64).log_prob(y.astype(np.float32)))(jnp.asarray(ELL, jnp.float32))
    finally:
        jax.config.update("jax_enable_x64", True)
    assert lp.dtype == jnp.float32 and g.dtype == jnp.float32 and np.all(np.isfinite(g))
    assert abs(float(lp) - ref) < 0.02 * 280 + 1.0, (float(lp), ref)  # |log det| is about 280 here


@pytest.mark.parametrize("rank", [0, 5])
@pytest.mark.filterwarnings("ignore:SimplexGPMarginal.log_prob. CG stopped:RuntimeWarning")  # run to exhaustion
def test_slq_equals_dense_quadrature_with_the_same_probes(rank):
    """With CG run to exhaustion the Lanczos quadrature is exact for every probe, so the estimate equals
    log det P + mean_i (P^-1/2 z_i)^T log(P^-1/2 A P^-1/2) (P^-1/2 z_i) computed densely."""
    X, y, k = _problem(n=60, seed=1)
    m = SimplexGPMarginal(k, X, 0.1, cg_tol=1e-13, max_cg_iter=60, num_probes=4, precond_rank=rank,
                          key=jax.random.PRNGKey(7))
    K = _dense(m.op)
    A = K + 0.1 * np.eye(60)
    L = np.asarray(_pivoted_cholesky(lambda i: jnp.asarray(K)[:, i], jnp.full(60, 1.3), rank))
    P = L @ L.T + 0.1 * np.eye(60)
    eps = np.asarray(m.probes())
    z = L @ eps[:rank] + np.sqrt(0.1) * eps[rank:]
    ev, V = np.linalg.eigh(P)
    P_half_inv = V @ np.diag(ev**-0.5) @ V.T
    ev, V = np.linalg.eigh(P_half_inv @ A @ P_half_inv)
    logm = V @ np.diag(np.log(ev)) @ V.T
    w = P_half_inv @ z
    logdet = np.linalg.slogdet(P)[1] + np.mean(np.einsum("ni,nm,mi->i", w, logm, w))
    expected = -0.5 * (y @ np.linalg.solve(A, y) + logdet + 60 * np.log(2 * np.pi))
    np.testing.assert_allclose(float(m.log_prob(y)), expected, rtol=1e-9)


def test_cg_tridiagonal_numpy_matches_lanczos_of_the_matrix():
    # the shared numpy/JAX code: CG coefficients -> tridiagonal whose quadrature is z^T log(A) z
    rng = np.random.default_rng(0)
    B = rng.normal(size=(20, 20))
    A = B @ B.T / 20 + 0.5 * np.eye(20)
    z = rng.normal(size=(20, 2))
    x, r, p, rz = np.zeros_like(z), z.copy(), z.copy(), (z * z).sum(0)
    alphas, betas = [], []
    for _ in range(20):
        Ap = A @ p
        a = rz / (p * Ap).sum(0)
        x, r = x + a * p, r - a * Ap
        b = (r * r).sum(0) / rz
        rz, p = (r * r).sum(0), r + b * p
        alphas.append(a)
        betas.append(b)
    active = np.ones((20, 2), bool)
    active[12:, 1] = False  # the second system stopped after 12 steps: padded, its quadrature is a 12-point one
    T = krylov.cg_tridiagonal(np, np.array(alphas), np.array(betas), active)
    ev, V = np.linalg.eigh(A)
    exact = np.einsum("ni,nm,mi->i", z, V @ np.diag(np.log(ev)) @ V.T, z)
    est = [krylov.slq_logdet(np, T[i:i + 1], (z[:, i] ** 2).sum(keepdims=True)) for i in range(2)]
    assert est[0] == pytest.approx(exact[0], rel=1e-10)
    assert est[1] == pytest.approx(exact[1], rel=1e-5)
    T12 = krylov.cg_tridiagonal(np, np.array(alphas)[:12, 1:], np.array(betas)[:12, 1:], active[:12, 1:])
    np.testing.assert_array_equal(T[1][:12, :12], T12[0])  # the stopped system: its 12 steps, then identity
    np.testing.assert_array_equal(T[1][12:, 12:], np.eye(8))
    assert not T[1][:12, 12:].any()
    assert krylov.lanczos_steps(1000) == 100 and krylov.lanczos_steps(30) == 30


def test_gradient_is_the_stated_estimator_with_the_same_probes():
    """d/dtheta = 1/2 a^T dK a - 1/(2p) sum_i (A^-1 z_i)^T dK (P^-1 z_i), with a, A^-1 z_i, P^-1 z_i from
    dense solves and the dK products differentiated through the operator; the noise and mean parts too."""
    X, y, k = _problem(n=120, seed=2)
    rank, p, noise = 5, 8, 0.1
    m = SimplexGPMarginal(k, X, noise, cg_tol=1e-12, num_probes=p, precond_rank=rank, key=jax.random.PRNGKey(3))
    g_k, g_noise, g_mean = jax.grad(
        lambda kk, s, mu: SimplexGPMarginal(kk, X, s, mean=mu, cg_tol=1e-12, num_probes=p, precond_rank=rank,
                                            key=jax.random.PRNGKey(3)).log_prob(y), argnums=(0, 1, 2))(k, noise, 0.0)
    K = _dense(m.op)
    A = K + noise * np.eye(120)
    L = np.asarray(_pivoted_cholesky(lambda i: jnp.asarray(K)[:, i], jnp.full(120, 1.3), rank))
    P = L @ L.T + noise * np.eye(120)
    eps = np.asarray(m.probes())
    z = L @ eps[:rank] + np.sqrt(noise) * eps[rank:]
    a, S, Pz = np.linalg.solve(A, y), np.linalg.solve(A, z), np.linalg.solve(P, z)

    def estimator(kk):
        op = LatticeKernelOperator(X, kk)
        return 0.5 * a @ (op @ a) - 0.5 / p * jnp.sum(S * (op @ jnp.asarray(Pz)))

    ref = jax.grad(estimator)(k)
    np.testing.assert_allclose(g_k.lengthscale, ref.lengthscale, rtol=1e-7)
    np.testing.assert_allclose(g_k.variance, ref.variance, rtol=1e-7)
    np.testing.assert_allclose(g_noise, 0.5 * a @ a - 0.5 / p * np.sum(S * Pz), rtol=1e-7)
    np.testing.assert_allclose(g_mean, a.sum(), rtol=1e-7)


def test_gradients_against_finite_differences_and_dense_gradient():
    X, y, k = _problem()

    def lp(ell, var, noise, mean, probes=256, tol=1e-6):
        kern = nk.RBF(3, variance=var, lengthscale=ell)
        return SimplexGPMarginal(kern, X, noise, mean=mean, cg_tol=tol, num_probes=probes).log_prob(y)

    args = (jnp.asarray(ELL), 1.3, 0.1, 0.2)
    g = jax.jit(jax.grad(lp, argnums=(0, 1, 2, 3)))(*args)
    g_ref = jax.grad(_dense_log_prob, argnums=(2, 3, 4))(X, y, k, 0.1, 0.2)
    dense_k = g_ref[0]
    # the trace term is a stochastic estimate (256 probes; measured error 3% of the norm here)
    assert np.linalg.norm(g[0] - dense_k.lengthscale) < 0.1 * np.linalg.norm(dense_k.lengthscale), (g[0], dense_k)
    assert abs(g[1] - dense_k.variance) < 0.05 * abs(dense_k.variance) + 1.0
    assert abs(g[2] - g_ref[1]) < 0.05 * abs(g_ref[1]) + 1.0
    np.testing.assert_allclose(g[3], g_ref[2], rtol=1e-5)
    # finite differences of the estimator itself with fixed probes (the lattice does not move with the
    # noise or the mean, so the estimator is smooth there): the mean exactly (log p is quadratic in it, so
    # a central difference with a large step is exact), the noise within its SLQ error
    fd_mean = (lp(*args[:3], 0.3, 16, 1e-10) - lp(*args[:3], 0.1, 16, 1e-10)) / 0.2
    np.testing.assert_allclose(jax.grad(lp, argnums=3)(*args[:3], 0.2, 16, 1e-10), fd_mean, rtol=1e-6)
    eps = 1e-3
    fd_noise = (lp(args[0], 1.3, 0.1 + eps, 0.2) - lp(args[0], 1.3, 0.1 - eps, 0.2)) / (2 * eps)
    assert abs(g[2] - fd_noise) < 0.05 * abs(fd_noise), (g[2], fd_noise)


def test_log_prob_warns_when_cg_stops_before_its_tolerance():
    # from inside jit and grad too (a host callback), as linear_operator warns in the Pyro frontend
    X, y, k = _problem(n=300)
    m = SimplexGPMarginal(k, X, 0.01, cg_tol=1e-12, max_cg_iter=2)
    with pytest.warns(RuntimeWarning, match=r"log_prob: CG stopped after max_cg_iter=2 iterations .* cg_tol=1e-12"):
        float(m.log_prob(y))
    with pytest.warns(RuntimeWarning, match=r"log_prob: CG stopped after max_cg_iter=2"):
        g = jax.jit(jax.grad(lambda noise: SimplexGPMarginal(k, X, noise, cg_tol=1e-12, max_cg_iter=2).log_prob(y)))(0.01)
        float(g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        float(SimplexGPMarginal(k, X, 0.1, cg_tol=1e-6).log_prob(y))


def test_predict_warns_when_cg_stops_before_its_tolerance():
    X, y, k = _problem(n=300)
    X_new = np.random.default_rng(9).normal(size=(20, 3))
    with pytest.warns(RuntimeWarning, match=r"max_cg_iter=2 iterations .* above cg_tol=1e-12"):
        SimplexGPMarginal(k, X, 0.01, cg_tol=1e-12, max_cg_iter=2).predict(y, X_new, variance_rank=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SimplexGPMarginal(k, X, 0.1, cg_tol=1e-6).predict(y, X_new, variance_rank=5)


def test_predict_matches_dense_joint_posterior():
    X, y, k = _problem(n=300)
    X_new = np.random.default_rng(9).normal(size=(40, 3))
    m = SimplexGPMarginal(k, X, 0.1, mean=0.3, cg_tol=1e-10)
    pred = m.predict(y, X_new, chunk=16)
    assert pred.event_shape == (40,) and pred.batch_shape == ()
    J = _dense(LatticeKernelOperator(np.concatenate([X, X_new]), k))
    Kxx, Ksx = J[:300, :300] + 0.1 * np.eye(300), J[300:, :300]
    mean = 0.3 + Ksx @ np.linalg.solve(Kxx, y - 0.3)
    var = 1.3 - np.einsum("ij,ji->i", Ksx, np.linalg.solve(Kxx, Ksx.T))
    np.testing.assert_allclose(pred.mean, mean, rtol=0, atol=1e-7)
    np.testing.assert_allclose(pred.variance, var + 0.1, rtol=0, atol=1e-7)
    np.testing.assert_allclose(m.predict(y, X_new, noiseless=True).variance, var, rtol=0, atol=1e-7)
    # Lanczos (LOVE) variances: never below the exact ones, and close to them with enough steps
    love = [m.predict(y, X_new, noiseless=True, variance_rank=r) for r in (10, 300)]
    np.testing.assert_allclose(love[0].mean, mean, rtol=0, atol=1e-7)
    assert np.all(love[0].variance >= var - 1e-9) and np.all(love[1].variance >= var - 1e-9)
    np.testing.assert_allclose(love[1].variance, var, rtol=0, atol=1e-6)  # the whole Krylov space: exact
    with pytest.raises(ValueError, match="variance_rank"):
        m.predict(y, X_new, variance_rank=0)
    with pytest.raises(ValueError, match="X_new"):
        m.predict(y, np.ones((4, 2)))
    with pytest.raises(ValueError, match="y"):
        m.predict(y[:10], X_new)


@pytest.mark.parametrize("cls, name", [(nk.RBF, "rbf"), (nk.Matern52, "matern52")])
def test_predict_neighbor_variances_bound_and_reach_the_exact_gp(cls, name):
    X, y, _ = _problem(n=300)
    k = cls(3, variance=1.3, lengthscale=jnp.asarray(ELL))
    X_new = np.random.default_rng(9).normal(size=(40, 3))
    m = SimplexGPMarginal(k, X, 0.1, cg_tol=1e-8)
    _, exact = gp_predict(name, X, y, X_new, 1.3, ELL, 0.1)  # the exact kernel's latent variances
    # conditioned on every training point: the exact GP's variances
    np.testing.assert_allclose(m.predict(y, X_new, noiseless=True, neighbors=300).variance, exact, rtol=0, atol=1e-9)
    # on fewer (nested sets of nearest points): never below the exact variances, never above fewer points'
    few, more = (np.asarray(m.predict(y, X_new, noiseless=True, neighbors=j).variance) for j in (10, 60))
    assert np.all(more >= exact - 1e-10) and np.all(few >= more - 1e-10) and np.all(few <= 1.3)
    assert (few - exact).max() > 1e-4  # ten points do not carry all the information
    noisy = m.predict(y, X_new, neighbors=10)
    np.testing.assert_allclose(noisy.variance, few + 0.1, rtol=0, atol=1e-12)
    # the mean is still the lattice GP's (CG), whatever the variances
    np.testing.assert_allclose(noisy.mean, m.predict(y, X_new, variance_rank=5).mean, rtol=0, atol=1e-12)
    for bad in (0, 301, 2.5, True):
        with pytest.raises(ValueError, match="neighbors"):
            m.predict(y, X_new, neighbors=bad)
    with pytest.raises(ValueError, match="neighbors or variance_rank, not both"):
        m.predict(y, X_new, neighbors=5, variance_rank=5)


def test_predict_progress_bar_counts_every_test_point(capsys):
    X, y, k = _problem(n=300)
    X_new = np.random.default_rng(9).normal(size=(40, 3))
    m = SimplexGPMarginal(k, X, 0.1, cg_tol=1e-6)
    quiet = m.predict(y, X_new, chunk=16)
    assert capsys.readouterr().err == ""
    shown = m.predict(y, X_new, chunk=16, progress_bar=True)  # 3 chunks of CG solves: 16 + 16 + 8 points
    last = capsys.readouterr().err.split("\r")[-1]
    assert "Simplex-GP variances: 100%" in last and "40/40" in last
    np.testing.assert_array_equal(shown.variance, quiet.variance)
    m.predict(y, X_new, neighbors=10, progress_bar=True)
    last = capsys.readouterr().err.split("\r")[-1]
    assert "neighbour variances: 100%" in last and "40/40" in last


def test_agrees_with_pyro_marginal(float64, pyro_clean):
    import torch
    from pyro.contrib.gp import kernels as gpk

    from pyro_scalegp.lattice import SimplexGPMarginal as PyroMarginal

    X, y, k = _problem(n=200, seed=4)
    X_new = np.random.default_rng(5).normal(size=(30, 3))
    kt = gpk.RBF(3, variance=torch.tensor(1.3), lengthscale=torch.tensor(ELL))
    torch.manual_seed(0)
    mt = PyroMarginal(kt, torch.tensor(X), torch.tensor(0.3), cg_tol=1e-6, num_probes=64)
    lp_t = mt.log_prob(torch.tensor(y))
    g_t = torch.autograd.grad(lp_t, [kt.lengthscale_unconstrained])[0] / kt.lengthscale.detach()  # d/d lengthscale
    m = SimplexGPMarginal(k, X, 0.3, cg_tol=1e-6, num_probes=64)
    lp, g = jax.value_and_grad(lambda kk: SimplexGPMarginal(kk, X, 0.3, cg_tol=1e-6, num_probes=64).log_prob(y))(k)
    logdet = np.linalg.slogdet(_dense(m.op) + 0.3 * np.eye(200))[1]
    # both are SLQ estimates with 64 probes of the same quantity on the same operator
    assert abs(float(lp) - lp_t.item()) < 0.02 * abs(logdet) + 2.0, (float(lp), lp_t.item())
    assert np.linalg.norm(np.asarray(g.lengthscale) - g_t.numpy()) < 0.2 * np.linalg.norm(g_t.numpy()) + 1.0
    # predictions are CG solves (no probes): equal up to the CG tolerances
    with torch.no_grad():
        pt = PyroMarginal(kt, torch.tensor(X), torch.tensor(0.3), cg_tol=1e-6).predict(torch.tensor(y),
                                                                                      torch.tensor(X_new))
    pj = SimplexGPMarginal(k, X, 0.3, cg_tol=1e-6).predict(y, X_new)
    np.testing.assert_allclose(pj.mean, pt.mean.numpy(), atol=1e-4)
    np.testing.assert_allclose(pj.variance, pt.variance.numpy(), atol=1e-4)
    # the Lanczos (LOVE) variances: the same Krylov space, so equal up to rounding
    with torch.no_grad():
        lt = PyroMarginal(kt, torch.tensor(X), torch.tensor(0.3), cg_tol=1e-6).predict(
            torch.tensor(y), torch.tensor(X_new), variance_rank=12)
    lj = SimplexGPMarginal(k, X, 0.3, cg_tol=1e-6).predict(y, X_new, variance_rank=12)
    np.testing.assert_allclose(lj.variance, lt.variance.numpy(), rtol=0, atol=1e-8)
    assert np.all(lj.variance >= pj.variance - 1e-4)
    # the nearest-neighbour variances: the same exact-kernel computation
    with torch.no_grad():
        nt = PyroMarginal(kt, torch.tensor(X), torch.tensor(0.3), cg_tol=1e-6).predict(
            torch.tensor(y), torch.tensor(X_new), neighbors=25)
    nj = SimplexGPMarginal(k, X, 0.3, cg_tol=1e-6).predict(y, X_new, neighbors=25)
    np.testing.assert_allclose(nj.variance, nt.variance.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(nj.mean, pj.mean, rtol=0, atol=1e-12)


def test_svi_under_jit_lowers_the_loss():
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO

    X, y, _ = _problem(n=300, seed=6)

    def model(X, y):
        ell = numpyro.param("ell", jnp.full(3, 2.0), constraint=dist.constraints.positive)
        var = numpyro.param("var", 0.5, constraint=dist.constraints.positive)
        noise = numpyro.param("noise", 0.5, constraint=dist.constraints.positive)
        numpyro.sample("y", SimplexGPMarginal(nk.Matern52(3, variance=var, lengthscale=ell), X, noise,
                                              cg_tol=1e-3, num_probes=8, key=numpyro.prng_key()), obs=y)

    svi = SVI(model, lambda X, y: None, numpyro.optim.Adam(0.1), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), X, y)
    update = jax.jit(svi.update)
    losses = []
    for _ in range(12):
        state, loss = update(state, jnp.asarray(X), jnp.asarray(y))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < losses[0] - 20, losses
    params = svi.get_params(state)
    assert params["noise"] < 0.5


def test_prior_samples_and_marginal_samples_have_the_operators_covariance():
    # the same draws built eagerly and inside jit (whose lattice size is known only when it runs) and under vmap;
    # their covariance (and the marginal's, with its noise and mean) by Monte Carlo
    X, _, _ = _problem(n=30, seed=4)
    k = nk.Matern32(3, variance=1.7, lengthscale=jnp.asarray(ELL))
    op = LatticeKernelOperator(X, k)
    K = _dense(op)
    key = jax.random.PRNGKey(0)
    f = op.prior_samples(key, 40000)
    assert f.shape == (40000, 30)
    np.testing.assert_allclose(np.asarray(f.T @ f) / 40000, K, rtol=0, atol=0.05 * K.diagonal().max())
    traced = jax.jit(lambda kk, key: LatticeKernelOperator(X, kk).prior_samples(key, 3))
    np.testing.assert_allclose(traced(k, key), op.prior_samples(key, 3), rtol=1e-12, atol=1e-13)
    keys = jax.random.split(key, 2)
    batched = jax.vmap(lambda key: op.prior_samples(key, 3))(keys)
    np.testing.assert_allclose(batched[1], op.prior_samples(keys[1], 3), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(jax.grad(lambda kk: LatticeKernelOperator(X, kk).prior_samples(key, 2).sum())(k).variance,
                               0.0)  # not differentiable: zero, not a wrong gradient
    m = SimplexGPMarginal(k, X, 0.3, mean=2.0)
    y = np.asarray(m.sample(jax.random.PRNGKey(1), (200, 100)))
    assert y.shape == (200, 100, 30)
    np.testing.assert_allclose(np.cov(y.reshape(-1, 30).T), K + 0.3 * np.eye(30), rtol=0, atol=0.05 * K.diagonal().max())
    assert abs(y.mean() - 2.0) < 0.05


def test_nuts_rejects_lengthscales_the_lattice_cannot_hold():
    # NUTS's step-size search starting from a large step proposes lengthscales of 0 and inf, and spans of
    # 1e97 lengthscales, beyond the lattice's 32-bit coordinates. Built eagerly such values raise; inside
    # jit the build warns and log_prob is NaN, which NUTS rejects, so the run goes on
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS, Predictive

    X, y, _ = _problem(n=60, seed=1)
    with pytest.raises(DomainError, match="X: inputs span .* lengthscales"):
        SimplexGPMarginal(nk.RBF(3, 1.0, jnp.full(3, 1e-9)), X, 0.1)
    lp = jax.jit(lambda ell: SimplexGPMarginal(nk.RBF(3, 1.0, ell), X, 0.1).log_prob(y))
    grad = jax.jit(jax.grad(lp))
    for ell, message in ((1e-9, "X: inputs span"), (np.inf, "lengthscale: must be finite and positive")):
        with pytest.warns(DomainWarning, match=message):
            assert np.isnan(float(lp(jnp.full(3, ell))))
        with pytest.warns(DomainWarning, match=message):
            assert np.isnan(grad(jnp.full(3, ell))).all()
    np.testing.assert_allclose(float(lp(jnp.ones(3))),
                               float(SimplexGPMarginal(nk.RBF(3, 1.0, jnp.ones(3)), X, 0.1).log_prob(y)), rtol=1e-10)

    def model(X, y):
        ell = numpyro.sample("ell", dist.LogNormal(jnp.zeros(3), 1.0).to_event(1))
        noise = numpyro.sample("noise", dist.LogNormal(-2.0, 1.0))
        numpyro.sample("y", SimplexGPMarginal(nk.RBF(3, 1.0, ell), X, noise), obs=y)

    mcmc = MCMC(NUTS(model, step_size=1e3, max_tree_depth=3), num_warmup=5, num_samples=3, progress_bar=False)
    with pytest.warns(DomainWarning):
        mcmc.run(jax.random.PRNGKey(0), jnp.asarray(X), jnp.asarray(y))
    samples = mcmc.get_samples()
    assert samples["ell"].shape == (3, 3) and np.isfinite(samples["ell"]).all() and np.isfinite(samples["noise"]).all()
    draws = Predictive(model, samples)(jax.random.PRNGKey(1), jnp.asarray(X), None)["y"]  # the marginal's own draws
    assert draws.shape == (3, 60) and np.isfinite(np.asarray(draws)).all()


def test_fewer_points_than_the_default_preconditioner_rank():
    # precond_rank=None is 15 capped at N: with N = 6 the rank-6 pivoted Cholesky factor is K itself, so the
    # preconditioner is A and CG and the quadrature are exact; an explicit rank above N is refused
    X, y, k = _problem(n=6, seed=2)
    m = SimplexGPMarginal(k, X, 0.1)
    assert m.precond_rank == 6
    np.testing.assert_allclose(float(m.log_prob(y)), log_marginal(_dense(m.op), y, 0.1), rtol=1e-8)
    assert SimplexGPMarginal(k, X, 0.1, precond_rank=4).precond_rank == 4
    with pytest.raises(ValueError, match="precond_rank: at most N = 6"):
        SimplexGPMarginal(k, X, 0.1, precond_rank=7)


def test_bad_input():
    X, y, k = _problem(n=50)
    for kwargs, name in (({"cg_tol": 0.0}, "cg_tol"), ({"num_probes": 0}, "num_probes"),
                         ({"max_cg_iter": 2.5}, "max_cg_iter"), ({"precond_rank": -1}, "precond_rank"),
                         ({"precond_rank": 51}, "precond_rank"), ({"precond_rank": 2.0}, "precond_rank"),
                         ({"num_probes": True}, "num_probes"), ({"mean": np.ones(3)}, "mean"),
                         ({"order": 0}, "order")):
        with pytest.raises(ValueError, match=name):
            SimplexGPMarginal(k, X, 0.1, **kwargs)
    with pytest.raises(ValueError, match="noise"):
        SimplexGPMarginal(k, X, -0.1)
    with pytest.raises(ValueError, match="noise"):
        SimplexGPMarginal(k, X, jnp.ones(2))
    with pytest.raises(ValueError, match="kernel"):
        SimplexGPMarginal(nk.Periodic(3), X, 0.1)
    with pytest.raises(ValueError, match="X"):
        SimplexGPMarginal(k, np.where(np.eye(50, 3) > 0, np.nan, X), 0.1)
    m = SimplexGPMarginal(k, X, 0.1)
    with pytest.raises(ValueError, match="y"):
        m.log_prob(y[:10])
    with pytest.raises(ValueError, match="y"):
        m.log_prob(np.where(np.arange(50) == 3, np.nan, y))
    with pytest.raises(ValueError, match="mean"):
        SimplexGPMarginal(k, X, 0.1, mean=np.zeros(50)).predict(y, X[:3])
