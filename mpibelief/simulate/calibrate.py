"""Calibration: the measured costs that drive the simulator, kept in HDF5.

Three measurements, each of the code the simulated phase stands for (and, for
synchronous SGD, the exchange's arithmetic: :mod:`.exchange_work`, ``work_*``):

- compute: ``Model.loss_and_grad`` on real mini-batches of the config's data and
  model, timed here (median over ``steps`` after a warm-up that compiles the kernels);
  seconds per sample = median step / batch.
- apply: :meth:`ShardState.consume` of a gradient over the whole vector with the
  config's optimiser (what a shard does per push, minus reading its inbox window);
  seconds per parameter = median / parameters.
- network: latency and bandwidth fitted (least squares, ``t = latency + bytes /
  bandwidth``) to the medians of ``pull_fresh`` and ``push`` in ``bench/rma.py``'s
  ``results/bench_rma.h5``: the real client's operations over real MPI windows, not a
  raw ping-pong, so the protocol's own costs are in the fit.

Two refinements for a machine whose cores are shared (this workstation: 2 cores, load
3-13 from other work), where a simulated rank cannot be given a core of its own:

- ``run``: a real Downpour result file (a short ``R1_S1`` run made just before) from
  which every cost is taken in CPU seconds, as the run's ``/ranks/cpu_seconds`` and
  ``/server/apply_cpu_seconds`` measured them (:func:`from_run`), with the background
  load the replica's share of a core implies.  The simulator then shares the machine's
  cores among its ranks and that background (:mod:`.cores`), so the costs must not
  carry the contention of the run they came from: CPU seconds do not, wall seconds
  did (a replica's compute took 2-5x its CPU time here, with the other ranks and jobs).
  The compute timing then only gives the spread.  Measured here: in training a step's
  pull and push of 2 MiB each cost 0.6-1.1 ms of CPU and 2-8 ms of wall (MPICH calls
  ``sched_yield`` inside them: strace counted 2924 calls in 3 s of one replica, about
  20 a step, and on a busy machine each may hand the core away), against 0.07 ms each
  in ``bench/rma.py`` with the shard idle.
- ``concurrency`` k (older calibrations, no ``run``): the compute timing runs in k
  processes at once (forked, each on its own model), and every cost is scaled by the
  measured contention (k-process over 1-process compute time).  On a cluster with a
  core per rank, k = 1.

Medians, because this machine is shared: a burst of load on one timed step must not
set the simulated speed of every step.  The file (``results/calibration.h5``) holds the
fitted values as root attributes beside the raw timings and the provenance of
:func:`~mpibelief.results.stamp` (with the load average when it was measured), and a
simulated run names it in its own attributes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import numpy as np

from mpibelief.errors import UserError
from mpibelief.simulate import exchange_work
from mpibelief.simulate.cluster import Costs
from mpibelief.simulate.cores import Machine

FIELDS = ("compute_per_sample", "apply_per_param", "latency", "bandwidth")
# read as 0 (False) from files written before them
OPTIONAL = ("first_step", "shard_links", "evaluation", "descheduled")
SPREAD = "timings/spread"


FIRST_STEP = """
import sys, time, numpy as np
from mpibelief import config
from mpibelief.model import Model
cfg = config.load(sys.argv[1])
n_in, n_out, batch = map(int, sys.argv[2:5])
model = Model.from_config(cfg.model, n_in, n_out)
x = np.random.default_rng(0).standard_normal((batch, n_in)).astype(np.float32)
y = np.zeros(batch, np.int32)
took = []
for _ in range(4):
    tick = time.process_time()
    model.loss_and_grad(x, y)
    took.append(time.process_time() - tick)
print(took[0] - float(np.median(took[1:])))
"""


def first_step_seconds(cfg, n_in: int, n_out: int) -> float:
    """What a fresh process's first step costs over the others (loading the compiled
    kernels), timed in a fresh interpreter, in CPU seconds: measured here 0.42 s three
    times in a row while its wall time was 0.5, 1.1 and 1.2 s at load 7."""
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(cfg.to_toml())
        f.flush()
        env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", FIRST_STEP, f.name, str(n_in),
                               str(n_out), str(cfg.train.batch)], capture_output=True,
                              text=True, timeout=300, env=env)
    if done.returncode != 0:
        raise UserError(f"first-step timing failed: {done.stderr.strip()[-300:]}")
    return max(float(done.stdout.split()[-1]), 0.0)


def time_compute(model, data, batch: int, steps: int = 20, seed: int = 0) -> np.ndarray:
    """Seconds per ``loss_and_grad`` step on real batches (after 3 untimed warm-up steps)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(steps + 3):
        idx = rng.choice(len(data.y_train), batch, replace=False)
        x, y = data.x_train[idx], data.y_train[idx]
        tick = time.perf_counter()
        model.loss_and_grad(x, y)
        if i >= 3:
            out.append(time.perf_counter() - tick)
    return np.array(out)



