"""scalegp.async_server: the framework-free protocol of delayed proximal gradient, tested on its own
with a numpy quadratic problem: a scripted transport (the update rule for max_delay 0 and k, tags,
restarts, stalls, failures), and real transports with in-thread workers (pipes, TCP sockets)."""
from __future__ import annotations

import functools
import multiprocessing
import os
import socket
import sys
import threading
import time
from multiprocessing import AuthenticationError, Pipe

import numpy as np
import pytest

from scalegp.async_server import (DEFAULT_AVERAGE_DECAY, MAX_RESTARTS, ConnectionChannel, ConnectionWorkers,
                                  PeerFailedError, ProximalServer, StalledWorkerWarning, accept_workers, averaging,
                                  batch_rows, check_options, connect_to_server, serve_gradients, standing_in)
from tests.reference import moving_average

GAMMA, LAM = 0.1, 0.5
CENTRES = [np.array([1.0, -2.0, 0.5]), np.array([-0.5, 3.0, 2.0]), np.array([2.0, 0.0, -1.0])]


class QuadraticServer(ProximalServer):
    """g_k(theta) = |theta - c_k|^2 / 2, h(theta) = LAM |theta|^2 / 2, proximal gradient steps."""

    def __init__(self, workers, **options):
        self.theta = np.zeros(3)
        self.used = []  # the versions of the gradients each update used
        self.scales = []  # each update's step_scale
        super().__init__(workers, **options)

    def _flat_parameters(self):
        return self.theta.copy()

    def _proximal_step(self, grad, step_scale):
        self.used.append(list(self._used))
        self.scales.append(step_scale)
        h = 0.5 * LAM * self.theta @ self.theta
        gamma = GAMMA * step_scale
        self.theta = (self.theta - gamma * grad) / (1 + gamma * LAM)
        return h

    def _checkpoint(self):
        return {"params": self.theta.copy(), "optim": {}}

    def _restore(self, state):
        self.theta = np.array(state["params"])


def reference(num_steps, centres=CENTRES):
    """Synchronous proximal gradient descent: the parameters after each step and each step's loss."""
    theta, history, losses = np.zeros(3), [], []
    for _ in range(num_steps):
        losses.append(sum(0.5 * (theta - c) @ (theta - c) for c in centres) + 0.5 * LAM * theta @ theta)
        theta = (theta - GAMMA * sum(theta - c for c in centres)) / (1 + GAMMA * LAM)
        history.append(theta)
    return history, losses


def gradient(theta, k):
    return 0.5 * (theta - CENTRES[k]) @ (theta - CENTRES[k]), theta - CENTRES[k]


def crash_after(cls, name: str, calls: int, report) -> None:
    """Fault injection for the multi-process tests: patch ``cls.name`` so that this process dies
    like a crash (``os._exit(3)``, no clean-up) right after its ``calls``-th call, having called
    ``report(event="killed")``."""
    method, done = getattr(cls, name), []

    def patched(self, *args):
        result = method(self, *args)
        done.append(1)
        if len(done) == calls:
            report(event="killed")
            os._exit(3)
        return result

    setattr(cls, name, patched)


# ---- a scripted transport: the test decides what arrives when ---------------------------------------
class Scripted:
    """Each poll returns the next scripted list of events, or sleeps a scripted number of seconds;
    running out of script means the server waited where the test expected an update."""

    def __init__(self, num_workers, script=(), *, restartable=True, can_compute_here=False):
        self.num_workers, self.restartable = num_workers, restartable
        self.can_compute_here = can_compute_here
        self.computed = []  # (worker, version) of compute_here's calls
        self.script = list(script)
        self.sent, self.versions, self.restarted, self.closed = [], [], [], None

    def describe(self, k):
        return f"fake {k}"

    def send(self, k, tag, version, flat):
        self.sent.append((k, tag))
        self.versions.append(version)

    def poll(self, timeout):
        if not self.script:
            raise AssertionError("the server waited for an event the test did not script")
        item = self.script.pop(0)
        if isinstance(item, float):
            time.sleep(item)
            return []
        return item

    def restart(self, k):
        self.restarted.append(k)

    def compute_here(self, k, version, flat):
        self.computed.append((k, version))
        return gradient(flat, k)

    def close(self, abort=None):
        self.closed = ("abort", abort) if abort else ("stop",)


def grad_event(k, tag, theta):
    value, grad = gradient(theta, k)
    return ("grad", k, tag, value, grad)


