"""Hierarchical mixture of GP experts (Ng & Deisenroth [1]) as a NumPyro distribution.

The training data are split among experts ``k = 1..E`` with index sets ``I_k``
(:func:`scalegp.partition`); the experts share the kernel hyperparameters, the
noise variance ``s2`` and the mean ``m``. The marginal likelihood is approximated
by the product of the experts' exact marginal likelihoods (paper eq. 5-6):

.. math::

    \\log p(y) \\approx \\sum_{k=1}^E \\log \\mathcal N\\big(y_{I_k} \\,\\big|\\, m,\\;
        K_k + (s^2 + \\epsilon_k) I\\big),

with ``K_k`` the kernel on the inputs of expert ``k``; ``epsilon_k = 0`` unless that
expert's Cholesky factorization fails, then ``jitter, 10 jitter, ...`` (with a warning).
Its gradient per expert is

.. math::

    \\frac{\\partial}{\\partial \\theta} = \\tfrac12 \\operatorname{tr}\\Big(
        \\big(a a^\\top - \\hat K_k^{-1}\\big) \\frac{\\partial \\hat K_k}{\\partial \\theta}\\Big),
    \\qquad a = \\hat K_k^{-1} (y_{I_k} - m), \\quad \\hat K_k = K_k + (s^2+\\epsilon_k) I,

formed eagerly: ``log_prob`` is a :func:`jax.custom_vjp` over the experts' terms
whose forward rule computes, chunk by chunk, each expert's value and its gradients
with respect to the kernel parameters, the noise, the inputs and the residuals in
one pass (one Cholesky and one inverse per expert, ``G = 1/2 (a a^T - K^-1)``, and
the derivative of the kernel construction applied to ``G``: written out for isotropic
kernels, JAX's reverse mode for the others); the backward rule only weights the stored
gradients by the cotangent. JAX never differentiates the Cholesky, and nothing is
recomputed (unless some expert needs jitter: :func:`_retrying`).

Experts are evaluated in chunks (:func:`jax.lax.map`), so memory stays bounded by
one chunk of ``n x n`` matrices whatever ``N``, gradient included (the stored
gradients take ``O(E n d)``); with ``workers`` the experts are sharded over devices
(:func:`jax.shard_map` over a 1-D mesh), and the same code runs across processes
after :func:`jax.distributed.initialize` when the mesh spans every process's
devices (``workers=-1``).

A hierarchy (paper section 3.4) is given by ``experts.tree``: it decides the
order in which expert terms are summed and which experts share a device, never
the value, so a tree equals the flat model with the same leaves.

References:

1. J. W. Ng, M. P. Deisenroth. Hierarchical Mixture-of-Experts Model for
   Large-Scale Gaussian Process Regression. arXiv:1412.3078, 2014.
2. H. Liu, J. Cai, Y. Wang, Y.-S. Ong. Generalized Robust Bayesian Committee
   Machine for Large-scale Gaussian Process Regression. ICML 2018.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec
from numpyro.distributions import Distribution, Normal, constraints
from numpyro.distributions.util import validate_sample
from numpyro.util import not_jax_tracer
from tqdm.auto import tqdm

from scalegp import COMBINE_RULES, Experts, tree_leaves, tree_sum
from scalegp.combine import combine as combine_predictions
from scalegp.domain import DomainError, DomainWarning, JitterWarning

from . import kernels

__all__ = [
    "HGPMarginal", "NotPositiveDefiniteError", "NotPositiveDefiniteWarning", "JitterWarning",
    "expert_log_likelihood", "gaussian_log_likelihood",
]

_LOG_2PI = math.log(2.0 * math.pi)
#: default chunk: about 2**24 kernel entries per device (128 MiB in float64), as in pyro_scalegp
_CHUNK_ELEMENTS = 1 << 24
#: tries of the Cholesky with raised jitter (``jitter, 10 jitter, ..., 1e5 jitter``)
_JITTER_STEPS = 6


class NotPositiveDefiniteWarning(DomainWarning):
    """Under ``jit``: an expert's matrix stayed non positive definite at the largest jitter;
    its log-likelihood was set to ``-inf`` (and the gradient is NaN)."""


class NotPositiveDefiniteError(DomainError):
    """Outside ``jit``: an expert's matrix stayed non positive definite at the largest jitter."""


# --------------------------------------------------------------------------------------
# the per-expert Gaussian log-likelihood with an analytic backward pass
# --------------------------------------------------------------------------------------

def _cholesky(K):
    """Cholesky factors of a batch ``K (..., n, n)`` (lower triangle read, no jitter):
    ``(L, jitter_used = 0, ok)``, with ``ok`` false for a factor that is not finite (a
    failed factorization comes back NaN throughout, so its diagonal tells)."""
    L = lax.linalg.cholesky(K, symmetrize_input=False)
    ok = jnp.all(jnp.isfinite(jnp.diagonal(L, axis1=-2, axis2=-1)), -1)
    return L, jnp.zeros(K.shape[:-2], dtype=K.dtype), ok


def _cholesky_escalating(K, jitter):
    """:func:`_cholesky`, with an expert whose factor is not finite refactored with
    ``jitter, 10 jitter, ...`` (at most :data:`_JITTER_STEPS` tries) added to its diagonal.
    Returns ``(L, jitter_used, ok)``; ``jitter_used`` is 0 where the first factorization
    succeeded."""
    eye = jnp.eye(K.shape[-1], dtype=K.dtype)

    def cond(state):
        _, _, ok, tries = state
        return (tries < _JITTER_STEPS) & ~jnp.all(ok)

    def body(state):
        L, j, ok, tries = state
        j = jnp.where(ok, j, jnp.where(j > 0, 10.0 * j, jitter))
        L_new, _, ok_new = _cholesky(K + j[..., None, None] * eye)
        L = jnp.where(ok[..., None, None], L, L_new)
        return L, j, ok | ok_new, tries + 1

    first = _cholesky(K)
    # the loop's carry would copy every factor; skip it when no expert needs jitter
    return lax.cond(jnp.all(first[2]), lambda _: first, lambda _: lax.while_loop(cond, body, (*first, 0))[:3], None)