def time_apply(n_params: int, optimizer, repeats: int = 20) -> np.ndarray:
    """Seconds per shard apply of an ``n_params`` gradient (the real ShardState)."""
    from mpibelief.ps.state import GRADIENT, ShardState

    optimizer.warm()
    state = ShardState(n_params, optimizer, clients=1)
    grad = np.random.default_rng(0).standard_normal(n_params).astype(np.float32) * 1e-3
    out = []
    for i in range(repeats + 2):
        tick = time.perf_counter()
        state.consume(GRADIENT, grad, 0, state.version, 0, 1)
        if i >= 2:
            out.append(time.perf_counter() - tick)
    return np.array(out)


def _timed_child(args) -> np.ndarray:
    model, data, batch, steps, seed = args
    return time_compute(model, data, batch, steps, seed)


def time_compute_concurrent(model, data, batch: int, k: int, steps: int = 20) -> np.ndarray:
    """Step times of ``k`` processes timing at once (forked: each its own copy)."""
    if k == 1:
        return time_compute(model, data, batch, steps)
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(k) as pool:
        found = pool.map(_timed_child, [(model, data, batch, steps, i) for i in range(k)])
    return np.concatenate(found)


def from_run(path: Path, bandwidth: float, cores: int | None = None,
             latency: float = 0.0) -> dict:
    """Compute, message, apply and evaluation costs measured in a real Downpour run, and
    the background load it met on this machine's ``cores`` (default: its own count).

    From a run whose ``/ranks`` has ``cpu_seconds`` (every Downpour run now), the costs
    are CPU seconds, what the simulator's phases are (:mod:`.cores`):

    - a replica was runnable for its training time less its waits for a free inbox
      slot, and got ``share = cpu / runnable`` of a core; its CPU is split between
      compute and messages as its wall time was (so the messages carry what waiting for
      a time slice inside MPI costs: in thread CPU time they were 0.64-1.09 ms a step
      in four runs, by this split 1.3-1.8 ms, and only the split makes the simulated
      steps as long as the real ones);
    - the messages' CPU is put on their bytes (``bandwidth``; ``latency`` stays the
      micro-benchmark's), not on their count: measured in thread CPU time, a step's
      pull and push cost 0.64-0.78 ms with one shard and 0.86-1.09 ms with two (the
      same bytes in twice the messages), where a cost per message would double;
    - a shard's CPU applying (``/server/apply_cpu_seconds``) per push is the apply
      cost (its idle polling, 0.2-1 s a run, left out: it is spread thin), the
      coordinator's CPU in its watch loop per evaluation the evaluation cost;
    - from a run of one replica and one shard, the share of its pushes applied before
      its next pull (staleness 0, the first push aside) is ``descheduled``, the chance
      that the replica lost its core in the one MPI call between push and pin for
      longer than the shard took to apply (:class:`~.cluster.Cluster`).

    The background: each other rank worked ``cpu / share`` of the replicas' training
    time ``T`` (at the same share, on shared cores), so with ``active`` ranks working on
    average::

        share = cores / (active + background)  =>  background = cores / share - active

    (0 when the replica had a core to itself, share near 1).  Checked against the other
    sessions sampled during four real runs (:mod:`.background`): 7.7 sampled for 7.7
    implied, 8.4 for 8.1, 8.8 for 7.6, 9.3 for 8.5.  From an older file without
    ``cpu_seconds``: wall seconds, the messages' cost on their count, no background.
    """
    names = ("rank", "samples", "comm_seconds", "compute_seconds", "train_seconds",
             "wait_seconds", "cpu_seconds")
    try:
        with h5py.File(path, "r") as f:
            r = {k: f[f"ranks/{k}"][()] for k in names if f"ranks/{k}" in f}
            shard_ranks, applied = f["server/shard_rank"][()], f["server/applied"][()]
            apply_cpu = f["server/apply_cpu_seconds"][()] if "server/apply_cpu_seconds" in f \
                else None
            staleness = f["server/staleness"][()] if "server/staleness" in f else np.zeros(1)
            n, batch = int(f.attrs["n_params"]), _batch(f.attrs["config"])
            evaluations = len(f["metrics/samples"]) - 1 if "metrics/samples" in f else 0
    except (OSError, KeyError) as exc:
        raise UserError(f"cannot calibrate from run {path}: {exc}") from None
    replicas, shards = r["samples"] > 0, np.isin(r["rank"], shard_ranks)
    steps, S = r["samples"][replicas] / batch, len(shard_ranks)
    found = {"replica_samples": float(np.mean(r["samples"][replicas])), "run_file": str(path)}
    cpu = r.get("cpu_seconds")
    if cpu is None or not cpu[replicas].all():  # wall seconds; messages by their count
        comm_step = float(np.mean(r["comm_seconds"][replicas] / steps))
        latency = (comm_step - 2 * 4 * n / bandwidth) / (2 * S)  # a pull, a push per shard
        found.update({"run_comm_step_seconds": comm_step, "latency": max(latency, 0.0),
                      "compute_per_sample": float(np.sum(r["compute_seconds"][replicas])
                                                  / np.sum(r["samples"][replicas])),
                      "apply_per_param": float(np.sum(r["compute_seconds"][shards])
                                               / np.sum(applied) / (n / S))})
        return found
    train, wait = r["train_seconds"][replicas], r["wait_seconds"][replicas]
    comm = r["comm_seconds"][replicas]
    share = float(np.sum(cpu[replicas]) / np.sum(train - wait))
    compute_cpu = cpu[replicas] * (train - comm) / (train - wait)
    comm_step = float(np.mean(cpu[replicas] * (comm - wait) / (train - wait) / steps))
    others = float(np.sum(cpu[~replicas]) / share / np.mean(train))
    if apply_cpu is None or not np.all(apply_cpu > 0):
        apply_cpu = cpu[shards]  # the whole serving loop's: idle polling too
    cores = cores or len(os.sched_getaffinity(0))
    background = cores / share - int(replicas.sum()) - others if share < 0.95 else 0.0
    apply_per_param = float(np.sum(apply_cpu) / np.sum(applied) / (n / S))
    if replicas.sum() == 1 and S == 1 and staleness.sum() > 1:  # the race it measures
        # staleness 0: the pull came after the push was applied (the first push: always)
        found["descheduled"] = max(float(staleness[0]) - 1, 0.0) / (staleness.sum() - 1)
    bytes_time = comm_step - 2 * S * latency  # 2 x 4n bytes a step: a pull and a push
    found.update({
        "run_comm_step_seconds": comm_step, "latency": latency,
        "bandwidth": 2 * 4 * n / bytes_time if bytes_time > 0 else bandwidth,
        "compute_per_sample": float(np.sum(compute_cpu) / np.sum(r["samples"][replicas])),
        "apply_per_param": apply_per_param,
        "evaluation": float(np.sum(cpu[~replicas & ~shards])) / max(evaluations, 1),
        "share": share, "active_others": others, "machine_cores": cores,
        "background": max(float(background), 0.0)})
    return found


