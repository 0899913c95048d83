"""ADVGP maths (issue 4, part 1): closed-form composite loss, gradients, prediction, in Pyro
and NumPyro, against the dense float64 reference and against each other."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pyro
import pyro.contrib.gp as gp
import pytest
import torch
from numpyro.infer import Predictive as NumPyroPredictive
from numpyro.infer import Trace_ELBO as NumPyroTraceELBO
from pyro.distributions import constraints
from pyro.distributions.transforms import transform_to

from numpyro_scalegp import kernels as nk
from numpyro_scalegp.advgp import ADVGP as NumPyroADVGP
from pyro_scalegp.advgp import ADVGP as PyroADVGP
from tests import reference as ref

VARIANCE = 1.3
LENGTHSCALE = np.array([0.7, 1.2])
NOISE = 0.2


pytestmark = pytest.mark.usefixtures("float64", "jax_x64", "pyro_clean")


def data(N=30, M=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, size=(N, 2))
    y = np.sin(2 * X[:, 0]) * np.cos(X[:, 1]) + 0.3 * rng.normal(size=N)
    Z = X[rng.choice(N, M, replace=False)] + 0.05 * rng.normal(size=(M, 2))
    return X, y, Z


def random_q(M, seed=1):
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=M)
    L = np.tril(0.3 * rng.normal(size=(M, M)), -1) + np.diag(rng.uniform(0.3, 1.2, size=M))
    return mu, L


def pyro_model(Z, *, variance=VARIANCE, lengthscale=LENGTHSCALE, noise=NOISE, jitter=0.0):
    kernel = gp.kernels.RBF(2, variance=torch.tensor(variance), lengthscale=torch.tensor(lengthscale))
    return PyroADVGP(kernel, torch.tensor(Z), noise, jitter=jitter)


def numpyro_model(Z, *, variance=VARIANCE, lengthscale=LENGTHSCALE, noise=NOISE, jitter=0.0):
    return NumPyroADVGP(nk.RBF(2, variance, jnp.asarray(lengthscale)), jnp.asarray(Z), noise, jitter=jitter)


def set_q(model, mu, L):
    """Put (mu, scale_tril) into a Pyro ADVGP; return the shared unconstrained params dict."""
    with torch.no_grad():
        model.guide.loc_unconstrained.copy_(torch.tensor(mu))
        model.guide.scale_tril_unconstrained.copy_(transform_to(constraints.lower_cholesky).inv(torch.tensor(L)))
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


def test_loss_matches_dense_reference_both_frameworks():
    X, y, Z = data()
    mu, L = random_q(len(Z))
    expected = -ref.advgp_elbo("rbf", X, y, Z, VARIANCE, LENGTHSCALE, NOISE, mu, L)
    pm = pyro_model(Z)
    params = set_q(pm, mu, L)
    assert pm.loss(torch.tensor(X), torch.tensor(y)).item() == pytest.approx(expected, rel=1e-11)
    nm = numpyro_model(Z)
    assert float(jax.jit(lambda p: nm.loss(X, y, params=p))(params)) == pytest.approx(expected, rel=1e-11)
    # shards split the data term and nothing else
    shards = [np.arange(0, 7), np.arange(7, 19), np.arange(19, 30)]
    g, h = pm.loss_terms(torch.tensor(X), torch.tensor(y), shards)
    assert g.shape == (3,)
    assert (g.sum() + h).item() == pytest.approx(expected, rel=1e-11)
    gj, hj = jax.jit(lambda p: nm.loss_terms(X, y, shards, params=p))(params)
    np.testing.assert_allclose(np.asarray(gj), g.detach().numpy(), rtol=1e-11)
    assert float(hj) == pytest.approx(h.item(), rel=1e-11)
    kl = 0.5 * (np.trace(L @ L.T) + mu @ mu - len(mu) - np.linalg.slogdet(L @ L.T)[1])
    assert h.item() == pytest.approx(kl, rel=1e-11)


def test_optimum_equals_titsias_bound():
    X, y, Z = data()
    jitter = 1e-8
    mu, L = ref.advgp_optimal_q("rbf", X, y, Z, VARIANCE, LENGTHSCALE, NOISE, jitter=jitter)
    bound = ref.titsias_collapsed_bound("rbf", X, y, Z, VARIANCE, LENGTHSCALE, NOISE, jitter=jitter)
    pm = pyro_model(Z, jitter=jitter)
    params = set_q(pm, mu, L)
    loss = pm.loss(torch.tensor(X), torch.tensor(y))
    assert -loss.item() == pytest.approx(bound, rel=1e-10)
    assert -float(numpyro_model(Z, jitter=jitter).loss(X, y, params=params)) == pytest.approx(bound, rel=1e-10)
    # stationary in (mu, U): the gradient of the full loss vanishes there ...
    loss.backward()
    assert pm.guide.loc_unconstrained.grad.abs().max() < 1e-8
    assert pm.guide.scale_tril_unconstrained.grad.abs().max() < 1e-8
    # ... and any other q is worse
    mu2, L2 = random_q(len(Z), seed=5)
    set_q(pm, mu + 0.01 * mu2, L + 0.01 * np.tril(L2, -1))
    assert -pm.loss(torch.tensor(X), torch.tensor(y)).item() < bound


def test_elbo_below_exact_and_tight_when_Z_is_X():
    X, y, Z = data()
    exact = ref.gp_log_marginal("rbf", X, y, VARIANCE, LENGTHSCALE, NOISE)
    mu, L = ref.advgp_optimal_q("rbf", X, y, Z, VARIANCE, LENGTHSCALE, NOISE)
    pm = pyro_model(Z)
    set_q(pm, mu, L)
    elbo = -pm.loss(torch.tensor(X), torch.tensor(y)).item()
    assert elbo < exact - 1e-3
    # every q lower-bounds the evidence, not only the optimal one
    for seed in range(3):
        set_q(pm, *random_q(len(Z), seed=seed))
        assert -pm.loss(torch.tensor(X), torch.tensor(y)).item() < elbo
    # Z = X: Q = K, the Jensen gap vanishes and the bound is exact
    Xs, ys = X[:15], y[:15]
    mu, L = ref.advgp_optimal_q("rbf", Xs, ys, Xs, VARIANCE, LENGTHSCALE, NOISE)
    pyro.clear_param_store()
    pm = pyro_model(Xs)
    params = set_q(pm, mu, L)
    exact = ref.gp_log_marginal("rbf", Xs, ys, VARIANCE, LENGTHSCALE, NOISE)
    assert -pm.loss(torch.tensor(Xs), torch.tensor(ys)).item() == pytest.approx(exact, rel=1e-8)
    assert -float(numpyro_model(Xs).loss(Xs, ys, params=params)) == pytest.approx(exact, rel=1e-8)
    # and prediction is the exact GP's
    Xt = np.random.default_rng(3).uniform(-2, 2, size=(7, 2))
    mean, var = ref.gp_predict("rbf", Xs, ys, Xt, VARIANCE, LENGTHSCALE, NOISE, noiseless=False)
    pred = pm.predict(torch.tensor(Xt))
    np.testing.assert_allclose(pred.mean.detach().numpy(), mean, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(pred.variance.detach().numpy(), var, rtol=1e-6)
    predj = numpyro_model(Xs).predict(Xt, params=params)
    np.testing.assert_allclose(np.asarray(predj.mean), mean, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(predj.variance), var, rtol=1e-6)


def test_predict_matches_formula():
    X, y, Z = data()
    mu, L = random_q(len(Z))
    pm = pyro_model(Z)
    params = set_q(pm, mu, L)
    Xt = np.random.default_rng(4).uniform(-2, 2, size=(9, 2))
    Phi = ref.advgp_features("rbf", Xt, Z, VARIANCE, LENGTHSCALE)
    mean = Phi @ mu
    var = NOISE + VARIANCE - (Phi**2).sum(1) + ((Phi @ L) ** 2).sum(1)
    pred = pm.predict(torch.tensor(Xt))
    assert pred.event_shape == (9,)
    np.testing.assert_allclose(pred.mean.detach().numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(pred.variance.detach().numpy(), var, rtol=1e-10)
    predj = numpyro_model(Z).predict(Xt, params=params)
    assert predj.event_shape == (9,)
    np.testing.assert_allclose(np.asarray(predj.mean), mean, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(predj.variance), var, rtol=1e-10)


def test_trace_elbo_agrees_with_closed_form_in_expectation():
    X, y, Z = data(N=20, M=4)
    mu, L = random_q(len(Z))
    pm = pyro_model(Z, jitter=1e-6)
    params = set_q(pm, mu, L)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    closed = pm.loss(Xt, yt).item()
    pyro.set_rng_seed(0)
    # batch means of vectorized particles: their spread gives the standard error
    elbo = pyro.infer.Trace_ELBO(num_particles=500, vectorize_particles=True, max_plate_nesting=0)
    draws = np.array([elbo.loss(pm.model, pm.guide, Xt, yt) for _ in range(8)])
    se = draws.std(ddof=1) / np.sqrt(len(draws))
    assert se > 0
    assert abs(draws.mean() - closed) < 4 * se
    # NumPyro: the constrained parameter values by site name
    nm = numpyro_model(Z, jitter=1e-6)
    c = nm.constrain({k: jnp.asarray(v) for k, v in params.items()})
    param_map = {"guide.loc": c["loc"], "guide.scale_tril": c["scale_tril"], "Z": c["Z"],
                 "noise": c["noise"], "kernel.variance": c["kernel"].variance,
                 "kernel.lengthscale": c["kernel"].lengthscale}
    assert float(nm.loss(X, y, params=params)) == pytest.approx(closed, rel=1e-10)
    one = lambda key: NumPyroTraceELBO().loss(key, param_map, nm.model, nm.guide, X, y)  # noqa: E731
    drawsj = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(0), 4000)))
    sej = drawsj.std() / np.sqrt(len(drawsj))
    assert abs(drawsj.mean() - closed) < 4 * sej


def test_initial_parameters_match_pyro_and_compile_nothing(xla_compiles):
    """``init_params`` equals Pyro's initial ``named_parameters()`` (``init_scale`` != 1, so the
    log-diagonal of ``scale_tril`` is not zero) and compiles nothing: each eager JAX operation
    compiles on first use, which made up half a second of AsyncProximalSVI's start."""
    _, _, Z = data()
    kernel = gp.kernels.RBF(2, variance=torch.tensor(VARIANCE), lengthscale=torch.tensor(LENGTHSCALE))
    pm = PyroADVGP(kernel, torch.tensor(Z), NOISE, init_scale=1.7)
    nm = NumPyroADVGP(nk.RBF(2, VARIANCE, jnp.asarray(LENGTHSCALE)), jnp.asarray(Z), NOISE, init_scale=1.7)
    before = len(xla_compiles)
    params = nm.init_params()
    assert xla_compiles[before:] == []
    expected = {name: p.detach().numpy() for name, p in pm.named_parameters()}
    assert set(params) == set(expected)
    for name, value in expected.items():
        assert params[name].dtype == jnp.float64, name
        np.testing.assert_allclose(np.asarray(params[name]), value, rtol=1e-12, atol=1e-15, err_msg=name)


