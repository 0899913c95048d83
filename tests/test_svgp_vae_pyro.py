"""Pyro SVGP-VAE and exact GP-VAE against the dense float64 reference (tests/reference.py)."""
from __future__ import annotations

import numpy as np
import pyro
import pyro.contrib.gp as gp
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_scalegp.svgp_vae import SVGPVAE, ExactGPVAE, SVGPVAEGuide
from tests import reference as ref

N, D, K, L = 12, 2, 6, 3


pytestmark = pytest.mark.usefixtures("float64", "pyro_clean")


class Encoder(torch.nn.Module):
    def __init__(self, k=K, latent=L):
        super().__init__()
        self.hidden = torch.nn.Linear(k, 8)
        self.loc = torch.nn.Linear(8, latent)
        self.scale = torch.nn.Linear(8, latent)

    def forward(self, y):
        h = torch.tanh(self.hidden(y.reshape(y.shape[0], -1)))
        return self.loc(h), torch.nn.functional.softplus(self.scale(h)) + 0.2


def make_data(seed=0, n=N, binary=False):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, D, generator=g) * 4 - 2
    Y = torch.randn(n, K, generator=g)
    if binary:
        Y = (Y > 0).to(Y.dtype)
    return X, Y


def make_kernel():
    return gp.kernels.RBF(D, variance=torch.tensor(1.3), lengthscale=torch.tensor([0.9, 1.4]))


def kmat(A, B):
    return ref.kernel_matrix("rbf", A.detach().numpy(), B.detach().numpy(), 1.3, [0.9, 1.4])


def latent_set(encoder, Y):
    with torch.no_grad():
        loc, scale = encoder(Y)
    return loc.numpy(), scale.numpy() ** 2


def log_lik(vae, z, Y):
    with torch.no_grad():
        return float(vae.observation(torch.as_tensor(z), Y.dim() - 1).log_prob(Y).sum())


def standard_normal(shape, seed):
    pyro.set_rng_seed(seed)
    return torch.distributions.Normal(torch.zeros(shape), torch.ones(shape)).rsample().numpy()