def _batch(toml_text: str) -> int:
    import tomllib

    return int(tomllib.loads(toml_text)["train"]["batch"])


def fit_network(path: Path) -> tuple[float, float, dict]:
    """``(latency, bandwidth, used)`` fitted to bench_rma's pull_fresh and push medians."""
    if not path.exists():
        raise UserError(f"no network measurement at {path}: run bench/rma.py first"
                        " (PYTHONPATH=. mpiexec -n 3 python -m mpi4py bench/rma.py)")
    sizes, times = [], []
    with h5py.File(path, "r") as f:
        for mode in ("pull_fresh", "push"):
            group = f[f"bench/rma/{mode}"]
            sizes.append(group["sizes"][()])
            times.append(np.nanmedian(group["timings"][()], axis=1))
    size, seconds = np.concatenate(sizes).astype(float), np.concatenate(times)
    slope, latency = np.polyfit(size, seconds, 1)
    latency = max(float(latency), float(seconds.min()) * 0.5)  # a fit may cross zero
    return latency, 1.0 / float(slope), {"sizes": size, "seconds": seconds}


def measure(cfg, data, rma: Path, steps: int = 20, concurrency: int = 1,
            run: Path | None = None) -> tuple[Costs, dict]:
    """Calibrate the config's model and optimiser on this machine; ``(costs, raw)``.

    Args:
        concurrency: processes timing the compute at once (see the module docstring).
        run: a real Downpour run's file for the in-run message and apply costs.
    """
    from mpibelief.model import Model
    from mpibelief.optim import Optimizer

    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    batch = cfg.train.batch
    alone = time_compute(model, data, batch, steps, cfg.run.seed)
    # Every real replica pays its first step's kernel loading once, in its training loop.
    first = first_step_seconds(cfg, data.n_inputs, data.n_classes)
    compute = time_compute_concurrent(model, data, batch, concurrency, steps) \
        if concurrency > 1 else alone
    contention = float(np.median(compute) / np.median(alone))
    apply = time_apply(model.n_params, Optimizer.from_config(cfg.train), steps)
    latency, bandwidth, net = fit_network(Path(rma))
    raw = {"compute_step_seconds": compute, "apply_seconds": apply,
           "network_sizes": net["sizes"], "network_seconds": net["seconds"],
           "n_params": model.n_params, "batch": batch, "rma_file": str(rma),
           "concurrency": concurrency, "contention": contention, "first_step": first}
    # The sync exchange's arithmetic (reduce, Strom's encode and decode): .exchange_work.
    raw.update(exchange_work.measure(model.n_params, cfg.compression).scaled(contention).attrs())
    apply_per_param = float(np.median(apply)) / model.n_params
    if run is not None:
        measured = from_run(Path(run), bandwidth, latency=latency)
        raw.update(measured)
        latency, apply_per_param = measured["latency"], measured["apply_per_param"]
        bandwidth = measured.get("bandwidth", bandwidth)
    # The spread has mean 1, so the mean step is the calibrated one (a median-normalised
    # spread of this machine's skewed timings made simulated steps 2-3x too slow).
    median = float(np.median(compute))
    per_sample = median / batch
    if run is not None:  # the run's replica paid its first step once: take it out
        samples = measured["replica_samples"]
        per_sample = contention * max(measured["compute_per_sample"] - first / samples,
                                      0.2 * measured["compute_per_sample"])
    costs = Costs(per_sample, apply_per_param * contention, latency * contention,
                  bandwidth, tuple(float(v) for v in np.sort(compute) / np.mean(compute)),
                  first, evaluation=raw.get("evaluation", 0.0),
                  descheduled=raw.get("descheduled", 0.0))
    return costs, raw


