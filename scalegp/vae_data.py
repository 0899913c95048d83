"""Data generators for GP-VAEs (paper 004), framework-free numpy; nothing is downloaded.

* :func:`moving_ball`: black-and-white videos of a ball whose 2-D trajectory is
  drawn from a GP with a squared-exponential kernel in time (Pearce, 2020): by
  default 30 frames of 32 x 32 pixels, ball radius 3, kernel lengthscale 2.
* :func:`rotated_digits`: scikit-learn's bundled handwritten digits (the offline
  stand-in for MNIST) rotated to evenly spaced angles in ``[0, 2 pi)``, with the
  rotation angle and the source-image id as auxiliary inputs (Casale et al., 2018).

References:

1. M. Pearce. The Gaussian process prior VAE for interpretable latent dynamics
   from pixels. AABI 2020.
2. F. P. Casale et al. Gaussian process prior variational autoencoders. NeurIPS 2018.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MovingBallData", "RotatedDigitsData", "moving_ball", "rotated_digits"]


@dataclass
class MovingBallData:
    """Moving-ball videos.

    :ivar videos: ``(num_videos, num_frames, size, size)`` pixel values in ``{0, 1}``.
    :ivar trajectories: ``(num_videos, num_frames, 2)`` ball centres in pixel
        coordinates (column ``x``, row ``y``).
    :ivar paths: ``(num_videos, num_frames, 2)`` the GP draws before scaling to pixels.
    :ivar times: ``(num_frames,)`` the frame times ``0, 1, ..., num_frames - 1``.
    """

    videos: np.ndarray
    trajectories: np.ndarray
    paths: np.ndarray
    times: np.ndarray


@dataclass
class RotatedDigitsData:
    """Rotated digit images with their auxiliary inputs.

    :ivar images: ``(N, size, size)`` pixel values in ``[0, 1]``.
    :ivar angles: ``(N,)`` rotation angles in radians, in ``[0, 2 pi)``.
    :ivar ids: ``(N,)`` index of the source image (``0 .. num_images - 1``), the
        key of a learned per-digit embedding.
    :ivar angle_index: ``(N,)`` index of the angle in ``angle_grid``.
    :ivar angle_grid: ``(num_angles,)`` the angles used.
    :ivar labels: ``(N,)`` the digit class of each image.
    """

    images: np.ndarray
    angles: np.ndarray
    ids: np.ndarray
    angle_index: np.ndarray
    angle_grid: np.ndarray
    labels: np.ndarray


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if int(value) != value or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def moving_ball(num_videos: int, *, num_frames: int = 30, size: int = 32, radius: float = 3.0,
                lengthscale: float = 2.0, seed: int = 0, dtype=np.float64) -> MovingBallData:
    """Videos of a ball moving along 2-D GP trajectories.

    Each coordinate of the path is an independent draw from
    :math:`\\mathcal{GP}(0, k)` at the frame times :math:`t = 0, \\dots, T-1`,

    .. math::

        k(t, t') = \\exp\\Big(-\\frac{(t - t')^2}{2 \\ell^2}\\Big), \\qquad
        c_t = \\frac{\\mathrm{size} - 1}{2} + \\frac{\\mathrm{size}}{6} p_t,

    clipped so that the whole ball stays inside the frame; pixel :math:`(r, c)`
    is on when :math:`(c - c_{t,x})^2 + (r - c_{t,y})^2 \\le \\mathrm{radius}^2`.

    .. note:: Cost: ``O(T^3 + V T size^2)`` time for ``V`` videos of ``T`` frames.
    """
    num_videos = _check_positive_int("num_videos", num_videos)
    num_frames = _check_positive_int("num_frames", num_frames)
    size = _check_positive_int("size", size)
    if not radius > 0 or 2 * radius >= size - 1:
        raise ValueError(f"radius: must be in (0, (size - 1) / 2), got {radius!r}")
    if not lengthscale > 0:
        raise ValueError(f"lengthscale: must be positive, got {lengthscale!r}")
    rng = np.random.default_rng(seed)
    t = np.arange(num_frames, dtype=np.float64)
    K = np.exp(-0.5 * (t[:, None] - t[None, :]) ** 2 / lengthscale**2)
    L = np.linalg.cholesky(K + 1e-8 * np.eye(num_frames))
    paths = np.einsum("ts,vsc->vtc", L, rng.standard_normal((num_videos, num_frames, 2)))
    centre = (size - 1) / 2.0
    traj = np.clip(centre + size / 6.0 * paths, radius, size - 1 - radius)
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    d2 = ((cols[None, None] - traj[..., 0, None, None]) ** 2
          + (rows[None, None] - traj[..., 1, None, None]) ** 2)
    videos = (d2 <= radius**2).astype(dtype)
    return MovingBallData(videos, traj.astype(dtype), paths.astype(dtype), t.astype(dtype))


def rotated_digits(*, digit: int | None = 3, num_images: int | None = None, num_angles: int = 16,
                   size: int = 16, seed: int = 0, dtype=np.float64) -> RotatedDigitsData:
    """scikit-learn's 8 x 8 handwritten digits, upsampled and rotated.

    Every selected image is upsampled to ``size x size`` (bilinear) and rotated by
    each angle :math:`2 \\pi j / J`, :math:`j = 0, \\dots, J-1` (bilinear, about the
    image centre, zero fill), giving ``N = num_images * num_angles`` images, ordered
    image-major. Pixel values are scaled to ``[0, 1]``.

    :param digit: keep only this class (``None``: all ten classes).
    :param num_images: keep this many images of the class (drawn with ``seed``;
        ``None``: all of them).
    :param num_angles: ``J``, the number of rotations per image.
    :param size: side of the output images.

    .. note:: Cost: ``O(N size^2)`` time and memory.
    """
    from scipy import ndimage
    from sklearn.datasets import load_digits

    num_angles = _check_positive_int("num_angles", num_angles)
    size = _check_positive_int("size", size, minimum=8)
    raw = load_digits()
    images, labels = raw.images / 16.0, raw.target
    if digit is not None:
        if digit not in range(10):
            raise ValueError(f"digit: must be in 0..9 or None, got {digit!r}")
        keep = np.flatnonzero(labels == digit)
    else:
        keep = np.arange(len(labels))
    if num_images is not None:
        num_images = _check_positive_int("num_images", num_images)
        if num_images > len(keep):
            raise ValueError(f"num_images: only {len(keep)} images available, got {num_images}")
        keep = np.sort(np.random.default_rng(seed).choice(keep, num_images, replace=False))
    base = np.stack([ndimage.zoom(images[i], size / 8.0, order=1) for i in keep])
    grid = 2 * np.pi * np.arange(num_angles) / num_angles
    out = np.empty((len(keep), num_angles, size, size))
    for j, a in enumerate(grid):
        out[:, j] = ndimage.rotate(base, np.degrees(a), axes=(2, 1), reshape=False, order=1,
                                   mode="constant", cval=0.0)
    out = np.clip(out, 0.0, 1.0).reshape(-1, size, size)
    n = len(keep)
    ids = np.repeat(np.arange(n), num_angles)
    angle_index = np.tile(np.arange(num_angles), n)
    return RotatedDigitsData(out.astype(dtype), grid[angle_index].astype(dtype), ids, angle_index,
                             grid.astype(dtype), labels[keep][ids])
