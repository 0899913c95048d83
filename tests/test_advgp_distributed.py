"""distributed_proximal_svi (issue 4, part 3): the delayed proximal algorithm over torch.distributed
(gloo, point-to-point) with 3 processes on 127.0.0.1: one server, two workers."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyro_scalegp.async_svi import distributed_proximal_svi
from tests.test_advgp_async import OPTIM, data, new_model, proximal_gd


pytestmark = pytest.mark.usefixtures("float64", "pyro_clean")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank, world, port, out, max_delay, num_steps):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        X, y, Z = data()
        result = distributed_proximal_svi(new_model(Z), X, y, num_steps, max_delay=max_delay, optim=OPTIM)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("max_delay", [0, 2])
def test_three_local_processes(tmp_path, max_delay):
    out = str(tmp_path / "result.pt")
    steps = 5
    mp.spawn(_process, args=(3, _free_port(), out, max_delay, steps), nprocs=3, join=True)
    result = torch.load(out, weights_only=False)
    assert result["state"]["version"] == steps
    assert max(result["staleness"]) <= max_delay
    X, y, Z = data()
    if max_delay == 0:
        expected = proximal_gd(Z, X, y, steps)[-1]
        for name, value in result["state"]["params"].items():
            np.testing.assert_allclose(value.numpy(), expected[name].numpy(), rtol=1e-10, atol=1e-13, err_msg=name)
        assert result["staleness"] == [0] * steps
        assert result["losses"][0] == pytest.approx(new_model(Z).loss(X, y).item(), rel=1e-12)
    assert all(np.isfinite(result["losses"]))
    assert result["losses"][-1] < result["losses"][0]


def test_requires_a_process_group():
    X, y, Z = data()
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torch.distributed"):
        distributed_proximal_svi(new_model(Z), X, y, 1)
