r"""Framework-free maths of the Simplex-GP lattice operator (paper 002 [1]), numpy only.

The operator approximates the kernel matrix of a stationary kernel by filtering on the
permutohedral lattice [2]:

.. math::

    K \approx \sigma^2 D^{-1/2}\, W^\top C^\top C\, W\, D^{-1/2},
    \qquad C = C_d \cdots C_1 C_0,

with :math:`W` the barycentric splat of the points :math:`z = x/\ell` elevated into the hyperplane
:math:`\sum_j e_j = 0` of :math:`\mathbb{R}^{d+1}`, :math:`C_j` a 1-D blur with the symmetric stencil
``coef`` along lattice direction :math:`j`, and :math:`D` (an estimate of) the diagonal of
:math:`W^\top C^\top C W`. Blurring along :math:`0..d` and then
:math:`d..0` makes the operator exactly symmetric and positive semi-definite; :math:`D` calibrates
its diagonal to the kernel variance :math:`\sigma^2` with a symmetric scaling (any positive
:math:`D` keeps symmetry and PSD). :math:`D_{ii} = w_i^\top G_i w_i` with :math:`G_i` the Gram of
the one-pass blur between point :math:`i`'s :math:`d+1` simplex vertices on the lattice actually
built, :math:`(G_i)_{kl} = \langle C e_{a_{ik}}, C e_{a_{il}} \rangle`. Vertices absent from the
table drop their share of the blur, so :math:`G_i` is not the closed form of the infinite lattice
(on 8-D flights inputs the truncated diagonal is 0.15-0.6 of it, point by point), and propagating
each point's :math:`d+1` vertices through the blur costs its support (thousands of vertices at
:math:`d = 8`, the former exact pass: 7 s for 10k flights points). Instead, with
:math:`B = C^\top C` (:math:`M \times M`),

.. math::

    (G_i)_{kl} = B_{a_{ik} a_{il}}, \qquad
    G_i \approx \tfrac{1}{S} Z_{a_i}^\top Z_{a_i}, \quad Z = C^\top P.

:math:`B` is needed only at the vertex pairs of the :math:`U` distinct simplices, and neighbouring
simplices share most of them: on all 8-D flights rows 82,134 simplices have
:math:`82134 \cdot 45 = 3.7` million entries but only :math:`P` = 131,595 distinct pairs. The pairs are
found by hashing (:math:`O(U d^2)`) and :math:`B` is evaluated once per pair. Exact: the :math:`M`
columns of :math:`B` (identity columns through the :math:`2(d+1)` blurs, in blocks), from which every
pair reads its entry: :math:`2(d+1)(2r+1)M^2` operations, independent of :math:`N`. Estimated:
:math:`S` = ``kernels_cuda.cpu.CALIBRATION_PROBES`` = 256 Rademacher columns :math:`P` (signs hashed
from vertex id and column; the CPU build numbers vertices in order of first occurrence, so the
estimate is the same in every run; computed in float32 whatever the lattice's dtype, far below the
estimate's own error), :math:`S((d+1)(2r+1)M + P)` operations, unbiased, with a relative
error of about :math:`\sqrt{2/S}` per point (about 6% median, 15-20% at the 95th percentile),
correlated between nearby points; products lose about 0.01 (up to 0.05 measured) of cosine
similarity against the exact calibration. The cheaper of the two is used, exact on lattices small
enough (:math:`\le 2^{26}` operations) whatever the probes would cost (``probe_plan``): exact for the
small problems of the tests, probes for the 8-D flights inputs from 2000 rows up. Each point's
diagonal :math:`w_i^\top G_i w_i` is then read from its simplex's pairs (:math:`O(N d^2)`), and so is
:math:`G_i w_i`, half its gradient in the weights; the :math:`G_i` themselves are never formed.

Stencil (paper section 4.1): the kernel profile sampled at spacing :math:`s`, ``order`` :math:`r`
giving :math:`2r+1` taps, with :math:`s` chosen by the coverage criterion: the fraction of the
kernel's mass inside :math:`|x| \le s(2r+1)/2` equals the fraction of its spectral mass below the
Nyquist frequency :math:`\pi/s` (binary search; spectra by FFT).

Elevation scale: one blur pass per direction has variance :math:`v_c` (stencil as a distribution
over its offsets), two passes :math:`2 v_c`, splat and slice add :math:`1/6`; the lattice is scaled
so that the filter's variance per input axis is one lengthscale squared (exact moment matching for
the RBF; for the Matern kernels the stencil's shape carries the kernel and the moment match was the
more accurate of the two choices measured, against the kernel's own 1-D second moment), per axis
:math:`s_i = (d+1)\sqrt{2v_c + 1/6}/\sqrt{(i+1)(i+2)}`.

References: [1] Kapoor, Finzi, Wang, Wilson, "SKIing on Simplices: Kernel Interpolation on the
Permutohedral Lattice for Scalable Gaussian Processes", ICML 2021. [2] Adams, Baek, Davis, "Fast
high-dimensional filtering using the permutohedral lattice", Eurographics 2010.

.. note:: Cost: the stencil search is ``O(G log G)`` for a grid of ``G = 2^16`` samples, once per
   (kernel, order) and cached; everything else here is ``O(d^2)`` or ``O(N d)`` validation. The
   calibration, once per lattice, costs ``O(U d^2)`` to find the ``P`` distinct vertex pairs of the
   ``U <= N`` distinct simplices, then ``O(M^2 d r)`` exact or ``O(S (M d r + P))`` with probes.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from .domain import DomainError
from .kernel_shapes import check_lengthscale_shape

__all__ = [
    "KERNELS", "kernel_profile", "coverage_spacing", "Stencil", "stencil", "elevation_scale",
    "elevation_matrix", "memory_estimate", "check_memory", "validate_inputs",
    "barycentric", "column_extremes",
]

KERNELS = ("rbf", "exponential", "matern32", "matern52")
_MAX_COORD = 2**30


def kernel_profile(name: str, r: np.ndarray) -> np.ndarray:
    """Unit-variance profile :math:`k(r)` of a supported kernel at scaled distances ``r >= 0``."""
    r = np.abs(np.asarray(r, dtype=np.float64))
    if name == "rbf":
        return np.exp(-0.5 * r**2)
    if name == "exponential":
        return np.exp(-r)
    if name == "matern32":
        s = np.sqrt(3.0) * r
        return (1 + s) * np.exp(-s)
    if name == "matern52":
        s = np.sqrt(5.0) * r
        return (1 + s + s**2 / 3.0) * np.exp(-s)
    raise ValueError(f"kernel: unsupported kernel {name!r}; supported: {', '.join(KERNELS)}")


def _half_line_cdfs(name: str, half_width: float = 60.0, size: int = 2**16):
    """Cumulative mass of the kernel profile on ``[0, x]`` and of its spectrum on ``[0, w]``
    (trapezoid rule; the spectrum by FFT of the sampled profile), each normalized to one."""
    x = np.linspace(-half_width, half_width, size, endpoint=False)
    dx = x[1] - x[0]
    spec = np.abs(np.fft.fft(np.fft.ifftshift(kernel_profile(name, x)))) * dx
    w = 2 * np.pi * np.fft.fftfreq(size, dx)
    xs = x[size // 2 :]  # 0, dx, ...
    ws, sp = w[: size // 2], spec[: size // 2]  # 0, dw, ...

    def cdf(t, f):
        c = np.concatenate([[0.0], np.cumsum(0.5 * (f[1:] + f[:-1]) * np.diff(t))])
        return t, c / c[-1]

    return cdf(xs, kernel_profile(name, xs)), cdf(ws, sp)


def coverage_spacing(name: str, order: int, *, tol: float = 1e-10) -> float:
    r"""Spacing :math:`s` at which the spatial coverage of :math:`2r+1` samples equals the spectral
    coverage below Nyquist (paper section 4.1), by bisection on ``[1e-3, 20]``: the fraction of the
    kernel's mass in :math:`|x| \le s(2r+1)/2` equals the fraction of its spectral mass in
    :math:`|\omega| \le \pi/s` (both increasing/decreasing in :math:`s`, so the crossing is unique)."""
    (xs, cx), (ws, cw) = _half_line_cdfs(name)

    def gap(s):
        return np.interp(s * (2 * order + 1) / 2, xs, cx) - np.interp(np.pi / s, ws, cw)

    lo, hi = 1e-3, 20.0
    if not (gap(lo) < 0 < gap(hi)):
        raise RuntimeError(f"coverage criterion has no crossing for {name}, order {order}")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if gap(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class Stencil:
    """A symmetric 1-D blur stencil: ``coef[t]`` for offsets ``+-t``, ``t = 0..order``.

    :ivar coef: the half stencil (``order + 1``), normalized so the full stencil sums to one.
    :ivar spacing: the sample spacing from the coverage criterion.
    :ivar variance: variance of the full stencil as a distribution over its offsets.
    """

    def __init__(self, name: str, order: int):
        self.name, self.order = name, order
        self.spacing = coverage_spacing(name, order)
        t = np.arange(order + 1)
        c = kernel_profile(name, self.spacing * t)
        self.coef = c / (c[0] + 2 * c[1:].sum())
        self.variance = float(2 * (t**2 * self.coef).sum())

    def full(self) -> np.ndarray:
        """The full stencil over offsets ``-order..order``."""
        return np.concatenate([self.coef[:0:-1], self.coef])


@functools.lru_cache(maxsize=None)
def stencil(name: str, order: int) -> Stencil:
    """Cached :class:`Stencil` of kernel ``name`` (one of :data:`KERNELS`) with ``2 order + 1`` taps."""
    kernel_profile(name, 0.0)
    if int(order) != order or order < 1:
        raise ValueError(f"order: must be a positive integer, got {order!r}")
    return Stencil(name, int(order))


def elevation_scale(d: int, st: Stencil) -> np.ndarray:
    """Per-axis scales :math:`s_i` applied to :math:`z = x/\\ell` before elevation (``d``)."""
    alpha = (d + 1) * np.sqrt(2 * st.variance + 1.0 / 6.0)
    i = np.arange(d)
    return alpha / np.sqrt((i + 1.0) * (i + 2.0))


def elevation_matrix(d: int) -> np.ndarray:
    """``E`` (``(d+1) x d``) with ``elevated = E @ (z * scale)``, the recursion of the C kernel
    written as a matrix; its columns are orthogonal with norms :math:`\\sqrt{(i+1)(i+2)}`."""
    E = np.zeros((d + 1, d))
    E[d, d - 1] = -d
    for j in range(d - 1, 0, -1):
        E[j] = E[j + 1]
        E[j, j - 1] -= j
        E[j, j] += j + 2
    E[0] = E[1]
    E[0, 0] += 2
    return E


def memory_estimate(n: int, d: int, order: int, ncols: int = 1, itemsize: int = 8) -> int:
    """Upper bound in bytes of the lattice built for ``n`` points in ``d`` dimensions (at most
    ``n (d+1)`` vertices), its calibration (for at most ``n`` distinct simplices: their vertex pairs,
    hashed with 48 bytes of keys, table and scratch per pair, the values at the pairs, the gradient's
    :math:`G_i w_i`, and two column buffers of at most 64 MiB per thread, two threads
    counted), and the buffers of one product with ``ncols`` columns (with the CPU build's per-thread splat
    buffers, at most 128 MiB)."""
    n_pv = n * (d + 1)
    cap = 1 << max(4, int(2 * n_pv - 1).bit_length())
    per_pv = itemsize + 4 * 3 + 4 * d + 4 * 3  # bary, rank/greedy/vid, keys, build scratch
    calibration = n * (d + 1) * (d + 2) // 2 * (48 + itemsize) + n * (d + 1) * itemsize + (128 << 20)
    return int(n_pv * per_pv + 4 * cap + n_pv * (d + 1) * 2 * order * 4 + calibration
               + 2 * n_pv * ncols * itemsize + 2 * n * ncols * itemsize + (128 << 20))


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(n: int, d: int, order: int, ncols: int = 1, itemsize: int = 8, *, limit=None,
                 where: str = "host") -> int:
    """Raise :class:`MemoryError` (before anything is allocated) if :func:`memory_estimate` exceeds
    ``limit`` (default: the host memory available now), naming ``where`` that memory is. Returns the
    estimate."""
    est = memory_estimate(n, d, order, ncols, itemsize)
    limit = _available_bytes() if limit is None else int(limit)
    if est > limit:
        raise MemoryError(
            f"lattice for N={n}, d={d}, order={order}, {ncols} column(s) needs up to {est / 2**30:.2f} GiB, "
            f"more than the {limit / 2**30:.2f} GiB of {where} memory available"
        )
    return est


def column_extremes(X: np.ndarray, rows: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(X.max(axis=0), X.min(axis=0))`` of a 2-D array. numpy reduces a narrow C-ordered array over
    axis 0 one element at a time (30,000 x 8 values: 0.87 ms a reduction here); ``rows`` rows at a time
    viewed as one wide row, it reduces whole vectors (0.07 ms), then the ``rows`` partial rows."""
    n, d = X.shape
    m = n - n % rows
    if m == 0 or not X.flags.c_contiguous:
        return X.max(axis=0), X.min(axis=0)
    wide = X[:m].reshape(m // rows, rows * d)
    hi, lo = wide.max(axis=0).reshape(rows, d).max(axis=0), wide.min(axis=0).reshape(rows, d).min(axis=0)
    if m < n:
        hi, lo = np.maximum(hi, X[m:].max(axis=0)), np.minimum(lo, X[m:].min(axis=0))
    return hi, lo


def validate_inputs(X, lengthscale, variance, kernel: str, order) -> tuple[np.ndarray, np.ndarray]:
    """Check the operator's inputs (numpy views of them); ``ValueError`` naming the bad argument
    (:class:`scalegp.domain.DomainError` for the hyperparameters' values: see there). Returns ``X``
    as a 2-D array and the lengthscale broadcast to ``(d,)``."""
    kernel_profile(kernel, 0.0)
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X: expected a 2-D (N, d) array, got shape {X.shape}")
    n, d = X.shape
    if n == 0:
        raise ValueError("X: N must be positive (got no rows)")
    if d == 0:
        raise ValueError("X: d must be positive (got no columns)")
    # the column extremes: NaN propagates through them, and they bound the lattice coordinates (no N x d temporaries)
    hi, lo = column_extremes(X)
    if not (np.all(np.isfinite(hi)) and np.all(np.isfinite(lo))):
        raise ValueError("X: contains NaN or infinite values")
    ell = np.asarray(lengthscale, dtype=np.float64)
    check_lengthscale_shape(ell.shape, d)
    if not (np.all(np.isfinite(ell)) and np.all(ell > 0)):
        raise DomainError(f"lengthscale: must be finite and positive, got {ell}")
    var = np.asarray(variance, dtype=np.float64)
    if var.size != 1:
        raise ValueError(f"variance: must be a scalar, got shape {var.shape}")
    if not (np.isfinite(var).all() and (var > 0).all()):
        raise DomainError(f"variance: must be a finite positive scalar, got {variance}")
    if isinstance(order, bool) or int(order) != order or order < 1:
        raise ValueError(f"order: must be a positive integer, got {order!r}")
    ell = np.broadcast_to(ell, (d,))
    st = stencil(kernel, int(order))
    span = (np.maximum(hi, -lo) / ell).max()
    bound = span * elevation_scale(d, st).max() * 2 * (d + 1)
    if not bound < _MAX_COORD:
        raise DomainError(
            f"X: inputs span {span:.3g} lengthscales, too far for 32-bit lattice coordinates; "
            "centre the inputs or increase the lengthscale")
    return X, ell


def barycentric(elevated: np.ndarray, greedy: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Barycentric weights (``N x (d+1)``) of elevated points in their simplices, given the
    remainder-0 point ``greedy`` and the residual ranks (as the C kernel computes them); linear in
    ``elevated`` for fixed ``greedy``/``rank`` (numpy reference of the frontends' differentiable copy)."""
    n, dp1 = elevated.shape
    d = dp1 - 1
    delta = (elevated - greedy) / dp1
    b = np.zeros((n, dp1 + 1), dtype=elevated.dtype)
    rows = np.arange(n)[:, None]
    np.add.at(b, (rows, d - rank), delta)
    np.add.at(b, (rows, d + 1 - rank), -delta)
    b[:, 0] += 1 + b[:, dp1]
    return b[:, :dp1]
