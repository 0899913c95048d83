"""numpyro_scalegp.HGPMarginal against the dense float64 reference (tests/reference.py)."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scalegp import Experts, gp_draws, partition
from scalegp.domain import DomainError, DomainWarning
from tests import reference as ref

KERNEL_NAMES = {"rbf": "RBF", "matern32": "Matern32", "matern52": "Matern52", "exponential": "Exponential"}
VARIANCE, LENGTHSCALE, NOISE, MEAN = 1.3, np.array([0.7, 1.1]), 0.1, 0.2


@pytest.fixture(scope="module", autouse=True)
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, (60, 2))
    y = np.sin(X).sum(1) + 0.3 * rng.standard_normal(60)
    Xs = rng.uniform(-2.5, 2.5, (7, 2))
    return X, y, Xs


def make_kernel(name, variance=VARIANCE, lengthscale=LENGTHSCALE):
    from numpyro_scalegp import kernels
    return getattr(kernels, KERNEL_NAMES[name])(2, variance, jnp.asarray(lengthscale))


def hgp(name, X, experts, **kw):
    from numpyro_scalegp import HGPMarginal
    kw.setdefault("mean", MEAN)
    return HGPMarginal(make_kernel(name), X, kw.pop("noise", NOISE), experts=experts, **kw)


# ------------------------------------------------------------------ the hand-written kernel derivative

@pytest.mark.parametrize("ard", [True, False], ids=["ard", "scalar"])
@pytest.mark.parametrize("name", list(KERNEL_NAMES))
def test_isotropic_gram_derivative_equals_autodiff(name, ard):
    """isotropic_gram's written-out vjp against JAX's autodiff of kernel(X) and against central
    differences, for a non-symmetric cotangent, a duplicated input and a column the kernel skips."""
    from numpyro_scalegp import kernels

    rng = np.random.default_rng(3)
    X = jnp.asarray(rng.uniform(-2, 2, (9, 3)))
    X = X.at[6].set(X[5])  # two equal rows: r = 0 off the diagonal
    G = jnp.asarray(rng.standard_normal((9, 9)))
    ls = jnp.asarray([0.7, 1.3]) if ard else jnp.asarray(0.9)
    k = getattr(kernels, KERNEL_NAMES[name])(2, jnp.asarray(1.4), ls, active_dims=[0, 2])
    K, vjp = jax.vjp(kernels.isotropic_gram, k, X)
    K_ref, vjp_ref = jax.vjp(lambda k, X: k(X), k, X)
    np.testing.assert_array_equal(np.asarray(K), np.asarray(K_ref))
    (dk, dX), (dk_ref, dX_ref) = vjp(G), vjp_ref(G)
    for a, b in zip(jax.tree_util.tree_leaves(dk), jax.tree_util.tree_leaves(dk_ref)):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dX), np.asarray(dX_ref), rtol=1e-10, atol=1e-12)
    assert float(jnp.abs(dX[:, 1]).max()) == 0.0 and float(jnp.abs(dX).max()) > 0.1

    def f(ls_, X_):  # sum(G * K), differentiated by central differences in the lengthscale
        return float(jnp.sum(G * getattr(kernels, KERNEL_NAMES[name])(2, 1.4, ls_, active_dims=[0, 2])(X_)))

    h = 1e-6
    step = jnp.zeros_like(ls).at[..., 0].set(h) if ard else jnp.asarray(h)
    fd = (f(ls + step, X) - f(ls - step, X)) / (2 * h)
    np.testing.assert_allclose(float(jnp.ravel(dk.lengthscale)[0]), fd, rtol=1e-6)


# ------------------------------------------------------------------ values against the reference

@pytest.mark.parametrize("name", list(KERNEL_NAMES))
def test_one_expert_equals_exact_gp(data, name):
    X, y, Xs = data
    d = hgp(name, X, np.arange(60)[None])
    expected = ref.gp_log_marginal(name, X, y, VARIANCE, LENGTHSCALE, NOISE, MEAN)
    np.testing.assert_allclose(float(d.log_prob(y)), expected, rtol=1e-8)
    for noiseless in (True, False):
        mu, var = ref.gp_predict(name, X, y, Xs, VARIANCE, LENGTHSCALE, NOISE, MEAN, noiseless=noiseless)
        for rule in ("poe", "gpoe", "bcm"):  # one expert: these rules give the exact GP (rBCM does not)
            p = d.predict(y, Xs, combine=rule, noiseless=noiseless)
            assert p.event_shape == (7,)
            np.testing.assert_allclose(np.asarray(p.mean), mu, rtol=1e-8)
            np.testing.assert_allclose(np.asarray(p.variance), var, rtol=1e-8)


@pytest.mark.parametrize("name", list(KERNEL_NAMES))
def test_many_experts_equal_reference(data, name):
    X, y, _ = data
    experts = partition(X, expert_size=15, duplication=2, method="kdtree", seed=1)
    d = hgp(name, X, experts)
    expected = ref.hgp_log_marginal(name, X, y, experts.index, VARIANCE, LENGTHSCALE, NOISE, MEAN)
    np.testing.assert_allclose(float(d.log_prob(y)), expected, rtol=1e-10)
    # a per-point mean vector, and several target vectors at once
    mean = np.linspace(-1, 1, 60)
    dv = hgp(name, X, experts, mean=mean)
    Y = np.stack([y, -y, 2 * y])
    expected = [ref.hgp_log_marginal(name, X, t, experts.index, VARIANCE, LENGTHSCALE, NOISE, 0.0)
                for t in Y - mean]
    np.testing.assert_allclose(np.asarray(dv.log_prob(Y)), expected, rtol=1e-10)


def test_gaussian_log_likelihood_and_its_vjp():
    from numpyro_scalegp import gaussian_log_likelihood
    rng = np.random.default_rng(3)
    A = rng.standard_normal((3, 5, 5))
    K = A @ A.transpose(0, 2, 1) + 5 * np.eye(5)
    r = rng.standard_normal((3, 5, 2))
    expected = [[ref.log_marginal(K[k], r[k, :, b], 0.0) for b in range(2)] for k in range(3)]
    np.testing.assert_allclose(np.asarray(gaussian_log_likelihood(K, r)), expected, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gaussian_log_likelihood(K, r[..., 0])), np.asarray(expected)[:, 0])
    w = rng.standard_normal((3, 2))

    @jax.jit
    def f(K, r):
        return jnp.sum(w * gaussian_log_likelihood(K, r))

    gK, gr = jax.grad(f, argnums=(0, 1))(jnp.asarray(K), jnp.asarray(r))
    # directional central differences along symmetric directions (the function reads K as symmetric)
    for _ in range(3):
        B = rng.standard_normal(K.shape)
        dK, dr = B + B.transpose(0, 2, 1), rng.standard_normal(r.shape)
        h = 1e-5
        fd = (f(K + h * dK, r + h * dr) - f(K - h * dK, r - h * dr)) / (2 * h)
        np.testing.assert_allclose(float(jnp.sum(gK * dK) + jnp.sum(gr * dr)), float(fd), rtol=1e-7)


def test_cholesky_inverses_by_blocks():
    """K^-1 and L^-1 r from the Cholesky factor by blocks (one block, several, and a last block
    shorter than the others) equal numpy's, and K^-1 is exactly symmetric."""
    from numpyro_scalegp.hgp import _INVERSE_BLOCK, _cholesky_inverses
    rng = np.random.default_rng(13)
    for n in (_INVERSE_BLOCK - 3, 2 * _INVERSE_BLOCK + 45):
        A = rng.standard_normal((2, n, n))
        K = A @ A.transpose(0, 2, 1) / n + 0.5 * np.eye(n)
        r = rng.standard_normal((2, n, 3))
        L = np.linalg.cholesky(K)
        alpha, K_inv = (np.asarray(t) for t in _cholesky_inverses(jnp.asarray(L), jnp.asarray(r)))
        np.testing.assert_allclose(K_inv, np.linalg.inv(K), rtol=1e-10, atol=1e-10 * np.abs(K_inv).max())
        np.testing.assert_array_equal(K_inv, K_inv.transpose(0, 2, 1))
        np.testing.assert_allclose(alpha, np.linalg.solve(L, r), rtol=1e-10, atol=1e-10 * np.abs(alpha).max())
        np.testing.assert_array_equal(np.asarray(_cholesky_inverses(jnp.asarray(L))), K_inv)


