"""pyro_scalegp.HGPMarginal and numpyro_scalegp.HGPMarginal agree on the same inputs.

Pyro's Exponential kernel evaluates ``r = sqrt(r^2 + 1e-12)`` (``pyro.contrib.gp``'s
``_torch_sqrt``), so its diagonal is ``variance * exp(-1e-6)`` instead of ``variance``; the
NumPyro kernel is exact. That difference equals a change of the noise variance by
``variance * (1 - exp(-1e-6))``, a function of the variance; off the diagonal the eps changes
``r`` by a relative ``1e-12 / (2 r^2)``, negligible for inputs that are not nearly duplicated
(the data below keep every pair of points apart). So the Exponential case compares with that
noise offset, at the same tolerance as the other kernels.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyro = pytest.importorskip("pyro")

from scalegp import partition  # noqa: E402

KERNELS = ("RBF", "Matern32", "Matern52", "Exponential")
VARIANCE, LENGTHSCALE, NOISE, MEAN = 1.3, [0.7, 1.1], 0.1, 0.2


@pytest.fixture(scope="module", autouse=True)
def float64():
    previous_jax, previous_torch = jax.config.jax_enable_x64, torch.get_default_dtype()
    jax.config.update("jax_enable_x64", True)
    torch.set_default_dtype(torch.float64)
    yield
    jax.config.update("jax_enable_x64", previous_jax)
    torch.set_default_dtype(previous_torch)


@pytest.fixture(autouse=True)
def param_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # a jittered 9 x 8 grid: every pair at least 0.3 apart, so Pyro's sqrt eps (module docstring)
    # changes each off-diagonal entry and its derivatives by at most ~1e-11 relative
    grid = np.stack(np.meshgrid(np.linspace(-2, 2, 9), np.linspace(-1.75, 1.75, 8)), -1).reshape(-1, 2)
    X = grid + rng.uniform(-0.1, 0.1, grid.shape)
    y = np.sin(X).sum(1) + 0.3 * rng.standard_normal(72)
    Xs = rng.uniform(-2.5, 2.5, (9, 2))
    return X, y, Xs


def _noise_offset(name, variance):
    return variance * (1 - math.exp(-1e-6)) if name == "Exponential" else 0.0


def _pyro(name, X, y, experts):
    """Value and gradients (log lengthscale, log variance, noise, mean) on the Pyro side."""
    import pyro.contrib.gp.kernels as pk
    import pyro_scalegp
    k = getattr(pk, name)(2, variance=torch.tensor(VARIANCE), lengthscale=torch.tensor(LENGTHSCALE))
    noise = torch.tensor(NOISE, requires_grad=True)
    mean = torch.tensor(MEAN, requires_grad=True)
    d = pyro_scalegp.HGPMarginal(k, torch.tensor(X), noise, experts=experts, mean=mean)
    value = d.log_prob(torch.tensor(y))
    value.backward()
    # PyroParam(constraint=positive) stores log values: these are d/dlog(lengthscale), d/dlog(variance)
    return (value.item(), k.lengthscale_unconstrained.grad.numpy(), k.variance_unconstrained.grad.item(),
            noise.grad.item(), mean.grad.item())


def _numpyro(name, X, y, experts):
    from numpyro_scalegp import HGPMarginal, kernels

    def f(log_ls, log_var, noise, mean):
        variance = jnp.exp(log_var)
        k = getattr(kernels, name)(2, variance, jnp.exp(log_ls))
        return HGPMarginal(k, X, noise - _noise_offset(name, variance), experts=experts, mean=mean).log_prob(y)

    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(
        jnp.log(jnp.asarray(LENGTHSCALE)), math.log(VARIANCE), NOISE, MEAN)
    return (float(value), np.asarray(grads[0]), *(float(g) for g in grads[1:]))


@pytest.mark.parametrize("name", KERNELS)
def test_log_prob_and_gradients_agree(data, name):
    X, y, _ = data
    experts = partition(X, expert_size=16, duplication=2, method="kdtree", seed=3).with_tree([2, 2])
    assert experts.num_experts > 4
    p, j = _pyro(name, X, y, experts), _numpyro(name, X, y, experts)
    labels = ("value", "d/dlog lengthscale", "d/dlog variance", "d/dnoise", "d/dmean")
    for label, a, b in zip(labels, p, j):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=f"{name}: {label}")


@pytest.mark.parametrize("rule", ["poe", "gpoe", "bcm", "rbcm", "grbcm"])
def test_predictions_agree(data, rule):
    import pyro.contrib.gp.kernels as pk
    import pyro_scalegp
    from numpyro_scalegp import HGPMarginal, kernels
    X, y, Xs = data
    if rule == "grbcm":
        experts = partition(X, expert_size=24, communication=8, method="random", seed=4)
    else:
        experts = partition(X, expert_size=12, method="kdtree", seed=4)
    k = pk.Matern52(2, variance=torch.tensor(VARIANCE), lengthscale=torch.tensor(LENGTHSCALE))
    tp = pyro_scalegp.HGPMarginal(k, torch.tensor(X), torch.tensor(NOISE), experts=experts,
                                  mean=torch.tensor(MEAN))
    jp = HGPMarginal(kernels.Matern52(2, VARIANCE, jnp.asarray(LENGTHSCALE)), X, NOISE, experts=experts, mean=MEAN)
    for noiseless in (True, False):
        a = tp.predict(torch.tensor(y), torch.tensor(Xs), combine=rule, noiseless=noiseless)
        b = jp.predict(y, Xs, combine=rule, noiseless=noiseless)
        np.testing.assert_allclose(a.mean.numpy(), np.asarray(b.mean), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(a.variance.numpy(), np.asarray(b.variance), rtol=1e-9)


@pytest.mark.parametrize("rule", ["rbcm", "grbcm"])
def test_predict_progress_bar_counts_every_expert_and_changes_nothing(data, rule, capsys):
    """``predict(..., progress_bar=True)``: a bar over the experts that reaches their number (the
    communication expert included for GRBCM), ticked chunk by chunk, and the same predictions."""
    import pyro.contrib.gp.kernels as pk
    import pyro_scalegp
    from numpyro_scalegp import HGPMarginal, kernels
    X, y, Xs = data
    experts = partition(X, expert_size=12, method="random", seed=4, communication=8 if rule == "grbcm" else None)
    total = experts.num_experts + (rule == "grbcm")
    k = pk.Matern52(2, variance=torch.tensor(VARIANCE), lengthscale=torch.tensor(LENGTHSCALE))
    tp = pyro_scalegp.HGPMarginal(k, torch.tensor(X), torch.tensor(NOISE), experts=experts, chunk_size=2)
    jp = HGPMarginal(kernels.Matern52(2, VARIANCE, jnp.asarray(LENGTHSCALE)), X, NOISE, experts=experts,
                     chunk_size=2)
    for predict, as_np in ((lambda **kw: tp.predict(torch.tensor(y), torch.tensor(Xs), combine=rule, **kw),
                            lambda t: t.numpy()),
                           (lambda **kw: jp.predict(y, Xs, combine=rule, **kw), np.asarray)):
        plain = predict()
        assert "HGP predict" not in capsys.readouterr().err  # no bar by default
        shown = predict(progress_bar=True)
        err = capsys.readouterr().err
        assert "HGP predict" in err and f"{total}/{total}" in err, err[-500:]
        np.testing.assert_array_equal(as_np(shown.mean), as_np(plain.mean))
        np.testing.assert_array_equal(as_np(shown.variance), as_np(plain.variance))


def test_frontends_export_the_same_names():
    """The two frontends' public names are the same but for each framework's idiom: Pyro's kernels
    are ``pyro.contrib.gp`` modules (``bind``/``BoundKernel`` read their parameters once) and its
    optimizers classes; NumPyro's kernels are ours (``kernels``), its optimizers functions, and its
    traced failures warnings (``NotPositiveDefiniteWarning``). Shared classes are one object."""
    import numpyro_scalegp
    import pyro_scalegp

    pyro_only = {"BoundKernel", "bind", "ProximalAdadelta", "ProximalAdadeltaOptimizer"}
    numpyro_only = {"kernels", "proximal_adadelta", "NotPositiveDefiniteWarning"}
    assert set(pyro_scalegp.__all__) - set(numpyro_scalegp.__all__) == pyro_only
    assert set(numpyro_scalegp.__all__) - set(pyro_scalegp.__all__) == numpyro_only
    for name in ("Experts", "partition", "balanced_tree", "JitterWarning"):
        assert getattr(pyro_scalegp, name) is getattr(numpyro_scalegp, name)
