"""distributed_proximal_svi (issue 4, part 3): the delayed proximal algorithm over torch.distributed
(gloo, point-to-point) with 3 processes on 127.0.0.1: one server, two workers; a rank that dies is
named by the others within seconds."""
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
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_scalegp import async_svi
from pyro_scalegp.async_svi import PeerFailedError, distributed_proximal_svi
from tests.test_advgp_async import MINIBATCHES, OPTIM, SHARDS, data, new_model, proximal_gd
from tests.test_advgp_async_server import crash_after


pytestmark = pytest.mark.usefixtures("float64", "pyro_clean")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank, world, port, out, max_delay, num_steps, batching):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        X, y, Z = data()
        result = distributed_proximal_svi(new_model(Z), X, y, num_steps, max_delay=max_delay, optim=OPTIM,
                                          **batching)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("max_delay, batching", [(0, {}), (2, {}), (0, MINIBATCHES)],
                         ids=["synchronous", "max_delay 2", "synchronous minibatches"])
def test_three_local_processes(tmp_path, max_delay, batching):
    out = str(tmp_path / "result.pt")
    steps = 5
    options = dict(batching, shards=SHARDS) if batching else {}
    mp.spawn(_process, args=(3, _free_port(), out, max_delay, steps, options), nprocs=3, join=True)
    result = torch.load(out, weights_only=False)
    assert result["state"]["version"] == steps
    assert max(result["staleness"]) <= max_delay
    X, y, Z = data()
    assert all(np.isfinite(result["losses"]))
    if max_delay == 0:
        expected = proximal_gd(Z, X, y, steps, **batching)[-1]
        for name, value in result["state"]["params"].items():
            np.testing.assert_allclose(value.numpy(), expected[name].numpy(), rtol=1e-10, atol=1e-13, err_msg=name)
        assert result["staleness"] == [0] * steps
    if not batching:  # the loss is exact (with minibatches: an estimate)
        assert result["losses"][-1] < result["losses"][0]
        if max_delay == 0:
            assert result["losses"][0] == pytest.approx(new_model(Z).loss(X, y).item(), rel=1e-12)


def test_requires_a_process_group():
    X, y, Z = data()
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torch.distributed"):
        distributed_proximal_svi(new_model(Z), X, y, 1)


def _dying_process(rank, world, port, out_dir, die_after):
    """Like _process, but rank 2 crashes right after sending its die_after-th gradient; every rank
    writes what happened to out_dir/<rank>.json."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)

    def report(**fields):
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(dict(fields, time=time.time()), f)

    if rank == 2:
        crash_after(async_svi._DistributedChannel, "send", die_after, report)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    X, y, Z = data()
    try:
        distributed_proximal_svi(new_model(Z), X, y, 10**6, optim=OPTIM)
    except PeerFailedError as exc:
        report(event="error", message=str(exc))
        raise SystemExit(1)
    finally:
        dist.destroy_process_group()


def test_a_rank_that_dies_is_named_within_seconds(tmp_path):
    start = time.time()
    ctx = mp.start_processes(_dying_process, args=(3, _free_port(), str(tmp_path), 3), nprocs=3, join=False,
                             start_method="spawn")
    try:
        for proc in ctx.processes:
            proc.join(timeout=90)
        assert not any(proc.is_alive() for proc in ctx.processes), "a rank hangs"
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in ctx.processes] == [1, 1, 3]
    killed, server, worker = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (2, 0, 1))
    # it died after its gradient of version 2: noticed before or after that update
    assert server["message"].startswith("rank 2 (worker 1) died")
    assert server["message"].endswith(("stopped at version 2", "stopped at version 3"))
    assert worker["message"].startswith("rank 0 (the server) stopped the run")
    assert server["time"] - killed["time"] < 3.0 and worker["time"] - killed["time"] < 3.0
    assert time.time() - start < 90


# argv: output file, checkpoint file, num_steps; rank 2 crashes after its 3rd gradient in the first attempt
TORCHRUN_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    from pyro_scalegp import async_svi
    from tests.test_advgp_async import OPTIM, data, new_model
    from tests.test_advgp_async_server import crash_after

    out, checkpoint, num_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    # the agent's store outlives an attempt: a prefix per attempt keeps the last one's addresses out
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    if dist.get_rank() == 2 and attempt == 0:
        crash_after(async_svi._DistributedChannel, "send", 3, lambda **_: None)
    X, y, Z = data()
    result = async_svi.distributed_proximal_svi(new_model(Z), X, y, num_steps, optim=OPTIM, checkpoint=checkpoint)
    if dist.get_rank() == 0:
        torch.save(dict(result, attempt=attempt), out)
    dist.destroy_process_group()
""")


def test_torchrun_restarts_the_ranks_after_a_worker_dies_and_the_run_goes_on(tmp_path):
    """A worker crashes; ``torchrun --max-restarts=1`` restarts every rank and the server goes on from
    the checkpoint: the run ends exactly as uninterrupted synchronous proximal gradient descent."""
    steps = 6
    out, checkpoint = tmp_path / "result.pt", tmp_path / "advgp.ckpt"
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "--max-restarts=1",
         "--monitor-interval=0.5", str(script), str(out), str(checkpoint), str(steps)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:  # a hang must not leave ranks behind: on SIGTERM torchrun stops its ranks (own sessions)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    result = torch.load(out, weights_only=False)
    assert result["attempt"] == 1  # the second attempt finished the run
    assert result["resumed_from"] in (2, 3)  # the worker died after its gradient of version 2
    assert result["state"]["version"] == steps and result["staleness"] == [0] * steps
    X, y, Z = data()
    history = proximal_gd(Z, X, y, steps)
    for name, value in result["state"]["params"].items():
        np.testing.assert_allclose(value.numpy(), history[-1][name].numpy(), rtol=1e-10, atol=1e-13, err_msg=name)
    # the loss of update t is the negative ELBO at theta_t, before and after the restart
    model = new_model(Z)
    expected_losses = [model.loss(X, y).item()]
    for params in history[:-1]:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name])
        expected_losses.append(model.loss(X, y).item())
    np.testing.assert_allclose(result["losses"], expected_losses, rtol=1e-10)
