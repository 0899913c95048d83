"""Speed of one HGP value + gradient: ours against autograd through the Cholesky and against the floor.

The case of the HGP issue: ``E = 200`` experts of ``n = 512`` points in ``d = 8`` dimensions,
float64, RBF kernel with ARD lengthscales, gradient with respect to every kernel
hyperparameter and the noise. Three ways to get the same objective's value and gradient:

* ``hgp``: :class:`pyro_scalegp.HGPMarginal` (analytic gradient accumulated chunk by chunk, one
  batched Cholesky and inverse per chunk of experts, chunks spread over threads) / :class:`numpyro_scalegp.HGPMarginal` (``custom_vjp``);
* ``autograd``: the same sum of exact log marginals written with ``torch.linalg.cholesky`` /
  ``jnp.linalg.cholesky`` and differentiated by autograd / ``jax.grad`` through the factorization;
* ``floor``: only the batched Cholesky and the inverse from it (``cholesky_inverse`` /
  ``cho_solve`` against the identity) of the same ``(E, n, n)`` blocks, precomputed: no kernel
  evaluation, no gradient. Any exact method needs at least this.
* ``floor_blocked`` (JAX): the same floor with the inverse from the factor by the blocked
  ``potri`` of :func:`numpyro_scalegp.hgp._cholesky_inverses` (what ``HGPMarginal`` uses;
  JAX has no ``cholesky_inverse``). The JAX ratio is taken against the faster of the two floors.
* ``floor_split`` (torch): the same floor with the blocks split into chunks over threads, one
  intra-op thread each, exactly as ``HGPMarginal`` runs its chunks
  (:func:`pyro_scalegp.hgp.map_chunks`): the floor under our threading, so that ``hgp /
  floor_split`` shows the cost of everything but the factorization and inverse.

Each (framework, method) runs in a fresh subprocess (peak RSS of that process is reported);
times are medians of ``--repeats`` calls after one warm-up. Targets (issue 2): ``hgp`` within
1.5x of ``floor`` and at least 4x faster than ``autograd``.

Run: ``python -m benchmarks.hgp_speed`` (about 2-3 minutes on 2 cores), ``--quick`` for a smoke test.
"""
from __future__ import annotations

import math

import numpy as np

from .common import parser, quick_mode, run_isolated, write_results

NAME = "hgp_speed"


def _problem(E: int, n: int, d: int, seed: int):
    from scalegp import partition

    rng = np.random.default_rng(seed)
    X = rng.standard_normal((E * n, d))
    y = np.sin(X.sum(1)) + 0.3 * rng.standard_normal(E * n)
    experts = partition(X, expert_size=n, method="random", seed=seed)
    assert experts.index.shape == (E, n), experts.index.shape
    return X, y, experts


LENGTHSCALE, VARIANCE, NOISE = 1.5, 1.0, 0.1
JITTER = 1e-6  # HGPMarginal adds jitter only to an expert whose Cholesky fails (none does here)


