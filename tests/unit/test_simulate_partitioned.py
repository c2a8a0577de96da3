"""Simulated replicas of P partitions: the scaling model's step ratio, parallel transfers,
and the math of P = 1.

The simulated math does not change with P because a partitioned replica computes the
whole model's gradient: ``tests/mpi/mpi_partition.py`` (under ``mpiexec -n 1..4`` by
``tests/mpi/test_under_mpiexec.py``) checks a partition's loss and every gradient against
the whole model's, and ``tests/e2e/test_model_parallel.py`` has SGD on two partitions
reproduce one.  So here the clock must change with P and nothing else.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mpibelief import config as configs
from mpibelief.data import load_dataset
from mpibelief.errors import ConfigError
from mpibelief.layout import shard_slices
from mpibelief.model import Model
from mpibelief.plan import boundary_bytes
from mpibelief.simulate import calibrate, partitioned
from mpibelief.simulate.cluster import Costs, Faults
from mpibelief.simulate.network import Network
from mpibelief.simulate.run import build, simulate
from mpibelief.simulate.sync import check as sync_check

SETS = ["run.algorithm='downpour'", "data.source='synthetic'", "data.n_train=1024",
        "data.n_test=256", "data.n_inputs=20", "data.n_classes=5", "model.hidden=16",
        "model.layers=1", "train.batch=16", "train.lr=0.05", "train.eval_every=0.05",
        "downpour.warmstart_steps=0"]
COSTS = Costs(compute_per_sample=1e-3, apply_per_param=1e-6, latency=1e-4, bandwidth=1e8)
N = 20 * 16 + 16 + 16 * 5 + 5  # 421 parameters


def cfg_of(partitions: int = 1, shards: int = 1, extra=()):
    return configs.load(None, [*SETS, "layout.replicas=1", f"layout.shards={shards}",
                               f"layout.partitions={partitions}", *extra])


@pytest.fixture(scope="module")
def data():
    return load_dataset(cfg_of().data)


def model_of(data):
    return Model.from_config(cfg_of().model, data.n_inputs, data.n_classes, allocate=False)


def test_one_partition_is_todays_simulation(data):
    """P = 1: the costs come back untouched (nothing timed), and a run's clock is the
    calibrated one to the last bit: fetch, compute, put per step, then the last apply."""
    costs, split = partitioned.replica_costs(COSTS, model_of(data), 16, 1)
    assert costs is COSTS and split.ratio == 1.0 and split.partitions == 1
    _, server, cluster = build(cfg_of(), data, costs, Faults())
    cluster.run()
    steps = cluster.replicas[0].stats.steps
    transfer = COSTS.latency + 4 * N / COSTS.bandwidth
    step = transfer + 16 * COSTS.compute_per_sample + transfer
    assert cluster.env.now == pytest.approx(steps * step + N * COSTS.apply_per_param,
                                            rel=1e-12)


def test_the_ratio_is_the_scaling_model_by_hand():
    """8-6-4 network, two partitions, batch 10: hand-made tile times, the plan's bytes."""
    model = Model(8, 4, 6, 1, "relu", allocate=False)
    bytes_2 = boundary_bytes(model, 2, 10)
    assert bytes_2[1, 0, 1] == bytes_2[1, 1, 0] == 4 * 10 * 3  # 3 hidden units each way
    assert bytes_2[0].sum() == 0  # both read the data themselves
    tiles_1 = (np.array([[2e-3], [1e-3]]), np.array([[4e-3], [2e-3]]))  # 9 ms in all
    tiles_2 = (np.array([[1.0e-3, 1.2e-3], [0.6e-3, 0.5e-3]]),
               np.array([[2.0e-3, 2.2e-3], [1.0e-3, 1.1e-3]]))  # slowest: 5.1 ms
    net = Network("test", 1e-4, 1e8)
    split = partitioned.split_of(tiles_1, tiles_2, bytes_2, net, batch=10, step_seconds=0.01)
    exchange = 2 * (1e-4 + 120 / 1e8)  # layer 1, forward and backward
    loss = 3 * 2 * (1e-4 + 8 * 10 / 1e8)  # three allreduces of 10 values, 2 messages
    assert split.comm_seconds == pytest.approx(exchange + loss)
    assert split.compute_ratio == pytest.approx(5.1 / 9)
    assert split.ratio == pytest.approx(5.1 / 9 + (exchange + loss) / 0.01)
    assert split.attrs()["partition_ratio"] == split.ratio
    one = partitioned.split_of(tiles_1, tiles_1, boundary_bytes(model, 1, 10), net, 10, 0.01)
    assert one.ratio == 1.0