def _retrying(compute):
    """``compute(escalate)`` (a pytree whose first leaf holds per-expert results that are not
    finite for an expert whose factorization failed: log likelihoods ``-inf``, predictive
    means and draws NaN) run with plain factorizations and, only if some expert failed, again with
    jitter escalation (:func:`_cholesky_escalating`).

    The common case pays for no escalation machinery: a :func:`jax.lax.cond` or loop
    around the factors would copy every ``n x n`` block and block XLA's fusions (E = 200,
    n = 512: value + gradient about 20% slower); the cond here passes only the outputs."""
    out = compute(False)
    failed = ~jnp.all(jnp.isfinite(jax.tree_util.tree_leaves(out)[0]))
    return lax.cond(failed, lambda _: compute(True), lambda o: o, out)


def _cholesky_differentiable(K, jitter):
    """Cholesky factors of ``K + j I`` with each expert's jitter ``j`` chosen as in
    :func:`_cholesky_escalating` (the loop runs on ``stop_gradient(K)``; reverse-mode
    autodiff cannot pass a ``while_loop``), then one differentiable factorization."""
    _, j, _ = _cholesky_escalating(lax.stop_gradient(K), jitter)
    return jnp.linalg.cholesky(K + lax.stop_gradient(j)[..., None, None] * jnp.eye(K.shape[-1], dtype=K.dtype))


def _factor_differentiable(K, jitter, escalate: bool):
    """Differentiable Cholesky factors for :func:`_retrying`: plain, or with jitter escalation."""
    return _cholesky_differentiable(K, jitter) if escalate else _cholesky(K)[0]


def _solve_lower(L, b, *, transpose=False):
    return lax.linalg.triangular_solve(L, b, left_side=True, lower=True, transpose_a=transpose)


def _inverse_lower(L):
    """``L^-1`` of lower triangular ``L (..., n, n)``, by a triangular solve against the identity."""
    return _solve_lower(L, jnp.broadcast_to(jnp.eye(L.shape[-1], dtype=L.dtype), L.shape))


def _gaussian_ll(L, ok, alpha):
    """``log N(r | 0, L L^T)`` ``(..., B)`` from ``alpha = L^-1 r`` ``(..., n, B)``; ``-inf``
    where ``ok`` is false."""
    logdet = jnp.sum(jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)), -1)
    ll = -0.5 * jnp.sum(alpha**2, -2) - logdet[..., None] - 0.5 * L.shape[-1] * _LOG_2PI
    return jnp.where(ok[..., None], ll, -jnp.inf)


def _loglik_from_cholesky(L, j, ok, r):
    """``((ll (..., B), j), a = K^-1 r)`` from the Cholesky factor ``L`` of ``K + j I``."""
    alpha = _solve_lower(L, r)  # (..., n, B)
    return (_gaussian_ll(L, ok, alpha), j), _solve_lower(L, alpha, transpose=True)


def _loglik_forward(K, r, jitter):
    L, j, ok = _cholesky_escalating(K, jitter)
    out, a = _loglik_from_cholesky(L, j, ok, r)
    return out, (L, a)


#: block size of :func:`_cholesky_inverses`
_INVERSE_BLOCK = 128


def _cholesky_inverses(L, r=None):
    r"""``K^-1 = L^-T L^-1`` from the Cholesky factor ``L (..., n, n)`` of ``K``, and
    ``alpha = L^-1 r`` for ``r (..., n, B)`` if given: the counterpart of LAPACK's ``trtri``
    and ``lauum`` (``potri``) built from matrix products on blocks of :data:`_INVERSE_BLOCK`
    rows, ``P = L^-1`` block by block

    .. math::

        P_{ii} = L_{ii}^{-1}, \quad P_{ij} = -P_{ii} \textstyle\sum_{k=j}^{i-1} L_{ik} P_{kj}, \qquad
        (K^{-1})_{ij} = \textstyle\sum_{k \ge i} P_{ki}^\top P_{kj} \quad (i \ge j),

    the blocks above the diagonal being the transposes, so ``K^-1`` is exactly symmetric and
    assembled once (recursive halving would copy every level: 10-15% of an HGP value and
    gradient at n = 512). ``4 n^3 / 3`` flops against ``2 n^3`` for two triangular solves
    against the identity."""
    e = list(range(0, L.shape[-1], _INVERSE_BLOCK)) + [L.shape[-1]]
    nb = len(e) - 1

    def block(M, i, j):
        return M[..., e[i]:e[i + 1], e[j]:e[j + 1]]

    def t(M):
        return jnp.swapaxes(M, -1, -2)

    P = {}
    for i in range(nb):
        L_ii = block(L, i, i)
        P[i, i] = _inverse_lower(L_ii)
        for j in range(i):
            P[i, j] = -(P[i, i] @ sum(block(L, i, k) @ P[k, j] for k in range(j, i)))
    K_inv = {}
    for i in range(nb):
        for j in range(i + 1):
            K_inv[i, j] = sum(t(P[k, i]) @ P[k, j] for k in range(i, nb))
        K_inv[i, i] = 0.5 * (K_inv[i, i] + t(K_inv[i, i]))  # exactly symmetric
    K_inv = jnp.concatenate([jnp.concatenate([K_inv[i, j] if i >= j else t(K_inv[j, i]) for j in range(nb)], -1)
                             for i in range(nb)], -2)
    if r is None:
        return K_inv
    alpha = jnp.concatenate([sum(P[i, j] @ r[..., e[j]:e[j + 1], :] for j in range(i + 1)) for i in range(nb)], -2)
    return alpha, K_inv


@jax.custom_vjp
def _loglik(K, r, jitter):
    return _loglik_forward(K, r, jitter)[0]


def _loglik_fwd(K, r, jitter):
    out, (L, a) = _loglik_forward(K, r, jitter)
    return out, (L, a, jitter)


def _loglik_bwd(res, cotangents):
    L, a, jitter = res
    g = cotangents[0]  # (..., B); the jitter output carries no gradient
    K_inv = _cholesky_inverses(L)
    dK = 0.5 * (jnp.einsum("...ib,...jb,...b->...ij", a, a, g) - g.sum(-1)[..., None, None] * K_inv)
    dr = -a * g[..., None, :]
    return dK, dr, jnp.zeros_like(jitter)


_loglik.defvjp(_loglik_fwd, _loglik_bwd)