def test_pyro_and_numpyro_agree_on_loss_and_gradients():
    X, y, Z = data()
    mu, L = random_q(len(Z))
    pm = pyro_model(Z, jitter=1e-6)
    params = set_q(pm, mu, L)
    loss = pm.loss(torch.tensor(X), torch.tensor(y))
    loss.backward()
    nm = numpyro_model(Z, jitter=1e-6)
    lossj, grads = jax.jit(jax.value_and_grad(lambda p: nm.loss(X, y, params=p)))(
        {k: jnp.asarray(v) for k, v in params.items()})
    assert float(lossj) == pytest.approx(loss.item(), rel=1e-11)
    assert set(grads) == {name for name, _ in pm.named_parameters()}
    for name, p in pm.named_parameters():
        np.testing.assert_allclose(np.asarray(grads[name]), p.grad.numpy(), rtol=1e-8, atol=1e-10,
                                   err_msg=name)


@pytest.mark.parametrize("case", ["ard", "scalar_lengthscale", "active_dims"])
def test_rbf_data_term_written_out_equals_autograd(case):
    """The RBF data term with its gradient written out (what the workers of AsyncProximalSVI
    differentiate) equals autograd through the generic path, in value and every gradient."""
    X, y, Z = data()
    if case == "active_dims":  # a third input column the kernel ignores
        rng = np.random.default_rng(3)
        X, Z = np.insert(X, 1, rng.normal(size=len(X)), axis=1), np.insert(Z, 1, rng.normal(size=len(Z)), axis=1)
    mu, L = random_q(len(Z))
    grads, values = [], []
    for path in ("written_out", "autograd"):
        pyro.clear_param_store()
        ls = torch.tensor(0.9) if case == "scalar_lengthscale" else torch.tensor(LENGTHSCALE)
        kernel = gp.kernels.RBF(2, variance=torch.tensor(VARIANCE), lengthscale=ls,
                                active_dims=[0, 2] if case == "active_dims" else None)
        pm = PyroADVGP(kernel, torch.tensor(Z), NOISE, jitter=1e-6)
        set_q(pm, mu, L)
        Xt, yt = torch.tensor(X), torch.tensor(y)
        value = pm.data_term(Xt, yt, chol_zz=None if path == "written_out" else pm._chol_zz())
        assert (type(value.grad_fn).__name__ == "_RBFDataTermBackward") == (path == "written_out")
        if path == "written_out":  # first derivatives only: a second one raises instead of being wrong
            first = torch.autograd.grad(value**2, [pm.Z], create_graph=True)[0]  # 2 g dg/dZ
            with pytest.raises(RuntimeError):
                first.sum().backward()
            for p in pm.parameters():
                p.grad = None
        value.backward()
        values.append(value.item())
        grads.append({name: p.grad.numpy().copy() for name, p in pm.named_parameters() if p.grad is not None})
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 6
    for name in grads[1]:
        np.testing.assert_allclose(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("kernel", ["rbf_ard", "rbf_scalar_lengthscale", "matern52"])
def test_numpyro_data_term_written_out_equals_autodiff(kernel):
    """The NumPyro data term with the gradient of its matrix part written out (what the workers
    of AsyncProximalSVI differentiate) equals JAX's autodiff of the generic path (``loss_terms``'
    shard term), in value and in the gradients of every parameter and of X and y; and a second
    reverse-mode derivative through it equals autodiff's too."""
    X, y, Z = data()
    mu, L = random_q(len(Z))
    params = set_q(pyro_model(Z, jitter=1e-6), mu, L)
    ls = 0.9 if kernel == "rbf_scalar_lengthscale" else jnp.asarray(LENGTHSCALE)
    k = (nk.Matern52 if kernel == "matern52" else nk.RBF)(2, VARIANCE, ls)
    nm = NumPyroADVGP(k, jnp.asarray(Z), NOISE, jitter=1e-6)
    params = {n: jnp.asarray(v) for n, v in params.items()}
    params["kernel.lengthscale_unconstrained"] = jnp.log(jnp.asarray(ls))

    def generic(p, X, y):
        c = nm.constrain(p)
        return nm._shard_term(c, X, y, nm._chol_zz(c["kernel"], c["Z"]))

    def written(p, X, y):
        return nm.data_term(X, y, params=p)

    args = (params, jnp.asarray(X), jnp.asarray(y))
    (v_w, g_w), (v_g, g_g) = (jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*args) for f in (written, generic))
    assert float(v_w) == pytest.approx(float(v_g), rel=1e-12)
    for name in params:
        np.testing.assert_allclose(g_w[0][name], g_g[0][name], rtol=1e-9, atol=1e-11, err_msg=name)
        assert np.any(np.asarray(g_w[0][name]) != 0), name
    for i, name in ((1, "X"), (2, "y")):
        np.testing.assert_allclose(g_w[i], g_g[i], rtol=1e-9, atol=1e-11, err_msg=name)
    # d/dZ of (d/dnoise g): reverse over reverse through the custom rule
    second = [jax.grad(lambda Zu: jax.grad(f)({**params, "Z_unconstrained": Zu}, *args[1:])["noise_unconstrained"])(
        params["Z_unconstrained"]) for f in (written, generic)]
    np.testing.assert_allclose(second[0], second[1], rtol=1e-8, atol=1e-10)


