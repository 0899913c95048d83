"""Smoke tests of the SVGP-VAE moving-ball, digits and epoch-timing benchmarks (--quick sizes)
and of the digits benchmark's data split."""
from __future__ import annotations

import json
import math

import numpy as np
import pyro
import pytest
import torch

from benchmarks import svgp_vae_ball, svgp_vae_digits, svgp_vae_epoch
from scalegp.vae_data import rotated_digits


@pytest.fixture(autouse=True)
def restore_torch_state():
    old = torch.get_default_dtype(), torch.get_num_threads()
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()
    torch.set_default_dtype(old[0])
    torch.set_num_threads(old[1])


def test_split_and_adjacent_views():
    data = rotated_digits(digit=3, num_images=3, num_angles=4, size=8)
    train, test = svgp_vae_digits.split(data, 3)
    assert len(test) == 3 and len(train) == 9 and not set(train) & set(test)
    assert (data.angle_index[test] == 3).all() and (data.angle_index[train] != 3).all()
    adj = svgp_vae_digits.adjacent(data, test)
    np.testing.assert_array_equal(data.ids[adj], data.ids[test])
    np.testing.assert_array_equal(data.angle_index[adj], 0)  # the next angle, wrapping around
    assert set(adj) <= set(train)
    with pytest.raises(ValueError, match="held_out"):
        svgp_vae_digits.split(data, 4)


def test_digits_quick(tmp_path):
    svgp_vae_digits.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "svgp_vae_digits.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["SVGP-VAE", "CVAE (z: mean over views)", "CVAE (z: adjacent view)",
                                          "reference: copy of adjacent view"]
    assert all(0.0 < r["mse"] < 1.0 for r in rows)
    best = min(rows[1]["mse"], rows[2]["mse"])
    assert rows[0]["mse_ratio_to_cvae"] == pytest.approx(rows[0]["mse"] / best)


def test_epoch_quick(tmp_path):
    svgp_vae_epoch.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "svgp_vae_epoch.json").read_text())["rows"]
    assert [(r["model"], r["N"]) for r in rows] == [("SVGP-VAE", 200), ("SVGP-VAE", 400),
                                                    ("exact GP-VAE", 200), ("exact GP-VAE", 400)]
    assert all(r["s_per_epoch"] > 0 and math.isfinite(r["fit_exponent"]) for r in rows)


def test_ball_quick(tmp_path):
    svgp_vae_ball.main(["--quick", "--threads", "1", "--seeds", "0", "1", "--jobs", "2", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "svgp_vae_ball.json").read_text())["rows"]
    per_seed = ["SVGP-VAE", "SVGP-VAE", "exact GP-VAE", "VAE"]
    assert [(r["model"], r["seed"]) for r in rows] == ([(m, 0) for m in per_seed] + [(m, 1) for m in per_seed]
                                                       + [(m, "mean") for m in per_seed])
    assert [r["M"] for r in rows[:2]] == [5, 15]
    assert all(math.isfinite(r["rmse_px"]) and r["rmse_px"] > 0 for r in rows)
    for k, mean in enumerate(rows[8:]):
        errs = [rows[k]["rmse_px"], rows[4 + k]["rmse_px"]]
        assert mean["rmse_px"] == pytest.approx(np.mean(errs)) and mean["rmse_sd"] == pytest.approx(np.std(errs, ddof=1))
    assert (tmp_path / "svgp_vae_ball.png").exists()
