"""numpyro_scalegp.async_svi.distributed_proximal_svi: the delayed proximal algorithm across 3
jax.distributed processes on 127.0.0.1 (one server, two workers; messages over TCP, rendezvous
through jax.distributed with gloo CPU collectives), in fresh subprocesses: synchronous mode equals
in-process proximal gradient descent step for step, and a rank that dies is named within seconds."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.test_advgp_async_numpyro import MINIBATCHES, data, new_model, proximal_gd

pytestmark = pytest.mark.usefixtures("jax_x64")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# argv: rank, coordinator port, num_steps, max_delay, gradients after which rank 2 kills itself (0: never),
# minibatch size (0: whole shards), checkpoint file ("": none)
SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    rank, port, num_steps, max_delay, die_after, batch_size = (int(a) for a in sys.argv[1:7])
    checkpoint = sys.argv[7] or None
    # short jax.distributed timeouts: after a process died, its own shutdown gives up quickly
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=3, process_id=rank,
                               initialization_timeout=60, heartbeat_timeout_seconds=10,
                               shutdown_timeout_seconds=5)
    from numpyro_scalegp.async_svi import PeerFailedError, distributed_proximal_svi
    from scalegp.async_server import ConnectionChannel
    from tests.test_advgp_async_numpyro import MINIBATCHES, OPTIM, SHARDS, data, new_model
    from tests.test_advgp_async_server import crash_after

    def report(**fields):
        print(json.dumps(dict(fields, rank=rank, time=time.time())), flush=True)

    if rank == 2 and die_after:  # a crash right after sending its die_after-th gradient
        crash_after(ConnectionChannel, "send", die_after, report)
    X, y, Z = data()
    batching = dict(MINIBATCHES, batch_size=batch_size, shards=SHARDS) if batch_size else {}
    try:
        result = distributed_proximal_svi(new_model(Z), X, y, num_steps, max_delay=max_delay, optim=OPTIM,
                                          checkpoint=checkpoint, **batching)
    except PeerFailedError as exc:
        report(event="error", message=str(exc))
        raise SystemExit(1)  # jax.distributed's own shutdown then gives up within its timeouts
    if rank == 0:
        report(event="done", losses=result["losses"], staleness=result["staleness"],
               version=result["state"]["version"], resumed_from=result.get("resumed_from"),
               params={k: np.asarray(v).tolist() for k, v in result["state"]["params"].items()})
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(num_steps: int, max_delay: int, die_after: int = 0, timeout: float = 150,
            checkpoint: str = "", batch_size: int = 0) -> list[list[dict]]:
    """Run the 3 processes; the JSON lines each printed, by rank."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [str(_free_port()), str(num_steps), str(max_delay), str(die_after), str(batch_size), checkpoint]
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(rank), *args], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(3)]
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            outputs.append(([json.loads(line) for line in stdout.splitlines() if line.startswith("{")],
                            proc.returncode, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def test_three_processes_synchronous_equal_proximal_gradient_descent_step_for_step():
    steps = 5
    (server, rc, err), *workers = _launch(steps, 0)
    assert rc == 0, err[-3000:]
    assert all(w[1] == 0 for w in workers), [w[2][-2000:] for w in workers]
    (done,) = server
    _assert_proximal_gradient_descent(done, steps)


def test_three_processes_with_minibatches_equal_stochastic_proximal_gradient_descent():
    steps = 4
    (server, rc, err), *workers = _launch(steps, 0, batch_size=MINIBATCHES["batch_size"])
    assert rc == 0, err[-3000:]
    assert all(w[1] == 0 for w in workers), [w[2][-2000:] for w in workers]
    (done,) = server
    assert done["version"] == steps and done["staleness"] == [0] * steps and np.all(np.isfinite(done["losses"]))
    X, y, Z = data()
    expected = proximal_gd(new_model(Z), X, y, steps, **MINIBATCHES)[-1]
    for name, value in expected.items():
        np.testing.assert_allclose(done["params"][name], np.asarray(value), rtol=1e-10, atol=1e-13, err_msg=name)


def _assert_proximal_gradient_descent(done: dict, steps: int) -> None:
    """The server's report equals ``steps`` of in-process synchronous proximal gradient descent."""
    assert done["version"] == steps and done["staleness"] == [0] * steps
    X, y, Z = data()
    model = new_model(Z)
    history = proximal_gd(model, X, y, steps)
    # the loss of update t is the negative ELBO at theta_t: equal at every step
    expected_losses = [float(model.loss(X, y))] + [float(model.loss(X, y, params=p)) for p in history[:-1]]
    np.testing.assert_allclose(done["losses"], expected_losses, rtol=1e-10)
    for name, value in history[-1].items():
        np.testing.assert_allclose(done["params"][name], np.asarray(value), rtol=1e-10, atol=1e-13, err_msg=name)


def test_a_rank_that_dies_is_named_within_seconds():
    start = time.time()
    (server, rc0, err0), (worker, rc1, err1), (dying, rc2, _) = _launch(10**6, 0, die_after=3)
    (killed,) = dying
    assert rc2 == 3
    (error,) = server
    assert error["event"] == "error", err0[-3000:]
    assert error["message"].startswith("rank 2 (worker 1) died")
    # it died after its gradient of version 2: noticed before or after that update
    assert error["message"].endswith(("stopped at version 2", "stopped at version 3"))
    assert error["time"] - killed["time"] < 3.0  # named within seconds of the death, no hang
    # the surviving worker is told why the run stopped
    (stopped,) = worker
    assert stopped["event"] == "error", err1[-3000:]
    assert stopped["message"].startswith("rank 0 (the server) stopped the run: rank 2 (worker 1) died")
    assert stopped["time"] - killed["time"] < 3.0
    # both exit with an error (1, or an abort by jax.distributed's coordination service, which
    # notices the dead process too); the whole run, start-up included, stays well under a minute or two
    assert rc0 != 0 and rc1 != 0
    assert time.time() - start < 120


def test_relaunched_after_a_crash_the_run_goes_on_from_its_checkpoint(tmp_path):
    """A worker crashes mid-run; relaunching the job (as a scheduler would) restarts every process,
    the dead worker on its own shard, and the server resumes from the checkpoint: the run ends
    exactly as uninterrupted synchronous proximal gradient descent, losses included."""
    steps, checkpoint = 6, str(tmp_path / "advgp.ckpt")
    (server, rc0, err0), _, (dying, rc2, _) = _launch(steps, 0, die_after=3, checkpoint=checkpoint)
    assert rc2 == 3 and rc0 != 0 and server[0]["event"] == "error", err0[-3000:]
    (server, rc, err), *workers = _launch(steps, 0, checkpoint=checkpoint)
    assert rc == 0, err[-3000:]
    assert all(w[1] == 0 for w in workers), [w[2][-2000:] for w in workers]
    (done,) = server
    assert done["resumed_from"] in (2, 3)  # the worker died after its gradient of version 2
    _assert_proximal_gradient_descent(done, steps)


def test_requires_jax_distributed():
    from numpyro_scalegp.async_svi import distributed_proximal_svi

    X, y, Z = data()
    with pytest.raises(ValueError, match="jax.distributed"):
        distributed_proximal_svi(new_model(Z), X, y, 1)