# ------------------------------------------------------------------ combination rules

def _expert_reference(name, X, y, index, Xs):
    preds = [ref.gp_predict(name, X[i], y[i], Xs, VARIANCE, LENGTHSCALE, NOISE, MEAN) for i in index]
    return [m - MEAN for m, _ in preds], [v for _, v in preds]


@pytest.mark.parametrize("num_test", [7, 40], ids=["solves", "inverse"])
def test_expert_predictions_equal_reference_with_fewer_and_more_test_points_than_an_expert(data, num_test):
    """Experts of 12 points: 7 test points take the triangular solves, 40 the product with the inverse of
    the Cholesky factor (numpyro_scalegp.hgp._predict_chunk); both as the dense float64 reference."""
    from numpyro_scalegp.hgp import _Layout, _expert_predictions

    X, y, _ = data
    Xs = np.random.default_rng(8).uniform(-2.5, 2.5, (num_test, 2))
    experts = partition(X, expert_size=12, method="random", seed=2)
    means, variances = _expert_predictions(make_kernel("matern52"), jnp.asarray(X), jnp.asarray(NOISE),
                                           jnp.asarray(y - MEAN), jnp.asarray(1e-10), jnp.asarray(Xs),
                                           layout=_Layout(experts.index), mesh=None, max_chunk=2)
    ref_means, ref_vars = _expert_reference("matern52", X, y, experts.index, Xs)
    np.testing.assert_allclose(np.asarray(means), np.array(ref_means), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.asarray(variances), np.array(ref_vars), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("rule", ["poe", "gpoe", "bcm", "rbcm", "grbcm"])
def test_combination_rules_equal_reference(data, rule):
    X, y, Xs = data
    if rule == "grbcm":
        experts = partition(X, expert_size=20, communication=8, method="random", seed=2)
    else:
        experts = partition(X, expert_size=20, method="kdtree", seed=2)
    d = hgp("matern52", X, experts)
    means, variances = _expert_reference("matern52", X, y, experts.index, Xs)
    if rule == "grbcm":
        pm, pv = ref.gp_predict("matern52", X[experts.communication], y[experts.communication], Xs,
                                VARIANCE, LENGTHSCALE, NOISE, MEAN)
        pm = pm - MEAN
    else:
        pm, pv = np.zeros(len(Xs)), np.full(len(Xs), VARIANCE)
    mu, var = ref.combine_reference(rule, means, variances, pm, pv)
    latent = d.predict(y, Xs, combine=rule, noiseless=True)
    np.testing.assert_allclose(np.asarray(latent.mean), mu + MEAN, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(latent.variance), var, rtol=1e-9)
    noisy = d.predict(y, Xs, combine=rule)
    np.testing.assert_allclose(np.asarray(noisy.variance), var + NOISE, rtol=1e-9)


# ------------------------------------------------------------------ gradients

@pytest.mark.parametrize("name", list(KERNEL_NAMES))
def test_gradients_match_finite_differences(data, name):
    from numpyro_scalegp import HGPMarginal
    X, y, _ = data
    experts = partition(X, expert_size=15, duplication=2, method="random", seed=4)

    def f(p):
        k = make_kernel(name, p["variance"], p["lengthscale"])
        return HGPMarginal(k, X, p["noise"], experts=experts, mean=p["mean"], chunk_size=2).log_prob(y)

    p0 = {"variance": VARIANCE, "lengthscale": LENGTHSCALE, "noise": NOISE, "mean": MEAN}
    grads = jax.jit(jax.grad(f))({k: jnp.asarray(v) for k, v in p0.items()})

    def ref_f(p):
        return ref.hgp_log_marginal(name, X, y, experts.index, p["variance"], p["lengthscale"], p["noise"],
                                    p["mean"])

    h = 1e-6
    for key in p0:
        for i in range(np.size(p0[key])):
            up = {k: np.array(v, dtype=float) for k, v in p0.items()}
            down = {k: np.array(v, dtype=float) for k, v in p0.items()}
            up[key].reshape(-1)[i] += h
            down[key].reshape(-1)[i] -= h
            fd = (ref_f(up) - ref_f(down)) / (2 * h)
            np.testing.assert_allclose(np.asarray(grads[key]).reshape(-1)[i], fd, rtol=1e-6, atol=1e-8,
                                       err_msg=f"{name} d/d{key}[{i}]")


def _dense_hgp(name, X, Y, index, p):
    """Sum over experts of exact log marginals, written densely and differentiated by JAX
    through the Cholesky (the slow way the analytic gradient must equal)."""
    K = make_kernel(name, p["variance"], p["lengthscale"])(X[index]) + p["noise"] * jnp.eye(index.shape[1])
    L = jnp.linalg.cholesky(K)
    R = (Y - p["mean"])[..., index]  # (..., E, n)
    L = jnp.broadcast_to(L, R.shape[:-1] + L.shape[-2:])  # jax < 0.10 does not broadcast batch dimensions
    alpha = jax.scipy.linalg.solve_triangular(L, R[..., None], lower=True)[..., 0]
    logdet = jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)).sum(-1)
    n = index.shape[1]
    return jnp.sum(-0.5 * (alpha**2).sum(-1) - logdet - 0.5 * n * np.log(2 * np.pi), -1)