def test_max_delay_0_waits_for_every_worker_at_the_current_version():
    workers = Scripted(2)
    server = QuadraticServer(workers, max_delay=0, stall_timeout=60)
    assert workers.sent == [(0, 1), (1, 1)]  # the initial parameters (tag 1 = version 0) to both
    theta0 = server.theta.copy()
    workers.script = [[grad_event(0, 1, theta0)], [grad_event(1, 1, theta0)]]
    server.step()  # needs both
    assert workers.script == [] and server.version == 1 and server.used == [[0, 0]]
    assert workers.sent[2:] == [(0, 2), (1, 2)] and workers.versions == [0, 0, 1, 1]  # version 1 to both
    theta1 = server.theta.copy()
    # a gradient of version 0 after the update is stale: not enough, and the worker gets version 1
    workers.script = [[grad_event(0, 1, theta0)], [grad_event(0, 2, theta1), grad_event(1, 2, theta1)]]
    with pytest.raises(AssertionError, match="did not script"):
        QuadraticServer(Scripted(2, [[grad_event(0, 1, theta0)]]), max_delay=0, stall_timeout=60).step()
    server.step()
    assert server.used[-1] == [1, 1] and server.staleness == [0, 0]
    history, _ = reference(2, CENTRES[:2])
    np.testing.assert_allclose(server.theta, history[1], rtol=1e-15)


def test_max_delay_k_updates_without_a_straggler_until_it_is_k_versions_behind():
    k = 2
    workers = Scripted(2)
    server = QuadraticServer(workers, max_delay=k, stall_timeout=60)
    theta = server.theta.copy()
    workers.script = [[grad_event(0, 1, theta), grad_event(1, 1, theta)]]
    server.step()  # both at version 0
    for version in range(1, k + 1):  # worker 1 straggles: worker 0 alone drives k more updates
        workers.script = [[grad_event(0, version + 1, server.theta)]]
        server.step()
        assert server.used[-1] == [version, 0]
    assert server.staleness == [0, 1, 2]
    # version k + 1: worker 1's gradient of version 0 is now too old; a fresh one from worker 0 is not enough
    workers.script = [[grad_event(0, k + 2, server.theta)]]
    with pytest.raises(AssertionError, match="did not script"):
        server.step()
    workers.script = [[grad_event(1, 2, server.theta)]]  # its gradient of version 1 will do
    server.step()
    assert server.used[-1] == [k + 1, 1] and server.staleness[-1] == k
    # the straggler was sent the newest parameters when its stale gradient came back
    assert (1, server._tag - 1) in workers.sent


@pytest.mark.parametrize("shrink", [True, False])
def test_delayed_updates_divide_their_steps_by_one_plus_the_mean_delay(shrink):
    workers = Scripted(2)
    server = QuadraticServer(workers, max_delay=2, stall_timeout=60, shrink_stale_steps=shrink)
    thetas = [server.theta.copy()]
    workers.script = [[grad_event(0, 1, thetas[0]), grad_event(1, 1, thetas[0])]]
    server.step()
    for version in (1, 2):  # worker 1 straggles with its gradient of version 0
        thetas.append(server.theta.copy())
        workers.script = [[grad_event(0, version + 1, thetas[-1])]]
        server.step()
    assert server.staleness == [0, 1, 2]
    # mean delays 0, 1/2, 1: (version - (version + 0) / 2)
    assert server.scales == pytest.approx([1.0, 2 / 3, 1 / 2] if shrink else [1.0] * 3, rel=1e-15)
    # the same updates by hand: prox of the summed delayed gradients, step GAMMA / (1 + mean delay)
    theta = np.zeros(3)
    for version, scale in zip((0, 1, 2), server.scales):
        grad = gradient(thetas[version], 0)[1] + gradient(thetas[0], 1)[1]
        theta = (theta - GAMMA * scale * grad) / (1 + GAMMA * scale * LAM)
    np.testing.assert_allclose(server.theta, theta, rtol=1e-15)


def test_dead_worker_is_restarted_counted_and_resent_the_newest_parameters():
    workers = Scripted(2)
    server = QuadraticServer(workers, max_delay=0, stall_timeout=60)
    theta = server.theta.copy()
    workers.script = [[grad_event(0, 1, theta), ("dead", 1, "exit code -9")], [grad_event(1, 1, theta)]]
    with pytest.warns(RuntimeWarning, match=r"fake 1 died \(exit code -9\); restarted on its shard at version 0"):
        server.step()
    assert workers.restarted == [1] and server.restarts == [(1, 0)]
    assert workers.sent[:3] == [(0, 1), (1, 1), (1, 1)]  # resent version 0 after the restart
    assert server.version == 1


