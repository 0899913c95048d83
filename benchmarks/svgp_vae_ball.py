"""Moving ball (paper 004, section 4.1): latent trajectory error of SVGP-VAE against the number of
inducing points, beside the exact GP-VAE (Pearce 2020) and a plain VAE, in one run.

Each video (30 frames of 32 x 32, a ball of radius 3 on a 2-D GP trajectory with an SE kernel
of lengthscale 2, from :func:`scalegp.vae_data.moving_ball`) is one GP data set: auxiliary input
the frame time, ``b = N = 30`` (no minibatching within a video, as in the paper); the networks,
kernel and inducing points are shared across videos and trained by Pyro ``SVI`` with
``Trace_ELBO`` on one video per step. Metric: on held-out videos, the posterior mean latents
(every frame of a video encoded, :meth:`condition`, then :meth:`latent` at the frame times; the
encoder mean for the VAE) are mapped to the true trajectories by one least-squares affine map
over all test frames; reported is the RMSE of the mapped latents in pixels, and the learned
kernel lengthscale (the generating one is 2). All models: same encoder / decoder architecture,
same initialization, same number of steps, Bernoulli likelihood, latent dimension 2.

With ``--seeds``, every model runs once per seed (its own videos and network initialization) and
rows with seed ``mean`` average the error over the seeds (one seed's ranking is not robust).
``svgp_vae_ball.png`` plots the mean error against ``M`` (+-1 sd) with the two baselines as
horizontal lines.

Run: ``python -m benchmarks.svgp_vae_ball --seeds 0 1 2 3 4 5 --jobs 2 --threads 1`` (``--jobs``: seeds
in parallel processes; ``--quick`` or ``CI`` for a smoke test).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyro
import pyro.contrib.gp as gp
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_scalegp.svgp_vae import SVGPVAE, ExactGPVAE
from scalegp.vae_data import moving_ball

from .common import Timer, parser, quick_mode, set_threads, write_results

LATENT = 2


class Encoder(torch.nn.Module):
    def __init__(self, pixels: int, hidden: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(pixels, hidden), torch.nn.Tanh())
        self.loc = torch.nn.Linear(hidden, LATENT)
        self.scale = torch.nn.Linear(hidden, LATENT)

    def forward(self, y):
        h = self.body(y.reshape(y.shape[0], -1))
        return self.loc(h), torch.nn.functional.softplus(self.scale(h)) + 1e-3


class Decoder(torch.nn.Module):
    def __init__(self, size: int, hidden: int):
        super().__init__()
        self.size = size
        self.net = torch.nn.Sequential(torch.nn.Linear(LATENT, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, size * size))

    def forward(self, z):
        return self.net(z).reshape(z.shape[0], self.size, self.size)


def affine_rmse(latents: np.ndarray, truth: np.ndarray) -> float:
    """RMSE (pixels) of the least-squares affine map from latents ``(n, 2)`` to truth ``(n, 2)``."""
    A = np.concatenate([latents, np.ones((len(latents), 1))], 1)
    coef, *_ = np.linalg.lstsq(A, truth, rcond=None)
    return float(np.sqrt(((A @ coef - truth) ** 2).sum(1).mean()))


def nets(size, hidden, seed):
    torch.manual_seed(seed)
    return Encoder(size * size, hidden), Decoder(size, hidden)


def train(model, guide, batches, steps, lr):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    with Timer() as t:
        losses = [svi.step(*batches[i % len(batches)]) for i in range(steps)]
    return float(np.mean(losses[-len(batches):])), t.seconds


def run_gpvae(kind, M, train_set, test_set, t, args, size):
    pyro.clear_param_store()
    enc, dec = nets(size, args.hidden, args.seed)
    kern = gp.kernels.RBF(1, variance=torch.tensor(1.0), lengthscale=torch.tensor(args.init_lengthscale))
    if kind == "exact":
        vae = ExactGPVAE(enc, dec, kern, latent_dim=LATENT)
        guide = vae.guide
    else:
        Z = torch.linspace(0.0, float(t[-1]), M).unsqueeze(-1)
        vae = SVGPVAE(enc, dec, kern, Z, num_data=len(t), latent_dim=LATENT)
        guide = vae.guide
    batches = [(t, torch.as_tensor(v)) for v in train_set.videos]
    loss, secs = train(vae.model, guide, batches, args.steps, args.lr)
    latents = []
    with torch.no_grad():
        for v in test_set.videos:
            latents.append(vae.condition(t, torch.as_tensor(v)).latent(t).mean.numpy())
        ls = float(pyro.param("guide.kernel.lengthscale" if kind != "exact" else "kernel.lengthscale"))
    rmse = affine_rmse(np.concatenate(latents), test_set.trajectories.reshape(-1, 2))
    return {"model": "exact GP-VAE" if kind == "exact" else "SVGP-VAE", "M": M if kind != "exact" else len(t),
            "rmse_px": rmse, "lengthscale": ls, "final_loss": loss, "train_s": secs,
            "s_per_epoch": secs / args.steps * len(batches)}


def run_vae(train_set, test_set, args, size):
    pyro.clear_param_store()
    enc, dec = nets(size, args.hidden, args.seed)

    def model(Y):
        pyro.module("decoder", dec)
        with pyro.plate("data", Y.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(Y.shape[0], LATENT), 1.0).to_event(1))
            pyro.sample("y", dist.Bernoulli(logits=dec(z)).to_event(2), obs=Y)

    def guide(Y):
        pyro.module("encoder", enc)
        loc, scale = enc(Y)
        with pyro.plate("data", Y.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    batches = [(torch.as_tensor(v),) for v in train_set.videos]
    loss, secs = train(model, guide, batches, args.steps, args.lr)
    with torch.no_grad():
        latents = np.concatenate([enc(torch.as_tensor(v))[0].numpy() for v in test_set.videos])
    rmse = affine_rmse(latents, test_set.trajectories.reshape(-1, 2))
    return {"model": "VAE", "M": None, "rmse_px": rmse, "lengthscale": None, "final_loss": loss,
            "train_s": secs, "s_per_epoch": secs / args.steps * len(batches)}


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (model, M) over the seeds: mean and sample standard deviation of the error."""
    out = []
    for key in dict.fromkeys((r["model"], r["M"]) for r in rows):
        errs = np.array([r["rmse_px"] for r in rows if (r["model"], r["M"]) == key])
        out.append({"model": key[0], "M": key[1], "seed": "mean", "rmse_px": float(errs.mean()),
                    "rmse_sd": float(errs.std(ddof=1)) if len(errs) > 1 else 0.0, "seeds": len(errs)})
    return out


