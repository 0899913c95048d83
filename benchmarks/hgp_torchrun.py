"""Train an HGP across ``torch.distributed`` ranks: each rank owns a data shard and its experts.

Launch from the repository root on one machine (two ranks, gloo on 127.0.0.1)::

    torchrun --standalone --nproc_per_node=2 -m benchmarks.hgp_torchrun --quick
    torchrun --standalone --nproc_per_node=2 -m benchmarks.hgp_torchrun --data flights --num-train 40000

or across machines with ``torchrun --nnodes=M --node_rank=i --rdzv_endpoint=HOST:PORT ...``.
Run without ``torchrun`` (``python -m benchmarks.hgp_torchrun``) it trains as a single rank.

Every rank takes its slice of the training rows (here: rows ``rank::world`` of a seeded
permutation; on a cluster each rank would read only its own file), partitions it into experts
with :func:`scalegp.partition`, and builds ``HGPMarginal(..., distributed=True)`` over its local
data. ``log_prob`` then returns the *global* HGP objective on every rank and its backward pass
the *global* gradient (one ``all_reduce`` per step), so the ranks, started from the same
hyperparameters, take identical Adam steps; the script checks that they still agree at the end.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import pyro
import pyro.contrib.gp as gp
import torch
import torch.distributed as tdist

from pyro_scalegp import HGPMarginal
from scalegp import gp_draws, load_flights, partition


def _init() -> tuple[int, int]:
    if "RANK" not in os.environ:  # plain `python hgp_torchrun.py`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
    tdist.init_process_group("gloo")
    return tdist.get_rank(), tdist.get_world_size()


def _data(args, rank: int, world: int):
    """This rank's training rows (and the true lengthscale for synthetic data)."""
    if args.data == "flights":
        data = load_flights(num_train=args.num_train, seed=args.seed)
        X, y, truth = data.X_train, data.y_train, None
    else:
        X, y, _ = gp_draws(args.num_train, args.dims, lengthscale=args.true_lengthscale, noise=0.05, seed=args.seed)
        truth = args.true_lengthscale
    order = np.random.default_rng(args.seed).permutation(len(X))[rank::world]
    return torch.as_tensor(X[order]), torch.as_tensor(y[order]), truth


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=("synthetic", "flights"), default="synthetic")
    p.add_argument("--num-train", type=int, default=20_000, help="training rows over all ranks")
    p.add_argument("--dims", type=int, default=4, help="input dimensions of the synthetic data")
    p.add_argument("--true-lengthscale", type=float, default=0.8)
    p.add_argument("--expert-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes (also when the env var CI is set)")
    args = p.parse_args(argv)
    if args.quick or os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        args.num_train, args.expert_size, args.steps = min(args.num_train, 2000), min(args.expert_size, 100), 20

    torch.set_default_dtype(torch.float64)
    rank, world = _init()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    X, y, truth = _data(args, rank, world)
    experts = partition(X.numpy(), expert_size=args.expert_size, method="kdtree", seed=args.seed + rank)
    N_global = torch.tensor(float(len(y)))
    tdist.all_reduce(N_global)

    pyro.clear_param_store()
    d = X.shape[1]
    kernel = gp.kernels.RBF(d, variance=torch.tensor(1.0), lengthscale=torch.ones(d))
    log_noise = torch.tensor(math.log(0.1), requires_grad=True)
    params = list(kernel.parameters()) + [log_noise]
    opt = torch.optim.Adam(params, lr=args.lr)
    if rank == 0:
        print(f"{world} rank(s); rank 0 holds {len(y)} of {int(N_global)} rows in {experts.num_experts} experts "
              f"of {experts.expert_size}", flush=True)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        opt.zero_grad()
        hgp = HGPMarginal(kernel, X, log_noise.exp(), experts=experts, distributed=True)
        loss = -hgp.log_prob(y) / N_global  # the global objective on every rank
        loss.backward()  # global gradients on every rank
        opt.step()
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == 1):
            print(f"step {step:4d}  loss/N {loss.item():.4f}  noise {log_noise.exp().item():.4f}  "
                  f"lengthscale {[round(v, 3) for v in kernel.lengthscale.detach().tolist()]}  "
                  f"{time.perf_counter() - start:.1f} s", flush=True)

    flat = torch.cat([q.detach().reshape(-1) for q in params])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    tdist.all_gather(gathered, flat)
    spread = float(max((g - flat).abs().max() for g in gathered))
    result = {"world": world, "loss_per_point": loss.item(), "noise": log_noise.exp().item(),
              "lengthscale": kernel.lengthscale.detach().tolist(), "seconds": time.perf_counter() - start,
              "max_param_spread_across_ranks": spread}
    if rank == 0:
        print(f"ranks agree on the hyperparameters to {spread:.1e}")
        if truth is not None:
            print(f"true lengthscale {truth}, learned {[round(v, 3) for v in result['lengthscale']]}")
    tdist.destroy_process_group()
    if spread > 1e-12:
        raise RuntimeError(f"ranks diverged: hyperparameters differ by {spread:.2e}")
    return result


if __name__ == "__main__":
    main()