def test_gradients_match_finite_differences_and_closed_form():
    X, y, Z = data(N=25, M=5)
    mu, L = random_q(len(Z))
    pm = pyro_model(Z, jitter=1e-6)
    set_q(pm, mu, L)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    pm.loss(Xt, yt).backward()
    eps = 1e-6
    for name, p in pm.named_parameters():
        flat = p.detach().view(-1)
        idx = range(flat.numel()) if flat.numel() <= 10 else np.random.default_rng(0).choice(flat.numel(), 10)
        for i in idx:
            if name == "guide.scale_tril_unconstrained" and i % len(Z) > i // len(Z):
                continue  # strict upper triangle: not a parameter
            with torch.no_grad():
                old = flat[i].item()
                flat[i] = old + eps
                up = pm.loss(Xt, yt).item()
                flat[i] = old - eps
                down = pm.loss(Xt, yt).item()
                flat[i] = old
            fd = (up - down) / (2 * eps)
            assert p.grad.view(-1)[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-6), (name, i)
    # DESIGN.md: grad_mu g = (A mu - Phi^T y)/s2, grad_U g = triu(U A)/s2, A = Phi^T Phi;
    # with scale_tril = U^T, d g / d scale_tril = tril(A scale_tril)/s2.
    pyro.clear_param_store()
    pm = pyro_model(Z, jitter=1e-6)
    set_q(pm, mu, L)
    g, _ = pm.loss_terms(Xt, yt)
    g.sum().backward()
    Phi = ref.advgp_features("rbf", X, Z, VARIANCE, LENGTHSCALE, jitter=1e-6)
    A = Phi.T @ Phi
    np.testing.assert_allclose(pm.guide.loc_unconstrained.grad.numpy(), (A @ mu - Phi.T @ y) / NOISE, rtol=1e-9)
    G = np.tril(A @ L) / NOISE
    G_unc = np.tril(G, -1) + np.diag(np.diag(G) * np.diag(L))  # diagonal stored as log
    np.testing.assert_allclose(pm.guide.scale_tril_unconstrained.grad.numpy(), G_unc, rtol=1e-9, atol=1e-12)