@pytest.mark.parametrize("name", list(KERNEL_NAMES))
def test_gradient_equals_autodiff_through_cholesky(data, name):
    """The eager analytic gradient (kernel parameters, noise, mean vector, X) equals jax.grad of
    a dense implementation through the Cholesky: one target vector, several target vectors
    (weighted), and vmap over target vectors; overlapping experts, a tree, padded chunks."""
    from numpyro_scalegp import HGPMarginal
    X, y, _ = data
    experts = partition(X, expert_size=15, duplication=2, method="random", seed=11).with_tree([3])
    index = jnp.asarray(experts.index)
    rng = np.random.default_rng(12)
    p0 = {"variance": jnp.asarray(VARIANCE), "lengthscale": jnp.asarray(LENGTHSCALE), "noise": jnp.asarray(NOISE),
          "mean": jnp.asarray(rng.standard_normal(60)), "X": jnp.asarray(X)}
    Y = jnp.stack([jnp.asarray(y), jnp.asarray(rng.standard_normal(60))])
    w = jnp.asarray([0.7, -1.3])

    def ours(p, Y):
        k = make_kernel(name, p["variance"], p["lengthscale"])
        return HGPMarginal(k, p["X"], p["noise"], experts=experts, mean=p["mean"], chunk_size=3).log_prob(Y)

    def dense(p, Y):
        return _dense_hgp(name, p["X"], Y, index, p)

    def check(got, expected, what):
        for key in p0:
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(expected[key]), rtol=1e-9,
                                       atol=1e-9 * float(jnp.max(jnp.abs(expected[key]))),
                                       err_msg=f"{name} {what} d/d{key}")

    v, g = jax.jit(jax.value_and_grad(ours))(p0, Y[0])
    v_ref, g_ref = jax.value_and_grad(dense)(p0, Y[0])
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-12)
    check(g, g_ref, "one target")
    check(jax.jit(jax.grad(lambda p: jnp.sum(w * ours(p, Y))))(p0),
          jax.grad(lambda p: jnp.sum(w * dense(p, Y)))(p0), "two targets")
    per_y = jax.jit(jax.vmap(jax.grad(ours), in_axes=(None, 0)))(p0, Y)
    for i in range(2):
        check(jax.tree_util.tree_map(lambda t: t[i], per_y), jax.grad(dense)(p0, Y[i]), f"vmap target {i}")
    gy = jax.jit(jax.grad(ours, argnums=1))(p0, Y[1])
    np.testing.assert_allclose(np.asarray(gy), np.asarray(jax.grad(dense, argnums=1)(p0, Y[1])), rtol=1e-9,
                               atol=1e-12)


