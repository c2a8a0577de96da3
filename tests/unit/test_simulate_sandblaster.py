"""The simulated Sandblaster: the real L-BFGS driver and dispatcher on a SimPy clock.

Multinomial logistic regression (``model.layers = 0``: convex) on the synthetic
teacher's data keeps each run to a fraction of a second; the costs are chosen here, so
simulated seconds can be predicted exactly.
"""

from __future__ import annotations

import dataclasses
import pickle

import h5py
import numpy as np
import pytest

from mpibelief import config as configs
from mpibelief.data import load_dataset
from mpibelief.errors import ConfigError
from mpibelief.model import Model
from mpibelief.simulate import calibrate
from mpibelief.simulate.cluster import Costs, Faults
from mpibelief.simulate.run import check, simulate
from mpibelief.simulate.sandblaster import build
from tests.lbfgs_reference import minimize

SETS = ["run.algorithm='sandblaster'", "run.seed=3", "data.source='synthetic'",
        "data.n_train=2000", "data.n_test=200", "data.n_inputs=20", "data.n_classes=5",
        "model.layers=0", "model.hidden=8", "train.eval_every=1e9",
        "sandblaster.batch=1000", "sandblaster.portions=16", "sandblaster.push_every=2",
        "sandblaster.iterations=4"]
# 100 us per sample: a portion of 62 rows takes 6.2 ms, far more than a message (10 us).
COSTS = Costs(compute_per_sample=1e-4, apply_per_param=1e-8, latency=1e-5, bandwidth=1e9)


def cfg_of(replicas: int = 4, shards: int = 2, extra=()):
    return configs.load(None, [*SETS, f"layout.replicas={replicas}",
                               f"layout.shards={shards}", *extra])


@pytest.fixture(scope="module")
def data():
    return load_dataset(cfg_of().data)


def steps(data, cfg, costs=COSTS, faults=None, start=None):
    sim = build(cfg, data, costs, faults, start)
    return sim, [sim.step(k) for k in range(cfg.sandblaster.iterations)]


def test_every_portion_is_summed_exactly_once_with_backups(data):
    """A 8x straggler and random slow portions: backups are issued and some lose, and
    still every evaluation's summed portions add up to exactly the batch, on every
    shard, and the portions committed are exactly the batch's."""
    cfg = cfg_of(extra=["sandblaster.slow_replica=1", "sandblaster.slow_factor=8.0"])
    sim, records = steps(data, cfg, faults=Faults(straggler_fraction=0.2,
                                                  straggler_slowdown=5.0))
    evals = sum(r.evals for r in records)
    assert all(r.samples_applied == r.evals * 1000 for r in records)
    assert all(sum(r.done_by) == r.evals * 16 for r in records)
    assert sum(r.backups_issued for r in records) > 0
    assert sum(r.backups_wasted for r in records) > 0
    for state in sim.states:  # the last evaluation's sum, counted by each shard alone
        assert int(state.accum_samples[1:].sum()) == 1000
        assert state.stats.applied == sum(rep.stats.pushes for rep in sim.replicas)
    # the real work: one gradient over the batch per evaluation, whatever the copies
    assert sim.math.gradient_rows == sim.math.forward_rows == evals * 1000


def test_the_shards_hold_the_sum_of_the_portions_gradients(data):
    """What the shards' accumulator holds after an evaluation is what R replicas would
    have pushed: every portion's gradient times its rows, computed here portion by
    portion, summed (to float32 summation order)."""
    cfg = cfg_of(5, 3, ["sandblaster.backups=true"])
    sim = build(cfg, data, COSTS, Faults(straggler_fraction=0.3, straggler_slowdown=5.0))
    sim.space.reset_accumulator("grad")
    sim.space.publish("x")
    book = sim.dispatcher.evaluate(0, sim.driver.bounds)
    assert book.samples == 1000 and book.stats.backups > 0
    got = np.concatenate([state.vector("grad") for state in sim.states])
    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    rows = np.random.default_rng([cfg.run.seed, 0]).choice(2000, 1000, replace=False)
    rows.sort()
    want = np.zeros_like(got)
    loss_sum = 0.0
    for lo, hi in sim.driver.bounds:
        loss, _ = model.loss_and_grad(data.x_train[rows[lo:hi]], data.y_train[rows[lo:hi]])
        want += np.float32(hi - lo) * model.grads
        loss_sum += loss * (hi - lo)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert book.loss_sum == pytest.approx(loss_sum, rel=1e-6)
    counted = [state.accum_samples[1:].tolist() for state in sim.states]
    assert counted[0] == counted[1] == counted[2] and sum(counted[0]) == 1000


