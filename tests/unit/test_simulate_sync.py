"""Synchronous SGD, Strom compression and SGD [1] on the simulated clock (no MPI).

A tiny synthetic problem (a 20-16-5 network, 421 parameters) keeps each run to a
fraction of a second; costs are chosen here, so simulated seconds can be computed by
hand.  The math is checked against oracles built from the model and optimiser alone
(as ``tests/mpi/mpi_sync.py`` checks the real sync) and against the real SGD [1] loop.
"""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from mpibelief import config as configs
from mpibelief.clock import VirtualClock
from mpibelief.compression import ThresholdCompressor
from mpibelief.compressor import policy
from mpibelief.data import batches, load_dataset
from mpibelief.errors import ConfigError
from mpibelief.model import Model
from mpibelief.simulate import calibrate, collectives
from mpibelief.simulate.cluster import Costs, Faults
from mpibelief.simulate.exchange_work import LocalWork
from mpibelief.simulate.run import check, simulate
from mpibelief.simulate.sync import SyncSim
from tests import oracles

BATCH = 16
SETS = ["run.algorithm='sync'", "layout.shards=0", "data.source='synthetic'",
        "data.n_train=2048", "data.n_test=256", "data.n_inputs=20", "data.n_classes=5",
        "model.hidden=16", "model.layers=1", f"train.batch={BATCH}", "train.lr=0.05",
        "train.eval_every=0.05"]
N = 20 * 16 + 16 + 16 * 5 + 5  # the model's parameters
COSTS = Costs(compute_per_sample=1e-3, apply_per_param=1e-6, latency=1e-4, bandwidth=1e8)
WORK = LocalWork(reduce_per_entry=1e-9, encode_per_entry=2e-9, decode_per_entry=3e-10,
                 decode_per_word=4e-9)
STROM = ["compression.enabled=true", "compression.fraction=0.05"]


def cfg_of(replicas: int = 1, epochs: float = 1.0, extra=()):
    return configs.load(None, [*SETS, f"layout.replicas={replicas}", f"train.epochs={epochs}",
                               *extra])


@pytest.fixture(scope="module")
def data():
    return load_dataset(cfg_of().data)


def sim_of(data, cfg, costs=COSTS, faults=None) -> SyncSim:
    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    return SyncSim(cfg, data, model, costs, WORK, faults)


def run(sim: SyncSim, steps: int | None = None) -> list[float]:
    """Step it; the simulated seconds of each step."""
    return [sim.step(s)[1] for s in range(1, (steps or sim.total_steps) + 1)]


def combined_batch(cfg, data, replicas: int, steps: int) -> np.ndarray:
    return oracles.combined_batch(cfg, data, replicas, steps, BATCH)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_r_replicas_equal_one_on_the_combined_batch(data, optimizer):
    cfg = cfg_of(4, extra=[f"train.optimizer='{optimizer}'"])
    sim = sim_of(data, cfg)
    run(sim, 20)
    expected = combined_batch(cfg, data, 4, 20)
    moved = np.max(np.abs(expected - combined_batch(cfg, data, 4, 0)))
    error = np.max(np.abs(sim.model.params - expected))
    # The tolerances of tests/mpi/mpi_sync.py: float32 sums in another order.
    assert error <= {"sgd": 1e-5, "adagrad": 5e-5}[optimizer] * moved, (error, moved)
    assert moved > 1e-3


