"""numpyro_scalegp.HGPMarginal sharded over devices and across jax.distributed processes.

Device counts are fixed when JAX starts, so every case runs in a fresh subprocess:
2 forced host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``) for the
sharded case, and 2 processes joined by :func:`jax.distributed.initialize` on 127.0.0.1
(CPU collectives through gloo) for the multi-process case. Each compares the value, the
gradient and the predictions with the in-process evaluation (``workers=0``).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# shared by every subprocess: a small problem, evaluated with a given `workers`
COMMON = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax, jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)

    def evaluate(workers):
        from numpyro_scalegp import HGPMarginal, kernels
        from scalegp import partition
        rng = np.random.default_rng(0)
        X = rng.uniform(-2, 2, (84, 2))
        y = np.sin(X).sum(1) + 0.3 * rng.standard_normal(84)
        Xs = rng.uniform(-2, 2, (5, 2))
        experts = partition(X, expert_size=12, method="kdtree", seed=1).with_tree([3])  # 7 experts

        def loss(p):
            k = kernels.Matern52(2, p["variance"], p["lengthscale"])
            return HGPMarginal(k, X, p["noise"], experts=experts, mean=p["mean"], workers=workers,
                               chunk_size=2).log_prob(y)

        p = {"variance": 1.3, "lengthscale": jnp.array([0.7, 1.1]), "noise": 0.1, "mean": 0.2}
        value, grads = jax.jit(jax.value_and_grad(loss))(p)
        eager = loss(p)
        d = HGPMarginal(kernels.Matern52(2, 1.3, p["lengthscale"]), X, 0.1, experts=experts, mean=0.2,
                        workers=workers)
        pred = d.predict(y, Xs, combine="rbcm")
        batch = jax.jit(jax.vmap(lambda ls: loss(dict(p, lengthscale=ls))))(jnp.stack([p["lengthscale"],
                                                                                       2 * p["lengthscale"]]))
        return {"value": float(value), "eager": float(eager),
                "grads": {k: np.asarray(v).tolist() for k, v in grads.items()},
                "mean": np.asarray(pred.mean).tolist(), "variance": np.asarray(pred.variance).tolist(),
                "batch": np.asarray(batch).tolist(), "devices": len(jax.devices()),
                "processes": jax.process_count()}
""")


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _run(script: str, env, timeout: float = 240) -> dict:
    out = subprocess.run([sys.executable, "-c", COMMON + script], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_same(a: dict, b: dict):
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-12)
    np.testing.assert_allclose(a["eager"], b["value"], rtol=1e-12)
    for key in b["grads"]:
        np.testing.assert_allclose(a["grads"][key], b["grads"][key], rtol=1e-10, err_msg=key)
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-10)
    np.testing.assert_allclose(a["variance"], b["variance"], rtol=1e-10)
    np.testing.assert_allclose(a["batch"], b["batch"], rtol=1e-12)


@pytest.fixture(scope="module")
def in_process() -> dict:
    return _run("print(json.dumps(evaluate(0)))", _env())


def test_sharded_over_two_devices_equals_in_process(in_process):
    script = textwrap.dedent("""
        results = {w: evaluate(w) for w in (1, 2, -1)}
        assert results[2]["devices"] == 2
        # the experts are really split: each device's shard holds 4 of the 8 (7 + 1 padding) experts
        from numpyro_scalegp.hgp import _mesh
        assert _mesh(2).devices.size == 2
        print(json.dumps({str(k): v for k, v in results.items()}))
    """)
    results = _run(script, _env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    for workers in ("1", "2", "-1"):
        _assert_same(results[workers], in_process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_jax_distributed_equal_single_process(in_process):
    port = _free_port()
    script = textwrap.dedent(f"""
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                                   process_id=int(sys.argv[1]), initialization_timeout=60)
        result = evaluate(-1)
        assert result["processes"] == 2 and result["devices"] == 2
        print(json.dumps(result))
    """)
    env = _env()
    procs = [subprocess.Popen([sys.executable, "-c", COMMON + script, str(rank)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = []
    try:
        for rank, proc in enumerate(procs):
            stdout, stderr = proc.communicate(timeout=240)
            assert proc.returncode == 0, f"rank {rank}:\n{stderr[-3000:]}"
            outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for result in outputs:  # every process sees the global value and gradient
        _assert_same(result, in_process)
