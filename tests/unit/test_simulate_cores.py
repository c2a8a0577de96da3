"""Shared cores in the simulator: processor sharing, and a cluster on fewer cores than ranks.

Every time here is exact (the costs are chosen, nothing is timed), so the tests are
deterministic; they run in a fraction of a second.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import simpy

from mpibelief.simulate import calibrate
from mpibelief.simulate.cluster import Costs
from mpibelief.simulate.cores import Cores, Machine
from tests.unit.test_simulate import COSTS, NO_FAULTS, cfg_of, data  # noqa: F401 - fixture


def finish_times(cores: int, jobs: list[tuple], background: float = 0.0):
    """Each ``(arrival, cpu seconds[, urgent])`` job's end time on ``cores`` shared cores."""
    env = simpy.Environment()
    shared = Cores(env, cores, background)
    ends = [None] * len(jobs)

    def job(i, arrival, seconds, urgent=False):
        yield env.timeout(arrival)
        yield from shared.work(seconds, urgent)
        ends[i] = env.now

    for i, spec in enumerate(jobs):
        env.process(job(i, *spec))
    env.run()
    return ends


def test_four_ranks_of_equal_work_take_twice_as_long_on_two_cores_as_on_four():
    assert finish_times(4, [(0.0, 1.0)] * 4) == pytest.approx([1.0] * 4)
    assert finish_times(2, [(0.0, 1.0)] * 4) == pytest.approx([2.0] * 4)
    assert finish_times(8, [(0.0, 1.0)] * 4) == pytest.approx([1.0] * 4)  # never above 1


def test_a_shard_apply_delays_a_replica_compute_on_a_shared_core():
    compute, apply, urgent = (0.0, 1.0), (0.0, 0.5), (0.0, 0.5, True)
    assert finish_times(2, [compute, apply]) == pytest.approx([1.0, 0.5])  # a core each
    assert finish_times(2, [compute, urgent]) == pytest.approx([1.0, 0.5])
    # One core, fair shares: both at half speed until the apply ends at 1.0 (0.5 of the
    # compute done), then the compute's other 0.5 s alone.
    assert finish_times(1, [compute, apply]) == pytest.approx([1.5, 1.0])
    # Urgent (a shard waking to apply): the apply takes the core at once, the compute
    # waits 0.5 s; it ends at 1.5 all the same: the core did the same work.
    assert finish_times(1, [compute, urgent]) == pytest.approx([1.5, 0.5])
    # Two cores, four other runnable processes: the apply still runs at full speed, the
    # compute shares the other core with them (0.2 of a core) until the apply ends at
    # 0.5, then both cores (0.4): 0.1 + 0.4 * 2.25 = 1 s of CPU at 2.75 s.
    assert finish_times(2, [compute, urgent], background=4) == pytest.approx([2.75, 0.5])


def test_arrivals_and_background_change_the_rates():
    # B arrives at 0.5 s: both at half speed until A's last 0.5 s is done at 1.5.
    assert finish_times(1, [(0.0, 1.0), (0.5, 1.0)]) == pytest.approx([1.5, 2.0])
    # Two other runnable processes on 2 cores: one job gets 2/3 of a core.
    assert finish_times(2, [(0.0, 1.0)], background=2.0) == pytest.approx([1.5])
    with pytest.raises(ValueError):
        Machine(cores=0)


def simulate(data, replicas, shards, machine=None, costs=COSTS, eval_every=0.0):  # noqa: F811
    from mpibelief.simulate.run import build

    cfg = cfg_of(replicas, shards, extra=[f"train.eval_every={eval_every or 1.0}"])
    _, server, cluster = build(cfg, data, costs, NO_FAULTS, machine)
    cluster.eval_every = eval_every
    cluster.run()
    return server, cluster