def test_worker_that_keeps_dying_without_a_gradient_stops_the_run():
    theta = np.zeros(3)
    dead = [("dead", 1, "exit code 1")]
    # a gradient in between resets the count: three deaths, a gradient, three more deaths
    workers = Scripted(2, [[grad_event(0, 1, theta)], dead, dead, dead, [grad_event(1, 1, theta)]])
    server = QuadraticServer(workers, max_delay=0, stall_timeout=60)
    with pytest.warns(RuntimeWarning, match="restarted"):
        server.step()
    assert server.version == 1 and workers.restarted == [1, 1, 1]
    workers.script = [dead, dead, dead, dead]
    with pytest.warns(RuntimeWarning, match="restarted"), pytest.raises(
            PeerFailedError, match=rf"fake 1 died {MAX_RESTARTS + 1} times without sending a gradient in between "
                                   r"\(last: exit code 1\); the server stopped at version 1"):
        server.step()
    assert workers.restarted == [1] * (2 * MAX_RESTARTS) and workers.closed[0] == "abort"


def test_dead_worker_that_cannot_be_restarted_stops_the_run_naming_it():
    workers = Scripted(2, [[("dead", 1, "its connection closed")]], restartable=False)
    server = QuadraticServer(workers, max_delay=0, stall_timeout=60)
    with pytest.raises(PeerFailedError, match=r"^fake 1 died \(its connection closed\); the server stopped at version 0"):
        server.step()
    assert workers.closed[0] == "abort" and workers.closed[1].startswith("fake 1 died")
    with pytest.raises(RuntimeError, match="closed"):
        server.step()


def test_worker_error_stops_the_run_with_its_traceback():
    workers = Scripted(1, [[("error", 0, "Traceback: boom")]])
    server = QuadraticServer(workers, max_delay=0, stall_timeout=60)
    with pytest.raises(PeerFailedError, match="fake 0 failed:\nTraceback: boom"):
        server.step()


def test_non_finite_gradient_is_refused_naming_the_worker():
    theta = np.zeros(3)
    value, grad = gradient(theta, 1)
    grad[2] = np.nan
    workers = Scripted(2, [[grad_event(0, 1, theta), ("grad", 1, 1, value, grad)]])
    server = QuadraticServer(workers, max_delay=0, stall_timeout=60)
    with pytest.raises(FloatingPointError, match=r"from fake 1 \(computed at version 0\); .* stays at version 0"):
        server.step()
    assert server.version == 0 and server.used == [] and np.all(server.theta == 0)


def test_stalled_worker_is_reported_once_and_only_while_awaited():
    theta = np.zeros(3)
    workers = Scripted(2, [[grad_event(0, 1, theta)], 0.2, 0.2, [], [grad_event(1, 1, theta)]])
    server = QuadraticServer(workers, max_delay=0, stall_timeout=0.15)
    with pytest.warns(StalledWorkerWarning, match="fake 1 has sent no gradient") as record:
        server.step()
    assert len(record) == 1 and [s[:2] for s in server.stalls] == [(1, 0)] and server.stalls[0][2] > 0.15
    # worker 0, which had answered, was never reported


def test_server_stands_in_for_starting_workers_until_their_first_gradient():
    workers = Scripted(2, [[], [], []], can_compute_here=True)
    server = QuadraticServer(workers, max_delay=0, stall_timeout=60)
    theta0 = server.theta.copy()
    server.step()  # nothing from the starting workers: the server computes both gradients itself
    server.step()
    assert workers.computed == [(0, 0), (1, 0), (0, 1), (1, 1)] and server.stood_in == workers.computed
    assert workers.sent == [(0, 1), (1, 1)]  # the workers are still busy with version 0
    # worker 0's first gradient (version 0, older than the server's): dropped, and it gets version 2;
    # from now on the server waits for it, and stands in for worker 1 only
    theta2 = server.theta.copy()
    workers.script = [[grad_event(0, 1, theta0)], [grad_event(0, 3, theta2)]]
    server.step()
    assert workers.sent[2] == (0, 3) and workers.computed[4:] == [(1, 2)] and workers.script == []
    assert server.used[-1] == [2, 2] and server.staleness == [0, 0, 0]
    history, losses = reference(3, CENTRES[:2])
    np.testing.assert_allclose(server.theta, history[2], rtol=1e-15)
    # worker 0, up, is waited for (no stand-in); a restarted worker is stood in for again
    workers.script = [[("dead", 0, "exit code -9")], []]
    with pytest.warns(RuntimeWarning, match="fake 0 died"):
        server.step()
    assert workers.restarted == [0] and sorted(workers.computed[5:]) == [(0, 3), (1, 3)]
    np.testing.assert_allclose(server.theta, reference(4, CENTRES[:2])[0][3], rtol=1e-15)


def test_first_gradient_older_than_the_servers_stand_in_does_not_count_as_new():
    workers = Scripted(1, [[]], can_compute_here=True)
    server = QuadraticServer(workers, max_delay=2, stall_timeout=60)
    theta0 = server.theta.copy()
    server.step()  # stood in at version 0
    theta1 = server.theta.copy()
    # the worker's own version-0 gradient repeats what the update used: the server waits for its next
    workers.script = [[grad_event(0, 1, theta0)], [grad_event(0, 2, theta1)]]
    server.step()
    assert server.used == [[0], [1]] and workers.script == [] and server.stood_in == [(0, 0)]