def torch_case(method: str, E: int, n: int, d: int, repeats: int, threads: int, seed: int = 0) -> dict:
    """Median time of one value+gradient (or of the floor) with torch, in this process."""
    import torch

    from .common import timeit

    torch.set_num_threads(threads)
    X_np, y_np, experts = _problem(E, n, d, seed)
    X, y = torch.as_tensor(X_np), torch.as_tensor(y_np)
    idx = torch.as_tensor(experts.index)
    out: dict = {}
    if method in ("floor", "floor_split"):
        Xb = X[idx] / LENGTHSCALE
        r2 = torch.cdist(Xb, Xb).square()
        K = VARIANCE * torch.exp(-0.5 * r2) + NOISE * torch.eye(n, dtype=X.dtype)
        del Xb, r2

        def blocks(start=0, stop=None):
            L = torch.linalg.cholesky(K[start:stop])
            return torch.cholesky_inverse(L)

        if method == "floor":
            call = blocks
        else:  # the same work split over threads as HGPMarginal splits its expert chunks
            from pyro_scalegp.hgp import _chunk, map_chunks

            step = _chunk(None, n, E)

            def call():
                return map_chunks(lambda start: blocks(start, start + step), E, step)

        out["value"] = float("nan")
    else:
        import pyro
        import pyro.contrib.gp as gp

        pyro.clear_param_store()
        kernel = gp.kernels.RBF(input_dim=d, variance=torch.tensor(VARIANCE),
                                lengthscale=torch.full((d,), LENGTHSCALE))
        noise_u = torch.tensor(math.log(NOISE), requires_grad=True)
        params = list(kernel.parameters()) + [noise_u]
        if method == "hgp":
            from pyro_scalegp import HGPMarginal

            def objective():
                return HGPMarginal(kernel, X, noise_u.exp(), experts=experts, jitter=JITTER).log_prob(y)
        elif method == "autograd":
            Xb, yb = X[idx], y[idx]
            eye = torch.eye(n, dtype=X.dtype)

            def objective():
                Z = Xb / kernel.lengthscale
                z2 = Z.square().sum(-1)
                r2 = (z2[..., :, None] + z2[..., None, :] - 2 * Z @ Z.transpose(-1, -2)).clamp_min(0)
                K = kernel.variance * torch.exp(-0.5 * r2) + noise_u.exp() * eye
                L = torch.linalg.cholesky(K)
                a = torch.cholesky_solve(yb[..., None], L)[..., 0]
                return (-0.5 * (yb * a).sum() - torch.diagonal(L, dim1=-2, dim2=-1).log().sum()
                        - 0.5 * E * n * math.log(2 * math.pi))
        else:
            raise ValueError(f"method: unknown method {method!r}")

        def call():
            for p in params:
                p.grad = None
            value = objective()
            value.backward()
            return value

        value = call()
        out["value"] = float(value.detach())
        out["grad_norm"] = float(torch.cat([p.grad.reshape(-1) for p in params]).norm())
    out.update(timeit(call, repeats=repeats, warmup=1))
    out["threads"] = torch.get_num_threads()
    return out