def write(path: Path, costs: Costs, raw: dict) -> None:
    """``path``: the costs as root attributes, raw timings under ``/timings``, stamped.

    A raw figure named as a cost (the run's compute per sample, before the first step
    is taken out) is kept as ``run_<name>``: the cost is what :func:`read` returns.
    """
    from mpibelief.results import stamp

    path.parent.mkdir(parents=True, exist_ok=True)
    names = FIELDS + OPTIONAL
    attrs = {f"run_{k}" if k in names else k: v for k, v in raw.items()
             if not isinstance(v, np.ndarray)}
    attrs.update({name: getattr(costs, name) for name in names})
    attrs["loadavg_1min"] = os.getloadavg()[0]
    attrs["cpus"] = os.cpu_count() or 0
    with h5py.File(path, "w") as f:
        stamp(f, attrs)
        for name, value in raw.items():
            if isinstance(value, np.ndarray):
                f.create_dataset(f"timings/{name}", data=value)
        f.create_dataset(SPREAD, data=np.array(costs.spread, np.float64))


def machine(path: Path) -> Machine:
    """The machine a calibration from a run measured: its cores, shared with the
    background load the run met (:func:`from_run`)."""
    try:
        with h5py.File(path, "r") as f:
            return Machine(int(f.attrs["machine_cores"]), float(f.attrs["background"]))
    except (OSError, KeyError) as exc:
        raise UserError(f"{path} measured no machine (calibrate from a real run that"
                        f" records /ranks/cpu_seconds): {exc}") from None


def read(path: Path) -> Costs:
    """The costs a calibration file holds (one-line error if it is not one)."""
    try:
        with h5py.File(path, "r") as f:
            spread = tuple(f[SPREAD][()]) if SPREAD in f else ()
            return Costs(*(float(f.attrs[name]) for name in FIELDS), spread=spread,
                         **{k: (bool if k == "shard_links" else float)(f.attrs.get(k, 0))
                            for k in OPTIONAL})
    except (OSError, KeyError) as exc:
        raise UserError(f"cannot read calibration {path}: {exc}"
                        " (make one with: mpibelief simulate CONFIG --calibrate)") from None