def test_float32_close_to_float64():
    X, y, Z = data()
    mu, L = random_q(len(Z))
    pm = pyro_model(Z, jitter=1e-6)
    params = set_q(pm, mu, L)
    expected = pm.loss(torch.tensor(X), torch.tensor(y)).item()
    pyro.clear_param_store()
    torch.set_default_dtype(torch.float32)
    kernel = gp.kernels.RBF(2, variance=torch.tensor(VARIANCE, dtype=torch.float32),
                            lengthscale=torch.tensor(LENGTHSCALE, dtype=torch.float32))
    pm32 = PyroADVGP(kernel, torch.tensor(Z, dtype=torch.float32), NOISE, jitter=1e-6)
    with torch.no_grad():
        for name, p in pm32.named_parameters():
            p.copy_(torch.tensor(params[name]))
    value = pm32.loss(torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-4)
    jax.config.update("jax_enable_x64", False)
    nm = NumPyroADVGP(nk.RBF(2, VARIANCE, jnp.asarray(LENGTHSCALE, jnp.float32)),
                      jnp.asarray(Z, jnp.float32), NOISE, jitter=1e-6)
    p32 = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    valuej = nm.loss(np.float32(X), np.float32(y), params=p32)
    assert valuej.dtype == jnp.float32
    assert float(valuej) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("framework", ["pyro", "numpyro"])
