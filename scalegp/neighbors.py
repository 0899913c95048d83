r"""Predictive variances from each test point's nearest training points (numpy only), the fast
variances of both frontends' ``SimplexGPMarginal.predict(..., neighbors=k)``.

The latent predictive variance of a GP, :math:`\sigma^2 - k_{*X}(K_{XX} + \sigma_n^2 I)^{-1}k_{X*}`,
needs one solve with the whole training matrix per test point. Conditioning on a subset
:math:`S` of the training points instead gives

.. math::

    v_S(x_*) = \sigma^2 - k_{*S}(K_{SS} + \sigma_n^2 I)^{-1} k_{S*} \;\ge\; v_X(x_*),

since conditioning a Gaussian on more observations can only lower its variance: the result is
conservative, and equal to the exact variance when :math:`S` holds every training point.
With :math:`S` the ``k`` training points nearest to :math:`x_*` in lengthscale units, the points that
carry almost all of the information about :math:`f(x_*)` under a stationary kernel, it is close
to the exact variance (on flights with the lengthscales a Simplex-GP learns: mean variance 0.589
with 256 neighbours against 0.581 by CG solves on all 243,853 rows, and 2.29 by 100 Lanczos steps).
The kernel is the exact stationary kernel (:func:`scalegp.lattice.kernel_profile`), not the
lattice operator.

.. note:: Cost: a k-d tree on the ``N`` scaled training inputs (``O(N log N)``), a ``k``-nearest
   query per test point, and per test point a ``k x k`` kernel matrix and one solve with it:
   ``O(T k^3)`` time, ``O(c k^2)`` memory for test chunks of ``c`` points (about 64 MiB).
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from .lattice import kernel_profile

__all__ = ["check_neighbors", "neighbor_variances"]

_CHUNK_BYTES = 64 << 20


def check_neighbors(neighbors, variance_rank, n: int) -> None:
    """``ValueError`` unless ``neighbors`` is ``None`` or an integer in ``[1, n]``, and not given
    together with ``variance_rank`` (``predict``'s two alternatives to the CG variances)."""
    if neighbors is None:
        return
    if isinstance(neighbors, bool) or not isinstance(neighbors, (int, np.integer)) or not 1 <= neighbors <= n:
        raise ValueError(f"neighbors: must be None or an integer in [1, {n}], got {neighbors!r}")
    if variance_rank is not None:
        raise ValueError("neighbors: give either neighbors or variance_rank, not both")


def neighbor_variances(X, X_new, k: int, *, kernel: str, lengthscale, variance, noise,
                       progress_bar: bool = False) -> np.ndarray:
    r"""Latent variances :math:`v_S(x_*)` at the rows of ``X_new`` (``T x d``), each conditioned on
    its ``k`` nearest rows of ``X`` (``N x d``) in the metric of ``lengthscale`` (scalar or ``(d,)``),
    under the stationary kernel ``kernel`` (a name of :data:`scalegp.lattice.KERNELS`) with
    ``variance`` :math:`\sigma^2` and observation noise ``noise`` :math:`\sigma_n^2`. float64,
    clipped at zero; add ``noise`` for the noisy targets. ``progress_bar`` shows one over the test
    points."""
    X = np.asarray(X, dtype=np.float64) / np.asarray(lengthscale, dtype=np.float64)
    Xs = np.asarray(X_new, dtype=np.float64) / np.asarray(lengthscale, dtype=np.float64)
    variance, noise, k = float(variance), float(noise), int(k)
    tree = cKDTree(X)
    out = np.empty(len(Xs))
    step = max(1, _CHUNK_BYTES // (8 * k * k))
    with tqdm(total=len(Xs), desc="neighbour variances", unit="point", disable=not progress_bar) as bar:
        for s in range(0, len(Xs), step):
            near = X[tree.query(Xs[s : s + step], k=k, workers=-1)[1].reshape(-1, k)]  # c x k x d
            sq = (near**2).sum(-1)
            r2 = sq[:, :, None] + sq[:, None, :] - 2 * near @ near.transpose(0, 2, 1)
            K = variance * kernel_profile(kernel, np.sqrt(np.maximum(r2, 0.0)))
            K[:, np.arange(k), np.arange(k)] = variance + noise
            cross = variance * kernel_profile(kernel, np.linalg.norm(near - Xs[s : s + step, None], axis=-1))
            out[s : s + step] = variance - (cross * np.linalg.solve(K, cross[..., None])[..., 0]).sum(-1)
            bar.update(len(near))
    return np.maximum(out, 0.0)