def test_prediction_gradient_is_finite_and_correct(data):
    X, y, Xs = data
    experts = partition(X, expert_size=20, method="random", seed=5)

    from numpyro_scalegp import HGPMarginal

    @jax.jit
    def f(ls):
        p = HGPMarginal(make_kernel("rbf", lengthscale=ls), X, NOISE, experts=experts).predict(y, Xs)
        return jnp.sum(p.mean) + jnp.sum(p.variance)

    g = jax.jit(jax.grad(f))(jnp.asarray(LENGTHSCALE))
    h = 1e-6
    for i in range(2):
        e = np.eye(2)[i] * h
        fd = (f(LENGTHSCALE + e) - f(LENGTHSCALE - e)) / (2 * h)
        np.testing.assert_allclose(float(g[i]), float(fd), rtol=1e-6)


# ------------------------------------------------------------------ trees, chunks, jit, vmap

def test_tree_equals_flat(data):
    X, y, Xs = data
    flat = partition(X, expert_size=10, method="kdtree", seed=6)
    deep = flat.with_tree([2, 3])
    assert deep.tree is not None and deep.tree != tuple(range(6))
    nested = Experts.from_any([[list(flat.index[0]), list(flat.index[1])], [flat.index[2], flat.index[3]],
                               [[flat.index[4]], [flat.index[5]]]])
    values = []
    for experts in (flat, deep, nested):
        d = hgp("rbf", X, experts)
        g = jax.jit(jax.grad(lambda v: hgp("rbf", X, experts, noise=v).log_prob(y)))(NOISE)
        p = d.predict(y, Xs, combine="rbcm")
        values.append((float(d.log_prob(y)), float(g), np.asarray(p.mean), np.asarray(p.variance)))
    for other in values[1:]:
        for a, b in zip(values[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-12)


def test_chunking_jit_and_vmap(data):
    from numpyro_scalegp import HGPMarginal
    X, y, _ = data
    experts = partition(X, expert_size=12, method="random", seed=7)

    def f(ls, chunk):
        return HGPMarginal(make_kernel("matern32", lengthscale=ls), X, NOISE, experts=experts,
                           chunk_size=chunk).log_prob(y)

    ls = jnp.asarray(LENGTHSCALE)
    v0, g0 = jax.value_and_grad(f)(ls, None)
    # 5 experts in chunks of at most 2: lax.map over 3 checkpointed chunks, padded to 6 experts
    v, g = jax.jit(jax.value_and_grad(f), static_argnums=1)(ls, 2)
    np.testing.assert_allclose(v, v0, rtol=1e-12)
    np.testing.assert_allclose(g, g0, rtol=1e-10)
    batch = jnp.stack([ls, 2 * ls, 0.5 * ls])
    vm = jax.jit(jax.vmap(lambda l: f(l, 2)))(batch)
    np.testing.assert_allclose(vm, [float(f(l, None)) for l in batch], rtol=1e-12)
    # the distribution itself is a pytree: it passes through jit as an argument
    d = HGPMarginal(make_kernel("matern32"), X, NOISE, experts=experts)
    np.testing.assert_allclose(jax.jit(lambda d: d.log_prob(y))(d), d.log_prob(y), rtol=1e-12)


def test_float32(data):
    from numpyro_scalegp import HGPMarginal
    X, y, Xs = data
    experts = partition(X, expert_size=20, method="random", seed=8)
    k = make_kernel("rbf")
    d = HGPMarginal(k, X.astype(np.float32), np.float32(NOISE), experts=experts, mean=np.float32(MEAN))
    value = d.log_prob(y.astype(np.float32))
    assert value.dtype == jnp.float32
    expected = ref.hgp_log_marginal("rbf", X, y, experts.index, VARIANCE, LENGTHSCALE, NOISE, MEAN)
    np.testing.assert_allclose(float(value), expected, rtol=1e-4)
    p = d.predict(y.astype(np.float32), Xs.astype(np.float32))
    assert p.mean.dtype == jnp.float32 and np.isfinite(np.asarray(p.variance)).all()


# ------------------------------------------------------------------ sampling and inference

def test_sample_disjoint_experts_and_refuse_overlap(data):
    from numpyro_scalegp import HGPMarginal
    X = data[0][:8]
    experts = np.array([[0, 2, 4, 6], [1, 3, 5, 7]])
    d = HGPMarginal(make_kernel("rbf"), X, NOISE, experts=experts, mean=MEAN)
    draws = d.sample(jax.random.PRNGKey(0), (20000,))
    assert draws.shape == (20000, 8)
    cov = np.zeros((8, 8))
    for idx in experts:
        cov[np.ix_(idx, idx)] = ref.kernel_matrix("rbf", X[idx], X[idx], VARIANCE, LENGTHSCALE) + NOISE * np.eye(4)
    np.testing.assert_allclose(np.cov(np.asarray(draws).T), cov, atol=0.06)
    np.testing.assert_allclose(np.asarray(draws).mean(0), MEAN, atol=0.04)
    overlapping = HGPMarginal(make_kernel("rbf"), X, NOISE, experts=np.array([[0, 1, 2, 3], [3, 4, 5, 6]]))
    with pytest.raises(NotImplementedError, match="overlap or miss"):
        overlapping.sample(jax.random.PRNGKey(0))


def _model(X, experts, y=None):
    import numpyro
    import numpyro.distributions as dist
    from numpyro_scalegp import HGPMarginal, kernels
    ls = numpyro.sample("lengthscale", dist.LogNormal(0.0, 1.0).expand([2]).to_event(1))
    var = numpyro.sample("variance", dist.LogNormal(0.0, 1.0))
    noise = numpyro.sample("noise", dist.LogNormal(-2.0, 1.0))
    return numpyro.sample("y", HGPMarginal(kernels.RBF(2, var, ls), X, noise, experts=experts), obs=y)


def test_svi_nuts_and_predictive(data):
    import numpyro
    from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
    from numpyro.infer.autoguide import AutoDelta
    X, y, _ = data
    experts = partition(X, expert_size=20, method="kdtree", seed=9)  # disjoint, covers every point
    guide = AutoDelta(_model)
    svi = SVI(_model, guide, numpyro.optim.Adam(0.05), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), 60, X, experts, y=y, progress_bar=False)
    losses = np.asarray(result.losses)
    assert np.isfinite(losses).all() and losses[-10:].mean() < losses[:10].mean() - 1.0
    mcmc = MCMC(NUTS(_model), num_warmup=10, num_samples=10, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(1), X, experts, y=y)
    samples = mcmc.get_samples()
    assert samples["lengthscale"].shape == (10, 2) and np.isfinite(np.asarray(samples["noise"])).all()
    assert len(np.unique(np.asarray(samples["noise"]))) > 1  # the chain moved
    predictive = Predictive(_model, samples)
    draws = predictive(jax.random.PRNGKey(2), X, experts)["y"]
    assert draws.shape == (10, 60) and np.isfinite(np.asarray(draws)).all()


