"""Time per epoch against the data-set size N: SVGP-VAE (minibatches of fixed size ``b``, ``M``
inducing points; cost ``O(N / b * (b M^2 L + M^3 L))`` per epoch, linear in N) beside the exact
GP-VAE (Pearce 2020; one full-batch step per epoch, ``O(N^3 L)``) where it runs.

Data: rotated digits (:func:`scalegp.vae_data.rotated_digits`, all ten classes, 16 x 16) with as
many rotations as needed to reach N; model and training as in :mod:`benchmarks.svgp_vae_digits`
(``Product(Periodic, Linear)`` kernel over (angle, learned embedding), Gaussian likelihood, Pyro
``SVI`` with ``Trace_ELBO`` and Adam). Each size is timed over ``--epochs`` epochs after one
warm-up epoch; reported is the median seconds per epoch, and the exponent of a least-squares fit
``log t = a + p log N`` over the sizes (p = 1: linear).

``svgp_vae_epoch.png`` plots seconds per epoch against N on log-log axes.

Run: ``python -m benchmarks.svgp_vae_epoch`` (``--quick`` or ``CI`` for a smoke test).
"""
from __future__ import annotations

import math
import os
import statistics
import time

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_scalegp.svgp_vae import SVGPVAE, ExactGPVAE
from scalegp.vae_data import rotated_digits

from .common import parser, quick_mode, set_threads, write_results
from .svgp_vae_digits import Decoder, Encoder, batches, digits_kernel


def make_data(N: int, seed: int):
    """The first ``N`` images of all ten digit classes rotated to ``ceil(N / 1797)`` angles."""
    angles = max(1, math.ceil(N / 1797))
    data = rotated_digits(digit=None, num_angles=angles, seed=seed)
    if N > len(data.images):
        raise ValueError(f"N: at most {len(data.images)} rotated digits, got {N}")
    pick = np.random.default_rng(seed).choice(len(data.images), N, replace=False)
    return (torch.as_tensor(data.angles[pick]), torch.as_tensor(data.ids[pick]),
            torch.as_tensor(data.images[pick]), int(data.ids.max()) + 1)


def epoch_times(kind: str, N: int, args) -> list[float]:
    """Seconds of each timed epoch of ``kind`` (``"svgp"`` or ``"exact"``) on ``N`` points."""
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    angles, ids, Y, num_images = make_data(N, args.seed)
    size = Y.shape[-1]
    enc, dec = Encoder(size * size, args.hidden, args.latent), Decoder(size, args.hidden, args.latent)
    emb0 = 0.5 * torch.randn(num_images, args.embed)

    def inputs(i):
        return torch.cat([angles[i].unsqueeze(-1), pyro.param("embedding", emb0)[ids[i]]], -1)

    kern = digits_kernel(args.embed)
    if kind == "svgp":
        zi = torch.as_tensor(np.random.default_rng(args.seed).choice(N, args.inducing, replace=False))
        Z = torch.cat([angles[zi].unsqueeze(-1), emb0[ids[zi]]], -1)
        vae = SVGPVAE(enc, dec, kern, Z, num_data=N, latent_dim=args.latent, likelihood="gaussian", noise=0.05)
        batch = args.batch
    else:
        vae = ExactGPVAE(enc, dec, kern, latent_dim=args.latent, likelihood="gaussian", noise=0.05)
        batch = N

    def model(i):
        vae.model(inputs(i), Y[i])

    def guide(i):
        vae.guide(inputs(i), Y[i])

    svi = SVI(model, guide, pyro.optim.Adam({"lr": args.lr}), Trace_ELBO())
    rng = np.random.default_rng(args.seed)
    times = []
    for epoch in range(args.epochs + 1):  # the first epoch is a warm-up
        t0 = time.perf_counter()
        for b in batches(N, batch, rng):
            svi.step(b)
        times.append(time.perf_counter() - t0)
    return times[1:]


def slope(ns, ts) -> float:
    """Exponent ``p`` of the least-squares fit ``log t = a + p log N``."""
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0]) if len(ns) > 1 else float("nan")


def plot(rows, path):
    """Seconds per epoch against N (log-log), with the fitted exponent of each model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, style in (("SVGP-VAE", "o-"), ("exact GP-VAE", "s-")):
        sel = [r for r in rows if r["model"] == label]
        if sel:
            ax.loglog([r["N"] for r in sel], [r["s_per_epoch"] for r in sel], style,
                      label=f"{label} (slope {sel[0]['fit_exponent']:.2f})")
    ax.set_xlabel("N (rotated digits)")
    ax.set_ylabel("seconds per epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000, 16000, 28752])
    p.add_argument("--exact-max", type=int, default=2000,
                   help="largest N for the exact GP-VAE (N = 2000: about 95 s per epoch on one thread)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per size (after one warm-up)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--latent", type=int, default=8)
    p.add_argument("--embed", type=int, default=8)
    p.add_argument("--inducing", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    if quick_mode(args):
        args.sizes, args.exact_max, args.epochs, args.hidden, args.inducing = [200, 400], 400, 1, 32, 8
    set_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    rows = []
    for kind, label in (("svgp", "SVGP-VAE"), ("exact", "exact GP-VAE")):
        for N in args.sizes:
            if kind == "exact" and N > args.exact_max:
                continue
            times = epoch_times(kind, N, args)
            rows.append({"model": label, "N": N, "M": args.inducing if kind == "svgp" else N,
                         "batch": args.batch if kind == "svgp" else N, "s_per_epoch": statistics.median(times),
                         "us_per_point": 1e6 * statistics.median(times) / N})
            print(rows[-1], flush=True)
    exps = {label: slope([r["N"] for r in rows if r["model"] == label],
                         [r["s_per_epoch"] for r in rows if r["model"] == label])
            for label in ("SVGP-VAE", "exact GP-VAE")}
    for r in rows:
        r["fit_exponent"] = exps[r["model"]]
    notes = (f"Rotated digits (all classes, 16 x 16), latent {args.latent}, hidden {args.hidden}, embedding "
             f"{args.embed}; SVGP-VAE with M = {args.inducing}, batch {args.batch}; exact GP-VAE: one full-batch "
             f"step per epoch, run up to N = {args.exact_max}. s_per_epoch: median over {args.epochs} epochs after "
             "one warm-up; fit_exponent: p of log t = a + p log N over the sizes of that model (1: linear in N).")
    write_results("svgp_vae_epoch", rows, out=args.out, meta=vars(args), notes=notes)
    plot(rows, os.path.join(args.out, "svgp_vae_epoch.png"))


if __name__ == "__main__":
    main()
