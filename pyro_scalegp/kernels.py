"""Batched evaluation of ``pyro.contrib.gp.kernels`` objects over many experts.

Pyro's kernels take 2-D inputs. The HGP needs the kernel on a batch of expert
inputs ``X`` of shape ``(E, n, d)``: :func:`gram` gives ``(E, n, n)``,
:func:`cross` the ``(E, n, T)`` blocks against shared points ``Z`` of shape
``(T, d)``, and :func:`diag` the prior variances.

For :class:`~pyro.contrib.gp.kernels.RBF`, :class:`~pyro.contrib.gp.kernels.Matern32`,
:class:`~pyro.contrib.gp.kernels.Matern52` and :class:`~pyro.contrib.gp.kernels.Exponential`
a batched fast path evaluates the same formulas as their ``forward`` (including
Pyro's ``sqrt(r^2 + 1e-12)``; entries below about 1e-150 are exactly 0, see
:data:`_EXP_FLOOR`), with

.. math::

    r^2 = \\Big\\|\\frac{x - z}{\\ell}\\Big\\|^2, \\quad
    k_{\\mathrm{RBF}} = \\sigma^2 e^{-r^2/2}, \\quad
    k_{\\mathrm{Exp}} = \\sigma^2 e^{-r}, \\quad
    k_{3/2} = \\sigma^2 (1 + \\sqrt3 r) e^{-\\sqrt3 r}, \\quad
    k_{5/2} = \\sigma^2 (1 + \\sqrt5 r + \\tfrac53 r^2) e^{-\\sqrt5 r}.

Any other kernel with ``forward(X, Z, diag)`` is evaluated expert by expert and
stacked.

Hyperparameters are read once, when the kernel is *bound* (:func:`bind`): a
:class:`BoundKernel` reads ``variance`` and ``lengthscale`` inside the kernel's
Pyro context, so ``PyroParam`` values register their ``pyro.param`` sites and
``PyroSample`` priors their ``pyro.sample`` sites exactly once, in the model
that builds the distribution; later evaluations (for instance when a trace
computes ``log_prob`` after the model has run) reuse those values. For generic
kernels every ``PyroSample`` attribute of the module tree is sampled at binding
and replayed from the module's context cache at evaluation.

.. note:: Cost: ``O(E n m d)`` time and ``O(E n m)`` memory for ``E`` blocks of
   ``n x m``; the generic path adds a Python loop over experts.
"""
from __future__ import annotations

import contextlib
import math

import torch
from pyro.contrib.gp import kernels as gp_kernels

from scalegp.domain import DomainError
from scalegp.kernel_shapes import check_active_columns, check_lengthscale_shape

__all__ = [
    "BoundKernel", "bind", "gram", "cross", "diag",
    "check_finite", "check_positive", "check_positive_scalar", "check_shape", "check_kernel_inputs",
]

_FAST = {
    gp_kernels.RBF: "rbf",
    gp_kernels.Exponential: "exponential",
    gp_kernels.Matern32: "matern32",
    gp_kernels.Matern52: "matern52",
}
_EPS = 1e-12  # pyro.contrib.gp.kernels.isotropic._torch_sqrt
#: ``exp`` arguments are clamped here and results below ``e^-344`` (about 1e-150) set to 0.
#: Float64 arithmetic takes 10-20x longer when a result is subnormal (below 1e-308): ``exp``
#: beyond ``-708``, and products of two tiny kernel entries in the triangular solves. Short
#: lengthscales make such entries the common case (measured on the flights: ``exp`` 30-70 ns
#: instead of 3.5 ns per entry, the prediction's triangular solve 1.7x slower)
_EXP_FLOOR, _EXP_ZERO = -345.0, math.exp(-344.0)


def check_finite(name: str, value: torch.Tensor, error: type = ValueError) -> None:
    """Raise ``error`` naming ``name`` unless every entry of ``value`` is finite (``error``:
    :class:`scalegp.domain.DomainError` for a hyperparameter's value)."""
    if not bool(torch.isfinite(value).all()):
        raise error(f"{name}: contains NaN or inf")