def test_starting_worker_that_stays_silent_is_reported_although_the_server_stands_in():
    workers = Scripted(1, [0.2, [], []], can_compute_here=True)
    server = QuadraticServer(workers, max_delay=0, stall_timeout=0.15)
    with pytest.warns(StalledWorkerWarning, match="fake 0 has sent no gradient"):
        server.step()
    assert [s[:2] for s in server.stalls] == [(0, 0)] and server.stood_in == [(0, 0)]
    server.step()  # reported once
    assert len(server.stalls) == 1 and server.version == 2


def test_load_state_dict_drops_gradients_on_replaced_parameters():
    workers = Scripted(1)
    server = QuadraticServer(workers, max_delay=3, stall_timeout=60)
    workers.script = [[grad_event(0, 1, server.theta)]]
    server.step()
    state = server.state_dict()
    assert state["version"] == 1
    server.load_state_dict({"version": 7, "params": np.ones(3), "optim": {}})
    assert server.version == 7 and workers.sent == [(0, 1), (0, 2)]  # the worker is busy with tag 2
    # its gradient of the replaced parameters (tag 2) is dropped although max_delay would allow
    # its age, and it is sent the loaded parameters (tag 3) at once
    workers.script = [[grad_event(0, 2, server.theta)], [grad_event(0, 3, np.ones(3))]]
    server.step()
    assert workers.sent[2] == (0, 3) and server.used == [[0], [7]] and server.version == 8
    assert workers.versions == [0, 1, 7, 8]  # the loaded version travels with the new tag


def run_synchronous(server, workers, num_steps):
    """``num_steps`` synchronous updates of a one-worker ``QuadraticServer`` on a scripted transport."""
    for _ in range(num_steps):
        workers.script = [[grad_event(0, server._tag, server.theta)]]
        server.step()


def one_worker_reference(num_steps):
    """Proximal gradient descent on worker 0's term alone: the iterates theta_0 .. theta_n."""
    return [np.zeros(3)] + reference(num_steps, centres=CENTRES[:1])[0]


@pytest.mark.parametrize("decay", [0.99, 0.5, 0.0])
def test_server_averages_the_iterates_with_a_warm_started_moving_average(decay):
    workers = Scripted(1)
    server = QuadraticServer(workers, max_delay=0, stall_timeout=60, average_decay=decay)
    iterates = one_worker_reference(25)
    np.testing.assert_array_equal(server.average, iterates[0])
    for t, expected in enumerate(moving_average(iterates, decay), start=1):
        run_synchronous(server, workers, 1)
        np.testing.assert_allclose(server.theta, iterates[t], rtol=1e-13)
        np.testing.assert_allclose(server.average, expected, rtol=1e-12, atol=1e-15)
    # decay 0: the average is the last iterate; otherwise it lags behind the iterates
    assert (np.allclose(server.average, server.theta) == (decay == 0.0))
    # the workers are sent the iterates, never the average
    assert server.average_decay == decay and np.array_equal(server._flat, server.theta)


def test_state_dict_carries_the_average_and_a_resumed_run_continues_it():
    uninterrupted = QuadraticServer(w := Scripted(1), max_delay=0, stall_timeout=60, average_decay=0.9)
    run_synchronous(uninterrupted, w, 12)
    first = QuadraticServer(w1 := Scripted(1), max_delay=0, stall_timeout=60, average_decay=0.9)
    run_synchronous(first, w1, 7)
    state = first.state_dict()
    np.testing.assert_array_equal(state["average"], first.average)
    resumed = QuadraticServer(w2 := Scripted(1), max_delay=0, stall_timeout=60, average_decay=0.9)
    resumed.load_state_dict(state)
    run_synchronous(resumed, w2, 5)
    np.testing.assert_array_equal(resumed.average, uninterrupted.average)
    np.testing.assert_array_equal(resumed.theta, uninterrupted.theta)
    # a state without an average (written before there were any) restarts it at the loaded parameters
    resumed.load_state_dict({**state, "average": None})
    np.testing.assert_array_equal(resumed.average, state["params"])
    with pytest.raises(ValueError, match="state: the average has 2 entries, the parameters 3"):
        resumed.load_state_dict({**state, "version": 99, "average": np.zeros(2)})
    assert resumed.version == state["version"]  # refused before anything was loaded