def test_a_core_per_rank_is_the_cluster_unchanged(data):  # noqa: F811
    """Enough cores for every rank: the same simulated run as the default, to the bit."""
    a, ca = simulate(data, 3, 2)
    b, cb = simulate(data, 3, 2, Machine(cores=6))
    assert ca.env.now == pytest.approx(cb.env.now, rel=1e-12)
    np.testing.assert_array_equal(a.params(), b.params())
    for sa, sb in zip(a.states, b.states, strict=True):
        np.testing.assert_array_equal(sa.stats.staleness, sb.stats.staleness)


def test_replicas_on_one_core_take_turns(data):  # noqa: F811
    """Two replicas computing on one core: each step takes about twice as long."""
    _, own = simulate(data, 2, 1)
    _, shared = simulate(data, 2, 1, Machine(cores=1))
    per_step = [c.replicas[0].stats.train_seconds / c.replicas[0].stats.steps
                for c in (own, shared)]
    assert 1.8 < per_step[1] / per_step[0] < 2.2, per_step
    # The shard's applies take the core at once (urgent): each lasts just its cost.
    for cluster in (own, shared):
        applied = shared.server.states[0].stats.applied
        cost = applied * shared.server.n_params * COSTS.apply_per_param
        assert cluster.times[0].busy_seconds == pytest.approx(cost, rel=1e-9)


def test_the_coordinator_evaluating_slows_replicas_on_shared_cores_only(data):  # noqa: F811
    evaluating = Costs(*[getattr(COSTS, k) for k in calibrate.FIELDS], evaluation=0.05)
    _, quiet = simulate(data, 1, 1, Machine(cores=1))
    _, busy = simulate(data, 1, 1, Machine(cores=1), evaluating, eval_every=0.05)
    _, own = simulate(data, 1, 1, None, evaluating, eval_every=0.05)
    assert own.env.now == pytest.approx(simulate(data, 1, 1)[1].env.now)
    # Half the time the replica shares the core with an evaluation: 1.5x as long,
    # give or take where the evaluations fall against the run's end.
    assert 1.3 < busy.env.now / quiet.env.now < 1.6, (busy.env.now, quiet.env.now)


def test_cpu_costs_and_background_from_a_run_file(tmp_path):
    """A replica that got 0.4 of a core on 2 cores, beside a shard and a coordinator of
    0.5 CPU seconds each (so working 1.25 s each of its 10 s, at 0.4 of a core too):
    2 / 0.4 = 1 + 0.25 + background, so a background of 3.75."""
    path = tmp_path / "run.h5"
    n, batch = 1000, 10
    with h5py.File(path, "w") as f:
        f.attrs["n_params"], f.attrs["config"] = n, "[train]\nbatch = 10\n"
        f["ranks/rank"] = [0, 1, 2]
        f["ranks/samples"] = [0, 0, 100 * batch]
        f["ranks/train_seconds"] = [0.0, 10.0, 10.0]
        f["ranks/compute_seconds"] = [0.0, 1.0, 8.0]
        f["ranks/comm_seconds"] = [0.0, 0.0, 2.0]
        f["ranks/wait_seconds"] = [0.0, 9.0, 0.0]
        f["ranks/cpu_seconds"] = [0.5, 0.5, 4.0]
        f["server/shard_rank"], f["server/applied"] = [1], [100]
        f["metrics/samples"] = [0.0, 500.0, 1000.0]  # two evaluations while training
    found = calibrate.from_run(path, bandwidth=1e9, cores=2, latency=1e-5)
    assert found["share"] == pytest.approx(0.4)
    assert found["background"] == pytest.approx(3.75)
    assert found["compute_per_sample"] == pytest.approx(8.0 * 0.4 / 1000)
    # 0.8 ms of messages a step (2 s of comm at 0.4), on 2 x 4n bytes, after the
    # micro-benchmark's latency for a pull and a push
    assert found["latency"] == 1e-5
    assert found["bandwidth"] == pytest.approx(2 * 4 * n / (2.0 * 0.4 / 100 - 2e-5))
    assert found["apply_per_param"] == pytest.approx(0.5 / 100 / n)
    assert found["evaluation"] == pytest.approx(0.25)