def check_positive(name: str, value: torch.Tensor, error: type = ValueError) -> None:
    """Raise ``error`` naming ``name`` unless every entry is finite and positive."""
    check_finite(name, value, error)
    if not bool((value > 0).all()):
        raise error(f"{name}: must be positive, got {value.detach().flatten()[:5].tolist()}")


def check_positive_scalar(name: str, value: torch.Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` holds one number, and
    :class:`scalegp.domain.DomainError` unless that is finite and positive (a hyperparameter's value)."""
    if value.numel() != 1:
        raise ValueError(f"{name}: expected a scalar, got shape {tuple(value.shape)}")
    check_positive(name, value, DomainError)


def check_shape(name: str, value: torch.Tensor, shape: tuple) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value.shape`` matches ``shape``
    (``None`` entries match any size)."""
    ok = value.dim() == len(shape) and all(s is None or s == v for s, v in zip(shape, value.shape))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(value.shape)}")


def check_kernel_inputs(kernel, columns: int, name: str = "X") -> None:
    """``ValueError`` naming ``name`` if a ``pyro.contrib.gp`` kernel reads a column (``active_dims``)
    that the ``columns`` columns of ``name`` lack, or naming ``lengthscale`` if its lengthscale is
    neither a scalar nor one per input dimension (Pyro's kernels accept both and fail, or broadcast,
    later). A lengthscale with a prior (``PyroSample``) is not read: reading it would draw it."""
    if not isinstance(kernel, gp_kernels.Kernel):
        return
    check_active_columns(kernel.active_dims, columns, name)
    if (isinstance(kernel, (gp_kernels.Isotropy, gp_kernels.Periodic))
            and "lengthscale" not in getattr(kernel, "_pyro_samples", {})):
        check_lengthscale_shape(tuple(kernel.lengthscale.shape), kernel.input_dim)


def _square_scaled_dist(X, Z, lengthscale):
    # the operations of pyro's Isotropy._square_scaled_dist, batched over leading axes
    scaled_X = X / lengthscale
    scaled_Z = scaled_X if Z is None else Z / lengthscale
    X2 = (scaled_X**2).sum(-1, keepdim=True)
    Z2 = X2 if Z is None else (scaled_Z**2).sum(-1, keepdim=True)
    XZ = scaled_X.matmul(scaled_Z.transpose(-1, -2))
    r2 = X2 - 2 * XZ + Z2.transpose(-1, -2)
    return r2.clamp(min=0)


def _exp(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)``, exactly 0 below ``e^-344`` (:data:`_EXP_FLOOR`); differentiable."""
    return torch.nn.functional.threshold(torch.exp(x.clamp(min=_EXP_FLOOR)), _EXP_ZERO, 0.0)


def _exp_(x: torch.Tensor) -> torch.Tensor:
    """:func:`_exp` in place."""
    return torch.nn.functional.threshold_(x.clamp_(min=_EXP_FLOOR).exp_(), _EXP_ZERO, 0.0)


def _stationary(kind: str, variance, lengthscale, X, Z):
    r2 = _square_scaled_dist(X, Z, lengthscale)
    if kind == "rbf":
        return variance * _exp(-0.5 * r2)
    if kind == "exponential":
        return variance * _exp(-(r2 + _EPS).sqrt())
    if kind == "matern32":
        sqrt3_r = 3**0.5 * (r2 + _EPS).sqrt()
        return variance * (1 + sqrt3_r) * _exp(-sqrt3_r)
    sqrt5_r = 5**0.5 * (r2 + _EPS).sqrt()  # matern52
    return variance * (1 + sqrt5_r + (5 / 3) * r2) * _exp(-sqrt5_r)


def stationary_forward(kind: str, variance, lengthscale, Xs, Zs=None, *, out=None, scratch=None):
    r"""In-place, allocation-lean ``k(Xs, Zs)`` for the fast kernels (no autograd), returning
    ``(K, aux)``: ``aux`` holds what :func:`stationary_vjp` needs (for ``Zs=None``).

    ``Xs`` are inputs already sliced to the active dimensions, ``(E, n, d)``; ``Zs`` is ``None``
    (``k(Xs, Xs)``, ``(E, n, n)``) or shared points ``(T, d)`` (``(E, n, T)``). ``out`` is a
    buffer of ``K``'s shape to write ``K`` into and ``scratch(name)`` (optional) returns one for
    each intermediate (``"r2"``, ``"e"``): reusing memory avoids page faults. The scaled
    squared distances come from one batched product of augmented inputs,
    :math:`r^2_{ij} = [\tilde x_i, |\tilde x_i|^2, 1] \cdot [-2 \tilde z_j, 1, |\tilde z_j|^2]`;
    for the RBF the product gives :math:`\log K_{ij} = \log\sigma^2 - r^2_{ij}/2` directly, so
    its kernel matrix costs one write and one ``exp`` pass over its entries.

    .. note:: Cost: ``O(E n T (d + 2))`` flops, 2 (RBF) to 8 (Matern 5/2) passes over the
       ``E n T`` entries.
    """
    buffer = scratch if scratch is not None else (lambda name: None)
    sX = Xs / lengthscale
    sZ = sX if Zs is None else Zs / lengthscale
    sqX = (sX * sX).sum(-1, keepdim=True)
    sqZ = sqX if Zs is None else (sZ * sZ).sum(-1, keepdim=True)
    oneX, oneZ = torch.ones_like(sqX), torch.ones_like(sqZ)
    if kind == "rbf":  # rounding may leave log K a hair above log(variance): harmless, not clamped
        log_var = torch.as_tensor(variance, dtype=sX.dtype).log()
        left = torch.cat([sX, sqX.mul(-0.5).add_(log_var), oneX], -1)
        right = torch.cat([sZ, oneZ, sqZ.mul(-0.5)], -1)
        return _exp_(torch.matmul(left, right.transpose(-1, -2), out=out)), sX
    r2 = torch.matmul(torch.cat([sX, sqX, oneX], -1), torch.cat([sZ * -2, oneZ, sqZ], -1).transpose(-1, -2),
                      out=out if kind == "exponential" else buffer("r2")).clamp_(min=0)
    if kind == "exponential":  # K overwrites r^2 with s = sqrt(r^2 + eps), then exp(-s)
        s = r2.add_(_EPS).sqrt_()
        return _exp_(torch.neg(s, out=buffer("e"))).mul_(variance), (sX, s)
    if kind == "matern32":  # r^2 becomes s, K takes its own buffer
        s = r2.add_(_EPS).sqrt_()
        e = _exp_(torch.mul(s, -(3**0.5), out=buffer("e")))
        return torch.mul(s, 3**0.5, out=out).add_(1).mul_(e).mul_(variance), (sX, e)
    s = torch.add(r2, _EPS, out=out).sqrt_()  # matern52: s lives in K's buffer until K replaces it
    e = _exp_(torch.mul(s, -(5**0.5), out=buffer("e")))
    # (1 + sqrt5 s + 5/3 r^2) e = 5/3 (r^2 + 3/sqrt5 s + 3/5) e; r^2 becomes r^2 / s for the vjp
    K = torch.add(r2, s, alpha=3 / 5**0.5, out=buffer("poly")).add_(0.6).mul_(e).mul_(variance * 5 / 3)
    return K, (sX, r2.div_(s), e)


def stationary_vjp(kind: str, variance, lengthscale, K, aux, G):
    r"""Gradients of ``sum(G * K)`` for :func:`stationary_forward`'s output: with respect to the
    variance, the lengthscale and the sliced inputs ``Xs``. ``G`` (symmetric) is overwritten.

    With :math:`W = G \circ \partial K / \partial r^2` and scaled inputs
    :math:`\tilde x = x / \ell`:
    :math:`\partial/\partial \tilde x_i = 4 (\sum_j W_{ij} \tilde x_i - (W \tilde x)_i)`; the row
    sums and :math:`W \tilde x` come from one batched product with :math:`[\tilde x, 1]`.
    :math:`\partial K/\partial r^2` is :math:`-K/2` (RBF), :math:`-K/(2s)` (Exponential),
    :math:`-\tfrac32 \sigma^2 e^{-\sqrt3 s}` (Matern 3/2) and
    :math:`-\tfrac56 \sigma^2 (1 + \sqrt5 r^2/s) e^{-\sqrt5 s}` (Matern 5/2), with
    :math:`s = \sqrt{r^2 + 10^{-12}}` as in Pyro.

    .. note:: Cost: ``O(E n^2 d)`` flops, 2 (RBF) to 5 (Matern 5/2) passes over ``E n^2`` entries.
    """
    sX = aux[0] if isinstance(aux, tuple) else aux
    if kind == "rbf":  # dK/dr2 = -K/2: W = -(G o K)/2, and sum(G o K) is the sum of its row sums
        GK = G.mul_(K)
        scale = -0.5
    else:
        grad_var = torch.dot(G.reshape(-1), K.reshape(-1)) / variance
        if kind == "exponential":
            GK, scale = G.mul_(K).div_(aux[1]), -0.5
        elif kind == "matern32":
            GK, scale = G.mul_(aux[1]), -1.5 * variance
        else:
            _, r2_over_s, e = aux
            GK, scale = G.mul_(e), -variance * 5 / 6
            GK.addcmul_(GK, r2_over_s, value=5**0.5)
    both = torch.bmm(GK, torch.cat([sX, torch.ones_like(sX[..., :1])], -1))
    rows = both[..., -1:]
    if kind == "rbf":
        grad_var = rows.sum() / variance
    grad_sX = both[..., :-1].sub_(rows * sX).mul_(-4 * scale)
    grad_ls = -(grad_sX * sX).sum((0, 1)) / torch.as_tensor(lengthscale).expand(sX.shape[-1])
    grad_X = grad_sX / lengthscale
    return grad_var.reshape(torch.as_tensor(variance).shape), \
        grad_ls.sum_to_size(torch.as_tensor(lengthscale).shape), grad_X


class BoundKernel:
    """A kernel whose hyperparameters have been read once.

    :param kernel: a ``pyro.contrib.gp.kernels.Kernel`` (or any module with
        ``forward(X, Z=None, diag=False)`` on 2-D inputs).

    Attributes: ``kernel`` (the wrapped object), ``kind`` (``"rbf"``,
    ``"exponential"``, ``"matern32"``, ``"matern52"`` for the fast path, else
    ``None``) and ``params`` (``(variance, lengthscale)`` on the fast path,
    ``()`` otherwise). The evaluation methods take optional replacement
    ``params`` so that callers can differentiate with respect to copies.
    """

    def __init__(self, kernel):
        if isinstance(kernel, BoundKernel):
            kernel = kernel.kernel
        if not callable(getattr(kernel, "forward", None)):
            raise ValueError(f"kernel: expected an object with forward(X, Z, diag), got {type(kernel).__name__}")
        self.kernel = kernel
        self.kind = _FAST.get(type(kernel))
        self._context = getattr(kernel, "_pyro_context", None)
        self._cache: dict = {}
        with self._context if self._context is not None else contextlib.nullcontext():
            if self.kind is not None:
                self.params = (kernel.variance, kernel.lengthscale)
                self.active_dims = list(kernel.active_dims)
            else:
                self.params = ()
                if self._context is not None:
                    for module in kernel.modules():
                        for name in module.__dict__.get("_pyro_samples", {}):
                            getattr(module, name)
                        for name in module.__dict__.get("_pyro_params", {}):
                            getattr(module, name)
                    self._cache = dict(self._context.cache)

    def __repr__(self):
        return f"BoundKernel({self.kernel!r})"

    @contextlib.contextmanager
    def _replay(self):
        """Evaluate the generic kernel with the ``PyroSample`` values drawn at binding."""
        if self._context is None:
            yield
            return
        with self._context:
            self._context.cache.update(self._cache)
            yield

    def _slice(self, X):
        if self.active_dims == list(range(X.shape[-1])):
            return X
        return X[..., self.active_dims]

    def _fast(self, params, X, Z):
        variance, lengthscale = self.params if params is None else params
        X, Z = self._slice(X), None if Z is None else self._slice(Z)
        if torch.is_grad_enabled():
            return _stationary(self.kind, variance, lengthscale, X, Z)
        flat = X.reshape(-1, *X.shape[-2:])  # no autograd: the in-place formulas
        K = stationary_forward(self.kind, variance, lengthscale, flat, Z)[0]
        return K.reshape(*X.shape[:-1], K.shape[-1])

    def gram(self, X, params=None):
        """``(..., n, n)`` kernel matrices of ``X`` of shape ``(..., n, d)``."""
        if self.kind is not None:
            return self._fast(params, X, None)
        with self._replay():
            flat = X.reshape(-1, *X.shape[-2:])
            return torch.stack([self.kernel(x) for x in flat]).reshape(*X.shape[:-1], X.shape[-2])

    def cross(self, X, Z, params=None):
        """``(..., n, T)`` cross-covariances of ``X (..., n, d)`` with ``Z (T, d)``."""
        if self.kind is not None:
            return self._fast(params, X, Z)
        with self._replay():
            flat = X.reshape(-1, *X.shape[-2:])
            return torch.stack([self.kernel(x, Z) for x in flat]).reshape(*X.shape[:-1], Z.shape[-2])

    def diag(self, X, params=None):
        """Prior variances ``k(x, x)`` of ``X (..., n, d)``, shape ``(..., n)``."""
        if self.kind is not None:
            variance = (self.params if params is None else params)[0]
            return variance.expand(X.shape[:-1])
        with self._replay():
            return self.kernel(X.reshape(-1, X.shape[-1]), diag=True).reshape(X.shape[:-1])


def bind(kernel) -> BoundKernel:
    """``kernel`` as a :class:`BoundKernel` (returned unchanged if it is one)."""
    return kernel if isinstance(kernel, BoundKernel) else BoundKernel(kernel)


def _inputs(name: str, X) -> torch.Tensor:
    if not torch.is_tensor(X):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(X).__name__}")
    check_finite(name, X)
    return X


def gram(kernel, X: torch.Tensor) -> torch.Tensor:
    """Kernel matrices of a batch of expert inputs.

    :param kernel: a Pyro kernel or :class:`BoundKernel`.
    :param X: ``(E, n, d)`` inputs.
    :returns: ``(E, n, n)``.
    """
    X = _inputs("X", X)
    check_shape("X", X, (None, None, None))
    return bind(kernel).gram(X)


def cross(kernel, X: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """Cross-covariances ``k(X_e, Z)`` for every expert.

    :param X: ``(E, n, d)`` expert inputs.
    :param Z: ``(T, d)`` shared points.
    :returns: ``(E, n, T)``.
    """
    X, Z = _inputs("X", X), _inputs("Z", Z)
    check_shape("X", X, (None, None, None))
    check_shape("Z", Z, (None, X.shape[-1]))
    return bind(kernel).cross(X, Z)


def diag(kernel, X: torch.Tensor) -> torch.Tensor:
    """Prior variances ``k(x, x)`` for inputs ``X`` of shape ``(..., d)``; returns ``X.shape[:-1]``."""
    X = _inputs("X", X)
    if X.dim() < 2:
        raise ValueError(f"X: expected shape (..., d), got {tuple(X.shape)}")
    return bind(kernel).diag(X)