def test_averaging_defaults_to_an_average_for_minibatches_only_and_names_a_bad_decay():
    assert averaging(None, 64) == DEFAULT_AVERAGE_DECAY == 0.99 and averaging(None, None) == 0.0
    assert averaging(0.5, None) == 0.5 and averaging(0, 64) == 0.0
    for bad in (1.0, -0.1, True, "0.9", np.nan):
        with pytest.raises(ValueError, match="average_decay: expected None or a number in"):
            averaging(bad, 64)
    # the default a server gets is no averaging: the average is the last iterate
    server = QuadraticServer(w := Scripted(1), max_delay=0, stall_timeout=60)
    run_synchronous(server, w, 3)
    np.testing.assert_array_equal(server.average, server.theta)


def test_check_options_names_the_bad_argument():
    shards, sleeps = check_options(10, num_workers=2, max_delay=0, stall_timeout=1.0)
    assert [s.tolist() for s in shards] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]] and sleeps == [0.0, 0.0]
    assert check_options(10, num_workers=2, max_delay=0, stall_timeout=1.0, worker_sleep=[0.5, 0.0])[1] == [0.5, 0.0]
    for kwargs, name in [({"num_workers": 0}, "num_workers"), ({"num_workers": 11}, "num_workers"),
                         ({"max_delay": 1.5}, "max_delay"),
                         ({"stall_timeout": 0}, "stall_timeout"), ({"shards": [np.arange(9)]}, "shards"),
                         ({"shards": [np.arange(5), np.arange(5)]}, "shards"),
                         ({"shards": [np.arange(5), np.arange(5, 11)]}, "shards"),
                         ({"worker_sleep": [0.0, np.nan]}, "worker_sleep"),
                         ({"worker_sleep": [0.0, 1.0, 2.0]}, "worker_sleep"),
                         ({"batch_size": 0}, "batch_size"), ({"batch_size": 2.5}, "batch_size"),
                         ({"batch_size": True}, "batch_size"), ({"seed": -1}, "seed"), ({"seed": "a"}, "seed"),
                         ({"num_threads": 0}, "num_threads"), ({"num_threads": 1.5}, "num_threads"),
                         ({"shrink_stale_steps": 1}, "shrink_stale_steps"),
                         ({"shrink_stale_steps": "yes"}, "shrink_stale_steps"),
                         ({"average_decay": 1.0}, "average_decay"), ({"average_decay": -0.1}, "average_decay"),
                         ({"average_decay": True}, "average_decay"), ({"average_decay": "0.9"}, "average_decay")]:
        with pytest.raises(ValueError, match=name):
            check_options(10, **{"num_workers": 2, "max_delay": 0, "stall_timeout": 1.0, **kwargs})


def test_standing_in_defaults_to_minibatch_runs_and_names_a_bad_value():
    assert standing_in(None, 64) and not standing_in(None, None)
    assert standing_in(True, None) and not standing_in(False, 64)
    with pytest.raises(ValueError, match="stand_in: expected None, True or False, got 1"):
        standing_in(1, None)


def test_batch_rows_are_a_uniform_draw_determined_by_seed_worker_and_version():
    assert batch_rows(3, 20, None, 0, 0) is None and batch_rows(3, 20, 20, 0, 0) is None
    rows = batch_rows(3, 20, 5, 0, 0)
    assert rows.shape == (5,) and np.all(np.diff(rows) > 0) and rows.min() >= 0 and rows.max() < 20
    np.testing.assert_array_equal(batch_rows(3, 20, 5, 0, 0), rows)
    draws = {tuple(batch_rows(version, 1000, 10, seed, k)) for version, seed, k in [(3, 0, 0), (3, 0, 1), (3, 1, 0),
                                                                                  (4, 0, 0)]}
    assert len(draws) == 4  # another seed, worker or version draws other rows
    # over many versions every row is drawn about b / n of the time (4,000 draws of 5 of 20
    # rows: 1,000 expected per row, standard deviation 27)
    counts = np.bincount(np.concatenate([batch_rows(t, 20, 5, 0, 0) for t in range(4000)]), minlength=20)
    assert np.all(np.abs(counts - 1000) < 150), counts


class OneMessage:
    """A worker channel that delivers one parameter vector, then the stop, and keeps what is sent back."""

    def __init__(self, flat):
        self.messages, self.sent = [(7, 3, flat), None], []

    def recv(self):
        return self.messages.pop(0)

    def send(self, tag, value, grad):
        self.sent.append((tag, value, grad))

    def fail(self, text):
        raise AssertionError(text)


