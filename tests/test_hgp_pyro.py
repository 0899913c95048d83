"""HGPMarginal (Pyro): against the dense float64 reference, finite differences, and Pyro inference."""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pyro
import pyro.distributions as pdist
import pyro.poutine as poutine
import pytest
import torch
from pyro.contrib.gp import kernels as gk
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.nn import PyroSample

import scalegp
from pyro_scalegp import HGPMarginal, JitterWarning, NotPositiveDefiniteError, expert_log_likelihood, gaussian_log_likelihood
from pyro_scalegp.hgp import GaussianLogLikelihood
from pyro_scalegp.kernels import bind, cross, diag, gram, stationary_forward
from pyro_scalegp.mcmc import reject_step
from pyro_scalegp.threads import torch_threads
from scalegp import partition
from scalegp.domain import DomainError, DomainWarning
from tests import reference

pytestmark = pytest.mark.usefixtures("float64", "pyro_clean")

KERNELS = {"rbf": gk.RBF, "matern32": gk.Matern32, "matern52": gk.Matern52, "exponential": gk.Exponential}
D = 3
VAR, LS, NOISE, MEAN = 1.3, [0.6, 0.9, 1.4], 0.05, 0.2


def _kernel(name="rbf"):
    return KERNELS[name](D, variance=torch.tensor(VAR), lengthscale=torch.tensor(LS))


def _data(N=120, seed=0):
    X, y, _ = scalegp.gp_draws(N, D, lengthscale=0.8, noise=NOISE, seed=seed)
    return torch.tensor(X), torch.tensor(y)


