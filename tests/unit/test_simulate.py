"""The simulated cluster: real replicas and shard states on a SimPy clock.

A tiny synthetic problem (a 20-16-5 network on the synthetic teacher's data) keeps each
run to a fraction of a second; the costs are chosen here, so simulated seconds can be
predicted exactly and shards can be made slow on purpose.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mpibelief import config as configs
from mpibelief.data import load_dataset
from mpibelief.simulate import calibrate
from mpibelief.simulate.cluster import Costs, Faults
from mpibelief.simulate.run import build, simulate

SETS = ["run.algorithm='downpour'", "data.source='synthetic'", "data.n_train=1024",
        "data.n_test=256", "data.n_inputs=20", "data.n_classes=5", "model.hidden=16",
        "model.layers=1", "train.batch=16", "train.lr=0.05", "train.eval_every=0.05",
        "downpour.warmstart_steps=0"]
# 1 ms per sample: a 16ms step; applying all 421 parameters takes 0.4 ms at 1 us each.
COSTS = Costs(compute_per_sample=1e-3, apply_per_param=1e-6, latency=1e-4, bandwidth=1e8)
NO_FAULTS = Faults()


def cfg_of(replicas: int = 1, shards: int = 1, epochs: float = 1.0, extra=()):
    return configs.load(None, [*SETS, f"layout.replicas={replicas}", f"layout.shards={shards}",
                               f"train.epochs={epochs}", *extra])


@pytest.fixture(scope="module")
def data():
    return load_dataset(cfg_of().data)


def run(data, replicas=1, shards=1, costs=COSTS, faults=NO_FAULTS, epochs=1.0, extra=()):
    model, server, cluster = build(cfg_of(replicas, shards, epochs, extra), data, costs, faults)
    cluster.run()
    return server, cluster


def mean_staleness(server) -> float:
    from mpibelief.algorithms.downpour import mean_staleness as mean

    return mean([s.stats for s in server.states])


def test_same_seed_same_run(data):
    a, ca = run(data, replicas=3, shards=2)
    b, cb = run(data, replicas=3, shards=2)
    np.testing.assert_array_equal(a.params(), b.params())
    assert ca.env.now == cb.env.now
    for sa, sb in zip(a.states, b.states, strict=True):
        np.testing.assert_array_equal(sa.stats.staleness, sb.stats.staleness)
    c, _ = run(data, replicas=3, shards=2, extra=["run.seed=1"])
    assert not np.array_equal(a.params(), c.params())  # the seed does matter


def test_staleness_rises_with_replicas(data):
    found = [mean_staleness(run(data, replicas=r, epochs=r)[0]) for r in (1, 2, 4, 8)]
    assert found == sorted(found) and found[-1] > found[0] + 2, found


def test_every_step_is_applied_once(data):
    server, cluster = run(data, replicas=3, shards=2)
    steps = [rep.stats.steps for rep in cluster.replicas]
    for state in server.states:
        assert state.stats.applied == sum(steps)  # one push per step (n_push = 1)
        assert list(state.samples[1:]) == [16 * s for s in steps]
    assert cluster.finished


def test_simulated_seconds_follow_the_calibration(data):
    """One replica, one shard: each step is a fetch, a compute and a put; the run ends
    when the last push is applied.  Doubling the compute cost adds exactly its part."""
    server, cluster = run(data)
    n, steps = server.n_params, cluster.replicas[0].stats.steps
    transfer = COSTS.latency + 4 * n / COSTS.bandwidth
    step = 2 * transfer + 16 * COSTS.compute_per_sample
    assert cluster.env.now == pytest.approx(steps * step + n * COSTS.apply_per_param)
    slower = Costs(2e-3, COSTS.apply_per_param, COSTS.latency, COSTS.bandwidth)
    _, cluster2 = run(data, costs=slower)
    assert cluster2.env.now - cluster.env.now == pytest.approx(steps * 16 * 1e-3)
    stats = cluster.replicas[0].stats
    assert stats.compute_seconds == pytest.approx(steps * 16e-3)
    warming = Costs(*[getattr(COSTS, k) for k in calibrate.FIELDS], first_step=0.5)
    _, cluster3 = run(data, costs=warming)  # a fresh process's first step, paid once
    assert cluster3.env.now - cluster.env.now == pytest.approx(0.5)
    assert stats.train_seconds == pytest.approx(steps * step, rel=1e-9)


def test_a_slow_shard_becomes_the_bottleneck(data):
    """Shard 1 applies 2000x slower: its apply outlasts a step, so it is always busy,
    replicas wait for their slots there, and shard 0 idles."""
    fast, cfast = run(data, replicas=4, shards=2, epochs=2)
    slow, cslow = run(data, replicas=4, shards=2, epochs=2, faults=Faults(shard_slowdown=(1, 2000)))
    busy = cslow.busy_fractions()
    assert busy[1] > 0.95 and busy[0] < 0.2, busy
    assert max(cfast.busy_fractions()) < 0.2
    assert cslow.env.now > 3 * cfast.env.now
    assert sum(s.stats.wait_seconds for s in cslow.stores) > 0.5 * cslow.env.now
    assert cslow.times[1].max_queue > 1


def test_stragglers_and_failures(data):
    _, base = run(data, replicas=2)
    _, slow = run(data, replicas=2, faults=Faults(straggler_fraction=1.0, straggler_slowdown=3))
    for a, b in zip(base.replicas, slow.replicas, strict=True):
        assert b.stats.compute_seconds == pytest.approx(3 * a.stats.compute_seconds)
    server, failed = run(data, replicas=2, faults=Faults(fail_at=((1, 0.1),)))
    steps = [rep.stats.steps for rep in failed.replicas]
    assert failed.failed == {1} and steps[1] < steps[0] and failed.finished
    assert server.states[0].stats.applied == sum(steps)


def test_network_fit_recovers_latency_and_bandwidth(tmp_path):
    path = tmp_path / "rma.h5"
    sizes = np.array([4096, 65536, 1 << 20, 4 << 20])
    with h5py.File(path, "w") as f:
        for mode in ("pull_fresh", "push"):
            g = f.create_group(f"bench/rma/{mode}")
            g["sizes"] = sizes
            g["timings"] = np.stack([5e-6 + sizes / 2e10] * 3, axis=1)
    latency, bandwidth, _ = calibrate.fit_network(path)
    assert latency == pytest.approx(5e-6) and bandwidth == pytest.approx(2e10)


def test_simulate_writes_a_result_file_marked_simulated(tmp_path, data):
    calibration = tmp_path / "calibration.h5"
    calibrate.write(calibration, COSTS, {"n_params": 421})
    out = tmp_path / "sim.h5"
    cfg = cfg_of(replicas=2, shards=2)
    row = simulate(cfg, out, calibration)
    with h5py.File(out) as f:
        assert f.attrs["simulated"] and f.attrs["calibration"] == str(calibration)
        assert f.attrs["status"] == "complete"
        wall = f["metrics/wall_seconds"][()]
        assert wall[0] == 0 and np.all(np.diff(wall) > 0) and wall[-1] == row["wall_seconds"]
        samples = f["metrics/samples"][()]
        assert samples[-1] == 1024  # every shard counts every push: 2 shards x 2 x 32
        assert f["server/staleness"][()].sum() == 2 * 2 * 32
        assert list(f["ranks/rank"][()]) == [0, 1, 2, 3, 4]
        assert f.attrs["cost_compute_per_sample"] == COSTS.compute_per_sample
    assert row["test_accuracy"] > 0.3  # chance is 0.2: it really trained


def test_costs_from_a_real_run_file(tmp_path):
    """The in-run calibration reads /ranks and /server as a real Downpour run writes them."""
    path = tmp_path / "run.h5"
    n, batch = 1000, 10
    with h5py.File(path, "w") as f:
        f.attrs["n_params"], f.attrs["config"] = n, "[train]\nbatch = 10\n"
        f["ranks/rank"] = [0, 1, 2, 3]
        f["ranks/samples"] = [0, 0, 0, 100 * batch]  # rank 3: the replica, 100 steps
        f["ranks/comm_seconds"] = [0.0, 0.0, 0.0, 100 * (4 * 1e-3 + 2 * 4 * n / 1e9)]
        f["ranks/compute_seconds"] = [0.0, 0.2, 0.2, 2.0]
        f["server/shard_rank"], f["server/applied"] = [1, 2], [100, 100]
    found = calibrate.from_run(path, bandwidth=1e9)
    assert found["latency"] == pytest.approx(1e-3)  # a pull and a push on each of 2 shards
    assert found["compute_per_sample"] == pytest.approx(2.0 / 1000)
    assert found["apply_per_param"] == pytest.approx(0.4 / 200 / 500)