def test_serve_gradients_scales_the_minibatch_estimate_by_n_over_b():
    X, y = np.arange(10.0), np.linspace(1.0, 2.0, 10)
    seen = []

    def make(X, y):
        def compute(flat, rows=None):  # g(theta) = sum_i y_i theta . theta / 2 over the rows used
            seen.append(rows)
            w = y if rows is None else y[rows]
            return 0.5 * w.sum() * flat @ flat, w.sum() * flat

        return compute

    flat = np.array([1.0, -2.0])
    full = OneMessage(flat)
    serve_gradients(full, make, X, y)
    assert seen.pop() is None and full.sent[0][1] == pytest.approx(0.5 * y.sum() * 5.0)
    batch = OneMessage(flat)
    serve_gradients(batch, make, X, y, batch_size=4, seed=3, worker=1)
    rows = seen.pop()
    np.testing.assert_array_equal(rows, batch_rows(3, 10, 4, 3, 1))  # version 3
    tag, value, grad = batch.sent[0]
    assert tag == 7 and value == pytest.approx(10 / 4 * 0.5 * y[rows].sum() * 5.0)
    np.testing.assert_allclose(grad, 10 / 4 * y[rows].sum() * flat)


# ---- real transports with in-thread workers ---------------------------------------------------------
class _Die(BaseException):
    """Ends a worker thread the way a crash ends a process: no error message, the connection closes."""


def make_compute(die_at=None):
    def build(c, _):
        calls = []

        def compute(flat):
            calls.append(1)
            if len(calls) == die_at:
                raise _Die
            return 0.5 * (flat - c) @ (flat - c), flat - c

        return compute

    return build


def run_worker(channel, build, c, sleep=0.0):
    try:
        serve_gradients(channel, build, c, None, sleep=sleep)
    except (_Die, PeerFailedError) as exc:
        channel.outcome = exc
    finally:
        channel._conn.close()


class ThreadWorkers(ConnectionWorkers):
    """Workers in threads of this process over pipes; restartable (a restart is a fresh thread
    that does not die)."""

    restartable = True

    def __init__(self, sleeps=(0.0, 0.0, 0.0), die_at=(None, None, None)):
        self._sleeps, self._die_at = sleeps, list(die_at)
        super().__init__([None] * 3, [f"thread {k}" for k in range(3)])
        for k in range(3):
            self._start(k)

    def _start(self, k):
        conn, child = Pipe()
        self._conns[k] = conn
        threading.Thread(target=run_worker, daemon=True,
                         args=(ConnectionChannel(child), make_compute(self._die_at[k]), CENTRES[k],
                               self._sleeps[k])).start()

    def restart(self, k):
        self._conns[k].close()
        self._die_at[k] = None
        self._start(k)


def test_thread_workers_synchronous_equals_proximal_gradient_descent_through_a_restart():
    history, losses = reference(6)
    with QuadraticServer(ThreadWorkers(sleeps=(0.0, 0.01, 0.0), die_at=(None, None, 3)), max_delay=0,
                         stall_timeout=60) as server:
        with pytest.warns(RuntimeWarning, match="thread 2 died"):
            for t in range(6):
                assert server.step() == pytest.approx(losses[t], rel=1e-14)
                np.testing.assert_allclose(server.theta, history[t], rtol=1e-14)
        assert server.restarts[0][0] == 2 and len(server.restarts) == 1 and server.staleness == [0] * 6


def test_thread_workers_bounded_delay_with_a_straggler():
    with pytest.warns(StalledWorkerWarning, match="thread 0"):
        with QuadraticServer(ThreadWorkers(sleeps=(0.3, 0.0, 0.0)), max_delay=4, stall_timeout=0.2) as server:
            server.run(12, progress_bar=False)
    assert max(server.staleness) == 4 and all(0 <= s <= 4 for s in server.staleness)
    assert all(t - 4 <= u <= t for t, used in enumerate(server.used) for u in used)


def tcp_workers(num_workers, authkeys, die_at=(None, None)):
    """A listening socket, and worker threads connecting to it; returns (socket, channels)."""
    listening = socket.create_server(("127.0.0.1", 0))
    address = listening.getsockname()
    channels = []

    def worker(k, key):
        channel = connect_to_server(address, key, k, timeout=10)
        channels.append(channel)
        run_worker(channel, make_compute(die_at[k]), CENTRES[k])

    threads = [threading.Thread(target=worker, args=(k, authkeys[k]), daemon=True) for k in range(num_workers)]
    for thread in threads:
        thread.start()
    return listening, channels, threads


def test_tcp_workers_synchronous_equal_proximal_gradient_descent():
    history, _ = reference(4, CENTRES[:2])
    listening, _, threads = tcp_workers(2, [b"key"] * 2)
    with QuadraticServer(accept_workers(listening, b"key", 2, timeout=10), max_delay=0, stall_timeout=60) as server:
        server.run(4, progress_bar=False)
        np.testing.assert_allclose(server.theta, history[-1], rtol=1e-14)
    for thread in threads:  # told to stop: they return
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_tcp_worker_that_dies_is_named_and_the_others_are_told():
    listening, channels, threads = tcp_workers(2, [b"key"] * 2, die_at=(None, 2))
    server = QuadraticServer(accept_workers(listening, b"key", 2, timeout=10), max_delay=0, stall_timeout=60)
    start = time.monotonic()
    with pytest.raises(PeerFailedError, match=r"^rank 2 \(worker 1\) died \(its connection closed\)"):
        server.run(10, progress_bar=False)
    assert time.monotonic() - start < 5
    for thread in threads:
        thread.join(timeout=5)
    (survivor,) = [c for c in channels if isinstance(c.outcome, PeerFailedError)]
    assert str(survivor.outcome).startswith("rank 0 (the server) stopped the run: rank 2 (worker 1) died")