def test_sgd_is_the_real_single_replica_loop(data, tmp_path):
    """SGD [1] simulated ends on the real train_sgd's parameters, bit for bit."""
    from mpibelief.algorithms.sgd import train_sgd
    from mpibelief.context import RunContext
    from mpibelief.layout import make_layout
    from mpibelief.results import ResultWriter
    from mpibelief.signals import Signals

    cfg = cfg_of(1, epochs=2.0, extra=["run.algorithm='sgd'", "train.optimizer='adagrad'",
                                       "train.eval_every=1e9"])
    sim = sim_of(data, cfg)
    run(sim)
    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    with ResultWriter(tmp_path / "real.h5", {}) as writer:
        ctx = RunContext(cfg, None, make_layout(1, 0, 1, 1), 0, data, model, writer,
                         VirtualClock(), Signals())
        summary = train_sgd(ctx)
    assert summary["steps"] == sim.steps == 2 * (2048 // BATCH)
    np.testing.assert_array_equal(sim.model.params, model.params)


def test_compressed_bytes_are_the_real_codecs(data):
    """Step 1's packets are what fresh real compressors make of the same gradients;
    the update is their decoded average; every later step stays within the budget."""
    R = 4
    cfg = cfg_of(R, epochs=1.0, extra=STROM)
    sim = sim_of(data, cfg)
    start = sim.model.params.copy()
    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.params[:] = start
    total = np.zeros(N, np.float32)
    sizes = []
    for r in range(R):
        shard = data.shard(r, R)
        idx = next(batches(len(shard.y_train), BATCH, np.random.default_rng(cfg.run.seed + 1 + r)))
        model.loss_and_grad(shard.x_train[idx], shard.y_train[idx])
        packet, _ = ThresholdCompressor(N, policy(cfg.compression)).compress(model.grads)
        ThresholdCompressor.decompress(packet, total)
        sizes.append(4 * packet.size)
    seconds = sim.step(1)[1]
    rows = [codec.log.columns() for codec in sim.codecs]
    assert [int(c["bytes_compressed"][0]) for c in rows] == [s + 4 for s in sizes]
    expected = start - np.float32(0.05) * (total * np.float32(1 / R))
    np.testing.assert_array_equal(sim.model.params, expected)
    exchange = collectives.packet_exchange_seconds(sizes, COSTS.latency, COSTS.bandwidth)
    words = sum(sizes) // 4
    assert seconds == pytest.approx(BATCH * 1e-3 + WORK.encode(N) + exchange
                                    + WORK.decode(N, words) + N * 1e-6, rel=1e-12)
    run_rest = [sim.step(s) for s in range(2, sim.total_steps + 1)]
    assert run_rest
    for c in (codec.log.columns() for codec in sim.codecs):
        assert len(c["step"]) == sim.total_steps
        assert (c["bytes_dense"] >= 20 * c["bytes_compressed"]).all()  # 5% kept, header in
        assert (c["bytes_dense"] == 4 * N).all()


def test_a_dense_step_follows_the_cost_model_by_hand(data):
    """R = 3 (not a power of two), no spread: compute 16 x 1 ms; Rabenseifner over p' = 2
    with the fold-in and fold-out: 2 + 2 = 4 messages of 100 us and (1 + 2) x 1684 bytes
    at 1e8 B/s; 1.5 x 421 additions at 1 ns; 421 updates at 1 us."""
    sim = sim_of(data, cfg_of(3))
    step = 0.016 + 4 * 1e-4 + 3 * 1684 / 1e8 + 1.5 * 421 * 1e-9 + 421 * 1e-6
    seconds = run(sim, 5)
    assert seconds == pytest.approx([step] * 5, rel=1e-12)
    assert sim.clock.now() == pytest.approx(5 * step, rel=1e-12)
    ranks = sim.rank_stats()
    assert ranks[2].compute_seconds == pytest.approx(5 * (0.016 + 421e-6), rel=1e-12)
    assert ranks[2].bytes_pushed == 5 * 1684


def test_collectives_by_hand():
    a, b = 1e-4, 1e8
    assert collectives.allreduce_seconds(4000, 1, a, b) == 0.0
    assert collectives.allreduce_seconds(4000, 2, a, b) == pytest.approx(2 * a + 4000 / b)
    # 200 = 128 + 72: 2 log2 128 + 2 = 16 messages, (2 * 127/128 + 2) vectors.
    assert collectives.allreduce_seconds(4000, 200, a, b) == pytest.approx(
        16 * a + (2 * 127 / 128 + 2) * 4000 / b)
    # allgather: recursive doubling (2^k ranks, < 512 KiB), Bruck (< 80 KiB), else ring.
    assert collectives.allgather_rounds(1000, 8) == 3
    assert collectives.allgather_rounds(100000, 6) == 5
    assert collectives.allgather_rounds(50000, 6) == 3
    assert collectives.allgather_rounds(600000, 8) == 7
    assert collectives.allgather_seconds([100, 300, 200], a, b) == pytest.approx(
        2 * a + 500 / b)  # Bruck, 2 rounds; the slowest receiver gets 300 + 200 bytes
    assert collectives.packet_exchange_seconds([100], a, b) == 0.0


def test_one_straggler_slows_the_whole_step(data):
    """Every 10th compute is 3x slower: a Downpour replica loses 20% on average, but a
    synchronous step of 8 waits for its slowest, slowed in 1 - 0.9^8 = 57% of steps."""
    cfg = cfg_of(8, epochs=4.0)
    base = run(sim_of(data, cfg))
    sim = sim_of(data, cfg, faults=Faults(straggler_fraction=0.1, straggler_slowdown=3.0))
    slowed = np.array(run(sim)) - np.array(base)
    assert set(np.round(slowed / 0.032, 9)) == {0.0, 1.0}  # 0, or 2 x 16 ms: all wait
    assert 0.45 < np.mean(slowed > 0) < 0.7, np.mean(slowed > 0)
    # Replicas that did not straggle waited for the one that did: more comm than without.
    comm_before = sum(base) - len(base) * (16e-3 + N * 1e-6)
    assert min(r.comm_seconds for r in sim.rank_stats()) > comm_before + 0.1


def test_every_replica_pays_the_first_step_once(data):
    costs = Costs(*[getattr(COSTS, k) for k in calibrate.FIELDS], first_step=0.5)
    seconds = run(sim_of(data, cfg_of(4), costs), 3)
    base = run(sim_of(data, cfg_of(4)), 3)
    assert np.subtract(seconds, base) == pytest.approx([0.5, 0, 0])


def test_simulate_writes_the_real_layout(tmp_path, data):
    calibration = tmp_path / "calibration.h5"
    calibrate.write(calibration, COSTS, {"n_params": N, **WORK.attrs()})
    out = tmp_path / "sim.h5"
    row = simulate(cfg_of(4, extra=STROM), out, calibration)
    with h5py.File(out) as f:
        assert f.attrs["simulated"] and f.attrs["calibration"] == str(calibration)
        assert f.attrs["status"] == "complete" and f.attrs["method"] == "sync[4]+strom(5%)"
        assert f.attrs["algorithm"] == "sync" and f.attrs["work_source"] == str(calibration)
        wall = f["metrics/wall_seconds"][()]
        assert wall[0] == 0 and np.all(np.diff(wall) > 0) and wall[-1] == row["wall_seconds"]
        steps = 2048 // (4 * BATCH)
        assert f["metrics/samples"][-1] == steps * 4 * BATCH and f.attrs["steps"] == steps
        assert list(f["ranks/rank"][()]) == [0, 1, 2, 3]
        assert list(f["compression/rank"][()]) == [r for r in range(4) for _ in range(steps)]
        pushed = f["compression/bytes_compressed"][()][f["compression/rank"][()] == 0].sum()
        assert f["ranks/bytes_pushed"][0] == pushed
    assert row["test_accuracy"] > 0.3  # chance is 0.2: it really trained
    start = np.full(N, 0.01, np.float32)
    warm = simulate(cfg_of(1, epochs=0.01, extra=["run.algorithm='sgd'"]), tmp_path / "w.h5",
                    calibration, start=start)
    assert warm["updates"] == 1
    with pytest.raises(Exception, match="float32 of shape"):
        simulate(cfg_of(1, extra=["run.algorithm='sgd'"]), tmp_path / "bad.h5", calibration,
                 start=start[:-1])


def test_checks_are_one_line_config_errors(data):
    with pytest.raises(ConfigError, match="layout.replicas >= 1"):
        check(cfg_of(0))
    with pytest.raises(ConfigError, match="needs no parameter server"):
        check(configs.load(None, [*SETS, "layout.shards=1"]))
    with pytest.raises(ConfigError, match="not modelled"):
        sim_of(data, cfg_of(2), faults=Faults(fail_at=((1, 0.1),)))
    plugin = configs.load(None, list(SETS))  # an algorithm registered by a plugin
    plugin = dataclasses.replace(plugin, run=dataclasses.replace(plugin.run, algorithm="noop"))
    with pytest.raises(ConfigError, match="simulate runs"):
        check(plugin)


CODEC = {"encode_per_entry": 2e-6, "decode_per_entry": 3e-7, "decode_per_word": 5e-6}


def test_a_strom_step_charges_the_calibrated_codec(tmp_path, data):
    """A dedicated-core calibration with codec costs (the campaigns'): every compressed
    step is the compute, the packets' allgather, the calibrated encode and decode of
    them and the update, and the run's file names the calibration as their source.
    The costs are ~1000x what this machine's codec takes, so a run that timed the
    codec instead would not add up."""
    from mpibelief.simulate import exchange_work
    from mpibelief.simulate.corecosts import calibration_file

    calibration = calibration_file(COSTS, tmp_path / "costs.h5", CODEC)
    cfg = cfg_of(4, extra=STROM)
    work, source = exchange_work.for_run(calibration, N, cfg.compression)
    assert {k: getattr(work, k) for k in CODEC} == CODEC
    assert source.startswith(f"codec (encode, decode): {calibration}, thread CPU time")
    sim = sim_of(data, cfg)
    sim.work = work
    for step in range(1, 4):
        seconds = sim.step(step)[1]
        words = int(sim.sizes.sum()) // 4
        exchange = collectives.packet_exchange_seconds(sim.sizes, COSTS.latency,
                                                       COSTS.bandwidth)
        codec = N * 2e-6 + N * 3e-7 + words * 5e-6
        assert seconds == pytest.approx(BATCH * 1e-3 + exchange + codec + N * 1e-6, rel=1e-12)
    out = tmp_path / "sim.h5"
    row = simulate(cfg, out, calibration)
    by_hand = sim_of(data, cfg)
    by_hand.work = LocalWork(0.0, **CODEC)
    assert row["wall_seconds"] == pytest.approx(sum(run(by_hand)), rel=1e-12)
    with h5py.File(out) as f:
        assert f.attrs["work_source"] == source
        assert {k: f.attrs[f"work_{k}"] for k in CODEC} == CODEC


def test_without_codec_costs_the_codec_is_timed_when_the_run_starts(tmp_path, data):
    """A calibration with neither ``work_*`` nor ``codec_*``: the old path, timed."""
    from mpibelief.simulate import exchange_work
    from mpibelief.simulate.corecosts import calibration_file

    calibration = calibration_file(COSTS, tmp_path / "costs.h5")
    out = tmp_path / "sim.h5"
    simulate(cfg_of(4, extra=STROM), out, calibration)
    with h5py.File(out) as f:
        assert f.attrs["work_source"] == exchange_work.TIMED_NOW
        assert f.attrs["work_encode_per_entry"] != CODEC["encode_per_entry"]
        assert 0 < f.attrs["work_encode_per_entry"] < 1e-6  # this machine's, timed
