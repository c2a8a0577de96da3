"""Shared cores in the simulator: processor sharing, run queues per core, and a cluster on
fewer cores than ranks.

Every time here is exact (the costs are chosen, nothing is timed), so the tests are
deterministic; they run in a fraction of a second.
"""

from __future__ import annotations

import h5py
import pytest
import simpy

from mpibelief.simulate import calibrate
from mpibelief.simulate.cluster import Costs
from mpibelief.simulate.cores import Cores, Machine
from mpibelief.simulate.runqueues import RunQueues
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


REPLICA0, REPLICA1, SHARD = ("replica", 0), ("replica", 1), ("shard", 0)


def queue_times(cores: int, jobs: list[tuple], migrate: float = 0.0, placed=None):
    """Each ``(arrival, cpu seconds, owner[, urgent])`` job's end time on run queues."""
    env = simpy.Environment()
    queues = RunQueues(env, cores, migrate=migrate)
    queues.placed.update(placed or {})
    ends = [None] * len(jobs)

    def job(i, arrival, seconds, owner, urgent=False):
        yield env.timeout(arrival)
        yield from queues.work(seconds, urgent, owner)
        ends[i] = env.now

    for i, spec in enumerate(jobs):
        env.process(job(i, *spec))
    env.run(until=100.0)
    return ends


def test_a_sleeper_wakes_on_an_idle_core():
    """One replica on 2 cores: the shard's apply and the coordinator's evaluation take
    the free core, whatever core they last ran on, so the replica is not slowed."""
    coordinator = ("coordinator", 0)
    jobs = [(0.0, 1.0, REPLICA0), (0.1, 0.5, SHARD, True), (0.7, 0.3, coordinator)]
    placed = {SHARD: 0, coordinator: 0}
    assert queue_times(2, jobs, placed=placed) == pytest.approx([1.0, 0.6, 1.0])
    assert finish_times(2, [(0.0, 1.0), (0.1, 0.5, True), (0.7, 0.3)]) == \
        pytest.approx([1.0, 0.6, 1.0])  # as on shared cores


def test_with_every_core_busy_a_shard_slows_only_the_replica_on_its_core():
    """Two replicas on two cores: an apply of 0.5 s on core 0 (where the shard last ran)
    stops replica 0 for 0.5 s and leaves replica 1 alone; shared equally, each would
    lose a quarter of a second, and they would stay in step."""
    jobs = [(0.0, 1.0, REPLICA0), (0.0, 1.0, REPLICA1), (0.0, 0.5, SHARD, True)]
    assert queue_times(2, jobs, placed={SHARD: 0}) == pytest.approx([1.5, 1.0, 0.5])
    assert queue_times(2, jobs, placed={SHARD: 1}) == pytest.approx([1.0, 1.5, 0.5])
    assert finish_times(2, [(0.0, 1.0), (0.0, 1.0), (0.0, 0.5, True)]) == \
        pytest.approx([1.25, 1.25, 0.5])


def test_the_balancer_moves_a_sleeper_between_busy_cores():
    """Applies of 1 ms every 10 ms for 100 s beside two replicas: the shard's core is
    redrawn every 0.5 s on average, so each replica loses about half the applies' time
    (10 s in all), never all of it."""
    env = simpy.Environment()
    queues = RunQueues(env, 2)

    def replica(r):
        yield from queues.work(1000.0, False, ("replica", r))

    def shard():
        while True:
            yield from queues.work(1e-3, True, SHARD)
            yield env.timeout(9e-3)

    for r in range(2):
        env.process(replica(r))
    env.process(shard())
    env.run(until=100.0)
    queues._charge()  # the CPU each replica got, up to now
    lost = [100.0 - (1000.0 - left) for left, urgent, _ in queues.jobs.values()
            if not urgent]
    assert sum(lost) == pytest.approx(10.0, rel=0.01)  # every apply took a core
    assert 3.0 < min(lost) <= max(lost) < 7.0, lost


def simulate(data, replicas, shards, machine=None, costs=COSTS, eval_every=0.0):  # noqa: F811
    from mpibelief.simulate.run import build

    cfg = cfg_of(replicas, shards, extra=[f"train.eval_every={eval_every or 1.0}"])
    _, server, cluster = build(cfg, data, costs, NO_FAULTS, machine=machine)
    cluster.eval_every = eval_every
    cluster.run()
    return server, cluster