def _rel(a, b):
    a = torch.as_tensor(a).detach().numpy()
    b = b.detach().numpy() if torch.is_tensor(b) else np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _dense_pyro(kernel, X, y, noise, mean):
    """The reference log marginal on Pyro's own kernel matrix (exact for every kernel)."""
    K = kernel.forward(X).detach().numpy()
    return reference.log_marginal(K, y.numpy(), noise, mean)


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("autograd", [True, False], ids=["autograd", "in-place"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_batched_kernels_equal_forward(name, autograd):
    X = torch.randn(4, 7, D)
    Z = torch.randn(5, D)
    k = _kernel(name)
    with torch.set_grad_enabled(autograd):  # without autograd: stationary_forward's in-place formulas
        G, C, d = gram(k, X), cross(k, X, Z), diag(k, X)
    if not autograd:  # into reused buffers, as HGPMarginal's chunks do
        buffers = {}
        K, _ = stationary_forward(name, torch.tensor(VAR), torch.tensor(LS), X, out=torch.full_like(G, float("nan")),
                                  scratch=lambda key: buffers.setdefault(key, torch.full_like(G, float("nan"))))
        assert torch.equal(K, G)
    for e in range(4):
        off = ~torch.eye(7, dtype=torch.bool)  # off the diagonal, where r > 0
        assert _rel(G[e][off], k.forward(X[e])[off]) < 1e-12
        # on it r^2 is rounding noise that sqrt(r^2 + 1e-12) amplifies by 1 / (2e-6)
        assert _rel(G[e].diagonal(), k.forward(X[e]).diagonal()) < 1e-12 + 1e-8 * (name == "exponential")
        assert _rel(C[e], k.forward(X[e], Z)) < 1e-12
        assert _rel(d[e], k.forward(X[e], diag=True)) < 1e-14
    # and Pyro's kernels equal the reference up to Pyro's sqrt(r^2 + 1e-12) on the diagonal
    ref = reference.kernel_matrix(name, X[0].numpy(), Z.numpy(), VAR, LS)
    assert _rel(C[0], ref) < 1e-9


@pytest.mark.parametrize("autograd", [True, False], ids=["autograd", "in-place"])
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_entries_below_1e_150_are_exact_zeros(name, autograd):
    """Far-apart points (short lengthscales): entries below about 1e-150 come out exactly 0, never
    subnormal (float64 arithmetic on subnormals is 10-20x slower); every larger entry is Pyro's."""
    X = torch.randn(3, 10, D)
    Z = torch.zeros(60, D)
    Z[:, 0] = torch.linspace(0.0, 2000.0, 60)  # scaled distances from 0 to about 3000
    k = _kernel(name)
    with torch.set_grad_enabled(autograd):
        C = cross(k, X, Z)
    for e in range(3):
        P = k.forward(X[e], Z).detach()
        large, tiny = P > 1e-140, P < 1e-160
        assert large.sum() >= 3 and tiny.sum() >= 100  # the check covers both kinds of entries
        assert torch.allclose(C[e][large], P[large], rtol=1e-10, atol=0.0)
        assert torch.all(C[e][tiny] == 0)
        assert torch.all((C[e] == 0) | (C[e] >= 1e-160))


def test_active_dims_and_generic_fallback():
    X = torch.randn(3, 6, 4)
    k = gk.Matern52(2, variance=torch.tensor(0.7), lengthscale=torch.tensor([0.5, 2.0]), active_dims=[1, 3])
    assert bind(k).kind == "matern52"
    for e in range(3):
        assert _rel(gram(k, X)[e], k.forward(X[e])) < 1e-12
    generic = gk.Sum(gk.RBF(4, lengthscale=torch.tensor(0.7)), gk.Polynomial(4, degree=1))
    assert bind(generic).kind is None
    Z = torch.randn(5, 4)
    for e in range(3):
        assert _rel(gram(generic, X)[e], generic.forward(X[e])) < 1e-14
        assert _rel(cross(generic, X, Z)[e], generic.forward(X[e], Z)) < 1e-14
        assert _rel(diag(generic, X)[e], generic.forward(X[e], diag=True)) < 1e-14


def test_kernel_helpers_reject_bad_input():
    k = _kernel()
    with pytest.raises(ValueError, match="X"):
        gram(k, torch.randn(5, D))
    with pytest.raises(ValueError, match="X"):
        gram(k, torch.full((2, 3, D), float("nan")))
    with pytest.raises(ValueError, match="Z"):
        cross(k, torch.randn(2, 3, D), torch.randn(4, D + 1))
    with pytest.raises(ValueError, match="kernel"):
        bind(object())


# --------------------------------------------------------------------------- log_prob


@pytest.mark.parametrize("name", list(KERNELS))
def test_one_expert_equals_exact_gp(name):
    X, y = _data(80)
    k = _kernel(name)
    d = HGPMarginal(k, X, NOISE, experts=np.arange(80)[None], mean=torch.tensor(MEAN))
    lp = d.log_prob(y).detach()
    assert lp.shape == ()
    assert abs(float(lp) - _dense_pyro(k, X, y, NOISE, MEAN)) <= 1e-8 * abs(float(lp))
    if name != "exponential":  # Pyro's exponential kernel is exp(-sqrt(r^2 + 1e-12)): off by ~1e-6 at r = 0
        ref = reference.gp_log_marginal(name, X.numpy(), y.numpy(), VAR, LS, NOISE, MEAN)
        assert abs(float(lp) - ref) <= 1e-8 * abs(ref)


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("method", ["kdtree", "random"])
def test_many_experts_equal_reference(name, method):
    X, y = _data(150)
    ex = partition(X.numpy(), expert_size=30, method=method, duplication=2, seed=3)
    k = _kernel(name)
    lp = HGPMarginal(k, X, NOISE, experts=ex, mean=torch.tensor(MEAN), chunk_size=4).log_prob(y).detach()
    if name == "exponential":
        ref = sum(_dense_pyro(k, X[i], y[i], NOISE, MEAN) for i in torch.as_tensor(ex.index))
    else:
        ref = reference.hgp_log_marginal(name, X.numpy(), y.numpy(), ex.index, VAR, LS, NOISE, MEAN)
    assert abs(float(lp) - ref) <= 1e-8 * abs(ref)


def test_chunks_and_paths_agree():
    X, y = _data(150)
    ex = partition(X.numpy(), expert_size=25, method="random")
    results = []
    for chunk in (1, 4, None):
        pyro.clear_param_store()  # else the kernels share Pyro's global "lengthscale" parameter
        k = _kernel()
        noise = torch.tensor(NOISE, requires_grad=True)
        mean = torch.tensor(MEAN, requires_grad=True)
        lp = HGPMarginal(k, X, noise, experts=ex, mean=mean, chunk_size=chunk).log_prob(y)
        lp.backward()
        results.append([lp.detach(), noise.grad, mean.grad, k.lengthscale_unconstrained.grad.clone()])
    # the same value through the generic (autograd) path
    pyro.clear_param_store()
    generic = gk.Sum(_kernel(), gk.Constant(D, variance=torch.tensor(1e-30)))
    noise = torch.tensor(NOISE, requires_grad=True)
    mean = torch.tensor(MEAN, requires_grad=True)
    lp = HGPMarginal(generic, X, noise, experts=ex, mean=mean).log_prob(y)
    lp.backward()
    results.append([lp.detach(), noise.grad, mean.grad, generic.kern0.lengthscale_unconstrained.grad])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert _rel(a, b) < 1e-10


def test_several_target_vectors_and_expand():
    X, y = _data(60)
    ex = partition(X.numpy(), expert_size=20, method="random")
    d = HGPMarginal(_kernel(), X, NOISE, experts=ex)
    Y = torch.stack([y, -y, 2 * y])
    lp = d.log_prob(Y)
    assert lp.shape == (3,)
    for i in range(3):
        assert _rel(lp[i], d.log_prob(Y[i])) < 1e-12
    e = d.expand((2,))
    assert e.batch_shape == (2,) and e.event_shape == (60,)
    assert e.log_prob(y).shape == (2,) and _rel(e.log_prob(y)[1], d.log_prob(y)) < 1e-12
    assert e.mean.shape == (2, 60) and e.variance.shape == (2, 60)
    assert _rel(d.variance, torch.full((60,), VAR + NOISE)) < 1e-14


def test_vector_mean():
    X, y = _data(60)
    ex = partition(X.numpy(), expert_size=20, method="random")
    m = torch.linspace(-1, 1, 60)
    lp = HGPMarginal(_kernel(), X, NOISE, experts=ex, mean=m).log_prob(y)
    ref = reference.hgp_log_marginal("rbf", X.numpy(), (y - m).numpy(), ex.index, VAR, LS, NOISE, 0.0)
    assert abs(float(lp.detach()) - ref) <= 1e-10 * abs(ref)


# --------------------------------------------------------------------------- gradients


def test_function_gradcheck():
    torch.manual_seed(0)
    E, n, B = 3, 5, 2
    A = torch.randn(E, n, n)
    Kn = (A @ A.transpose(-1, -2) + n * torch.eye(n)).requires_grad_()
    r = torch.randn(E, n, B, requires_grad=True)

    def f(Kn, r):  # the Function reads the lower triangle: symmetrize so that both agree
        return GaussianLogLikelihood.apply(0.5 * (Kn + Kn.transpose(-1, -2)), r, 1e-6, 0)

    assert torch.autograd.gradcheck(f, (Kn, r))
    # the value is the Gaussian log density
    ref = torch.distributions.MultivariateNormal(torch.zeros(n), Kn.detach()).log_prob(r.detach().permute(2, 0, 1))
    assert _rel(gaussian_log_likelihood(Kn.detach(), r.detach()), ref.T) < 1e-12
    assert _rel(gaussian_log_likelihood(Kn.detach(), r.detach()[..., 0]), ref[0]) < 1e-12


@pytest.mark.parametrize("name", list(KERNELS))
def test_gradcheck_hyperparameters(name):
    X, y = _data(16)
    index = partition(X.numpy(), expert_size=6, method="random", duplication=2).index
    ls = LS
    if name == "matern52":  # and a kernel reading only some columns
        bound, ls = bind(gk.Matern52(2, active_dims=[0, 2])), LS[:2]
    else:
        bound = bind(KERNELS[name](D))

    def f(variance, lengthscale, noise, mean, y, X):
        bound.params = (variance, lengthscale)  # the values a PyroParam / PyroSample read gives
        return expert_log_likelihood(bound, X, y, index, noise, mean, chunk_size=3)

    args = (torch.tensor(VAR), torch.tensor(ls), torch.tensor(NOISE), torch.tensor(MEAN), y, X)
    args = tuple(a.clone().requires_grad_() for a in args)
    assert torch.autograd.gradcheck(f, args, atol=1e-6, rtol=1e-5)


def test_gradients_equal_autograd_through_cholesky():
    X, y = _data(90)
    index = torch.as_tensor(partition(X.numpy(), expert_size=30, method="kdtree").index)
    k = _kernel("matern52")
    noise = torch.tensor(NOISE, requires_grad=True)
    lp = expert_log_likelihood(k, X, y, index, noise, None)
    params = [k.variance_unconstrained, k.lengthscale_unconstrained, noise]
    g_ours = torch.autograd.grad(lp, params)
    total = 0.0
    for idx in index:
        Kn = k.forward(X[idx]) + noise * torch.eye(len(idx))
        total = total + pdist.MultivariateNormal(torch.zeros(len(idx)), Kn).log_prob(y[idx])
    g_ref = torch.autograd.grad(total, params)
    assert abs(float(lp) - float(total)) <= 1e-10 * abs(float(total))
    for a, b in zip(g_ours, g_ref):
        assert _rel(a, b) < 1e-9


# --------------------------------------------------------------------------- trees


def test_tree_equals_flat():
    X, y = _data(160)
    ex = partition(X.numpy(), expert_size=20, method="kdtree", seed=1)
    Xs = torch.rand(25, D) * 4 - 2
    flat = HGPMarginal(_kernel(), X, NOISE, experts=ex)
    nested = [[list(ex.index[0]), list(ex.index[1])], [list(ex.index[i]) for i in range(2, 8)]]
    for experts in (ex.with_tree([2]), ex.with_tree([2, 2]), nested):
        d = HGPMarginal(_kernel(), X, NOISE, experts=experts)
        assert d.experts.tree is not None
        assert abs(float(d.log_prob(y) - flat.log_prob(y))) <= 1e-12 * abs(float(flat.log_prob(y)))
        for rule in ("poe", "gpoe", "bcm", "rbcm"):
            a, b = d.predict(y, Xs, combine=rule), flat.predict(y, Xs, combine=rule)
            assert _rel(a.mean, b.mean) < 1e-12 and _rel(a.variance, b.variance) < 1e-12


# --------------------------------------------------------------------------- prediction


@pytest.mark.parametrize("name", ["rbf", "matern32"])
@pytest.mark.parametrize("noiseless", [True, False])
def test_one_expert_predict_equals_exact_gp(name, noiseless):
    X, y = _data(70)
    Xs = torch.rand(30, D) * 4 - 2
    d = HGPMarginal(_kernel(name), X, NOISE, experts=np.arange(70)[None], mean=torch.tensor(MEAN))
    mu, var = reference.gp_predict(name, X.numpy(), y.numpy(), Xs.numpy(), VAR, LS, NOISE, MEAN,
                                   noiseless=noiseless)
    for rule in ("poe", "gpoe", "bcm"):  # with one expert these are that expert's prediction
        p = d.predict(y, Xs, combine=rule, noiseless=noiseless)
        assert isinstance(p, pdist.Independent) and p.event_shape == (30,)
        assert _rel(p.mean, mu) < 1e-8 and _rel(p.variance, var) < 1e-8


@pytest.mark.parametrize("rule", ["poe", "gpoe", "bcm", "rbcm", "grbcm"])
def test_combine_rules_equal_reference(rule):
    X, y = _data(150)
    Xs = torch.rand(40, D) * 4 - 2
    comm = rule == "grbcm"
    ex = partition(X.numpy(), expert_size=30, method="kdtree", communication=comm, seed=2)
    d = HGPMarginal(_kernel(), X, NOISE, experts=ex, mean=torch.tensor(MEAN), chunk_size=2)
    p = d.predict(y, Xs, combine=rule, noiseless=True)
    Xn, yn, Xsn = X.numpy(), y.numpy(), Xs.numpy()
    preds = [reference.gp_predict("rbf", Xn[i], yn[i], Xsn, VAR, LS, NOISE, MEAN) for i in ex.index]
    if comm:
        i = ex.communication
        prior = reference.gp_predict("rbf", Xn[i], yn[i], Xsn, VAR, LS, NOISE, MEAN)
    else:
        prior = (np.full(40, MEAN), np.full(40, VAR))
    mu, var = reference.combine_reference(rule, [m for m, _ in preds], [v for _, v in preds], *prior)
    assert _rel(p.mean, mu) < 1e-8 and _rel(p.variance, var) < 1e-8
    noisy = d.predict(y, Xs, combine=rule)
    assert _rel(noisy.variance, var + NOISE) < 1e-8


def test_predict_flushes_subnormals_and_leaves_the_callers_mode():
    """predict runs with subnormals flushed to zero (pyro_scalegp.threads.flushing_subnormals: 2x faster
    with short lengthscales) and gives the caller back the mode it had, also after an error."""
    from pyro_scalegp.threads import _flushing, flushing_subnormals

    X, y = _data(60)
    Xs = torch.rand(20, D) * 4 - 2
    d = HGPMarginal(_kernel(), X, NOISE, experts=partition(X.numpy(), expert_size=20, method="random", seed=1))
    seen = []
    original = d._expert_predictions
    d._expert_predictions = lambda *a: (seen.append(_flushing()), original(*a))[1]
    try:
        for mode in (False, True):
            torch.set_flush_denormal(mode)
            p = d.predict(y, Xs, combine="rbcm")
            assert _flushing() == mode
            if mode:
                torch.testing.assert_close(p.mean, reference_mean, rtol=0, atol=1e-300)
            reference_mean = p.mean
        assert seen == [True, True]
        with pytest.raises(RuntimeError, match="inside"):
            with flushing_subnormals():
                raise RuntimeError("inside")
        assert _flushing()
    finally:
        torch.set_flush_denormal(False)
    assert not _flushing()


def test_log_prob_flushes_subnormals_in_the_threads_of_its_chunks(monkeypatch):
    """The value and gradient of the chunks, computed in threads that log_prob starts, run with subnormals
    flushed (threads inherit the mode of the thread that starts them); the caller's mode is kept."""
    import pyro_scalegp.hgp as hgp_module
    from pyro_scalegp.threads import _flushing

    X, y = _data(80)
    kernel = _kernel()
    seen = []
    original = hgp_module._chunk_value_and_grads
    monkeypatch.setattr(hgp_module, "_chunk_value_and_grads", lambda *a: (seen.append(_flushing()), original(*a))[1])
    d = HGPMarginal(kernel, X, NOISE, experts=partition(X.numpy(), expert_size=20, method="random", seed=1),
                    chunk_size=1)
    with torch_threads(2):
        d.log_prob(y).backward()
    assert len(seen) == 4 and all(seen)
    assert not _flushing()


def test_predict_with_vector_mean_needs_mean_new():
    X, y = _data(60)
    m = torch.linspace(-1, 1, 60)
    d = HGPMarginal(_kernel(), X, NOISE, experts=np.arange(60)[None], mean=m)
    Xs = torch.rand(10, D)
    with pytest.raises(ValueError, match="mean_new"):
        d.predict(y, Xs)
    p = d.predict(y, Xs, combine="poe", mean_new=torch.full((10,), 0.5), noiseless=True)
    # a per-point mean equals the zero-mean GP on y - m, shifted by mean_new
    mu, var = reference.gp_predict("rbf", X.numpy(), (y - m).numpy(), Xs.numpy(), VAR, LS, NOISE, 0.0)
    assert _rel(p.mean, mu + 0.5) < 1e-8 and _rel(p.variance, var) < 1e-8


# --------------------------------------------------------------------------- jitter and errors


class _Negated(torch.nn.Module):
    """A plain torch module kernel (generic path) whose matrices are negative definite."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, X, Z=None, diag=False):
        return -3.0 * self.base(X, Z, diag=diag)


def test_jitter_warns_then_errors():
    n = 6
    Kn = torch.ones(2, n, n)  # singular: rank one
    Kn[1] = torch.eye(n)
    r = torch.randn(2, n)
    with pytest.warns(JitterWarning, match=r"experts \[0\].*1\.0e-06"):
        v = gaussian_log_likelihood(Kn, r, jitter=1e-6)
    ref = torch.distributions.MultivariateNormal(torch.zeros(n), Kn[0] + 1e-6 * torch.eye(n)).log_prob(r[0])
    assert _rel(v[0], ref) < 1e-10
    # a kernel whose matrices are indefinite: no jitter up to 0.1 helps
    X, y = _data(20)
    indefinite = _Negated(_kernel())
    d = HGPMarginal(indefinite, X, NOISE, experts=np.arange(20).reshape(2, 10))
    with pytest.raises(NotPositiveDefiniteError, match=r"experts \[0, 1\].*noise"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d.log_prob(y)
    assert issubclass(NotPositiveDefiniteError, ValueError)
    # duplicated inputs with a negligible noise: fixed by jitter, with a warning
    Xd = torch.cat([X[:5], X[:5]])
    dup = HGPMarginal(_kernel(), Xd, 1e-300, experts=np.arange(10)[None])
    with pytest.warns(JitterWarning, match="jitter"):
        assert torch.isfinite(dup.log_prob(torch.cat([y[:5], y[:5]])))


def test_bad_input_raises_value_error_naming_the_argument():
    X, y = _data(40)
    ex = np.arange(40).reshape(4, 10)
    k = _kernel()
    bad_X = X.clone()
    bad_X[3, 1] = float("nan")
    cases = [
        ("X", lambda: HGPMarginal(k, bad_X, NOISE, experts=ex)),
        ("X", lambda: HGPMarginal(k, X.numpy(), NOISE, experts=ex)),
        ("X", lambda: HGPMarginal(k, X[:, :2], NOISE, experts=ex)),
        ("noise", lambda: HGPMarginal(k, X, 0.0, experts=ex)),
        ("noise", lambda: HGPMarginal(k, X, -1.0, experts=ex)),
        ("noise", lambda: HGPMarginal(k, X, torch.tensor([0.1, 0.2]), experts=ex)),
        ("mean", lambda: HGPMarginal(k, X, NOISE, experts=ex, mean=torch.zeros(7))),
        ("mean", lambda: HGPMarginal(k, X, NOISE, experts=ex, mean=torch.tensor(float("inf")))),
        ("experts", lambda: HGPMarginal(k, X, NOISE, experts=ex + 1)),
        ("jitter", lambda: HGPMarginal(k, X, NOISE, experts=ex, jitter=0.0)),
        ("workers", lambda: HGPMarginal(k, X, NOISE, experts=ex, workers=-1)),
        ("chunk_size", lambda: HGPMarginal(k, X, NOISE, experts=ex, chunk_size=0)),
        ("kernel", lambda: HGPMarginal("rbf", X, NOISE, experts=ex)),
        ("method", lambda: partition(X.numpy(), expert_size=10, method="grid")),
    ]
    d = HGPMarginal(k, X, NOISE, experts=ex)
    y_inf = y.clone()
    y_inf[0] = float("inf")
    cases += [
        ("y", lambda: d.log_prob(y_inf)),
        ("y", lambda: d.log_prob(y[:-1])),
        ("y", lambda: d.predict(y[:-1], X[:3])),
        ("combine", lambda: d.predict(y, X[:3], combine="moe")),
        ("combine", lambda: d.predict(y, X[:3], combine="grbcm")),
        ("X_new", lambda: d.predict(y, torch.randn(3, D + 1))),
        ("X_new", lambda: d.predict(y, torch.full((3, D), float("nan")))),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=name):
            call()
    pyro.clear_param_store()  # else the kernel takes the stored "lengthscale"
    with pytest.raises(ValueError, match="kernel"):  # NaN hyperparameters
        HGPMarginal(gk.RBF(D, lengthscale=torch.tensor(float("nan"))), X, NOISE, experts=ex)
    with pytest.raises(ValueError, match="kernel"):  # NaN from a generic kernel
        expert_log_likelihood(_Negated(gk.RBF(D, variance=torch.tensor(float("nan")))), X, y, ex, NOISE)


def test_targets_and_test_inputs_take_the_dtype_of_X():
    """float64 targets from numpy beside float32 inputs (and the reverse), and test inputs of another
    dtype than X, are converted to X's dtype, not a torch dtype error naming no argument."""
    X, y = _data(40)
    ex = np.arange(40).reshape(4, 10)
    d64 = HGPMarginal(_kernel(), X, NOISE, experts=ex)
    y32 = y.float()
    with torch.no_grad():
        assert d64.log_prob(y32).dtype == torch.float64
        assert float(d64.log_prob(y32)) == float(d64.log_prob(y32.double()))
    pyro.clear_param_store()  # else a new kernel takes the stored float64 "lengthscale"
    k32 = gk.RBF(D, variance=torch.tensor(VAR, dtype=torch.float32), lengthscale=torch.tensor(LS, dtype=torch.float32))
    # float32 parameters (torch's default dtype) on float64 inputs, float32 test inputs
    p = HGPMarginal(k32, X, NOISE, experts=ex).predict(y, X[:5].float())
    q = HGPMarginal(k32, X, NOISE, experts=ex).predict(y, X[:5].float().double())
    assert p.mean.dtype == torch.float64 and torch.equal(p.mean, q.mean) and torch.equal(p.variance, q.variance)
    d32 = HGPMarginal(k32, X.float(), NOISE, experts=ex)
    with torch.no_grad():
        lp = d32.log_prob(y)
        assert lp.dtype == torch.float32 and float(lp) == float(d32.log_prob(y.float()))
    assert _rel(lp.double(), d64.log_prob(y)) < 1e-5


# --------------------------------------------------------------------------- sampling


def test_sample_disjoint_experts_and_refuse_overlap():
    X, _ = _data(6)
    d = HGPMarginal(_kernel(), X, NOISE, experts=np.array([[0, 2, 4], [1, 3, 5]]), mean=torch.tensor(MEAN))
    pyro.set_rng_seed(0)
    s = d.sample((20000,))
    assert s.shape == (20000, 6)
    K = _kernel().forward(X).detach() + NOISE * torch.eye(6)
    block = torch.zeros(6, 6)
    for idx in ([0, 2, 4], [1, 3, 5]):
        block[np.ix_(idx, idx)] = K[np.ix_(idx, idx)]
    emp = torch.cov(s.T)
    assert float((emp - block).abs().max()) < 0.06
    assert float((s.mean(0) - MEAN).abs().max()) < 0.05
    overlapping = HGPMarginal(_kernel(), X, NOISE, experts=np.array([[0, 1, 2], [2, 3, 4]]))
    with pytest.raises(NotImplementedError, match="predict"):
        overlapping.sample()


# --------------------------------------------------------------------------- Pyro inference


def _model_factory(X, experts, prior=False):
    kernel = gk.RBF(D, lengthscale=torch.ones(D))
    if prior:
        kernel.lengthscale = PyroSample(pdist.LogNormal(0.0, 1.0).expand([D]).to_event(1))
        kernel.variance = PyroSample(pdist.LogNormal(0.0, 1.0))

    def model(y=None):
        noise = pyro.sample("noise", pdist.LogNormal(-2.0, 1.0)) if prior else \
            pyro.param("noise", torch.tensor(0.2), constraint=pdist.constraints.positive)
        return pyro.sample("y", HGPMarginal(kernel, X, noise, experts=experts), obs=y)

    return kernel, model


def test_svi_loss_decreases():
    X, y = _data(120)
    ex = partition(X.numpy(), expert_size=30, method="kdtree")
    kernel, model = _model_factory(X, ex)
    svi = SVI(model, lambda y=None: None, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(y) for _ in range(30)]
    assert losses[-1] < losses[0] - 1.0
    assert {"noise", "variance", "lengthscale"} <= set(pyro.get_param_store().keys())
    # the loss is minus log_prob
    noise = pyro.param("noise").detach()
    ref = reference.hgp_log_marginal("rbf", X.numpy(), y.numpy(), ex.index, float(kernel.variance),
                                     kernel.lengthscale.detach().numpy(), float(noise))
    assert abs(svi.evaluate_loss(y) + ref) <= 1e-8 * abs(ref)


def test_svi_autodelta_with_priors_reads_samples_once():
    X, y = _data(60)
    ex = partition(X.numpy(), expert_size=20, method="random")
    kernel, model = _model_factory(X, ex, prior=True)
    tr = poutine.trace(model).get_trace(y)
    assert [n for n, s in tr.nodes.items() if s["type"] == "sample"] == ["noise", "variance", "lengthscale", "y"]
    tr.compute_log_prob()  # after the model ran: uses the drawn values, draws nothing new
    ls, var = tr.nodes["lengthscale"]["value"], tr.nodes["variance"]["value"]
    ref = reference.hgp_log_marginal("rbf", X.numpy(), y.numpy(), ex.index, float(var), ls.numpy(),
                                     float(tr.nodes["noise"]["value"]))
    assert abs(float(tr.nodes["y"]["log_prob_sum"]) - ref) <= 1e-8 * abs(ref)
    guide = AutoDelta(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(y) for _ in range(25)]
    assert losses[-1] < losses[0]


def test_nuts_and_predictive():
    X, y = _data(24)
    ex = np.arange(24).reshape(3, 8)  # disjoint: the observed site can also be sampled
    kernel, model = _model_factory(X, ex, prior=True)
    pyro.set_rng_seed(1)
    mcmc = MCMC(NUTS(model), num_samples=8, warmup_steps=8, disable_progbar=True)
    mcmc.run(y)
    samples = mcmc.get_samples()
    assert samples["lengthscale"].shape == (8, D) and torch.isfinite(samples["noise"]).all()
    draws = Predictive(model, samples)()["y"]
    assert draws.shape == (8, 24) and torch.isfinite(draws).all()


def test_nuts_rejects_hyperparameters_outside_the_domain():
    # NUTS's step-size search from a large step proposes a noise of 0 and lengthscales of 0 and inf: called
    # directly those raise DomainError; under NUTS the step is rejected with a DomainWarning and the run goes on
    X, y = _data(24)
    ex = np.arange(24).reshape(3, 8)
    kernel, model = _model_factory(X, ex, prior=True)
    with pytest.raises(DomainError, match="noise: must be positive"):
        HGPMarginal(gk.RBF(D), X, torch.tensor(0.0), experts=ex)
    with pytest.raises(DomainError, match="kernel: contains NaN or inf"):
        HGPMarginal(gk.RBF(D, lengthscale=torch.full((D,), math.inf)), X, torch.tensor(0.1), experts=ex)
    assert issubclass(NotPositiveDefiniteError, DomainError)
    assert not reject_step(ValueError("y: contains NaN or inf")) and not reject_step(RuntimeError("boom"))
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model, step_size=1e3, max_tree_depth=3), num_samples=3, warmup_steps=5, disable_progbar=True)
    with pytest.warns(DomainWarning, match="HMC/NUTS rejects this step"):
        mcmc.run(y)
    samples = mcmc.get_samples()
    assert samples["lengthscale"].shape == (3, D) and torch.isfinite(samples["noise"]).all()