def test_bad_input_raises_value_error_naming_the_argument(framework):
    X, y, Z = data()
    build = pyro_model if framework == "pyro" else numpyro_model
    conv = torch.tensor if framework == "pyro" else np.asarray
    for noise in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="noise"):
            build(Z, noise=noise)
    Zbad = Z.copy()
    Zbad[0, 0] = np.nan
    with pytest.raises(ValueError, match="Z"):
        build(Zbad)
    with pytest.raises(ValueError, match="Z"):
        build(Z[0])
    m = build(Z)
    Xbad = X.copy()
    Xbad[3, 1] = np.nan
    ybad = y.copy()
    ybad[2] = np.inf
    with pytest.raises(ValueError, match="X"):
        m.loss(conv(Xbad), conv(y))
    with pytest.raises(ValueError, match="y"):
        m.loss(conv(X), conv(ybad))
    with pytest.raises(ValueError, match="y"):
        m.loss(conv(X), conv(y[:-1]))
    with pytest.raises(ValueError, match="X"):
        m.loss(conv(X[:, :1]), conv(y))
    with pytest.raises(ValueError, match="X"):
        m.loss(conv(X[:, 0]), conv(y))
    with pytest.raises(ValueError, match="Z"):
        m.loss(conv(X[:4]), conv(y[:4]))  # M = 6 > N = 4
    with pytest.raises(ValueError, match="X"):
        m.predict(conv(Xbad))