def test_enough_cores_cost_what_a_core_per_rank_costs(data):  # noqa: F811
    """A core for every rank and nothing else running: every replica phase lasts its
    cost, as on the default cluster; only the shards' applies start later (an idle
    shard notices a push at its next poll), which moves no replica here (a step, 16 ms,
    is far longer than a poll and an apply)."""
    _, ca = simulate(data, 3, 2)
    _, cb = simulate(data, 3, 2, Machine(cores=6))
    for a, b in zip(ca.replicas, cb.replicas, strict=True):
        assert b.stats.train_seconds == pytest.approx(a.stats.train_seconds, rel=1e-9)
        assert b.stats.compute_seconds == pytest.approx(a.stats.compute_seconds, rel=1e-9)
    assert sum(s.stats.wait_seconds for s in cb.stores) == 0.0


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
        f["server/apply_cpu_seconds"] = [0.25]  # of the shard's 0.5: it idled the rest
        f["server/staleness"] = [0, 100]  # no pull came after its push was applied
        f["metrics/samples"] = [0.0, 500.0, 1000.0]  # two evaluations while training
    found = calibrate.from_run(path, bandwidth=1e9, cores=2, latency=1e-5)
    assert found["share"] == pytest.approx(0.4)
    assert found["background"] == pytest.approx(3.75)
    assert found["compute_per_sample"] == pytest.approx(8.0 * 0.4 / 1000)
    # 0.8 ms of messages a step (2 s of comm at 0.4), on 2 x 4n bytes, after the
    # micro-benchmark's latency for a pull and a push
    assert found["latency"] == 1e-5
    assert found["bandwidth"] == pytest.approx(2 * 4 * n / (2.0 * 0.4 / 100 - 2e-5))
    assert found["apply_per_param"] == pytest.approx(0.25 / 100 / n)
    assert found["descheduled"] == 0.0
    assert found["evaluation"] == pytest.approx(0.25)


def test_a_descheduled_replica_pulls_after_the_apply(data):  # noqa: F811
    """With chance ``descheduled`` after each MPI call the replica pins the next shard
    only once it applied the push: never, always, or about that share; with two shards
    the second is pinned after two such calls, so about twice as often."""
    found = []
    for chance in (0.0, 1.0, 0.3):
        costs = Costs(*[getattr(COSTS, k) for k in calibrate.FIELDS], descheduled=chance)
        server, _ = simulate(data, 1, 1, Machine(cores=4), costs)
        hist = server.states[0].stats.staleness
        found.append((hist[0] - 1) / (hist.sum() - 1))  # the first push: nothing before
    assert found[0] == 0.0 and found[1] == 1.0 and 0.15 < found[2] < 0.45, found
    costs = Costs(*[getattr(COSTS, k) for k in calibrate.FIELDS], descheduled=0.2)
    server, _ = simulate(data, 1, 2, Machine(cores=4), costs)
    fresh = [(s.stats.staleness[0] - 1) / (s.stats.staleness.sum() - 1) for s in server.states]
    assert 0.08 < fresh[0] < 0.32 and fresh[1] > fresh[0] + 0.05, fresh  # 0.2 and 0.36


def test_a_calibration_file_gives_back_its_costs(tmp_path):
    """The raw run figures written beside the costs never replace them (the run's compute
    per sample still holds the first step, which the cost has taken out)."""
    costs = Costs(*[getattr(COSTS, k) for k in calibrate.FIELDS], first_step=0.4,
                  evaluation=0.25, descheduled=0.05)
    path = tmp_path / "cal.h5"
    calibrate.write(path, costs, {"compute_per_sample": 9.0, "background": 2.5,
                                  "machine_cores": 2})
    assert calibrate.read(path) == costs
    assert calibrate.machine(path) == Machine(2, 2.5)
    with h5py.File(path) as f:
        assert f.attrs["run_compute_per_sample"] == 9.0


def first_reads(data, costs, seed: int) -> list[int]:  # noqa: F811
    """The version each of two replicas' first pull read, on a 4-core machine."""
    from mpibelief.simulate.run import build

    _, _, cluster = build(cfg_of(2, 1), data, costs, NO_FAULTS, machine=Machine(cores=4),
                          seed=seed)
    assert len(cluster.start_up) == 2  # build timed each replica's copy of its shard
    cluster.start_up = (0.5, 0.5)
    reads = [[], []]
    for r, store in enumerate(cluster.stores):
        def pull(out, pull=store.pull, r=r):
            reads[r].append(int(pull(out)[0]))
            return reads[r][-1:]
        store.pull = pull
    cluster.run()
    return [r[0] for r in reads], cluster


def test_replicas_start_up_apart_before_their_first_pull_on_a_shared_machine(data):  # noqa: F811
    """A replica's start-up (0.5 s here) comes before its first pull and lasts a draw
    from the spread, so a replica whose start-up took longer reads the other's pushes;
    alike (no spread), both read the loaded version 1, as before."""
    alike = Costs(*[getattr(COSTS, k) for k in calibrate.FIELDS])
    reads, cluster = first_reads(data, alike, 0)
    assert reads == [1, 1]
    step = cluster.replicas[0].stats.train_seconds / cluster.replicas[0].stats.steps
    assert step < 0.1  # the 0.5 s start-up is not a training step's
    apart = Costs(*[getattr(COSTS, k) for k in calibrate.FIELDS], spread=(0.5, 1.5))
    found = [sorted(first_reads(data, apart, seed)[0]) for seed in range(4)]
    # 0.5 s apart: the latecomer reads the leader's ~15 pushes (16 ms steps) applied.
    assert all(f[0] == 1 for f in found) and any(f[1] > 10 for f in found), found
    assert all(f[1] in (1,) or f[1] > 10 for f in found), found