def test_tcp_missing_or_unauthenticated_workers_are_named():
    listening, _, _ = tcp_workers(1, [b"key"])  # worker 1 never comes
    with pytest.raises(PeerFailedError, match="rank 2 did not connect within 1"):
        accept_workers(listening, b"key", 2, timeout=1)
    listening = socket.create_server(("127.0.0.1", 0))
    failure = []

    def intruder():
        try:
            connect_to_server(listening.getsockname(), b"wrong", 0, timeout=5)
        except AuthenticationError as exc:
            failure.append(exc)

    thread = threading.Thread(target=intruder, daemon=True)
    thread.start()
    with pytest.raises(AuthenticationError):
        accept_workers(listening, b"key", 1, timeout=5)
    thread.join(timeout=5)
    assert failure


# ---- local worker processes -------------------------------------------------------------------------
def test_process_that_exits_before_reading_its_shard_or_cannot_be_sent_it_is_named():
    from scalegp.async_server import ProcessWorkers

    big = (np.zeros((500_000, 1)), np.zeros(500_000))  # 8 MB: the hand-over waits for the process to read it
    workers = ProcessWorkers(multiprocessing.get_context("spawn"), np.sum, [big], [0.0])
    workers.processes[0].kill()  # killed while starting (a spawned interpreter takes far longer to read)
    workers.send(0, 1, 0, np.zeros(3))  # waits for the hand-over, which fails
    with pytest.raises(PeerFailedError, match=r"^worker 0 \(pid \d+\) exited while starting \(exit code -9\); "
                                              r".*`if __name__ == \"__main__\":`"):
        for _ in range(100):  # the death is seen within a poll or two
            workers.poll(0.05)
    assert not workers.processes[0].is_alive()
    # a restarted worker that dies the same way: the main module was imported fine before, so no hint
    workers = ProcessWorkers(multiprocessing.get_context("spawn"), np.sum, [big], [0.0])
    workers.restart(0)
    workers.processes[0].kill()
    with pytest.raises(PeerFailedError, match=r"exited while starting \(exit code -9\); its own output, if any, "
                                              r"is above$"):
        for _ in range(100):
            workers.poll(0.05)
    # a shard or make_compute that cannot be pickled: named, not a worker waiting forever for it
    workers = ProcessWorkers(multiprocessing.get_context("spawn"), lambda X, y: None, [big], [0.0])
    with pytest.raises(PeerFailedError, match=r"^worker 0 \(pid \d+\) could not be sent its shard: .*pickle"):
        for _ in range(100):
            workers.poll(0.05)
    assert not workers.processes[0].is_alive()


class SlowStartingProcess(multiprocessing.get_context("spawn").Process):
    """A spawned process that takes ``delay`` seconds to start, as from a fork server that is
    still importing, or then fails to start (``fail``)."""

    delay, fail = 0.0, False

    def start(self):
        time.sleep(self.delay)
        if self.fail:
            raise OSError("no fork server")
        super().start()


class SlowStarts:
    """A ``multiprocessing`` context (spawn) whose processes are :class:`SlowStartingProcess`."""

    def __init__(self, delay: float, fail: bool = False):
        self._delay, self._fail = delay, fail

    def get_start_method(self) -> str:
        return "spawn"

    def Pipe(self, duplex: bool):
        return multiprocessing.get_context("spawn").Pipe(duplex=duplex)

    def Process(self, **kwargs):
        proc = SlowStartingProcess(**kwargs)
        proc.delay, proc.fail = self._delay, self._fail
        return proc