def gaussian_log_likelihood(Kn, r, *, jitter: float = 1e-6):
    """``log N(r_k | 0, Kn_k)`` for a batch of experts, with the analytic gradient.

    :param Kn: ``(E, n, n)`` covariances ``K_k + noise I``.
    :param r: residuals ``(E, n)`` or ``(E, n, B)`` (``B`` right-hand sides).
    :param jitter: first jitter tried on an expert whose Cholesky factor is not finite;
        raised tenfold, at most 6 tries (see :class:`HGPMarginal`).
    :returns: ``(E,)`` or ``(E, B)``.

    The backward pass is analytic, with ``a = Kn^{-1} r`` and the inverse from the
    forward pass's Cholesky factor (never differentiating the factorization):

    .. math::

        \\frac{\\partial \\ell}{\\partial K_n} = \\tfrac12 (a a^\\top - K_n^{-1}), \\qquad
        \\frac{\\partial \\ell}{\\partial r} = -a.

    .. note:: Cost: ``O(E n^3 / 3)`` forward (Cholesky) plus ``O(E n^2 B)``; ``O(E n^3)``
       backward (the inverse from the factor, :func:`_cholesky_inverses`); ``O(E n^2)`` saved entries.
    """
    Kn = jnp.asarray(Kn)
    r = jnp.asarray(r, dtype=Kn.dtype)
    if Kn.ndim != 3 or Kn.shape[-1] != Kn.shape[-2]:
        raise ValueError(f"Kn: expected shape (E, n, n), got {Kn.shape}")
    if r.shape[:2] != Kn.shape[:2] or r.ndim not in (2, 3):
        raise ValueError(f"r: expected shape {Kn.shape[:2]} (+ (B,)), got {r.shape}")
    _check_jitter(jitter)
    ll, used = _loglik(Kn, r if r.ndim == 3 else r[..., None], jnp.asarray(jitter, dtype=Kn.dtype))
    _check_terms(used, ll)
    return ll if r.ndim == 3 else ll[..., 0]


# --------------------------------------------------------------------------------------
# chunked / sharded evaluation over experts
# --------------------------------------------------------------------------------------

class _Layout:
    """Static, hashable description of the experts (a ``jit`` cache key and pytree aux data):
    the ``(E, n)`` index, the tree, and the tree's leaf order, which lays sibling experts out
    side by side (so a subtree's experts share a device when sharded)."""

    def __init__(self, index, tree=None):
        self.index = np.asarray(index, dtype=np.int64)
        self.tree = tree
        self.order = np.arange(self.index.shape[0]) if tree is None else np.asarray(tree_leaves(tree))
        self.inverse = np.argsort(self.order)
        h = hashlib.blake2b(digest_size=16)
        h.update(np.ascontiguousarray(self.index).tobytes())
        h.update(repr((self.index.shape, tree)).encode())
        self._digest = h.digest()

    def __hash__(self):
        return hash(self._digest)

    def __eq__(self, other):
        return isinstance(other, _Layout) and self._digest == other._digest


@lru_cache(maxsize=None)
def _mesh(workers: int) -> Mesh | None:
    if workers == 0:
        return None
    devices = jax.devices() if workers == -1 else jax.devices()[:workers]
    return Mesh(np.asarray(devices), ("experts",))


def _pad_experts(arrays, total: int):
    """Pad the leading (expert) axis to ``total`` by repeating expert 0 (a valid expert whose
    outputs are discarded)."""
    def pad(x):
        extra = total - x.shape[0]
        return x if extra == 0 else jnp.concatenate([x, jnp.broadcast_to(x[:1], (extra,) + x.shape[1:])])
    return jax.tree_util.tree_map(pad, arrays)