def test_backups_beat_a_straggler(data):
    """Replica 1 computes 8x slower: with backups a batch takes less simulated time.
    Without the straggler there is nothing for them to win: a copy that lost still
    holds its replica into the next evaluation (measured: 28.4 against 25.3 ms per
    evaluation).  Deterministic: the same run gives the same seconds."""
    def seconds(backups: bool, slow: float) -> float:
        cfg = cfg_of(extra=[f"sandblaster.backups={str(backups).lower()}",
                            "sandblaster.slow_replica=1", f"sandblaster.slow_factor={slow}"])
        _, records = steps(data, cfg)
        return float(np.median([r.seconds / r.evals for r in records]))

    on, off = seconds(True, 8.0), seconds(False, 8.0)
    assert on < 0.85 * off, (on, off)
    assert seconds(True, 8.0) == on  # deterministic
    assert seconds(True, 1.0) > 0.95 * seconds(False, 1.0)


def test_matches_the_single_process_lbfgs(data):
    """The clock does not touch the math: the whole set as the batch, random stragglers
    and backups, and the loss after every iteration is the single-process L-BFGS's."""
    iterations = 12
    cfg = cfg_of(3, 2, ["sandblaster.batch=0", "sandblaster.portions=12",
                        "sandblaster.push_every=3", "sandblaster.history=5",
                        f"sandblaster.iterations={iterations}", "sandblaster.c2=0.1"])
    _, records = steps(data, cfg, faults=Faults(straggler_fraction=0.3,
                                                straggler_slowdown=6.0))
    losses = np.array([r.loss for r in records])
    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    want = np.array(minimize(model, data.x_train, data.y_train, iterations, m=5, c2=0.1))
    rel = np.abs(losses - want) / np.abs(want)
    assert rel.max() < 1e-4, (losses, want)
    assert want[-1] < 0.7 * want[0]  # it did optimise
    assert sum(r.backups_issued for r in records) > 0  # and copies were raced


def test_simulated_seconds_follow_the_costs(data):
    """One replica, one shard, two portions: an evaluation is the task message, the
    pull, the first portion, done, the next task, the second portion, done (the tail:
    push), the push's put and sum, pushed; each as the costs say."""
    cfg = cfg_of(1, 1, ["sandblaster.portions=2", "sandblaster.iterations=2"])
    sim, records = steps(data, cfg)
    c, n = COSTS, sim.model.n_params

    def msg(*m) -> float:
        return c.transfer(len(pickle.dumps(m, -1)))

    portion = 500 * c.compute_per_sample
    one = (msg("task", 0, 0, 0, 0, 500) + c.transfer(4 * n) + portion
           + msg("done", 0, 0, 1.5) + msg("task", 0, 0, 1, 500, 1000) + portion
           + msg("done", 0, 1, 1.5) + msg("push", 0) + c.transfer(4 * n)
           + n * c.apply_per_param + msg("pushed", 0))
    for r in records:
        assert r.gradient_seconds == pytest.approx(r.evals * one, rel=1e-9)
        assert r.seconds > r.gradient_seconds  # the commands cost their round trips


def test_warmstart_is_loaded_into_the_shards(data):
    cfg = cfg_of(extra=["sandblaster.iterations=1"])
    n = build(cfg, data, COSTS).model.n_params
    start = np.random.default_rng(7).standard_normal(n).astype(np.float32) * 0.1
    sim = build(cfg, data, COSTS, start=start)
    np.testing.assert_array_equal(sim.server.params(), start)
    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.params[...] = start
    rows = np.random.default_rng([cfg.run.seed, 0]).choice(2000, 1000, replace=False)
    rows.sort()
    want, _ = model.evaluate(data.x_train[rows], data.y_train[rows])
    assert sim.step(0).loss_before == pytest.approx(want, rel=1e-5)
    with pytest.raises(Exception, match="warmstart of 3 parameters"):
        build(cfg, data, COSTS, start=np.zeros(3, np.float32))


