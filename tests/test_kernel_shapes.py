"""A kernel whose lengthscale or columns do not fit the inputs is refused, in both frontends, with a
ValueError naming the argument (scalegp.kernel_shapes), where before the frameworks broadcast it, failed
with a message naming neither, or (JAX, which clamps out-of-range indices) read the last column twice."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pyro
import pyro.contrib.gp as gp
import pytest
import torch

import numpyro_scalegp as npg
import pyro_scalegp as ppg
from numpyro_scalegp import kernels as nk
from pyro_scalegp.kernels import check_kernel_inputs
from scalegp.kernel_shapes import check_active_columns, check_lengthscale_shape
from tests.test_svgp_vae_numpyro import jax_encoder
from tests.test_svgp_vae_pyro import Encoder

pytestmark = pytest.mark.usefixtures("float64", "jax_x64", "pyro_clean")

X = np.random.default_rng(0).normal(size=(60, 3))


def test_the_shared_checks_accept_a_scalar_or_one_lengthscale_per_dimension_and_the_columns_present():
    for shape in ((), (1,), (3,)):
        check_lengthscale_shape(shape, 3)
    for shape in ((2,), (4,), (3, 1), (1, 3)):
        with pytest.raises(ValueError, match=r"lengthscale: expected a scalar or shape \(3,\), got shape"):
            check_lengthscale_shape(shape, 3)
    check_active_columns([0, 2], 3)
    check_active_columns([], 0)
    with pytest.raises(ValueError, match=r"Z: the kernel reads columns \[1, 3\] but Z has 3"):
        check_active_columns([1, 3], 3, "Z")


@pytest.mark.parametrize("make", [
    lambda ell: nk.RBF(3, 1.0, ell), lambda ell: nk.Matern52(3, 1.0, ell), lambda ell: nk.Periodic(3, 1.0, ell, 2.0)])
def test_numpyro_kernels_refuse_a_lengthscale_of_another_length_also_when_traced(make):
    make(1.0), make(jnp.ones(1)), make(jnp.ones(3))
    with pytest.raises(ValueError, match=r"lengthscale: expected a scalar or shape \(3,\), got shape \(2,\)"):
        make(jnp.ones(2))
    Xj = jnp.asarray(X)
    assert jax.jit(lambda ell: make(ell)(Xj))(jnp.ones(3)).shape == (60, 60)
    with pytest.raises(ValueError, match="lengthscale"):
        jax.jit(lambda ell: make(ell)(Xj))(jnp.ones(2))


def test_numpyro_components_refuse_a_kernel_reading_a_column_the_inputs_lack():
    """Before: HGPMarginal with a 4-column kernel on 3 columns returned a log density, JAX's gather
    having clamped column 3 to column 2."""
    wide = nk.RBF(4, 1.0, jnp.ones(4))
    experts = npg.partition(X, expert_size=20)
    with pytest.raises(ValueError, match=r"X: the kernel reads columns \[0, 1, 2, 3\] but X has 3"):
        npg.HGPMarginal(wide, jnp.asarray(X), 0.1, experts=experts)
    product = nk.Product(nk.RBF(1, 1.0, 1.0, active_dims=[0]), nk.Periodic(1, 1.0, 1.0, 2.0, active_dims=[5]))
    with pytest.raises(ValueError, match=r"X: the kernel reads columns \[0, 5\] but X has 3"):
        npg.HGPMarginal(product, jnp.asarray(X), 0.1, experts=experts)
    with pytest.raises(ValueError, match=r"Z: the kernel reads columns \[0, 1, 2, 3\] but Z has 3"):
        npg.ADVGP(wide, jnp.asarray(X[:5]), noise=0.1)
    with pytest.raises(ValueError, match=r"Z: the kernel reads columns \[0, 1, 2, 3\] but Z has 3"):
        npg.SVGPVAEGuide(jax_encoder(), wide, jnp.asarray(X[:5]), num_data=60, latent_dim=2)
    # the same components with a kernel that fits
    fits = nk.RBF(3, 1.0, jnp.ones(3))
    assert np.isfinite(float(npg.HGPMarginal(fits, jnp.asarray(X), 0.1, experts=experts).log_prob(jnp.zeros(60))))
    npg.ADVGP(fits, jnp.asarray(X[:5]), noise=0.1)
    npg.SVGPVAEGuide(jax_encoder(), fits, jnp.asarray(X[:5]), num_data=60, latent_dim=2)


def test_pyro_components_refuse_a_mis_shaped_lengthscale_or_a_column_the_inputs_lack():
    Xt = torch.as_tensor(X)
    experts = ppg.partition(X, expert_size=20)
    short = gp.kernels.RBF(3, lengthscale=torch.ones(2))
    wide = gp.kernels.Matern32(4)
    for kernel, message in ((short, r"lengthscale: expected a scalar or shape \(3,\), got shape \(2,\)"),
                            (wide, r"X: the kernel reads columns \[0, 1, 2, 3\] but X has 3")):
        with pytest.raises(ValueError, match=message):
            ppg.HGPMarginal(kernel, Xt, torch.tensor(0.1), experts=experts)
        with pytest.raises(ValueError, match=message.replace("X", "Z")):
            ppg.ADVGP(kernel, Xt[:5], noise=0.1)
        with pytest.raises(ValueError, match=message.replace("X", "Z")):
            ppg.SVGPVAEGuide(Encoder(), kernel, Xt[:5], num_data=60, latent_dim=2)
    pyro.clear_param_store()  # the refused kernels' lengthscales went there, under the same name
    fits = gp.kernels.RBF(3, lengthscale=torch.ones(3))
    assert torch.isfinite(ppg.HGPMarginal(fits, Xt, torch.tensor(0.1), experts=experts).log_prob(torch.zeros(60)))
    ppg.ADVGP(gp.kernels.RBF(3), Xt[:5], noise=0.1)
    ppg.SVGPVAEGuide(Encoder(), fits, Xt[:5], num_data=60, latent_dim=2)


def test_pyro_check_does_not_draw_a_lengthscale_that_has_a_prior():
    kernel = gp.kernels.RBF(3)
    kernel.lengthscale = pyro.nn.PyroSample(pyro.distributions.LogNormal(0.0, 1.0).expand([3]).to_event(1))
    state = torch.get_rng_state()
    check_kernel_inputs(kernel, 3)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match="X: the kernel reads columns"):
        check_kernel_inputs(kernel, 2)


def test_lattice_operators_and_exact_gp_vaes_refuse_a_kernel_reading_a_column_the_inputs_lack():
    """Before: the NumPyro operator built its lattice on columns 0, 1, 2, 2 (JAX clamping column 3), the
    Pyro one failed in torch's indexing; the exact GP-VAEs as HGP did."""
    from numpyro import handlers

    from numpyro_scalegp.lattice import LatticeKernelOperator as NumPyroLattice
    from numpyro_scalegp.svgp_vae import ExactGPVAE as NumPyroExact
    from pyro_scalegp.lattice import LatticeKernelOperator as PyroLattice
    from pyro_scalegp.svgp_vae import ExactGPVAE as PyroExact
    from tests.test_svgp_vae_numpyro import jax_linear
    from tests.test_svgp_vae_pyro import K, L

    message = r"X: the kernel reads columns \[0, 1, 2, 3\] but X has 3"
    with pytest.raises(ValueError, match=message):
        NumPyroLattice(jnp.asarray(X), nk.RBF(4, 1.0, jnp.ones(4)))
    with pytest.raises(ValueError, match=message):
        PyroLattice(torch.as_tensor(X), gp.kernels.RBF(4))
    assert NumPyroLattice(jnp.asarray(X), nk.RBF(3, 1.0, jnp.ones(3))).shape == (60, 60)
    assert PyroLattice(torch.as_tensor(X), gp.kernels.RBF(3)).shape == (60, 60)

    Y = (np.random.default_rng(1).normal(size=(5, K)) > 0).astype(float)  # pixels of the default Bernoulli likelihood
    message = r"X: the kernel reads columns \[0, 1\] but X has 1"
    numpyro_vae = NumPyroExact(jax_encoder(), jax_linear(L, K), nk.RBF(2, 1.0, jnp.ones(2)), latent_dim=L)
    with pytest.raises(ValueError, match=message):
        handlers.seed(numpyro_vae.elbo, 0)(jnp.asarray(X[:5, :1]), jnp.asarray(Y))
    assert np.isfinite(float(handlers.seed(numpyro_vae.elbo, 0)(jnp.asarray(X[:5, :2]), jnp.asarray(Y))))
    pyro_vae = PyroExact(Encoder(), torch.nn.Linear(L, K), gp.kernels.RBF(2), latent_dim=L)
    with pytest.raises(ValueError, match=message):
        pyro_vae.elbo(torch.as_tensor(X[:5, :1]), torch.as_tensor(Y))
    assert torch.isfinite(pyro_vae.elbo(torch.as_tensor(X[:5, :2]), torch.as_tensor(Y)))