def test_lengthscale_recovery():
    """Maximizing the HGP objective on data from a known GP recovers the lengthscale within 10%."""
    from scipy.optimize import minimize
    from numpyro_scalegp import HGPMarginal, kernels
    X, y, _ = gp_draws(2000, 2, lengthscale=0.8, variance=1.0, noise=0.01, seed=3)
    experts = partition(X, expert_size=250, method="kdtree", seed=0)

    @jax.jit
    def loss(u):
        p = jnp.exp(u)
        return -HGPMarginal(kernels.RBF(2, p[0], p[1]), X, p[2], experts=experts).log_prob(y) / len(y)

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    res = minimize(lambda u: tuple(np.asarray(t, dtype=float) for t in value_and_grad(u)),
                   np.log([0.5, 0.3, 0.1]), jac=True, method="L-BFGS-B")
    variance, lengthscale, noise = np.exp(res.x)
    assert abs(lengthscale - 0.8) < 0.08, (lengthscale, variance, noise)
    assert abs(noise - 0.01) < 0.005


# ------------------------------------------------------------------ jitter and errors

def test_jitter_raised_with_warning_then_error(data):
    from numpyro_scalegp import HGPMarginal, JitterWarning, NotPositiveDefiniteError, NotPositiveDefiniteWarning
    X, y, _ = data
    experts = partition(X, expert_size=20, method="random", seed=10)
    # a nearly constant kernel with negligible noise: numerically singular in float64
    k = make_kernel("rbf", 1.0, [100.0, 100.0])
    d = HGPMarginal(k, X, 1e-20, experts=experts, jitter=1e-6)
    with pytest.warns(JitterWarning, match="added jitter up to 1.0e-06"):
        value = d.log_prob(y)
    expected = ref.hgp_log_marginal("rbf", X, y, experts.index, 1.0, 100.0, 1e-20 + 1e-6)
    np.testing.assert_allclose(float(value), expected, rtol=1e-8)
    f = jax.jit(lambda v: HGPMarginal(make_kernel("rbf", v, [100.0, 100.0]), X, 1e-20, experts=experts).log_prob(y))
    with pytest.warns(JitterWarning, match=r"expert\(s\) \[0, 1, 2\]"):
        np.testing.assert_allclose(float(f(1.0)), expected, rtol=1e-8)
        jax.effects_barrier()
    # the gradient path factors without jitter first and redoes the chunks only when one failed:
    # it must take the jitter too, and differentiate the jittered objective
    with pytest.warns(JitterWarning, match=r"expert\(s\) \[0, 1, 2\]"):
        value, grad = jax.jit(jax.value_and_grad(f))(1.0)
        jax.effects_barrier()
    np.testing.assert_allclose(float(value), expected, rtol=1e-8)
    h = 1e-3  # the objective is ill-conditioned (cond(K) ~ 1e7): smaller steps drown in round-off
    fd = (ref.hgp_log_marginal("rbf", X, y, experts.index, 1.0 + h, 100.0, 1e-20 + 1e-6)
          - ref.hgp_log_marginal("rbf", X, y, experts.index, 1.0 - h, 100.0, 1e-20 + 1e-6)) / (2 * h)
    np.testing.assert_allclose(float(grad), fd, rtol=1e-5)
    # predict factors plainly too, then with jitter where that failed: the same predictions as
    # the model whose noise includes that jitter
    Xs = data[2]
    jittered = HGPMarginal(k, X, 1e-20 + 1e-6, experts=experts).predict(y, Xs, noiseless=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JitterWarning)
        pred = d.predict(y, Xs, noiseless=True)
    assert np.all(np.isfinite(np.asarray(pred.mean)))
    np.testing.assert_allclose(np.asarray(pred.mean), np.asarray(jittered.mean), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pred.variance), np.asarray(jittered.variance), rtol=1e-6)
    # sample, likewise: finite draws with each expert's covariance (without the retry: NaN)
    draws = np.asarray(d.sample(jax.random.PRNGKey(1), (20000,)))
    assert np.all(np.isfinite(draws))
    idx = experts.index[0]
    cov = ref.kernel_matrix("rbf", X[idx], X[idx], 1.0, 100.0) + (1e-20 + 1e-6) * np.eye(len(idx))
    np.testing.assert_allclose(np.cov(draws[:, idx].T), cov, atol=0.06)
    # a kernel that is not positive definite at any jitter (negative variance)
    bad = HGPMarginal(make_kernel("rbf", -1.0), X, 1e-3, experts=experts)
    with pytest.raises(NotPositiveDefiniteError, match=r"expert\(s\) \[0, 1, 2\].*jitter 1.0e-01") as err:
        bad.log_prob(y)
    assert isinstance(err.value, ValueError)
    with pytest.warns(NotPositiveDefiniteWarning, match="log_prob is -inf"):
        assert float(f(-1.0)) == -np.inf
        jax.effects_barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-conditioned problem warns about nothing
        float(jax.jit(lambda v: hgp("rbf", X, experts, noise=v).log_prob(y))(NOISE))
        jax.effects_barrier()