def test_portions_default_to_the_replicas_and_impossible_ones_are_refused(data):
    sim = build(cfg_of(40, extra=["sandblaster.iterations=1"]), data, COSTS)
    assert len(sim.driver.bounds) == 40  # 16 configured, fewer than the 40 replicas
    record = sim.step(0)
    assert record.samples_applied == record.evals * 1000
    with pytest.raises(ConfigError, match="cannot be cut into 2000 portions"):
        check(cfg_of(2000))
    with pytest.raises(ConfigError, match="layout.replicas >= 1"):
        check(cfg_of(0))
    with pytest.raises(ConfigError, match="does not model failed"):
        build(cfg_of(), data, COSTS, Faults(fail_at=((0, 1.0),)))
    with pytest.raises(ConfigError, match="stopped or killed"):
        check(cfg_of(extra=["faults.stop_replica=0"]))


def test_simulate_writes_a_sandblaster_result(tmp_path):
    calibration = tmp_path / "cal.h5"
    calibrate.write(calibration, COSTS, {})
    out = tmp_path / "sb.h5"
    cfg = cfg_of(6, 2, ["train.eval_every=0.01"])
    row = simulate(cfg, out, calibration)
    with h5py.File(out) as f:
        assert f.attrs["simulated"] and f.attrs["calibration"] == str(calibration)
        assert f.attrs["status"] == "complete" and f.attrs["method"] == "sandblaster[6]"
        assert f.attrs["algorithm"] == "sandblaster" and f.attrs["replicas"] == 6
        table = f["sandblaster"]
        assert len(table["loss"]) == 4 and table["done_by"].shape == (4, 6)
        seconds = f["metrics/wall_seconds"][()]
        assert seconds[0] == 0 and seconds[-1] == pytest.approx(table["seconds"][()].sum())
        assert f["metrics/test_accuracy"][-1] == row["test_accuracy"] > 0.4
        assert list(f["ranks/rank"][()]) == list(range(9))  # coordinator, 2 shards, 6
        assert (f["server/busy_fraction"][()] > 0).all()
    with pytest.raises(Exception, match="exists"):
        simulate(cfg, out, calibration)


def test_shard_links_carry_the_replicas_pulls_and_pushes_in_turn(data):
    """R replicas, one portion each, one shard, a network on which the vector's bytes
    dominate (t = 4 n / bandwidth, 10 ms): with shard links the shard's outgoing link
    carries the R pulls of an evaluation one after another, its incoming link the R
    pushes (each replica's as soon as its pull is in: the two directions overlap), so
    an evaluation takes (R + 1) t and grows with R; without them the transfers overlap
    and it stays near 2 t whatever R.  One replica never waits for the link: its
    evaluation costs exactly what it costs without links."""
    n = Model.from_config(cfg_of().model, data.n_inputs, data.n_classes).n_params
    t = 0.01
    slow = dataclasses.replace(COSTS, compute_per_sample=1e-7, bandwidth=4 * n / t)
    linked = dataclasses.replace(slow, shard_links=True)
    per_eval = {}
    for R in (1, 2, 4, 8):
        cfg = cfg_of(R, 1, [f"sandblaster.portions={R}", "sandblaster.backups=false",
                            "sandblaster.iterations=2"])
        for costs in (slow, linked):
            _, records = steps(data, cfg, costs)
            evals = sum(r.evals for r in records)
            per_eval[R, costs.shard_links] = sum(r.gradient_seconds for r in records) / evals
    assert per_eval[1, True] == pytest.approx(per_eval[1, False], rel=1e-12)
    for R in (2, 4, 8):
        free = per_eval[R, False]
        assert free < 2 * t * 1.3  # no contention: one pull and one push of t each
        assert (R + 1) * t <= per_eval[R, True] <= (R + 1) * t + free  # R each way, in turn