def test_replica_costs_scale_the_calibrated_rate_by_the_timed_tiles(data):
    model = model_of(data)
    costs, split = partitioned.replica_costs(COSTS, model, 16, 2)
    again = partitioned.split_of(partitioned.tiles(model, 16, 1),
                                 partitioned.tiles(model, 16, 2),
                                 boundary_bytes(model, 2, 16),
                                 Network("calibrated", COSTS.latency, COSTS.bandwidth),
                                 16, 16 * COSTS.compute_per_sample)
    assert split == again  # the tiles are timed once per process
    assert costs.compute_per_sample == COSTS.compute_per_sample * split.ratio
    assert (costs.latency, costs.apply_per_param) == (COSTS.latency, COSTS.apply_per_param)
    assert split.partitions == 2 and 0 < split.compute_ratio <= 1.5


def test_each_partition_moves_its_own_range():
    """20-16-5: partition 0 holds 168 + 51 parameters, partition 1 168 + 34, partition-major;
    on two shards of 211 and 210, partition 0 straddles them."""
    model = Model(20, 5, 16, 1, "relu", allocate=False)
    assert partitioned.shard_pieces(model, 1, shard_slices(N, 2)) == [[(0, 211), (1, 210)]]
    pieces = partitioned.shard_pieces(model, 2, shard_slices(N, 2))
    assert pieces == [[(0, 211), (1, 8)], [(1, 202)]]
    slowest = 2 * COSTS.latency + 4 * 219 / COSTS.bandwidth  # partition 0's two Gets
    assert partitioned.transfer_seconds(COSTS, pieces) == pytest.approx(slowest)
    assert partitioned.transfer_seconds(COSTS, pieces, 0) == pytest.approx(2 * COSTS.latency)


def test_two_partitions_fetch_and_push_in_parallel(data):
    """One shard: the partitions move 219 and 202 parameters at once, so a step's
    transfers are the larger one's, and compute is the costs' (scaled by the caller)."""
    _, server, cluster = build(cfg_of(partitions=2), data, COSTS, Faults())
    cluster.run()
    steps = cluster.replicas[0].stats.steps
    transfer = COSTS.latency + 4 * 219 / COSTS.bandwidth
    step = transfer + 16 * COSTS.compute_per_sample + transfer
    assert cluster.env.now == pytest.approx(steps * step + N * COSTS.apply_per_param,
                                            rel=1e-12)
    assert server.states[0].stats.applied == steps  # one push per step, the whole gradient