def test_process_starts_do_not_hold_up_the_server_and_a_failed_start_is_named():
    from scalegp.async_server import ProcessWorkers

    began = time.monotonic()
    workers = ProcessWorkers(SlowStarts(1.5), make_fault_counter, [(np.zeros(3), np.zeros(3))], [0.0])
    try:
        assert time.monotonic() - began < 1.0  # started (and handed its shard) by another thread
        assert workers.poll(0.0) == []  # a process not started yet is not dead
        workers.send(0, 1, 0, np.zeros(3))  # waits for the hand-over
        events, deadline = [], time.monotonic() + 60
        while not events:
            assert time.monotonic() < deadline, "the worker sent no gradient in 60 s"
            events += workers.poll(0.1)
        assert [e[:3] for e in events] == [("grad", 0, 1)]
        assert workers.processes[0].is_alive() and workers.describe(0) == f"worker 0 (pid {workers.processes[0].pid})"
    finally:
        workers.close()
    assert workers.processes[0].exitcode == 0
    workers = ProcessWorkers(SlowStarts(0.0, fail=True), make_fault_counter, [(np.zeros(3), np.zeros(3))], [0.0])
    with pytest.raises(PeerFailedError, match=r"^worker 0 could not be started: OSError\('no fork server'\)$"):
        for _ in range(100):
            workers.poll(0.05)
    assert workers.processes[0].pid is None


class ThreadCountingForks:
    """The ``fork`` context, whose processes record in ``seen`` how many threads this process runs
    as they are forked."""

    def __init__(self):
        self.seen = []

    def get_start_method(self) -> str:
        return "fork"

    def Pipe(self, duplex: bool):
        return multiprocessing.get_context("fork").Pipe(duplex=duplex)

    def Process(self, **kwargs):
        seen = self.seen

        class Counting(multiprocessing.get_context("fork").Process):
            def start(self):
                seen.append(threading.active_count())
                super().start()

        return Counting(**kwargs)


class SlowToPickle:
    """A ``make_compute`` (:func:`make_fault_counter` once unpickled) whose pickling, in the
    hand-over thread, takes 0.3 s."""

    def __reduce__(self):
        time.sleep(0.3)
        return functools.partial, (make_fault_counter,)


@pytest.mark.skipif(sys.platform != "linux", reason="workers are forked on Linux only")
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # JAX's, where other tests started it
def test_workers_forked_here_are_forked_before_any_hand_over_thread_runs():
    """Forking copies no other thread, and a lock another thread holds stays locked in the child
    (Python 3.12 warns on any fork of a process with threads): every worker is forked from the
    calling thread before the first hand-over thread starts."""
    from scalegp.async_server import ProcessWorkers

    context, before = ThreadCountingForks(), threading.active_count()
    workers = ProcessWorkers(context, SlowToPickle(), [(np.zeros(3), np.zeros(3))] * 3, [0.0] * 3)
    try:
        assert context.seen == [before] * 3
        for k in range(3):
            workers.send(k, k + 1, 0, np.zeros(3))
        events, deadline = [], time.monotonic() + 60
        while len(events) < 3:
            assert time.monotonic() < deadline, "the workers sent no gradients in 60 s"
            events += workers.poll(0.1)
        assert sorted(e[:3] for e in events) == [("grad", k, k + 1) for k in range(3)]
    finally:
        workers.close()


def freed_block_faults(cycles: int = 20) -> int:
    """Page faults of ``cycles`` rounds of allocating ten 400 kB arrays (a gradient's ``M x b``
    intermediates) and freeing them: about 19,000 with glibc's defaults, none when freed memory is kept."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        arrays = [np.ones(50_000) for _ in range(10)]
        del arrays
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def make_fault_counter(X, y):
    """A worker's ``make_compute`` whose value is :func:`freed_block_faults` in the worker process."""
    return lambda flat: (float(freed_block_faults()), np.zeros_like(flat))


needs_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                                 reason="mallopt is glibc's")


@needs_glibc
def test_keep_freed_memory_stops_the_page_faults_of_freed_blocks():
    import subprocess

    code = ("from tests.test_advgp_async_server import freed_block_faults\n"
            "from scalegp.async_server import keep_freed_memory\n"
            "freed_block_faults(2)\n"
            "before, took = freed_block_faults(), keep_freed_memory()\n"
            "freed_block_faults(1)  # the heap grows once more, and is kept from then on\n"
            "print(before, took, freed_block_faults())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    before, took, after = out.stdout.split()
    assert took == "True"
    assert int(before) > 1000  # glibc's defaults: the freed heap is trimmed and faults in again
    assert int(after) < 50


@needs_glibc
def test_local_worker_processes_keep_freed_memory():

    from scalegp.async_server import ProcessWorkers

    workers = ProcessWorkers(multiprocessing.get_context("spawn"), make_fault_counter, [(np.zeros(3), np.zeros(3))],
                             [0.0])
    try:
        events = []
        for tag in (1, 2):  # the second gradient's rounds run on the memory the first one freed
            workers.send(0, tag, tag - 1, np.zeros(3))
            deadline = time.monotonic() + 60
            while not events or events[-1][2] != tag:
                assert time.monotonic() < deadline, "the worker sent no gradient in 60 s"
                events += workers.poll(0.1)
        kind, k, tag, faults, grad = events[-1]
        assert (kind, k, tag) == ("grad", 0, 2)
        assert faults < 50
    finally:
        workers.close()