@pytest.mark.parametrize("b", [5, N])
def test_hybrid_posterior_is_weighted_titsias_optimum(b):
    X, Y = make_data()
    Z = torch.linspace(-2, 2, 5).unsqueeze(-1).repeat(1, 2) * torch.tensor([1.0, -0.5])
    enc = Encoder()
    guide = SVGPVAEGuide(enc, make_kernel(), Z, num_data=N, latent_dim=L, jitter=1e-6)
    mu, A = guide.hybrid_posterior(X[:b], Y[:b])
    assert mu.shape == (L, 5) and A.shape == (L, 5, 5)
    yt, s2 = latent_set(enc, Y[:b])
    Kmm = kmat(Z, Z) + 1e-6 * np.eye(5)
    for l in range(L):
        mu_r, A_r = ref.titsias_optimum(Kmm, kmat(Z, X[:b]), yt[:, l], s2[:, l], weight=N / b)
        np.testing.assert_allclose(mu[l].detach().numpy(), mu_r, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(A[l].detach().numpy(), A_r, rtol=1e-9, atol=1e-10)


def test_hybrid_with_all_data_and_Z_equal_X_is_the_exact_posterior():
    X, Y = make_data()
    enc = Encoder()
    guide = SVGPVAEGuide(enc, make_kernel(), X.clone(), num_data=N, latent_dim=L, jitter=1e-10)
    mu, A = guide.hybrid_posterior(X, Y)
    yt, s2 = latent_set(enc, Y)
    Kxx = kmat(X, X)
    for l in range(L):
        m_exact, _, _ = ref.gpvae_exact_terms(Kxx, yt[:, l], s2[:, l])
        C = Kxx + np.diag(s2[:, l])
        np.testing.assert_allclose(mu[l].detach().numpy(), m_exact, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(A[l].detach().numpy(), Kxx - Kxx @ np.linalg.solve(C, Kxx),
                                   rtol=1e-6, atol=1e-7)
        # and the Hensman bound at the optimum is the Titsias bound, which here is log Z
        hb = ref.hensman_bound(Kxx + 1e-10 * np.eye(N), Kxx, np.full(N, 1.3), yt[:, l], s2[:, l],
                               mu[l].detach().numpy(), A[l].detach().numpy())
        assert hb == pytest.approx(ref.titsias_bound(Kxx + 1e-10 * np.eye(N), Kxx, np.full(N, 1.3),
                                                     yt[:, l], s2[:, l]), rel=1e-6)
        assert hb == pytest.approx(ref._log_normal(yt[:, l], C), rel=1e-6)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_elbo_with_all_data_and_Z_equal_X_equals_exact_gpvae(likelihood):
    X, Y = make_data(binary=likelihood == "bernoulli")
    enc, dec = Encoder(), torch.nn.Linear(L, K)
    sv = SVGPVAE(enc, dec, make_kernel(), X.clone(), num_data=N, latent_dim=L,
                 likelihood=likelihood, jitter=1e-10)
    ex = ExactGPVAE(enc, dec, make_kernel(), latent_dim=L, likelihood=likelihood)
    pyro.set_rng_seed(3)
    e_sv = sv.elbo(X, Y)
    pyro.set_rng_seed(3)
    e_ex = ex.elbo(X, Y)
    # dense reference: Pearce's ELBO with the same reparameterized sample
    yt, s2 = latent_set(enc, Y)
    eps = standard_normal((N, L), 3)
    m, v, term = np.zeros((N, L)), np.zeros((N, L)), 0.0
    for l in range(L):
        m[:, l], v[:, l], t = ref.gpvae_exact_terms(kmat(X, X), yt[:, l], s2[:, l])
        term += t
    expected = log_lik(ex, m + np.sqrt(v) * eps, Y) + term
    assert e_ex.item() == pytest.approx(expected, rel=1e-9)
    assert e_sv.item() == pytest.approx(expected, rel=1e-6)


def test_svi_loss_on_a_batch_equals_eq10():
    X, Y = make_data()
    Z = torch.tensor([[-1.5, 0.3], [-0.4, -1.0], [0.2, 0.9], [1.1, -0.2], [1.8, 1.5], [0.0, 0.0]])
    enc, dec = Encoder(), torch.nn.Sequential(torch.nn.Linear(L, 8), torch.nn.Tanh(), torch.nn.Linear(8, K))
    vae = SVGPVAE(enc, dec, make_kernel(), Z, num_data=N, latent_dim=L, likelihood="gaussian", noise=0.3)
    Xb, Yb = X[3:8], Y[3:8]
    b = 5
    pyro.set_rng_seed(7)
    loss = Trace_ELBO().loss(vae.model, vae.guide, Xb, Yb)
    pyro.set_rng_seed(7)
    direct = vae.elbo(Xb, Yb)
    # eq. 10 written out: cross-entropy and Hensman bound with the hybrid estimator, per channel
    yt, s2 = latent_set(enc, Yb)
    Kmm = kmat(Z, Z) + 1e-6 * np.eye(len(Z))
    m, v, term = np.zeros((b, L)), np.zeros((b, L)), 0.0
    for l in range(L):
        m[:, l], v[:, l], t = ref.svgp_vae_gp_terms(Kmm, kmat(Z, Xb), np.full(b, 1.3), yt[:, l], s2[:, l], N)
        term += t
    expected = log_lik(vae, m + np.sqrt(v) * standard_normal((b, L), 7), Yb) + term
    assert -loss == pytest.approx(expected, rel=1e-9)
    assert direct.item() == pytest.approx(expected, rel=1e-9)
    # the guide's z marginals are those of the sparse posterior
    loc, scale, _ = vae.guide.marginals(Xb, Yb)
    np.testing.assert_allclose(loc.detach().numpy(), m, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(scale.detach().numpy() ** 2, v, rtol=1e-9, atol=1e-12)


def test_exact_svi_loss_equals_pearce_elbo():
    X, Y = make_data(binary=True)
    enc, dec = Encoder(), torch.nn.Linear(L, K)
    vae = ExactGPVAE(enc, dec, make_kernel(), latent_dim=L)
    pyro.set_rng_seed(11)
    loss = Trace_ELBO().loss(vae.model, vae.guide, X, Y)
    yt, s2 = latent_set(enc, Y)
    m, v, term = np.zeros((N, L)), np.zeros((N, L)), 0.0
    for l in range(L):
        m[:, l], v[:, l], t = ref.gpvae_exact_terms(kmat(X, X), yt[:, l], s2[:, l])
        term += t
    expected = log_lik(vae, m + np.sqrt(v) * standard_normal((N, L), 11), Y) + term
    assert -loss == pytest.approx(expected, rel=1e-9)


def test_gradients_reach_encoder_decoder_kernel_and_Z():
    X, Y = make_data()
    enc, dec = Encoder(), torch.nn.Linear(L, K)
    kern = make_kernel()
    vae = SVGPVAE(enc, dec, kern, X[:5].clone() + 0.1, num_data=N, latent_dim=L, likelihood="gaussian")
    Xb = X[:6].clone().requires_grad_()  # learned auxiliary inputs (GP-LVM) get gradients too
    vae.elbo(Xb, Y[:6]).backward()
    grads = {
        "X": [Xb.grad],
        "encoder": [p.grad for p in enc.parameters()],
        "decoder": [p.grad for p in dec.parameters()],
        "kernel": [kern.lengthscale_unconstrained.grad, kern.variance_unconstrained.grad],
        "Z": [vae.guide.Z_unconstrained.grad],
        "noise": [vae.noise_unconstrained.grad],
    }
    for name, gs in grads.items():
        for g in gs:
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
    # SVI registers and moves every one of them through the param store
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(X[:6], Y[:6])
    names = set(pyro.get_param_store().keys())
    assert {"guide.Z", "guide.kernel.lengthscale", "guide.kernel.variance", "noise"} <= names
    assert any(n.startswith("guide.encoder$$$") for n in names)
    assert any(n.startswith("decoder$$$") for n in names)
    before = {n: pyro.param(n).detach().clone() for n in names}
    svi.step(X[6:], Y[6:])
    for n in names:
        assert not torch.equal(before[n], pyro.param(n).detach()), n


def test_gp_term_gradients_match_finite_differences():
    X, Y = make_data()
    enc = Encoder()
    guide = SVGPVAEGuide(enc, make_kernel(), X[:4].clone() + 0.05, num_data=N, latent_dim=L)
    with torch.no_grad():
        loc, scale = enc(Y[:6])
    loc.requires_grad_(), scale.requires_grad_()

    def f():
        Lm, V, LB, alpha = guide._factors(X[:6], loc, scale, N / 6)
        mean, var = guide._predict(guide.kernel(X[:6], diag=True), V, LB, alpha)
        return guide._kl(LB, alpha).sum() + (mean * torch.linspace(-1, 1, 6)).sum() + var.sum()

    params = [guide.Z_unconstrained, guide.kernel.lengthscale_unconstrained,
              guide.kernel.variance_unconstrained, loc, scale]
    grads = torch.autograd.grad(f(), params)
    h = 1e-6
    for p_, g_ in zip(params, grads):
        fd = torch.zeros_like(p_)
        with torch.no_grad():
            for i in range(p_.numel()):
                p_.view(-1)[i] += h
                up = f()
                p_.view(-1)[i] -= 2 * h
                down = f()
                p_.view(-1)[i] += h
                fd.view(-1)[i] = (up - down) / (2 * h)
        assert fd.abs().max() > 0
        np.testing.assert_allclose(g_.numpy(), fd.numpy(), rtol=1e-5, atol=1e-7)


def test_condition_and_generate_match_the_exact_posterior():
    X, Y = make_data(binary=True)
    enc, dec = Encoder(), torch.nn.Linear(L, K)
    Xs = torch.tensor([[0.3, -0.7], [1.9, 1.9], [-5.0, 0.0]])
    sv = SVGPVAE(enc, dec, make_kernel(), X.clone(), num_data=N, latent_dim=L, jitter=1e-10)
    ex = ExactGPVAE(enc, dec, make_kernel(), latent_dim=L)
    with torch.no_grad():
        p_sv = sv.condition(X, Y).latent(Xs)
        p_ex = ex.condition(X, Y).latent(Xs)
        gen = sv.generate(Xs)
    yt, s2 = latent_set(enc, Y)
    Kxx, Ksx = kmat(X, X), kmat(Xs, X)
    for l in range(L):
        C = Kxx + np.diag(s2[:, l])
        mean = Ksx @ np.linalg.solve(C, yt[:, l])
        var = 1.3 - np.einsum("sn,ns->s", Ksx, np.linalg.solve(C, Ksx.T))
        np.testing.assert_allclose(p_ex.mean[:, l].numpy(), mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(p_ex.variance[:, l].numpy(), var, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(p_sv.mean[:, l].numpy(), mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(p_sv.variance[:, l].numpy(), var, rtol=1e-6, atol=1e-7)
    assert p_sv.event_shape == (L,) and p_sv.batch_shape == (3,)
    # far from the data the latents revert to the prior
    np.testing.assert_allclose(p_sv.variance[2].numpy(), 1.3, rtol=1e-6)
    assert gen.batch_shape == (3,) and gen.event_shape == (K,)
    with torch.no_grad():
        np.testing.assert_allclose(gen.mean.numpy(), torch.sigmoid(dec(p_sv.mean)).numpy())


def test_conditioning_on_a_subset_is_the_hybrid_estimator_with_weight_one():
    X, Y = make_data()
    enc, dec = Encoder(), torch.nn.Linear(L, K)
    Z = X[::3].clone()
    vae = SVGPVAE(enc, dec, make_kernel(), Z, num_data=N, latent_dim=L)
    with torch.no_grad():
        pred = vae.condition(X[:7], Y[:7]).latent(X[7:])
    yt, s2 = latent_set(enc, Y[:7])
    Kmm = kmat(Z, Z) + 1e-6 * np.eye(len(Z))
    for l in range(L):
        mu, A = ref.titsias_optimum(Kmm, kmat(Z, X[:7]), yt[:, l], s2[:, l])
        m, v = ref.sparse_marginals(Kmm, kmat(Z, X[7:]), np.full(5, 1.3), mu, A)
        np.testing.assert_allclose(pred.mean[:, l].numpy(), m, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(pred.variance[:, l].numpy(), v, rtol=1e-8, atol=1e-10)


def test_product_of_periodic_and_linear_kernels_over_columns():
    # the rotated-digits kernel: periodic in the angle (column 0) times linear in an embedding
    g = torch.Generator().manual_seed(5)
    X = torch.cat([torch.rand(10, 1, generator=g) * 6.3, torch.randn(10, 3, generator=g)], 1)
    Y = torch.randn(10, K, generator=g)
    per = gp.kernels.Periodic(1, variance=torch.tensor(1.0), lengthscale=torch.tensor(0.7),
                              period=torch.tensor(2 * np.pi), active_dims=[0])
    lin = gp.kernels.Linear(3, variance=torch.tensor(0.5), active_dims=[1, 2, 3])
    kern = gp.kernels.Product(per, lin)
    Z = X[:6].clone() + 0.01
    enc = Encoder()
    guide = SVGPVAEGuide(enc, kern, Z, num_data=20, latent_dim=L)
    mu, A = guide.hybrid_posterior(X, Y)

    def k(A_, B_):
        A_, B_ = A_.numpy(), B_.numpy()
        d = A_[:, None, 0] - B_[None, :, 0]
        return np.exp(-2 * np.sin(np.pi * d / (2 * np.pi)) ** 2 / 0.49) * (0.5 * A_[:, 1:] @ B_[:, 1:].T)

    yt, s2 = latent_set(enc, Y)
    for l in range(L):
        mu_r, A_r = ref.titsias_optimum(k(Z, Z) + 1e-6 * np.eye(6), k(Z, X), yt[:, l], s2[:, l], weight=2.0)
        np.testing.assert_allclose(mu[l].detach().numpy(), mu_r, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(A[l].detach().numpy(), A_r, rtol=1e-7, atol=1e-9)


def test_float32_runs_and_agrees_loosely():
    X, Y = make_data()
    enc, dec = Encoder(), torch.nn.Linear(L, K)
    vae = SVGPVAE(enc, dec, make_kernel(), X[:6].clone(), num_data=N, latent_dim=L, likelihood="gaussian")
    with torch.no_grad():
        out64 = vae.guide.marginals(X, Y)
    torch.set_default_dtype(torch.float32)
    pyro.clear_param_store()
    enc32, dec32 = enc.float(), dec.float()
    vae32 = SVGPVAE(enc32, dec32, gp.kernels.RBF(D, variance=torch.tensor(1.3), lengthscale=torch.tensor([0.9, 1.4])),
                    X[:6].float(), num_data=N, latent_dim=L, likelihood="gaussian")
    with torch.no_grad():
        out32 = vae32.guide.marginals(X.float(), Y.float())
    for a64, a32 in zip(out64, out32):
        assert a32.dtype == torch.float32
        np.testing.assert_allclose(a32.numpy(), a64.numpy(), rtol=1e-4, atol=1e-5)
    e32 = vae32.elbo(X.float(), Y.float())
    assert e32.dtype == torch.float32 and torch.isfinite(e32)


def test_inputs_take_the_gp_dtype_and_a_mismatched_encoder_is_named():
    """float64 auxiliary inputs (numpy's) beside float32 networks, kernel and Z are converted to the
    GP's dtype (Z's; the exact GP-VAE: the encoder's outputs'), as float32 inputs would give; an encoder
    of another dtype than Z is a ValueError naming it, not a torch dtype error."""
    X, Y = make_data(binary=True)
    enc, dec = Encoder().float(), torch.nn.Linear(L, K).float()
    vaes = [SVGPVAE(enc, dec, make_kernel().float(), X[:6].float(), num_data=N, latent_dim=L),
            ExactGPVAE(enc, dec, make_kernel().float(), latent_dim=L)]
    for vae in vaes:
        values = []
        for Xb in (X, X.float()):
            pyro.set_rng_seed(0)
            with torch.no_grad():
                values.append(vae.elbo(Xb, Y.float()))
                z = vae.condition(Xb, Y.float()).latent(X[:3])
            assert z.mean.dtype == torch.float32
        assert values[0].dtype == torch.float32 and float(values[0]) == float(values[1])
    pyro.clear_param_store()  # else the new model takes the stored float32 "guide.Z"
    with pytest.raises(ValueError, match="encoder: returns .*float32.* Z are torch.float64"):
        SVGPVAE(enc, dec, make_kernel(), X[:6].clone(), num_data=N, latent_dim=L).elbo(X, Y.float())


def test_bad_input_raises_value_errors():
    X, Y = make_data()
    enc, dec = Encoder(), torch.nn.Linear(L, K)
    vae = SVGPVAE(enc, dec, make_kernel(), X[:4].clone(), num_data=6, latent_dim=L)
    with pytest.raises(ValueError, match="num_data"):
        vae.elbo(X[:7], Y[:7])
    with pytest.raises(ValueError, match="num_data"):
        vae.guide.hybrid_posterior(X[:7], Y[:7])
    with pytest.raises(ValueError, match="Y"):
        vae.elbo(X[:5], Y[:4])
    Xn = X[:5].clone()
    Xn[2, 1] = float("nan")
    with pytest.raises(ValueError, match="X"):
        vae.elbo(Xn, Y[:5])
    Yn = Y[:5].clone()
    Yn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="Y"):
        Trace_ELBO().loss(vae.model, vae.guide, X[:5], Yn)
    with pytest.raises(ValueError, match="encoder"):
        SVGPVAE(Encoder(latent=2), dec, make_kernel(), X[:4].clone(), num_data=6, latent_dim=L).elbo(X[:5], Y[:5])
    with pytest.raises(ValueError, match="condition"):
        vae.latent(X[:2])
    with pytest.raises(ValueError, match="num_data"):
        SVGPVAEGuide(enc, make_kernel(), X[:4], num_data=0, latent_dim=L)
    with pytest.raises(ValueError, match="likelihood"):
        SVGPVAE(enc, dec, make_kernel(), X[:4], num_data=6, latent_dim=L, likelihood="poisson")
    ex = ExactGPVAE(enc, dec, make_kernel(), latent_dim=L)
    with pytest.raises(ValueError, match="Y"):
        ex.elbo(X[:5], Y[:3])
    with torch.no_grad():
        vae.condition(X[:5], Y[:5])
    with pytest.raises(ValueError, match="X_new"):
        vae.generate(torch.full((2, X.shape[1]), float("nan")))