def test_noise_outside_the_domain_raises_eagerly_and_warns_under_jit(data):
    # a noise that underflows to 0 or overflows to inf is what NUTS meets far in a prior's tail: eagerly a
    # DomainError (a ValueError) naming it; inside jit a DomainWarning, and the log-density is not finite
    # (NUTS rejects the step) instead of a failed computation
    from numpyro_scalegp import HGPMarginal, NotPositiveDefiniteWarning
    from numpyro_scalegp.lattice import SimplexGPMarginal
    X, y, _ = data
    experts = partition(X, expert_size=20, method="random")
    for dist in (lambda noise: HGPMarginal(make_kernel("rbf"), X, noise, experts=experts),
                 lambda noise: SimplexGPMarginal(make_kernel("rbf"), X, noise)):
        for noise, message in ((0.0, "noise: must be positive"), (np.inf, "noise: contains NaN or inf")):
            with pytest.raises(DomainError, match=message):
                dist(noise)
            with pytest.warns(DomainWarning, match=message), warnings.catch_warnings():
                warnings.simplefilter("ignore", NotPositiveDefiniteWarning)  # HGP's Cholesky of a NaN matrix
                assert not np.isfinite(float(jax.jit(lambda v: dist(v).log_prob(y))(noise)))
                jax.effects_barrier()
    # so NUTS started from a step of 1,000 (its step-size search proposes noises and lengthscales of 0 and
    # inf) runs on
    from numpyro.infer import MCMC, NUTS
    mcmc = MCMC(NUTS(_model, step_size=1e3, max_tree_depth=3), num_warmup=5, num_samples=3, progress_bar=False)
    with pytest.warns(DomainWarning):
        mcmc.run(jax.random.PRNGKey(0), X, experts, y=y)
        jax.effects_barrier()
    assert np.isfinite(np.asarray(mcmc.get_samples()["noise"])).all()


