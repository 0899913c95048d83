"""Training and prediction of the torch HGP as the benchmarks run it.

:func:`fit_hgp` maximizes the HGP log marginal likelihood (the sum of the experts' exact log
marginals) over the kernel hyperparameters (variance, ARD lengthscales) and the noise with
L-BFGS (strong-Wolfe line search), in unconstrained (log) coordinates, on the per-point loss
``-log p(y) / N``, with the noise kept above :data:`NOISE_FLOOR`. Stopping criterion (torch's L-BFGS): ``max_iter`` iterations or
``1.5 max_iter + 5`` function evaluations, or earlier when the loss or every parameter changes by
less than ``tol`` in one iteration, or the gradient's largest entry falls below ``1e-5``.

:func:`predict_rules` predicts the test targets (noise included) with each combination rule.
:func:`fit_and_evaluate` (the flights benchmarks) holds out calibration rows, trains, and reports each
rule as trained and with its variances scaled by :func:`variance_scale`, fitted on the held-out rows.
GRBCM needs experts that share a communication expert; the hyperparameters are trained once,
on the partition given to :func:`fit_hgp`, and GRBCM predicts with them on a second partition
of the same training data built with ``communication=True`` (same expert size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from scalegp import partition

from .baselines import INIT
from .common import Timer, progress

#: lower bound of the noise variance (standardized data): keeps K + noise I positive definite
#: with duplicated inputs, whatever L-BFGS's line search tries
NOISE_FLOOR = 1e-4

__all__ = ["HGPFit", "make_kernel", "hyperparameters_in_range", "fit_hgp", "predict_rules", "variance_scale",
           "fit_and_evaluate"]


@dataclass
class HGPFit:
    kernel: object
    noise: torch.Tensor
    experts: object
    X: torch.Tensor
    y: torch.Tensor
    losses: list = field(default_factory=list)
    iterations: int = 0
    evaluations: int = 0
    train_s: float = float("nan")
    partition_s: float = float("nan")
    settings: dict = field(default_factory=dict)

    def hyperparameters(self) -> dict:
        with torch.no_grad():
            return {"variance": float(self.kernel.variance), "noise": float(self.noise),
                    "lengthscale": [round(float(v), 4) for v in self.kernel.lengthscale.reshape(-1)]}


def make_kernel(kernel: str, d: int, *, lengthscale: float = INIT["lengthscale"],
                variance: float = INIT["variance"], dtype=torch.float64):
    """A ``pyro.contrib.gp`` kernel with ARD lengthscales, its parameters in ``dtype`` (not torch's
    default dtype, float32 unless set)."""
    import pyro.contrib.gp as gp

    cls = {"rbf": gp.kernels.RBF, "matern32": gp.kernels.Matern32, "matern52": gp.kernels.Matern52}
    if kernel not in cls:
        raise ValueError(f"kernel: unknown kernel {kernel!r}; use one of {sorted(cls)}")
    return cls[kernel](input_dim=d, variance=torch.tensor(float(variance), dtype=dtype),
                       lengthscale=torch.full((d,), float(lengthscale), dtype=dtype))


LOG_BOUND = 50.0


def hyperparameters_in_range(kernel) -> bool:
    """Whether the kernel's lengthscales and variance lie within ``exp(+-LOG_BOUND)``. L-BFGS line
    searches can try wild points (log-lengthscales of -196 seen on the flights); past the bound the
    kernel's entries are 0, 1 or NaN (an overflowing scaled distance), so such a trial is rejected
    instead of evaluated."""
    with torch.no_grad():
        logs = torch.cat([kernel.lengthscale.reshape(-1), kernel.variance.reshape(-1)]).log()
        return bool((logs.abs() <= LOG_BOUND).all())  # False for NaN too


def fit_hgp(X, y, *, kernel: str = "rbf", expert_size: int = 512, duplication: int = 1,
            method: str = "kdtree", max_iter: int = 30, tol: float = 1e-6, seed: int = 0,
            noise: float = INIT["noise"], lengthscale: float = INIT["lengthscale"],
            variance: float = INIT["variance"], workers: int = 0, show_progress: bool = True,
            desc: str = "HGP L-BFGS") -> HGPFit:
    """Partition ``X`` into experts of ``expert_size`` (:func:`scalegp.partition`) and train the HGP
    hyperparameters by L-BFGS."""
    import pyro

    from pyro_scalegp import HGPMarginal, NotPositiveDefiniteError

    X = torch.as_tensor(np.asarray(X))
    y = torch.as_tensor(np.asarray(y))
    N, d = X.shape
    with Timer() as t_part:
        experts = partition(X.numpy(), method=method, expert_size=expert_size, duplication=duplication,
                                 seed=seed)
    pyro.clear_param_store()
    k = make_kernel(kernel, d, lengthscale=lengthscale, variance=variance, dtype=X.dtype)
    log_noise = torch.tensor(math.log(noise - NOISE_FLOOR), dtype=X.dtype, requires_grad=True)
    params = list(k.parameters()) + [log_noise]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.5) + 5,
                            tolerance_grad=1e-5, tolerance_change=tol, history_size=20,
                            line_search_fn="strong_wolfe")
    fit = HGPFit(k, log_noise, experts, X, y, partition_s=t_part.seconds,
                 settings={"kernel": kernel, "expert_size": expert_size, "num_experts": experts.num_experts,
                           "duplication": duplication, "partition": method, "max_iter": max_iter,
                           "tol": tol, "optimizer": "L-BFGS strong Wolfe", "workers": workers})
    bar = progress(total=opt.defaults["max_eval"], desc=desc, disable=not show_progress)

    def rejected():
        """A line-search trial point too far out: a huge loss makes the strong-Wolfe search step back."""
        for p in params:
            p.grad = torch.zeros_like(p)
        fit.evaluations += 1
        bar.update(1)
        return torch.tensor(1e10, dtype=X.dtype)

    def closure():
        opt.zero_grad()
        if not hyperparameters_in_range(k):
            return rejected()
        dist = HGPMarginal(k, X, NOISE_FLOOR + log_noise.exp(), experts=experts, workers=workers)
        try:
            loss = -dist.log_prob(y) / N
        except NotPositiveDefiniteError:  # e.g. a vanishing noise with duplicated inputs
            return rejected()
        loss.backward()
        fit.evaluations += 1
        fit.losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{fit.losses[-1]:.4f}", iter=opt.state[opt._params[0]].get("n_iter", 0))
        bar.update(1)
        return loss

    with Timer() as t_train:
        opt.step(closure)  # runs up to max_iter iterations (the bar counts function evaluations)
    bar.close()
    fit.iterations = int(opt.state[opt._params[0]].get("n_iter", 0))
    if not math.isfinite(fit.losses[-1]):
        raise RuntimeError(f"fit_hgp: the loss became {fit.losses[-1]} after {fit.iterations} iterations")
    fit.noise = NOISE_FLOOR + log_noise.detach().exp()
    fit.train_s = t_train.seconds + t_part.seconds
    return fit


def predict_rules(fit: HGPFit, X_test, *, rules=("poe", "gpoe", "bcm", "rbcm", "grbcm"),
                  communication_seed: int = 1, show_progress: bool = True) -> dict:
    """Predictive ``(mean, variance, seconds)`` of the noisy test targets for each rule.

    The experts' predictions are computed once and combined by each rule (what
    ``HGPMarginal.predict(y, X, combine=rule)`` does for one rule); a rule's seconds are the
    shared expert predictions plus its combination. GRBCM predicts with
    ``HGPMarginal.predict`` on a second partition with a communication expert (same expert
    size, random assignment), with the hyperparameters trained by :func:`fit_hgp`.
    """
    from pyro_scalegp import HGPMarginal
    from scalegp import combine

    Xt = torch.as_tensor(np.asarray(X_test))
    out = {}
    rules = list(rules)
    shared = [r for r in rules if r != "grbcm"]
    with torch.no_grad():
        dist = HGPMarginal(fit.kernel, fit.X, fit.noise, experts=fit.experts)
        if shared:
            with Timer() as t_experts:
                # the experts' latent predictions, shared by every rule but GRBCM
                index = torch.as_tensor(fit.experts.index)
                prior_mean = torch.zeros(len(Xt), dtype=Xt.dtype)
                n = fit.experts.expert_size
                chunk = max(1, (1 << 24) // (n * n))  # experts per batch and test points per block,
                test_chunk = max(1, (1 << 24) // (n * chunk))  # the sizes HGPMarginal.predict uses
                with progress(total=len(index), desc="HGP experts", unit="expert", disable=not show_progress) as bar:
                    means, variances = dist._expert_predictions(fit.y, index, Xt, prior_mean, test_chunk, bar)
                prior_var = dist.kernel.diag(Xt)
        for rule in progress(rules, desc="HGP predict", disable=not show_progress):
            with Timer() as t:
                if rule == "grbcm":
                    method = fit.settings["partition"]
                    comm = partition(fit.X.numpy(), method="random" if method == "kdtree" else method,
                                          expert_size=fit.experts.expert_size, communication=True,
                                          seed=communication_seed)
                    pred = HGPMarginal(fit.kernel, fit.X, fit.noise, experts=comm).predict(fit.y, Xt, combine=rule)
                    mean, var = pred.mean, pred.variance
                else:
                    mean, var = combine(torch, rule, means, variances, prior_mean, prior_var,
                                        tree=fit.experts.tree)
                    var = var + fit.noise
            seconds = t.seconds + (t_experts.seconds if rule != "grbcm" else 0.0)
            out[rule] = (mean.numpy().copy(), var.numpy().copy(), seconds)
    return out


def variance_scale(y, mean, var) -> float:
    """The factor ``s`` that minimizes the mean negative log density of ``N(mean, s var)`` over
    held-out targets ``y``: ``s = mean((y - mean)^2 / var)`` (a one-parameter recalibration,
    as in Levi et al. 2019 and Laves et al. 2020).

    For the HGP this is a re-estimate of the amplitude: multiplying the kernel variance and the
    noise by ``s`` leaves every expert's predictive mean unchanged and multiplies every expert's
    variance, and the prior's, by ``s``; every combination rule weighs experts by variance ratios
    only, so its combined mean stays and its variance (noise included) is multiplied by ``s``.
    The trained HGP has the amplitude of maximum marginal likelihood, which on heavy-tailed
    targets (the flight delays) makes it overconfident away from the training points.
    """
    y, mean, var = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (y, mean, var))
    return float(np.mean((y - mean) ** 2 / var))


def fit_and_evaluate(data, *, rules=("poe", "gpoe", "bcm", "rbcm", "grbcm"), calibration_rows: int = 4000,
                     seed: int = 0, show_progress: bool = True, **fit_kwargs) -> tuple[HGPFit, list[dict], dict]:
    """Train the HGP on ``data``'s training rows less ``calibration_rows`` random ones, predict the
    held-out rows and the test rows with every rule, and return the fit and two metric rows per
    rule: ``"HGP <rule>"`` as trained and ``"HGP <rule> cal"`` with the variance scaled by
    :func:`variance_scale` of the held-out rows (``calibration_rows=0``: the first kind only, on
    every training row). Rows carry ``rmse``, ``nlpd`` (:func:`benchmarks.common.gaussian_metrics`),
    ``train_s`` (a ``cal`` row's includes predicting the held-out rows), ``predict_s`` (the test
    rows), ``wall_s``, ``n_train``, ``scale``. The third value maps each rule to its test means.
    """
    from .common import gaussian_metrics

    N = len(data.y_train)
    held = np.zeros(N, dtype=bool)
    if calibration_rows:
        held[np.random.default_rng(seed).choice(N, calibration_rows, replace=False)] = True
    fit = fit_hgp(data.X_train[~held], data.y_train[~held], seed=seed, show_progress=show_progress, **fit_kwargs)
    X_pred = np.concatenate([data.X_train[held], data.X_test])
    n_test = len(data.y_test)
    n_fit = int((~held).sum())
    rows, means = [], {}
    for rule, (mean, var, secs) in predict_rules(fit, X_pred, rules=rules,
                                                 show_progress=show_progress).items():
        test_s = secs * n_test / len(X_pred)  # the held-out rows' share of the prediction is calibration
        means[rule] = mean[-n_test:]
        versions = [(f"HGP {rule}", 1.0, fit.train_s)]
        if calibration_rows:
            scale = variance_scale(data.y_train[held], mean[:-n_test], var[:-n_test])
            versions.append((f"HGP {rule} cal", scale, fit.train_s + secs - test_s))
        for name, scale, train_s in versions:
            row = {"method": name, "n_train": n_fit, "scale": scale}
            row.update(gaussian_metrics(data.y_test, mean[-n_test:], scale * var[-n_test:], y_std=data.y_std))
            row.update({"train_s": train_s, "predict_s": test_s, "wall_s": train_s + test_s})
            rows.append(row)
    return fit, rows, means