def test_plain_svi_trains_every_parameter_and_closed_form_ignores_the_param_store():
    X, y, Z = data()
    Xt, yt = torch.tensor(X), torch.tensor(y)
    pm = pyro_model(Z, jitter=1e-6)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    svi = pyro.infer.SVI(pm.model, pm.guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
    for _ in range(2):
        svi.step(Xt, yt)
    for name, p in pm.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name
    # a second model whose parameters have the same names: its closed-form loss uses its own values
    other = pyro_model(Z, variance=2.0, jitter=1e-6)
    expected = -ref.advgp_elbo("rbf", X, y, Z, 2.0, LENGTHSCALE, NOISE, np.zeros(len(Z)), np.eye(len(Z)), jitter=1e-6)
    assert other.loss(Xt, yt).item() == pytest.approx(expected, rel=1e-10)


def test_predictive_draws_match_predict():
    """Predictive(model, guide) draws y from N(Phi w, s2 + k - |phi|^2), w ~ q: its mean and
    variance are those of predict()."""
    X, y, Z = data()
    mu, L = random_q(len(Z))
    pm = pyro_model(Z, jitter=1e-6)
    params = set_q(pm, mu, L)
    Xt = np.random.default_rng(6).uniform(-2, 2, size=(5, 2))
    pred = pm.predict(torch.tensor(Xt))
    pyro.set_rng_seed(1)
    S = 4000
    draws = pyro.infer.Predictive(pm.model, guide=pm.guide, num_samples=S, parallel=True)(torch.tensor(Xt))["y"]
    assert draws.shape == (S, 5)
    sd = pred.variance.sqrt().detach()
    z = (draws.mean(0) - pred.mean.detach()) / (sd / S**0.5)
    assert z.abs().max() < 4.5
    np.testing.assert_allclose(draws.var(0).numpy(), pred.variance.detach().numpy(), rtol=0.12)
    nm = numpyro_model(Z, jitter=1e-6)
    c = nm.constrain({k: jnp.asarray(v) for k, v in params.items()})
    param_map = {"guide.loc": c["loc"], "guide.scale_tril": c["scale_tril"], "Z": c["Z"], "noise": c["noise"],
                 "kernel.variance": c["kernel"].variance, "kernel.lengthscale": c["kernel"].lengthscale}
    drawsj = NumPyroPredictive(nm.model, guide=nm.guide, params=param_map, num_samples=S)(jax.random.PRNGKey(1), Xt)["y"]
    assert drawsj.shape == (S, 5)
    zj = (np.asarray(drawsj.mean(0)) - pred.mean.detach().numpy()) / (sd.numpy() / S**0.5)
    assert np.abs(zj).max() < 4.5
    np.testing.assert_allclose(np.asarray(drawsj.var(0)), pred.variance.detach().numpy(), rtol=0.12)