def plot(rows, path):
    """Trajectory RMSE against the number of inducing points (mean over seeds, +-1 sd); the
    baselines as horizontal lines with their +-1 sd bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sv = [r for r in rows if r["model"] == "SVGP-VAE"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.errorbar([r["M"] for r in sv], [r["rmse_px"] for r in sv], yerr=[r["rmse_sd"] for r in sv], fmt="o-",
                capsize=3, label="SVGP-VAE")
    for r, style in zip([r for r in rows if r["model"] != "SVGP-VAE"], ("C1--", "C2:")):
        ax.axhline(r["rmse_px"], color=style[:2], linestyle=style[2:], label=r["model"])
        ax.axhspan(r["rmse_px"] - r["rmse_sd"], r["rmse_px"] + r["rmse_sd"], color=style[:2], alpha=0.12)
    ax.set_xlabel("inducing points M")
    ax.set_ylabel("trajectory RMSE after affine map (pixels)")
    ax.set_title(f"mean over {sv[0]['seeds']} seed(s)" if sv else "")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_seed(args, seed: int) -> list[dict]:
    """Every model on the videos of one seed (data and network initialization); ``args.threads``
    torch threads (also when it runs in a ``--jobs`` worker process)."""
    args = argparse.Namespace(**vars(args) | {"seed": seed})
    set_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    data = moving_ball(2 * args.videos, seed=seed)
    train_set = type(data)(data.videos[:args.videos], data.trajectories[:args.videos],
                           data.paths[:args.videos], data.times)
    test_set = type(data)(data.videos[args.videos:], data.trajectories[args.videos:],
                          data.paths[args.videos:], data.times)
    t = torch.as_tensor(data.times).unsqueeze(-1)
    size = data.videos.shape[-1]
    rows = [run_gpvae("svgp", M, train_set, test_set, t, args, size) for M in args.inducing]
    rows.append(run_gpvae("exact", None, train_set, test_set, t, args, size))
    rows.append(run_vae(train_set, test_set, args, size))
    for r in rows:
        r["seed"] = seed
        print(r, flush=True)
    return rows


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=35, help="training videos (as many test videos)")
    p.add_argument("--steps", type=int, default=6000, help="SVI steps (one video each)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--init-lengthscale", type=float, default=1.0)
    p.add_argument("--inducing", type=int, nargs="+", default=[5, 10, 15, 20, 30])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run every model once per seed (videos and initialization); default: --seed")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at once, each in its own process")
    args = p.parse_args(argv)
    if quick_mode(args):
        args.videos, args.steps, args.hidden, args.inducing = 4, 20, 32, [5, 15]
    seeds = args.seeds or [args.seed]
    if args.jobs > 1:  # seeds in parallel processes (each with --threads threads)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(args.jobs, len(seeds)), mp_context=context) as pool:
            rows = [r for rs in pool.map(run_seed, [args] * len(seeds), seeds) for r in rs]
    else:
        rows = [r for seed in seeds for r in run_seed(args, seed)]
    summary = summarize(rows)
    for r in summary:
        print(r, flush=True)
    notes = (f"{args.videos} training and {args.videos} test videos per seed, {args.steps} SVI steps (one video "
             f"each), Adam lr {args.lr}, hidden {args.hidden}, initial lengthscale {args.init_lengthscale}; "
             "rmse_px: RMSE in pixels of the test posterior mean latents after one least-squares affine map "
             f"to the true trajectories. Seeds {seeds} (each: its own videos and network initialization); "
             "the rows with seed 'mean' average them (rmse_sd: sample standard deviation).")
    write_results("svgp_vae_ball", rows + summary, out=args.out, meta=vars(args) | {"seeds": seeds}, notes=notes,
                  columns=["model", "M", "seed", "rmse_px", "rmse_sd", "lengthscale", "final_loss", "train_s",
                           "s_per_epoch"])
    plot(summary, os.path.join(args.out, "svgp_vae_ball.png"))


if __name__ == "__main__":
    main()