# --------------------------------------------------------------------------- precision and recovery


def test_float32_smoke():
    X, y = _data(100)
    ex = partition(X.numpy(), expert_size=25, method="kdtree")
    lp64 = HGPMarginal(_kernel(), X, NOISE, experts=ex).log_prob(y)
    p64 = HGPMarginal(_kernel(), X, NOISE, experts=ex).predict(y, X[:10])
    torch.set_default_dtype(torch.float32)  # the fixture restores float64 and then the original
    pyro.clear_param_store()
    k = gk.RBF(D, variance=torch.tensor(VAR), lengthscale=torch.tensor(LS))
    d = HGPMarginal(k, X.float(), NOISE, experts=ex)
    lp = d.log_prob(y.float())
    assert lp.dtype == torch.float32 and abs(float(lp) - float(lp64)) <= 1e-4 * abs(float(lp64))
    lp.backward()
    assert torch.isfinite(k.lengthscale_unconstrained.grad).all()
    p = d.predict(y.float(), X[:10].float())
    assert _rel(p.mean.double(), p64.mean) < 1e-3


@pytest.mark.slow
def test_recover_lengthscale():
    N, n = (1000, 100) if os.environ.get("CI") else (1600, 160)  # recovers 0.462 / 0.479
    X, y, _ = scalegp.gp_draws(N, 2, lengthscale=0.5, variance=1.0, noise=0.01, seed=4)
    X, y = torch.tensor(X), torch.tensor(y)
    ex = partition(X.numpy(), expert_size=n, method="kdtree", seed=0)
    kernel = gk.RBF(2, lengthscale=torch.tensor(1.5))
    log_noise = torch.tensor(math.log(0.1), requires_grad=True)
    opt = torch.optim.LBFGS(list(kernel.parameters()) + [log_noise], lr=0.5, max_iter=60,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -HGPMarginal(kernel, X, log_noise.exp(), experts=ex).log_prob(y) / N
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    assert abs(float(kernel.lengthscale.detach()) - 0.5) < 0.05


def test_generic_kernel_predict_and_log_prob():
    """Sum(RBF(v/2), RBF(v/2)) runs the generic path and equals RBF(v) on the fast path."""
    X, y = _data(90)
    ex = partition(X.numpy(), expert_size=30, method="kdtree", communication=True)
    Xs = torch.rand(12, D) * 4 - 2
    fast = HGPMarginal(_kernel(), X, NOISE, experts=ex)
    pyro.clear_param_store()
    half = dict(variance=torch.tensor(VAR / 2), lengthscale=torch.tensor(LS))
    generic = HGPMarginal(gk.Sum(gk.RBF(D, **half), gk.RBF(D, **half)), X, NOISE, experts=ex)
    assert generic.kernel.kind is None
    assert _rel(generic.log_prob(y).detach(), fast.log_prob(y).detach()) < 1e-12
    for rule in ("rbcm", "grbcm"):
        a, b = generic.predict(y, Xs, combine=rule), fast.predict(y, Xs, combine=rule)
        assert _rel(a.mean, b.mean) < 1e-10 and _rel(a.variance, b.variance) < 1e-10