def test_bad_input_raises_value_error_naming_argument(data):
    from numpyro_scalegp import HGPMarginal, gaussian_log_likelihood
    X, y, Xs = data
    experts = partition(X, expert_size=20, method="random")
    k = make_kernel("rbf")
    Xbad = X.copy()
    Xbad[3, 1] = np.nan
    cases = [
        (lambda: HGPMarginal(k, Xbad, NOISE, experts=experts), "X: contains NaN"),
        (lambda: HGPMarginal(k, X[None], NOISE, experts=experts), "X: expected shape"),
        (lambda: HGPMarginal(k, X, 0.0, experts=experts), "noise: must be positive"),
        (lambda: HGPMarginal(k, X, -1.0, experts=experts), "noise: must be positive"),
        (lambda: HGPMarginal(k, X, np.inf, experts=experts), "noise: contains NaN or inf"),
        (lambda: HGPMarginal(k, X, jnp.ones(2), experts=experts), "noise: expected a scalar"),
        (lambda: HGPMarginal(make_kernel("rbf", lengthscale=[np.nan, 1.0]), X, NOISE, experts=experts),
         "kernel: contains NaN or inf"),
        (lambda: HGPMarginal(k, X, NOISE, experts=experts, mean=np.ones(5)), "mean: expected"),
        (lambda: HGPMarginal(k, X, NOISE, experts=experts, jitter=0.0), "jitter: must be positive"),
        (lambda: HGPMarginal(k, X, NOISE, experts=experts, workers=64), "workers: 64 devices"),
        (lambda: HGPMarginal(k, X, NOISE, experts=experts, chunk_size=0), "chunk_size"),
        (lambda: HGPMarginal(k, X, NOISE, experts=experts.index + 5), "experts: indices must lie"),
        (lambda: HGPMarginal(k, X, NOISE, experts=experts).log_prob(np.r_[y[:-1], np.inf]), "value: contains"),
        (lambda: HGPMarginal(k, X, NOISE, experts=experts).log_prob(y[:-1]), "value: expected shape"),
        (lambda: HGPMarginal(k, X, NOISE, experts=experts).predict(y, Xs, combine="mean"), "combine: unknown"),
        (lambda: HGPMarginal(k, X, NOISE, experts=experts).predict(y, Xs, combine="grbcm"), "combine: 'grbcm'"),
        (lambda: HGPMarginal(k, X, NOISE, experts=experts).predict(y, Xs[:, :1]), "X_new: expected shape"),
        (lambda: HGPMarginal(k, X, NOISE, experts=experts).predict(y, Xs * np.nan), "X_new: contains NaN"),
        (lambda: HGPMarginal(k, X, NOISE, experts=experts).predict(np.r_[y[:-1], np.nan], Xs), "y: contains"),
        (lambda: HGPMarginal(k, X, NOISE, experts=experts, mean=np.ones(60)).predict(y, Xs), "mean_new"),
        (lambda: gaussian_log_likelihood(np.eye(3), np.ones(3)), "Kn: expected shape"),
        (lambda: partition(X, expert_size=20, method="octree"), "method: unknown"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()
    # traced under jit (and vmap): a host callback raises the message when the computation runs
    lp = jax.jit(lambda v: HGPMarginal(k, X, NOISE, experts=experts).log_prob(v))
    assert np.isfinite(float(lp(jnp.asarray(y))))
    with pytest.raises(Exception, match="value: contains NaN or inf"):
        jax.block_until_ready(lp(jnp.asarray(y).at[4].set(jnp.nan)))
    batch = jnp.stack([jnp.asarray(y), jnp.asarray(y) + 1.0])
    assert np.all(np.isfinite(np.asarray(jax.jit(jax.vmap(lp))(batch))))
    with pytest.raises(Exception, match="value: contains NaN or inf"):
        jax.block_until_ready(jax.jit(jax.vmap(lp))(batch.at[1, 0].set(jnp.inf)))


def test_validate_args_masks_values_outside_support(data):
    X, y, _ = data
    experts = partition(X, expert_size=20, method="random")
    d = hgp("rbf", X, experts, validate_args=True)
    assert np.isfinite(float(d.log_prob(y)))
    assert d.mean.shape == (60,) and d.variance.shape == (60,)
    np.testing.assert_allclose(np.asarray(d.variance), VARIANCE + NOISE)


def test_chunked_gradient_memory_is_bounded():
    """The chunked gradient keeps about one chunk's matrices alive: its compiled temporary
    memory stays below one copy of every expert's n x n matrix, while evaluating all experts
    at once needs several such copies (XLA's own accounting of the compiled program)."""
    from numpyro_scalegp import HGPMarginal, kernels
    rng = np.random.default_rng(0)
    X = rng.uniform(-2, 2, (64 * 128, 2))
    y = rng.standard_normal(len(X))
    experts = partition(X, expert_size=128, method="random")

    def loss(ls, chunk):
        return HGPMarginal(kernels.RBF(2, 1.0, ls), X, 0.1, experts=experts, chunk_size=chunk).log_prob(y)

    def temp_bytes(chunk):
        compiled = jax.jit(jax.grad(loss), static_argnums=1).lower(1.0, chunk).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(64), temp_bytes(4)
    block = 64 * 128 * 128 * 8  # every expert's n x n matrix once, float64
    assert full >= 4 * block, (full, block)
    assert chunked < block and 8 * chunked < full, (chunked, full, block)
