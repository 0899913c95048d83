"""Tests of the GP-VAE data generators in scalegp.vae_data."""
from __future__ import annotations

import numpy as np
import pytest

from scalegp.vae_data import moving_ball, rotated_digits


def test_moving_ball_shapes_and_pixels():
    data = moving_ball(5, seed=1)
    assert data.videos.shape == (5, 30, 32, 32)
    assert data.trajectories.shape == (5, 30, 2) and data.paths.shape == (5, 30, 2)
    np.testing.assert_array_equal(data.times, np.arange(30))
    assert set(np.unique(data.videos)) <= {0.0, 1.0}
    # every frame shows one whole disc of radius 3: the lattice points within it (29 when
    # centred on a pixel) and its pixel centroid at the trajectory
    counts = data.videos.sum((-1, -2))
    assert counts.min() >= 21 and counts.max() <= 32
    rows, cols = np.mgrid[0:32, 0:32]
    cx = (data.videos * cols).sum((-1, -2)) / counts
    cy = (data.videos * rows).sum((-1, -2)) / counts
    np.testing.assert_allclose(cx, data.trajectories[..., 0], atol=0.35)
    np.testing.assert_allclose(cy, data.trajectories[..., 1], atol=0.35)
    # the disc is exactly the set of pixels within the radius of the centre
    v, t = 2, 7
    c = data.trajectories[v, t]
    disc = (cols - c[0]) ** 2 + (rows - c[1]) ** 2 <= 9.0
    np.testing.assert_array_equal(data.videos[v, t], disc)


def test_moving_ball_paths_follow_the_se_kernel():
    data = moving_ball(3000, seed=2, size=12, radius=2.0)  # small frames: only the paths matter here
    p = data.paths.reshape(-1, 30, 2).transpose(0, 2, 1).reshape(-1, 30)  # (6000, 30) draws
    cov = p.T @ p / len(p)
    t = np.arange(30.0)
    K = np.exp(-0.5 * (t[:, None] - t[None, :]) ** 2 / 4.0)
    # standard error of a covariance estimate from 6000 draws is at most sqrt(2/6000) = 0.018
    np.testing.assert_allclose(cov, K, atol=0.08)
    assert abs(np.diag(cov, 1).mean() - np.exp(-1 / 8)) < 0.02
    assert abs(np.diag(cov, 4).mean() - np.exp(-2)) < 0.02


def test_moving_ball_seeded_and_validated():
    a, b = moving_ball(2, seed=3), moving_ball(2, seed=3)
    np.testing.assert_array_equal(a.videos, b.videos)
    assert not np.array_equal(a.videos, moving_ball(2, seed=4).videos)
    small = moving_ball(1, num_frames=10, size=20, radius=2.0, seed=0)
    assert small.videos.shape == (1, 10, 20, 20)
    for kwargs, name in [({"num_videos": 0}, "num_videos"), ({"num_videos": 1, "radius": 20.0}, "radius"),
                         ({"num_videos": 1, "lengthscale": -1.0}, "lengthscale"),
                         ({"num_videos": 1, "num_frames": 0}, "num_frames")]:
        with pytest.raises(ValueError, match=name):
            moving_ball(**kwargs)


def test_rotated_digits():
    data = rotated_digits(digit=3, num_images=10, num_angles=8, size=16, seed=0)
    assert data.images.shape == (80, 16, 16)
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0
    assert (data.labels == 3).all()
    np.testing.assert_array_equal(data.ids, np.repeat(np.arange(10), 8))
    np.testing.assert_allclose(data.angles, 2 * np.pi * np.tile(np.arange(8), 10) / 8)
    np.testing.assert_allclose(data.angle_grid[data.angle_index], data.angles)
    imgs = data.images.reshape(10, 8, 16, 16)
    # angle 0 is the upsampled original; a half turn is the original flipped on both axes;
    # a quarter turn maps pixel centres onto pixel centres, so it is a transpose-and-flip
    from scipy import ndimage
    from sklearn.datasets import load_digits

    raw = load_digits()
    idx = np.sort(np.random.default_rng(0).choice(np.flatnonzero(raw.target == 3), 10, replace=False))
    np.testing.assert_allclose(imgs[:, 0], np.clip(
        np.stack([ndimage.zoom(raw.images[i] / 16.0, 2.0, order=1) for i in idx]), 0, 1), atol=1e-12)
    np.testing.assert_allclose(imgs[:, 4], imgs[:, 0, ::-1, ::-1], atol=1e-9)
    quarter = imgs[:, 2]
    assert np.allclose(quarter, np.rot90(imgs[:, 0], 1, axes=(1, 2)), atol=1e-9) or np.allclose(
        quarter, np.rot90(imgs[:, 0], -1, axes=(1, 2)), atol=1e-9)
    # rotations differ from each other
    assert np.abs(imgs[:, 1] - imgs[:, 0]).mean() > 0.02


def test_rotated_digits_all_classes_and_errors():
    data = rotated_digits(digit=None, num_images=30, num_angles=2, size=8, seed=1)
    assert data.images.shape == (60, 8, 8)
    assert len(np.unique(data.labels)) > 3
    with pytest.raises(ValueError, match="digit"):
        rotated_digits(digit=11)
    with pytest.raises(ValueError, match="num_images"):
        rotated_digits(digit=3, num_images=10_000)
    with pytest.raises(ValueError, match="num_angles"):
        rotated_digits(num_angles=0)