def test_downpour_with_two_partitions_learns_what_one_does(tmp_path, data):
    """One replica, one shard: every pull sees all pushes but the last, whatever the
    durations, so P = 2 must give P = 1's accuracy at every sample count (bit for bit)
    and its final parameters, on another clock: the scaling model's step and parallel
    transfers, exactly."""
    calibration = tmp_path / "calibration.h5"
    calibrate.write(calibration, COSTS, {"n_params": N})
    files, rows = {}, {}
    for P in (1, 2):
        files[P] = tmp_path / f"p{P}.h5"
        simulate(cfg_of(P, extra=["train.eval_every=0.008"]), files[P],
                 calibration)
        with h5py.File(files[P]) as f:
            rows[P] = {k: f[f"metrics/{k}"][()] for k in ("samples", "wall_seconds",
                                                          "test_accuracy", "test_loss")}
            attrs = dict(f.attrs)
            ranks = {k: f[f"ranks/{k}"][()] for k in ("rank", "bytes_pushed", "samples")}
    one, two = rows[1], rows[2]
    common, i1, i2 = np.intersect1d(one["samples"], two["samples"], return_indices=True)
    # Rows every 8 ms: after every step at P = 1 (17 ms); at P = 2 (measured ratio 0.6,
    # 10 ms) after most, and after every other one even at a ratio of 0.3.
    assert len(common) > 10 and common[-1] == 1024  # rows at the same counts, the end too
    for key in ("test_accuracy", "test_loss"):
        np.testing.assert_array_equal(one[key][i1], two[key][i2], err_msg=key)
    assert two["test_accuracy"][-1] > 0.3  # chance is 0.2: it trained
    ratio = attrs["partition_ratio"]
    assert attrs["partitions"] == 2 and ratio != 1.0 and attrs["world_size"] == 1 + 1 + 2
    steps = 1024 // 16
    transfer = COSTS.latency + 4 * 219 / COSTS.bandwidth
    step = 2 * transfer + 16 * COSTS.compute_per_sample * ratio
    assert two["wall_seconds"][-1] == pytest.approx(steps * step + N * COSTS.apply_per_param)
    assert two["wall_seconds"][-1] != pytest.approx(one["wall_seconds"][-1])
    assert list(ranks["rank"]) == [0, 1, 2, 3]  # coordinator, shard, two partitions
    assert list(ranks["bytes_pushed"][2:]) == [steps * 4 * 219, steps * 4 * 202]
    assert list(ranks["samples"][2:]) == [steps * 16] * 2  # each saw every sample


def test_sgd_over_partitions_and_the_sync_refusal(tmp_path, data):
    """SGD [1] of 4 partitions: P = 1's losses, each step the scaled compute plus the
    update; synchronous SGD keeps the real algorithm's refusal of P > 1."""
    calibration = tmp_path / "calibration.h5"
    calibrate.write(calibration, COSTS, {"n_params": N})
    sgd = ["run.algorithm='sgd'", "layout.shards=0", "train.eval_every=0.0"]
    losses, ratio = {}, None
    for P in (1, 4):
        out = tmp_path / f"sgd{P}.h5"
        simulate(configs.load(None, [*SETS, *sgd, f"layout.partitions={P}"]), out, calibration)
        with h5py.File(out) as f:
            losses[P] = f["metrics/test_loss"][()]
            wall, ratio = f["metrics/wall_seconds"][-1], f.attrs["partition_ratio"]
            assert list(f["ranks/rank"][()]) == list(range(P)) and f.attrs["partitions"] == P
    np.testing.assert_array_equal(losses[1], losses[4])
    steps = 1024 // 16
    assert wall == pytest.approx(steps * (16 * COSTS.compute_per_sample * ratio
                                          + N * COSTS.apply_per_param))
    with pytest.raises(ConfigError, match="not built yet"):
        sync_check(configs.load(None, [*SETS[1:], "run.algorithm='sync'", "layout.shards=0",
                                       "layout.partitions=2"]))


def test_the_command_prints_each_network_and_p(tmp_path, capsys):
    calibration = tmp_path / "calibration.h5"
    calibrate.write(calibration, COSTS, {"n_params": N})
    sets = [x for s in SETS[1:] for x in ("--set", s)]
    assert partitioned.main(["configs/sgd.toml", *sets, "--calibration", str(calibration),
                             "--partitions", "1,2", "--networks", "calibrated,1gbe"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "421 parameters, batch 16; calibrated step 16.00 ms" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[-5]) for r in rows] == [("calibrated", "1"), ("calibrated", "2"),
                                             ("1gbe", "1"), ("1gbe", "2")]
    assert rows[0][-4] == rows[2][-4] == "1.000"  # P = 1: the calibrated step itself