def _map_chunks(fn, arrays, max_chunk: int, *, checkpoint: bool = True):
    """``fn`` over the leading axis in as few chunks of at most ``max_chunk`` as possible
    (equal sizes, padding minimal): :func:`jax.lax.map` over the chunks, each under
    :func:`jax.checkpoint` (unless ``checkpoint=False``: for functions that are never
    differentiated), so a gradient keeps one chunk's residuals alive at a time."""
    num = jax.tree_util.tree_leaves(arrays)[0].shape[0]
    chunks = -(-num // max(1, max_chunk))
    size = -(-num // chunks)
    padded = _pad_experts(arrays, chunks * size)
    if chunks == 1:
        out = fn(padded)
    else:
        stacked = jax.tree_util.tree_map(lambda x: x.reshape((chunks, size) + x.shape[1:]), padded)
        out = lax.map(jax.checkpoint(fn) if checkpoint else fn, stacked)
        out = jax.tree_util.tree_map(lambda x: x.reshape((chunks * size,) + x.shape[2:]), out)
    return jax.tree_util.tree_map(lambda x: x[:num], out)


def _over_experts(fn, replicated, per_expert, *, mesh: Mesh | None, max_chunk: int, checkpoint: bool = True):
    """``fn(replicated, chunk)`` over every expert (leading axis of ``per_expert``); with a
    mesh, the experts are split into contiguous shards, one per device
    (:func:`jax.shard_map`), each device mapping over its own chunks (:func:`_map_chunks`)."""
    if mesh is None:
        return _map_chunks(partial(fn, replicated), per_expert, max_chunk, checkpoint=checkpoint)
    num = jax.tree_util.tree_leaves(per_expert)[0].shape[0]
    devices = mesh.devices.size
    padded = _pad_experts(per_expert, -(-num // devices) * devices)
    spec = PartitionSpec("experts")
    sharded = jax.shard_map(
        lambda rep, xs: _map_chunks(partial(fn, rep), xs, max_chunk, checkpoint=checkpoint), mesh=mesh,
        in_specs=(PartitionSpec(), spec), out_specs=spec, check_vma=False,
    )
    out = sharded(replicated, padded)
    return jax.tree_util.tree_map(lambda x: x[:num], out)


def _plus_noise(K, Xe, noise):
    K = K.astype(Xe.dtype)  # float32 inputs compute in float32 whatever the parameters' dtype
    return K + noise * jnp.eye(K.shape[-1], dtype=K.dtype)


def _gram(kernel, Xe, noise):
    # isotropic kernels: the written-out derivative (kernels.isotropic_gram), fewer passes over K
    return _plus_noise(kernels.isotropic_gram(kernel, Xe) if getattr(kernel, "dprofile", None) else kernel(Xe),
                       Xe, noise)


def _factor(K, jitter, escalate: bool):
    return _cholesky_escalating(K, jitter) if escalate else _cholesky(K)


def _gram_and_vjp(kernel, Xe, noise):
    """``K = kernel(Xe) + noise I`` for a chunk of experts ``Xe (c, n, d)`` and its vjp for a
    symmetric cotangent ``G (c, n, n)``, giving each expert's cotangents (kernel leaves
    ``(c, ...)``, ``(c, n, d)``, noise ``(c,)``).

    Isotropic kernels: the written-out derivative (:func:`kernels.isotropic_gram_vjp`, which
    reads ``G`` once and uses its symmetry); others: JAX's reverse mode of :func:`_gram` with
    the parameters broadcast over the experts, so that their cotangents come out per expert."""
    if not getattr(kernel, "dprofile", None):
        c = Xe.shape[0]

        def per_expert(t):
            return jnp.broadcast_to(t, (c,) + jnp.shape(t))

        return jax.vjp(jax.vmap(_gram), jax.tree_util.tree_map(per_expert, kernel), Xe, per_expert(noise))
    K, kernel_vjp = kernels.isotropic_gram_vjp(kernel, Xe)

    def vjp(G):
        d_kernel, d_Xe = kernel_vjp(G)
        d_noise = jnp.trace(G, axis1=-2, axis2=-1).astype(jnp.result_type(noise))
        return d_kernel, d_Xe, d_noise

    return _plus_noise(K, Xe, noise), vjp


def _value_chunk(rep, chunk, *, escalate: bool):
    """A chunk's log likelihoods ``(c, B)`` and jitters ``(c,)``, value only."""
    kernel, noise, jitter = rep
    Xe, re = chunk
    return _loglik_from_cholesky(*_factor(_gram(kernel, Xe, noise), jitter, escalate), re)[0]


def _value_and_grads_chunk(rep, chunk, *, escalate: bool):
    """A chunk's log likelihoods ``(c, B)``, jitters ``(c,)`` and the gradients of every
    ``ll[k, b]`` (per expert ``k`` and right-hand side ``b``) with respect to the kernel
    pytree (leaves ``(c, B, ...)``), the noise ``(c, B)`` and the inputs ``Xe`` ``(c, B, n, d)``,
    and ``a = K^-1 r`` ``(c, n, B)`` (minus the gradient with respect to ``r``); jitter only
    with ``escalate`` (:func:`_retrying`).

    One Cholesky and one inverse per expert, ``G = 1/2 (a a^T - K^-1)``, and the
    reverse-mode derivative of the kernel construction applied to ``G``
    (:func:`_gram_and_vjp`)."""
    kernel, noise, jitter = rep
    Xe, re = chunk
    B = re.shape[-1]
    K, gram_vjp = _gram_and_vjp(kernel, Xe, noise)
    # K is symmetric; handing over its transpose lets XLA keep K (and an isotropic kernel's
    # profile) row-major, as the backward pass reads them, while LAPACK reads the
    # factorization's input column-major (E = 200, n = 512: value and gradient
    # about 15% faster with RBF, 2% with Periodic)
    L, j, ok = _factor(jnp.swapaxes(K, -1, -2), jitter, escalate)
    alpha, K_inv = _cholesky_inverses(L, re)  # products with the inverse: XLA's triangular solves cost more
    out, a = (_gaussian_ll(L, ok, alpha), j), K_inv @ re
    if B == 1:
        grads = jax.tree_util.tree_map(lambda t: t[:, None],
                                       gram_vjp(0.5 * (a * jnp.swapaxes(a, -1, -2) - K_inv)))
    else:
        G = 0.5 * (jnp.einsum("cib,cjb->bcij", a, a) - K_inv)
        grads = jax.tree_util.tree_map(lambda t: jnp.moveaxis(t, 0, 1), jax.vmap(gram_vjp)(G))
    return out, grads, a


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _eager_terms(kernel, Xe, noise, re, jitter, mesh, max_chunk):
    """Per-expert log likelihoods ``(E, B)`` of the residuals ``re (E, n, B)`` on the inputs
    ``Xe (E, n, d)`` and the jitter each used ``(E,)``.

    Differentiated, the forward rule computes the values and every expert's gradients in
    one pass, chunk by chunk (:func:`_value_and_grads_chunk`, no recomputation, one chunk's
    ``n x n`` matrices alive at a time); the backward rule only weights the stored
    gradients by the cotangent."""
    return _retrying(lambda escalate: _over_experts(
        partial(_value_chunk, escalate=escalate), (kernel, noise, jitter), (Xe, re), mesh=mesh,
        max_chunk=max_chunk, checkpoint=False))


def _eager_terms_fwd(kernel, Xe, noise, re, jitter, mesh, max_chunk):
    out, grads, a = _retrying(lambda escalate: _over_experts(
        partial(_value_and_grads_chunk, escalate=escalate), (kernel, noise, jitter), (Xe, re), mesh=mesh,
        max_chunk=max_chunk, checkpoint=False))
    return out, (grads, a, jitter)


def _eager_terms_bwd(mesh, max_chunk, res, cotangents):
    (d_kernel, d_Xe, d_noise), a, jitter = res
    g = cotangents[0]  # (E, B); the jitter output carries no gradient

    def weigh(t):
        return jnp.tensordot(g.astype(t.dtype), t, axes=([0, 1], [0, 1]))

    return (jax.tree_util.tree_map(weigh, d_kernel), jnp.einsum("eb,ebnd->end", g, d_Xe), weigh(d_noise),
            -a * g[:, None, :], jnp.zeros_like(jitter))


_eager_terms.defvjp(_eager_terms_fwd, _eager_terms_bwd)


def _float_leaves(kernel, dtype):
    """The kernel with integer leaves cast to ``dtype`` (so that every leaf has a cotangent)."""
    return jax.tree_util.tree_map(
        lambda t: jnp.asarray(t, dtype) if not jnp.issubdtype(jnp.result_type(t), jnp.inexact) else t, kernel)


@partial(jax.jit, static_argnames=("layout", "mesh", "max_chunk"))
def _expert_terms(kernel, X, noise, resid, jitter, *, layout, mesh, max_chunk):
    """Per-expert log likelihoods ``(E, B)`` of ``resid (B, N)`` and the jitter each used ``(E,)``."""
    index = layout.index[layout.order]
    ll, used = _eager_terms(_float_leaves(kernel, X.dtype), X[index], noise, jnp.moveaxis(resid[:, index], 0, -1),
                            jitter, mesh, max_chunk)
    return ll[layout.inverse], used[layout.inverse]


#: the progress bars of the predictions running, innermost last (host side; see HGPMarginal.predict)
_PROGRESS_BARS: list = []


@contextlib.contextmanager
def _progress_bar(experts: int, enabled: bool):
    """A bar over ``experts`` that :func:`_tick` advances while the block's computations run
    (it waits for their callbacks before closing)."""
    with tqdm(total=experts, desc="HGP predict", unit="expert", disable=not enabled) as bar:
        _PROGRESS_BARS.append(bar)
        try:
            yield
            if enabled:
                jax.effects_barrier()
        finally:
            _PROGRESS_BARS.remove(bar)


def _tick(experts, _done):
    """Host callback of a finished chunk of ``experts`` (``_done``: a value of its result, so
    that the callback waits for it)."""
    if _PROGRESS_BARS:
        bar = _PROGRESS_BARS[-1]
        bar.update(min(int(experts), bar.total - bar.n))  # padding experts are not counted


def _predict_chunk(rep, chunk, *, escalate: bool, progress: bool = False):
    kernel, noise, jitter, Xs = rep
    Xe, re = chunk
    K = _gram(kernel, Xe, noise)
    L = _factor_differentiable(K, jitter, escalate)
    Ks = kernel(Xe, Xs).astype(Xe.dtype)  # (B, n, T)
    alpha = _solve_lower(L, _solve_lower(L, re[..., None]), transpose=True)[..., 0]
    mean = jnp.einsum("bnt,bn->bt", Ks, alpha)
    n, T = Ks.shape[-2:]
    if T >= n:
        # L^-1 K_s as one matrix product with L^-1 (n^3 more flops): XLA's batched triangular solve with
        # many right-hand sides runs at a third of the speed of its matrix product on the CPU (8 experts of
        # 256 and 10,000 test points, 2 threads: 0.59 s against 0.31 s with the inverse; torch's solve 0.23 s)
        V = _inverse_lower(L) @ Ks
    else:
        V = _solve_lower(L, Ks)
    var = kernel(Xs, diag=True).astype(Xe.dtype) - jnp.sum(V**2, -2)
    if progress and not escalate:  # a retry with jitter runs without ticking
        jax.debug.callback(_tick, Xe.shape[0], mean[0, 0])
    return mean, jnp.maximum(var, jnp.finfo(var.dtype).tiny)


@partial(jax.jit, static_argnames=("layout", "mesh", "max_chunk", "progress"))
def _expert_predictions(kernel, X, noise, resid, jitter, Xs, *, layout, mesh, max_chunk, progress=False):
    """Latent means and variances ``(E, T)`` of the experts at ``Xs`` (residual space); with
    ``progress``, each finished chunk ticks the innermost of :data:`_PROGRESS_BARS`."""
    index = layout.index[layout.order]
    means, variances = _retrying(lambda escalate: _over_experts(
        partial(_predict_chunk, escalate=escalate, progress=progress), (kernel, noise, jitter, Xs),
        (X[index], resid[index]), mesh=mesh, max_chunk=max_chunk))
    return means[layout.inverse], variances[layout.inverse]


def _max_chunk(chunk_size: int | None, per_expert_elements: int) -> int:
    if chunk_size is not None:
        return int(chunk_size)
    return max(1, _CHUNK_ELEMENTS // max(1, per_expert_elements))


# --------------------------------------------------------------------------------------
# reporting jitter escalation and failures
# --------------------------------------------------------------------------------------

def _shown(experts) -> str:
    return "[" + ", ".join(str(k) for k in experts[:10]) + (", ...]" if len(experts) > 10 else "]")


def _messages(used, ll):
    """``(escalation, failure)`` messages (or ``None``) from ``used (..., E)``, ``ll (..., E, B)``."""
    used = np.asarray(used)
    E = used.shape[-1]
    used = used.reshape(-1, E)
    failed = np.isneginf(np.asarray(ll)).reshape(used.shape[0], E, -1).any(-1)
    raised = (used > 0) & ~failed
    escalation = failure = None
    if raised.any():
        experts = np.flatnonzero(raised.any(0))
        escalation = (f"HGPMarginal: K + noise I of expert(s) {_shown(experts)} ({len(experts)} in all) "
                      f"was not positive definite; added jitter up to {used[raised].max():.1e} to its diagonal")
    if failed.any():
        experts = np.flatnonzero(failed.any(0))
        failure = (f"HGPMarginal: K + noise I of expert(s) {_shown(experts)} ({len(experts)} in all) is not "
                   f"positive definite even with jitter {used[failed].max():.1e} added to the diagonal. "
                   "Try a larger noise (or a lower bound on it), removing duplicated inputs, float64, "
                   "or a larger `jitter`")
    return escalation, failure


def _report(used, ll):
    """Host callback under ``jit``: warn about raised jitter and failed experts."""
    escalation, failure = _messages(used, ll)
    if escalation:
        warnings.warn(escalation, JitterWarning, stacklevel=2)
    if failure:
        warnings.warn(failure + "; log_prob is -inf and its gradient NaN", NotPositiveDefiniteWarning,
                      stacklevel=2)


def _check_terms(used, ll) -> None:
    """Report raised jitter and failures: from Python when the values are concrete (a
    :class:`JitterWarning`, or :class:`NotPositiveDefiniteError`), else from a host callback
    when the compiled computation runs (:class:`JitterWarning`, :class:`NotPositiveDefiniteWarning`)."""
    if _concrete(used) and _concrete(ll):
        escalation, failure = _messages(used, ll)
        if failure:
            raise NotPositiveDefiniteError(failure)
        if escalation:
            warnings.warn(escalation, JitterWarning, stacklevel=4)
        return
    flag = jnp.any(used > 0) | jnp.any(jnp.isneginf(ll))
    lax.cond(flag, lambda: jax.debug.callback(_report, used, ll), lambda: None)


# --------------------------------------------------------------------------------------
# input checks (shapes and signs where values are concrete; NaN/inf also inside jit)
# --------------------------------------------------------------------------------------

def _concrete(value) -> bool:
    if not not_jax_tracer(value):
        return False
    return not isinstance(value, jax.Array) or value.is_fully_addressable


def _raise_non_finite(name: str, bad) -> None:
    if np.any(bad):  # batched under vmap, where both branches of the cond run
        raise ValueError(f"{name}: contains NaN or inf")


def _check_finite(name: str, value) -> None:
    """``ValueError`` naming ``name`` if ``value`` holds NaN or inf: at once where the value is
    concrete; inside ``jit``/``grad``/``vmap`` from a host callback when the compiled computation
    runs (JAX raises it as a ``JaxRuntimeError`` that carries this message). Cost: one ``O(size)``
    reduction; the callback runs only for bad values."""
    if _concrete(value):
        if not np.all(np.isfinite(np.asarray(value))):
            raise ValueError(f"{name}: contains NaN or inf")
        return
    if not_jax_tracer(value):  # a global array of a multi-process run: its shards are checked where they live
        return
    bad = ~jnp.all(jnp.isfinite(value))
    lax.cond(bad, lambda: jax.debug.callback(partial(_raise_non_finite, name), bad), lambda: None)


def _domain_message(name: str, value) -> str | None:
    value = np.asarray(value)
    if not np.all(np.isfinite(value)):
        return f"{name}: contains NaN or inf"
    if not np.all(value > 0):
        return f"{name}: must be positive, got {value.ravel()[:5].tolist()}"
    return None


def _warn_domain(name: str, value) -> None:
    message = _domain_message(name, value)
    if message:  # batched under vmap, where both branches of the cond run
        warnings.warn(message + " (NaN here)", DomainWarning, stacklevel=2)


def _check_positive(name: str, value):
    """``value``, a hyperparameter's (``noise``), checked to be finite and positive: where it is concrete a
    :class:`scalegp.domain.DomainError` naming ``name`` otherwise; inside ``jit``/``grad``/``vmap`` it is
    returned as NaN instead, so that the log-density is not finite (NUTS rejects the step), with a
    :class:`scalegp.domain.DomainWarning` from a host callback. Cost: one ``O(size)`` reduction; the
    callback runs only for bad values."""
    if _concrete(value):
        message = _domain_message(name, value)
        if message:
            raise DomainError(message)
        return value
    if not_jax_tracer(value):  # a global array of a multi-process run: its shards are checked where they live
        return value
    bad = ~(jnp.isfinite(value) & (value > 0))
    lax.cond(jnp.any(bad), lambda: jax.debug.callback(partial(_warn_domain, name), value), lambda: None)
    return jnp.where(bad, jnp.nan, value)


def _check_jitter(jitter) -> None:
    if not (isinstance(jitter, (int, float, np.floating)) and math.isfinite(jitter) and jitter > 0):
        raise ValueError(f"jitter: must be positive, got {jitter!r}")


def _as_inputs(name: str, X):
    X = X if isinstance(X, np.ndarray) else jnp.asarray(X)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2 or X.shape[0] < 1:
        raise ValueError(f"{name}: expected shape (N, d) or (N,) with N >= 1, got {X.shape}")
    _check_finite(name, X)
    return X


def _as_loc(mean, N: int, dtype):
    loc = jnp.zeros((), dtype=dtype) if mean is None else mean
    shape = jnp.shape(loc)
    if len(shape) > 1 or (len(shape) == 1 and shape[0] not in (1, N)):
        raise ValueError(f"mean: expected a scalar or shape ({N},), got {shape}")
    _check_finite("mean", loc)
    return jnp.reshape(loc, ()) if len(shape) == 1 and shape[0] == 1 else loc


def _log_prob(kernel, X, y, loc, noise, jitter, layout: _Layout, *, workers: int, chunk_size):
    """Sum over experts of their exact log marginal likelihoods, shape ``y.shape[:-1]``."""
    dtype = jnp.result_type(X, float)
    y = jnp.asarray(y, dtype)
    resid = (y - jnp.asarray(loc, dtype)).reshape(-1, y.shape[-1])
    n = layout.index.shape[1]
    ll, used = _expert_terms(
        kernel, jnp.asarray(X, dtype), jnp.asarray(noise, dtype), resid, jnp.asarray(jitter, dtype),
        layout=layout, mesh=_mesh(workers), max_chunk=_max_chunk(chunk_size, n * n),
    )
    _check_terms(used, ll)
    return tree_sum(ll, layout.tree).reshape(y.shape[:-1])


def expert_log_likelihood(kernel, X, y, index, noise, mean=None, *, jitter: float = 1e-6,
                          chunk_size: int | None = None, tree=None, workers: int = 0):
    """Sum over the rows of ``index`` of the experts' exact log marginal likelihoods.

    :param kernel: a :mod:`numpyro_scalegp.kernels` kernel.
    :param X: ``(N, d)`` inputs.
    :param y: ``(N,)`` targets, or ``(..., N)`` for several target vectors.
    :param index: ``(E, n)`` integer array of expert rows.
    :param noise: positive scalar (Gaussian noise variance).
    :param mean: ``None``, or an array broadcastable to ``(N,)``.
    :param jitter: first jitter tried for an expert whose Cholesky fails.
    :param chunk_size: experts per batched Cholesky (default about ``2**24 / n^2``).
    :param tree: optional expert tree (:attr:`scalegp.Experts.tree`); the sum is
        accumulated node by node.
    :param workers: devices to shard the experts over (see :class:`HGPMarginal`).
    :returns: array of shape ``y.shape[:-1]`` (a scalar for one target vector).

    .. note:: Cost: ``O(E n^3)`` time; ``O(chunk n^2)`` memory per device, gradient included
       (plus ``O(E n (d + 1) B)`` for the stored gradients).
    """
    X = _as_inputs("X", X)
    y = jnp.asarray(y)
    if y.ndim < 1 or y.shape[-1] != X.shape[0]:
        raise ValueError(f"y: expected shape (..., {X.shape[0]}), got {y.shape}")
    _check_finite("y", y)
    noise = _check_positive("noise", noise)
    _check_jitter(jitter)
    experts = Experts(np.asarray(index), None, tree)
    experts.check(X.shape[0])
    return _log_prob(kernel, X, y, _as_loc(mean, X.shape[0], jnp.result_type(X, float)), noise, jitter,
                     _Layout(experts.index, tree), workers=_check_workers(workers), chunk_size=chunk_size)


def _check_workers(workers) -> int:
    if not isinstance(workers, (int, np.integer)) or workers < -1:
        raise ValueError(f"workers: expected an int >= -1, got {workers!r}")
    if workers > len(jax.devices()):
        raise ValueError(f"workers: {workers} devices requested, only {len(jax.devices())} available "
                         "(on CPU, more with XLA_FLAGS=--xla_force_host_platform_device_count=n)")
    return int(workers)


# --------------------------------------------------------------------------------------
# the distribution
# --------------------------------------------------------------------------------------

class HGPMarginal(Distribution):
    """The HGP's approximate marginal distribution of the targets ``y`` (paper [1], eq. 5).

    .. math::

        \\log p(y) = \\sum_{k=1}^E \\log \\mathcal N\\big(y_{I_k} \\,\\big|\\, m_{I_k},\\;
            K(X_{I_k}, X_{I_k}) + s^2 I\\big)

    Use as ``numpyro.sample("y", HGPMarginal(kernel, X, noise, experts=experts), obs=y)``
    under ``SVI``, ``NUTS`` and ``Predictive``, inside ``jit`` and ``vmap`` (e.g. over kernel
    hyperparameters). The gradient is analytic per expert and formed eagerly (module docstring).

    :param kernel: a :mod:`numpyro_scalegp.kernels` kernel (a pytree; traced leaves allowed).
    :param X: training inputs ``(N, d)`` or ``(N,)``.
    :param noise: the Gaussian noise variance ``s^2`` (a positive scalar).
    :param experts: anything :meth:`scalegp.Experts.from_any` accepts: an
        :class:`~scalegp.Experts` (e.g. from :func:`scalegp.partition`), an ``(E, n)``
        integer array, or a nested list of index arrays (a tree). Static (pytree aux data):
        other experts recompile. With a communication expert the sum runs over the
        augmented experts.
    :param mean: ``None`` (zero), a scalar, or an array of shape ``(N,)``; stored as ``loc``
        (the ``mean`` property is the ``(N,)`` vector).
    :param jitter: first jitter tried on an expert whose Cholesky factor is not finite; it
        is raised tenfold, at most 6 tries, with a :class:`JitterWarning` (a
        ``RuntimeWarning``). If an expert still fails: when the values are concrete (eager
        calls, outside ``jit``/``grad``) a :class:`NotPositiveDefiniteError` (a
        ``ValueError``) naming the experts is raised; inside a traced computation (``jit``,
        ``grad``, ``vmap``, so under SVI and NUTS) that expert's term is ``-inf`` (so
        ``log_prob`` is ``-inf`` and its gradient NaN: NUTS rejects the step, SVI's loss
        becomes non-finite) and a :class:`NotPositiveDefiniteWarning` naming the experts is
        issued from a host callback when the computation runs.
    :param workers: where the experts run. ``0``: in-process on the default device.
        ``n >= 1``: sharded over the first ``n`` of :func:`jax.devices` (the JAX counterpart
        of the torch frontend's ``n`` worker processes: one contiguous shard of experts in
        tree order per device, :func:`jax.shard_map`). ``-1``: every device; after
        :func:`jax.distributed.initialize` that spans all processes, each process computes
        only its own devices' experts, and the value and gradient are summed across
        processes by XLA collectives (gloo on CPU). Every process then builds the
        distribution from the same ``X``, ``y`` and experts (each holds the whole data set;
        the torch frontend's ``distributed=True``, where each rank holds only its own data
        shard, has no counterpart here).
    :param chunk_size: experts per batched Cholesky on a device (default about
        ``2**24 / n^2``); bounds memory for any ``N``.
    :param validate_args: NumPyro argument validation.

    ``sample()`` is defined only for disjoint experts covering every point (the
    block-independent model); for predictions use :meth:`predict`.

    .. note:: Cost: ``log_prob`` takes ``O(E n^3)`` time (``E`` Cholesky factorizations of
       ``n x n``; the gradient adds, in the same pass, an inverse from each factor and one
       reverse pass through the kernel construction, ``O(E n^2 d)``) and
       ``O(chunk_size n^2)`` memory per device, plus ``O(E n (d + 1) B)`` for the stored
       gradients of ``B`` target vectors; :meth:`predict` takes ``O(E n^3 + E n^2 T)`` time and ``O(E T)`` memory plus one
       ``(chunk, n, n + T)`` block for ``T`` test points.
    """

    arg_constraints = {"noise": constraints.positive, "loc": constraints.real}
    support = constraints.real_vector
    reparametrized_params = ["noise", "loc"]
    pytree_data_fields = ("kernel", "X", "noise", "loc")
    pytree_aux_fields = ("_static", "jitter", "workers", "chunk_size")

    def __init__(self, kernel, X, noise, *, experts, mean=None, jitter: float = 1e-6,
                 workers: int = 0, chunk_size: int | None = None, validate_args: bool | None = None):
        if not callable(kernel):
            raise ValueError(f"kernel: expected a numpyro_scalegp.kernels kernel, got {type(kernel).__name__}")
        X = _as_inputs("X", X)
        if isinstance(kernel, kernels.Kernel):
            kernel.check_inputs(X)
            if not all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(kernel) if _concrete(v)):
                raise DomainError("kernel: contains NaN or inf")  # else a failed Cholesky that names no argument
        N = X.shape[0]
        if jnp.ndim(noise) != 0:
            raise ValueError(f"noise: expected a scalar, got shape {jnp.shape(noise)}")
        noise = _check_positive("noise", noise)
        _check_jitter(jitter)
        if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
            raise ValueError(f"chunk_size: must be an int >= 1, got {chunk_size!r}")
        experts = Experts.from_any(experts)
        experts.check(N)
        self.kernel, self.X, self.noise = kernel, X, noise
        self.loc = _as_loc(mean, N, jnp.result_type(X, float))
        self._static = _StaticExperts(experts)
        self.jitter = float(jitter)
        self.workers = _check_workers(workers)
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        super().__init__(batch_shape=(), event_shape=(N,), validate_args=validate_args)

    @property
    def mean(self):
        """The prior mean broadcast to ``(N,)`` (also the mean of ``y``)."""
        return jnp.broadcast_to(jnp.asarray(self.loc, self._dtype()), self.event_shape)

    @property
    def experts(self) -> Experts:
        """The experts (:class:`scalegp.Experts`)."""
        return self._static.experts

    @property
    def variance(self):
        """Marginal variances ``k(x_i, x_i) + noise`` of ``y``."""
        return jnp.broadcast_to(self.kernel(jnp.asarray(self.X, self._dtype()), diag=True) + self.noise,
                                self.event_shape)

    def _dtype(self):
        return jnp.result_type(self.X, float)

    def _check_y(self, y, name="y"):
        y = jnp.asarray(y)
        if y.ndim < 1 or y.shape[-1] != self.event_shape[0]:
            raise ValueError(f"{name}: expected shape (..., {self.event_shape[0]}), got {y.shape}")
        _check_finite(name, y)
        return y

    @validate_sample
    def log_prob(self, value):
        """Sum of the experts' exact log marginal likelihoods of ``value`` (``y``), shape
        ``value.shape[:-1]``."""
        y = self._check_y(value, "value")
        return _log_prob(self.kernel, self.X, y, self.loc, self.noise, self.jitter, self._static.layout,
                         workers=self.workers, chunk_size=self.chunk_size)

    def sample(self, key, sample_shape=()):
        """Draw from the block-independent model; only defined for disjoint experts
        covering every point (otherwise ``NotImplementedError``)."""
        index = self.experts.index
        N = self.event_shape[0]
        counts = np.bincount(index.ravel(), minlength=N)
        if self.experts.communication is not None or not (counts == 1).all():
            raise NotImplementedError(
                "HGPMarginal.sample: the experts overlap or miss points, so the product of experts is not "
                "a distribution one can draw from; use HGPMarginal.predict for predictions"
            )
        dtype = self._dtype()
        E, n = index.shape
        S = int(np.prod(sample_shape))
        eps = jax.random.normal(key, (E, n, S), dtype=dtype)

        def draw(rep, chunk, *, escalate: bool):
            kernel, noise, jitter = rep
            Xe, ze = chunk
            return _factor_differentiable(_gram(kernel, Xe, noise), jitter, escalate) @ ze

        rep = (self.kernel, jnp.asarray(self.noise, dtype), jnp.asarray(self.jitter, dtype))
        draws = _retrying(lambda escalate: _over_experts(
            partial(draw, escalate=escalate), rep, (jnp.asarray(self.X, dtype)[index], eps),
            mesh=_mesh(self.workers), max_chunk=_max_chunk(self.chunk_size, n * (n + S))))
        flat = jnp.zeros((S, N), dtype).at[:, index.reshape(-1)].set(jnp.moveaxis(draws, -1, 0).reshape(S, -1))
        return (flat + self.mean).reshape(tuple(sample_shape) + self.event_shape)

    def predict(self, y, X_new, *, combine: str = "rbcm", noiseless: bool = False, mean_new=None,
                progress_bar: bool = False):
        """Predictive distribution at ``X_new`` from the experts conditioned on ``y``.

        Each expert ``k`` predicts the latent ``f(x*)`` exactly from its own data (mean
        ``m_k``, variance ``v_k``); the predictions are combined over the expert tree by
        ``combine`` (:func:`scalegp.combine.combine`, DESIGN.md):

        .. math::

            \\frac{1}{v} = \\sum_k \\frac{\\beta_k}{v_k} + \\Big(1 - \\sum_k \\beta_k\\Big)\\frac{\\gamma}{v_0},
            \\qquad m = v \\Big(\\sum_k \\frac{\\beta_k m_k}{v_k}
                + \\Big(1 - \\sum_k\\beta_k\\Big)\\frac{\\gamma m_0}{v_0}\\Big),

        with ``"poe"``, ``"gpoe"``, ``"bcm"``, ``"rbcm"`` (paper [1] section 3.3) or
        ``"grbcm"`` [2] (needs ``experts.communication``; the prior ``(m_0, v_0)`` is then the
        communication expert's prediction). The noise variance is added after combining
        unless ``noiseless``. Differentiable in the hyperparameters (plain JAX autodiff).

        :param y: ``(N,)`` training targets.
        :param X_new: ``(T, d)`` or ``(T,)`` test inputs.
        :param mean_new: prior mean at ``X_new``; required when ``mean`` is a per-point
            vector, else the scalar mean is used.
        :param progress_bar: show a progress bar over the experts (for many test points;
            ticked from the running computation by :func:`jax.debug.callback`, so not inside
            ``jit``, where the bar would close before the computation runs).
        :returns: ``numpyro.distributions.Normal(mean, scale).to_event(1)`` over ``(T,)``.

        .. note:: Cost: ``O(E n^3 + E n^2 T)`` time; ``O(E T)`` memory plus one
           ``(chunk, n, n + T)`` block per device.
        """
        if combine not in COMBINE_RULES:
            raise ValueError(f"combine: unknown rule {combine!r}; use one of {COMBINE_RULES}")
        if combine == "grbcm" and self.experts.communication is None:
            raise ValueError("combine: 'grbcm' needs a communication expert, e.g. "
                             "scalegp.partition(..., communication=True)")
        y = self._check_y(y)
        if y.shape != self.event_shape:
            raise ValueError(f"y: expected shape {self.event_shape}, got {y.shape}")
        X_new = _as_inputs("X_new", X_new)
        if X_new.shape[1] != self.X.shape[1]:
            raise ValueError(f"X_new: expected shape (T, {self.X.shape[1]}), got {X_new.shape}")
        dtype = self._dtype()
        T = X_new.shape[0]
        if mean_new is None:
            if jnp.ndim(self.loc) != 0:
                raise ValueError("mean_new: the prior mean is a per-point vector; give its values at X_new")
            mean_new = self.loc
        if jnp.ndim(mean_new) > 1 or jnp.shape(mean_new) not in ((), (1,), (T,)):
            raise ValueError(f"mean_new: expected a scalar or shape ({T},), got {jnp.shape(mean_new)}")
        _check_finite("mean_new", mean_new)
        X, Xs = jnp.asarray(self.X, dtype), jnp.asarray(X_new, dtype)
        resid = jnp.asarray(y, dtype) - self.mean
        noise, jitter = jnp.asarray(self.noise, dtype), jnp.asarray(self.jitter, dtype)
        n = self.experts.expert_size
        with _progress_bar(self.experts.index.shape[0] + (combine == "grbcm"), progress_bar):
            means, variances = _expert_predictions(
                self.kernel, X, noise, resid, jitter, Xs, layout=self._static.layout, mesh=_mesh(self.workers),
                max_chunk=_max_chunk(self.chunk_size, n * (n + T)), progress=progress_bar,
            )
            if combine == "grbcm":
                comm = self.experts.communication
                prior_mean, prior_var = _expert_predictions(
                    self.kernel, X, noise, resid, jitter, Xs, layout=_Layout(comm[None]), mesh=None, max_chunk=1,
                    progress=progress_bar,
                )
                prior_mean, prior_var = prior_mean[0], prior_var[0]
            else:
                prior_mean = jnp.zeros((T,), dtype)
                prior_var = jnp.broadcast_to(self.kernel(Xs, diag=True), (T,)).astype(dtype)
        mu, var = combine_predictions(jnp, combine, means, variances, prior_mean, prior_var,
                                      tree=self.experts.tree)
        if not noiseless:
            var = var + noise
        return Normal(mu + jnp.asarray(mean_new, dtype), jnp.sqrt(var)).to_event(1)



class _StaticExperts:
    """The experts as static, hashable pytree aux data (hashed by content)."""

    def __init__(self, experts: Experts):
        self.experts = experts
        self.layout = _Layout(experts.index, experts.tree)
        comm = b"" if experts.communication is None else np.ascontiguousarray(experts.communication).tobytes()
        self._key = (self.layout, hashlib.blake2b(comm, digest_size=16).digest(), experts.communication is None)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _StaticExperts) and self._key == other._key
