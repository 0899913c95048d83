"""Proximal operator of the KL term and proximal ADADELTA (issue 4, part 2), Pyro and NumPyro."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyro
import pyro.contrib.gp as gp
import pytest
import torch
from pyro import poutine
from scipy.optimize import minimize

from numpyro_scalegp import kernels as nk
from numpyro_scalegp import optim as noptim
from numpyro_scalegp.advgp import ADVGP as NumPyroADVGP
from pyro_scalegp import optim as poptim
from pyro_scalegp.advgp import ADVGP as PyroADVGP
from tests import reference as ref

VARIANCE, LENGTHSCALE, NOISE = 1.3, np.array([0.7, 1.2]), 0.2


pytestmark = pytest.mark.usefixtures("float64", "jax_x64", "pyro_clean")


def data(N=30, M=5, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, size=(N, 2))
    y = np.sin(2 * X[:, 0]) * np.cos(X[:, 1]) + 0.3 * rng.normal(size=N)
    return X, y, X[rng.choice(N, M, replace=False)] + 0.05 * rng.normal(size=(M, 2))


def pyro_model(Z, jitter=1e-6):
    kernel = gp.kernels.RBF(2, variance=torch.tensor(VARIANCE), lengthscale=torch.tensor(LENGTHSCALE))
    return PyroADVGP(kernel, torch.tensor(Z), NOISE, jitter=jitter)


def h_scaled(x, v, gamma_loc, gamma_tril, M):
    """gamma * h(x) + 1/2 ||x - v||^2 with per-coordinate gamma; x = (mu, lower triangle of U^T)."""
    mu, low = x[:M], x[M:]
    rows, cols = np.tril_indices(M)
    L = np.zeros((M, M))
    L[rows, cols] = low
    diag = rows == cols
    h = (0.5 * gamma_loc * mu**2).sum() + (0.5 * gamma_tril * low**2).sum() \
        - (gamma_tril[diag] * np.log(np.abs(low[diag]))).sum()
    return h + 0.5 * ((x - v) ** 2).sum()


@pytest.mark.parametrize("framework", ["pyro", "numpyro"])
def test_prox_minimizes_gamma_h_plus_distance(framework):
    M = 4
    rng = np.random.default_rng(0)
    v_loc = rng.normal(size=M)
    V = np.tril(rng.normal(size=(M, M)))
    V[np.diag_indices(M)] = [-1.5, -0.1, 0.2, 2.0]  # negative diagonal entries too
    g_loc = rng.uniform(0.05, 2.0, size=M)
    G = np.tril(rng.uniform(0.05, 2.0, size=(M, M)))
    rows, cols = np.tril_indices(M)
    if framework == "pyro":
        mu = poptim.prox_kl_loc(torch.tensor(v_loc), torch.tensor(g_loc)).numpy()
        L = poptim.prox_kl_scale_tril(torch.tensor(V), torch.tensor(G)).numpy()
    else:
        mu = np.asarray(noptim.prox_kl_loc(jnp.asarray(v_loc), jnp.asarray(g_loc)))
        L = np.asarray(noptim.prox_kl_scale_tril(jnp.asarray(V), jnp.asarray(G)))
    assert np.all(np.diag(L) > 0)
    assert np.all(np.triu(L, 1) == 0)
    v = np.concatenate([v_loc, V[rows, cols]])
    fun = lambda x: h_scaled(x, v, g_loc, G[rows, cols], M)  # noqa: E731
    bounds = [(None, None)] * M + [(1e-9, None) if r == c else (None, None) for r, c in zip(rows, cols)]
    x0 = np.concatenate([np.zeros(M), np.where(rows == cols, 1.0, 0.0)])
    res = minimize(fun, x0, method="L-BFGS-B", bounds=bounds, options=dict(ftol=1e-15, gtol=1e-12, maxiter=10_000))
    ours = np.concatenate([mu, L[rows, cols]])
    np.testing.assert_allclose(ours, res.x, atol=1e-5)
    assert fun(ours) <= res.fun + 1e-12


@pytest.mark.parametrize("framework", ["pyro", "numpyro"])
def test_prox_diagonal_has_no_cancellation(framework):
    # v**2 >> gamma: the textbook root (v + sqrt(v**2 + 4 gamma (1 + gamma))) / (2 (1 + gamma))
    # rounds to 0 here, and log(0) would turn the unconstrained scale_tril into -inf
    v = np.array([-1e5, -1e3, -1.0, 3.0])
    g = np.array([1e-8, 1e-9, 1e-3, 1e-8])
    V, G = np.diag(v), np.diag(g)
    if framework == "pyro":
        u = np.diag(poptim.prox_kl_scale_tril(torch.tensor(V), torch.tensor(G)).numpy())
    else:
        u = np.diag(np.asarray(noptim.prox_kl_scale_tril(jnp.asarray(V), jnp.asarray(G))))
    assert np.all(u > 0)
    # u solves (1 + g) u^2 - v u - g = 0, to rounding relative to the largest term
    residual = (1.0 + g) * u**2 - v * u - g
    assert np.all(np.abs(residual) <= 1e-14 * np.maximum(np.abs(v * u), g))
    np.testing.assert_allclose(u[:2], -g[:2] / v[:2], rtol=1e-6)  # u ~ gamma / |v| for v << 0


def test_plain_groups_equal_torch_and_optax_adadelta():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(6, 6))
    A = A @ A.T + np.eye(6)
    b = rng.normal(size=6)
    x0 = rng.normal(size=6)
    p1 = torch.tensor(x0, requires_grad=True)
    p2 = torch.tensor(x0, requires_grad=True)
    ours = poptim.ProximalAdadeltaOptimizer([p1], lr=0.7, rho=0.8, eps=1e-5)
    theirs = torch.optim.Adadelta([p2], lr=0.7, rho=0.8, eps=1e-5)
    At, bt = torch.tensor(A), torch.tensor(b)
    for _ in range(20):
        for p, opt in ((p1, ours), (p2, theirs)):
            opt.zero_grad()
            (0.5 * p @ At @ p - bt @ p).backward()
            opt.step()
    np.testing.assert_allclose(p1.detach().numpy(), p2.detach().numpy(), rtol=1e-12)
    assert not np.allclose(p1.detach().numpy(), x0)
    # optax: a dict whose prox keys are absent from the gradient path is plain ADADELTA
    params = {"x": jnp.asarray(x0), "guide.loc_unconstrained": jnp.zeros(2),
              "guide.scale_tril_unconstrained": jnp.zeros((2, 2))}
    tx = noptim.proximal_adadelta(0.7, 0.8, 1e-5)
    ref_tx = optax.adadelta(0.7, 0.8, 1e-5)
    state, ref_state = tx.init(params), ref_tx.init(jnp.asarray(x0))
    xr = jnp.asarray(x0)
    for _ in range(20):
        grads = {k: jnp.zeros_like(v) for k, v in params.items()}
        grads["x"] = A @ params["x"] - b
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        u, ref_state = ref_tx.update(A @ xr - b, ref_state, xr)
        xr = optax.apply_updates(xr, u)
    np.testing.assert_allclose(np.asarray(params["x"]), p1.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(params["x"]), np.asarray(xr), rtol=1e-10)


def proximal_groups(model, **kw):
    named = dict(model.named_parameters())
    return poptim.ProximalAdadeltaOptimizer([
        {"params": [named["guide.loc_unconstrained"]], "prox": "loc"},
        {"params": [named["guide.scale_tril_unconstrained"]], "prox": "scale_tril"},
        {"params": [p for n, p in named.items() if not n.startswith("guide.")]},
    ], **kw)


def test_pyro_and_numpyro_optimizers_agree_on_advgp():
    X, y, Z = data()
    pm = pyro_model(Z)
    # copies: jnp.asarray may alias a numpy buffer, which the torch optimizer updates in place
    params = {n: jnp.array(p.detach().numpy(), copy=True) for n, p in pm.named_parameters()}
    opt = proximal_groups(pm, lr=2.0, rho=0.9)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    nm = NumPyroADVGP(nk.RBF(2, VARIANCE, jnp.asarray(LENGTHSCALE)), jnp.asarray(Z), NOISE, jitter=1e-6)
    tx = noptim.proximal_adadelta(2.0, 0.9)
    state = tx.init(params)
    grad_fn = jax.jit(jax.grad(lambda p: nm.loss_terms(X, y, params=p)[0].sum()))

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grad_fn(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(15):
        opt.zero_grad()
        pm.loss_terms(Xt, yt)[0].sum().backward()
        opt.step()
        params, state = step(params, state)
    for name, p in pm.named_parameters():
        np.testing.assert_allclose(np.asarray(params[name]), p.detach().numpy(), rtol=1e-7, atol=1e-9,
                                   err_msg=name)
    assert torch.isfinite(pm.guide.scale_tril).all() and (pm.guide.scale_tril.diagonal() > 0).all()


def test_step_scale_is_the_learning_rate_times_it_in_both_frameworks():
    """Steps with ``step_scale=c`` equal steps with ``lr * c``, running averages included (so
    repeated scaled steps stay equal); Pyro and NumPyro agree under changing scales."""
    X, y, Z = data()
    Xt, yt = torch.tensor(X), torch.tensor(y)
    scaled, plain = pyro_model(Z), pyro_model(Z)
    opt_scaled, opt_plain = proximal_groups(scaled, lr=2.0), proximal_groups(plain, lr=0.6)
    for _ in range(6):
        for model, opt, kw in ((scaled, opt_scaled, {"step_scale": 0.3}), (plain, opt_plain, {})):
            opt.zero_grad()
            model.loss_terms(Xt, yt)[0].sum().backward()
            opt.step(**kw)
    for (name, p), q in zip(scaled.named_parameters(), plain.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-12, atol=1e-14, err_msg=name)
    assert not torch.allclose(plain.guide.loc, pyro_model(Z).guide.loc)
    with pytest.raises(ValueError, match="step_scale"):
        opt_plain.step(step_scale=0.0)

    pm = pyro_model(Z)
    params = {n: jnp.array(p.detach().numpy(), copy=True) for n, p in pm.named_parameters()}
    opt = proximal_groups(pm, lr=2.0)
    nm = NumPyroADVGP(nk.RBF(2, VARIANCE, jnp.asarray(LENGTHSCALE)), jnp.asarray(Z), NOISE, jitter=1e-6)
    tx = noptim.proximal_adadelta(2.0)
    state = tx.init(params)
    grad_fn = jax.jit(jax.grad(lambda p: nm.loss_terms(X, y, params=p)[0].sum()))

    @jax.jit
    def step(params, state, scale):
        updates, state = tx.update(grad_fn(params), state, params, step_scale=scale)
        return optax.apply_updates(params, updates), state

    for scale in (1.0, 0.5, 1 / 3, 0.25, 1.0, 0.2):
        opt.zero_grad()
        pm.loss_terms(Xt, yt)[0].sum().backward()
        opt.step(step_scale=scale)
        params, state = step(params, state, scale)
    for name, p in pm.named_parameters():
        np.testing.assert_allclose(np.asarray(params[name]), p.detach().numpy(), rtol=1e-7, atol=1e-9,
                                   err_msg=name)


def test_proximal_adadelta_converges_to_the_titsias_optimum():
    """Only (mu, U) learn, by proximal steps on g: they reach the analytic optimum
    (NumPyro, jitted; the Pyro optimizer takes the same steps, see the test above)."""
    X, y, Z = data()
    nm = NumPyroADVGP(nk.RBF(2, VARIANCE, jnp.asarray(LENGTHSCALE)), jnp.asarray(Z), NOISE, jitter=0.0)
    init = nm.init_params()
    keys = ("guide.loc_unconstrained", "guide.scale_tril_unconstrained")
    fixed = {k: v for k, v in init.items() if k not in keys}
    q = {k: init[k] for k in keys}
    tx = noptim.proximal_adadelta(1.0, 0.95)
    grad_g = jax.grad(lambda q: nm.loss_terms(X, y, params={**fixed, **q})[0].sum())

    def body(_, carry):
        q, state = carry
        updates, state = tx.update(grad_g(q), state, q)
        return optax.apply_updates(q, updates), state

    q_end, _ = jax.jit(lambda q: jax.lax.fori_loop(0, 4000, body, (q, tx.init(q))))(q)
    bound = ref.titsias_collapsed_bound("rbf", X, y, Z, VARIANCE, LENGTHSCALE, NOISE)
    start = -float(nm.loss(X, y, params=init))
    end = -float(nm.loss(X, y, params={**fixed, **q_end}))
    assert start < bound - 10
    assert bound - 1e-3 < end <= bound + 1e-9
    mu, L = ref.advgp_optimal_q("rbf", X, y, Z, VARIANCE, LENGTHSCALE, NOISE)
    c = nm.constrain({**fixed, **q_end})
    np.testing.assert_allclose(np.asarray(c["loc"]), mu, atol=1e-2)
    np.testing.assert_allclose(np.asarray(c["scale_tril"]), L, atol=1e-2)


def test_diagonal_stays_positive_under_large_steps():
    M = 3
    P = torch.zeros(M, M, requires_grad=True)  # scale_tril = I
    opt = poptim.ProximalAdadeltaOptimizer([P], lr=50.0, prox="scale_tril")
    for _ in range(5):
        P.grad = torch.full((M, M), 1e3).tril()  # pushes the diagonal far below zero
        opt.step()
        diag = P.detach().diagonal().exp()
        assert torch.isfinite(P).all() and (diag > 0).all()
    params = {"guide.loc_unconstrained": jnp.zeros(M), "guide.scale_tril_unconstrained": jnp.zeros((M, M))}
    tx = noptim.proximal_adadelta(50.0)
    state = tx.init(params)
    for _ in range(5):
        grads = {"guide.loc_unconstrained": jnp.full(M, 1e3), "guide.scale_tril_unconstrained": jnp.tril(jnp.full((M, M), 1e3))}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert np.all(np.isfinite(np.asarray(params["guide.scale_tril_unconstrained"])))
    np.testing.assert_allclose(np.asarray(params["guide.scale_tril_unconstrained"]), P.detach().numpy(), rtol=1e-8)


def test_pyro_optim_factory_picks_the_guide_parameters():
    X, y, Z = data()
    Xt, yt = torch.tensor(X), torch.tensor(y)
    pm = pyro_model(Z)
    poutine.trace(pm.model).get_trace(Xt, yt)
    poutine.trace(pm.guide).get_trace(Xt, yt)
    store = pyro.get_param_store()
    assert {"guide.loc", "guide.scale_tril", "noise", "Z", "kernel.lengthscale"} <= set(store.keys())
    twin = pyro_model(Z)  # same values, its own tensors (not in the param store)
    with torch.no_grad():
        for (_, a), (_, b) in zip(twin.named_parameters(), pm.named_parameters()):
            a.copy_(b)
    optim = poptim.ProximalAdadelta({"lr": 3.0})
    direct = proximal_groups(twin, lr=3.0)
    for _ in range(3):
        for model in (pm, twin):
            for p in model.parameters():
                p.grad = None
            model.loss_terms(Xt, yt)[0].sum().backward()
        optim([store._params[name] for name in store.keys()])
        direct.step()
    for (name, a), (_, b) in zip(twin.named_parameters(), pm.named_parameters()):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-12, err_msg=name)


def test_bad_optimizer_arguments():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        poptim.ProximalAdadeltaOptimizer([p], lr=0.0)
    with pytest.raises(ValueError, match="rho"):
        poptim.ProximalAdadeltaOptimizer([p], rho=1.0)
    with pytest.raises(ValueError, match="prox"):
        poptim.ProximalAdadeltaOptimizer([p], prox="l1")
    with pytest.raises(ValueError, match="optim_args"):
        poptim.ProximalAdadelta({"prox": "loc"})
    with pytest.raises(ValueError, match="learning_rate"):
        noptim.proximal_adadelta(-1.0)
    with pytest.raises(ValueError, match="params"):
        noptim.proximal_adadelta().init({"x": jnp.zeros(2)})