def jax_case(method: str, E: int, n: int, d: int, repeats: int, threads: int, seed: int = 0) -> dict:
    """Median time of one jitted value+gradient (or of the floor) with JAX, in this process
    (XLA uses every core; ``threads`` is only recorded)."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from numpyro_scalegp import kernels

    from .common import timeit

    X_np, y_np, experts = _problem(E, n, d, seed)
    X, y = jnp.asarray(X_np), jnp.asarray(y_np)
    idx = jnp.asarray(experts.index)
    params = (jnp.asarray(VARIANCE), jnp.full((d,), LENGTHSCALE), jnp.asarray(math.log(NOISE)))
    out: dict = {}
    if method in ("floor", "floor_blocked"):
        from numpyro_scalegp.hgp import _cholesky_inverses

        k = kernels.RBF(d, VARIANCE, jnp.full((d,), LENGTHSCALE))
        Xb = X[idx]
        K = jax.block_until_ready(k(Xb) + NOISE * jnp.eye(n))

        @jax.jit
        def floor(K):  # no symmetrization pass (HGPMarginal skips it too: LAPACK reads one triangle)
            L = jax.lax.linalg.cholesky(K, symmetrize_input=False)
            if method == "floor_blocked":
                return _cholesky_inverses(L)
            return jax.scipy.linalg.cho_solve((L, True), jnp.broadcast_to(jnp.eye(n), K.shape))

        def call():
            return jax.block_until_ready(floor(K))

        out["value"] = float("nan")
    else:
        if method == "hgp":
            from numpyro_scalegp import HGPMarginal

            def objective(p):
                var, ls, log_noise = p
                return HGPMarginal(kernels.RBF(d, var, ls), X, jnp.exp(log_noise), experts=experts,
                                   jitter=JITTER).log_prob(y)
        elif method == "autograd":
            Xb, yb = X[idx], y[idx]

            def objective(p):
                var, ls, log_noise = p
                K = kernels.RBF(d, var, ls)(Xb) + jnp.exp(log_noise) * jnp.eye(n)
                L = jnp.linalg.cholesky(K)
                a = jax.scipy.linalg.cho_solve((L, True), yb[..., None])[..., 0]
                return (-0.5 * (yb * a).sum() - jnp.log(jnp.diagonal(L, axis1=-2, axis2=-1)).sum()
                        - 0.5 * E * n * math.log(2 * math.pi))
        else:
            raise ValueError(f"method: unknown method {method!r}")
        vg = jax.jit(jax.value_and_grad(objective))

        def call():
            return jax.block_until_ready(vg(params))

        value, grad = call()
        out["value"] = float(value)
        out["grad_norm"] = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grad))))
    out.update(timeit(call, repeats=repeats, warmup=1))
    out["threads"] = threads
    return out


def main(argv=None) -> list[dict]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=200)
    p.add_argument("--expert-size", type=int, default=512)
    p.add_argument("--dims", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--frameworks", default="torch,jax")
    args = p.parse_args(argv)
    if quick_mode(args):
        args.experts, args.expert_size, args.repeats = 8, 64, 2
    import os

    threads = args.threads or os.cpu_count() or 1
    E, n, d = args.experts, args.expert_size, args.dims
    rows = []
    for fw in args.frameworks.split(","):
        case = {"torch": torch_case, "jax": jax_case}[fw]
        res = {}
        for method in ("floor", "floor_split", "hgp", "autograd") if fw == "torch" else (
                "floor", "floor_blocked", "hgp", "autograd"):
            out, peak = run_isolated(case, method, E, n, d, args.repeats, threads, args.seed)
            res[method] = out
            row = {"framework": fw, "method": method, "median_s": out["median_s"], "min_s": out["min_s"],
                   "peak_rss_mib": peak, "value": out["value"], "grad_norm": out.get("grad_norm")}
            rows.append(row)
            print(f"{fw:6s} {method:9s} median {out['median_s']:.3f} s  (min {out['min_s']:.3f} s)"
                  f"  peak RSS {peak:.0f} MiB", flush=True)
        floor = min(res[m]["median_s"] for m in ("floor", "floor_blocked") if m in res)
        hgp, auto = (res[m]["median_s"] for m in ("hgp", "autograd"))
        for row in rows[-len(res):]:
            row["x_floor"] = row["median_s"] / floor
            row["x_hgp"] = row["median_s"] / hgp
        rel = abs(res["hgp"]["value"] - res["autograd"]["value"]) / abs(res["autograd"]["value"])
        split = f"; hgp / floor_split = {hgp / res['floor_split']['median_s']:.2f}" if "floor_split" in res else ""
        print(f"{fw}: hgp / floor = {hgp / floor:.2f} (target <= 1.5){split}; autograd / hgp = {auto / hgp:.2f}"
              f" (target >= 4); |value difference| / |value| = {rel:.1e}", flush=True)
    notes = (f"E={E} experts x n={n} points, d={d}, float64, RBF ARD; median of {args.repeats} after 1 warm-up; "
             f"{threads} threads. x_floor = time / floor time (JAX: the faster of floor and floor_blocked; "
             "target for hgp <= 1.5); "
             "x_hgp = time / hgp time (target for autograd >= 4). Each row in its own process; "
             "peak RSS includes the interpreter and imports.")
    write_results(NAME, rows, out=args.out, notes=notes,
                  meta={"experts": E, "expert_size": n, "dims": d, "repeats": args.repeats, "quick": quick_mode(args)},
                  columns=["framework", "method", "median_s", "min_s", "x_floor", "x_hgp", "peak_rss_mib", "value"])
    return rows


if __name__ == "__main__":
    main()
