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
5-15 from other work), where a simulated rank cannot be given a core of its own:

- ``concurrency`` k: the compute timing runs in k processes at once (forked, each on
  its own model), so the per-sample cost is what each of k replicas gets when they
  share the cores.  On a cluster with a core per rank, k = 1.
- ``run``: a real Downpour result file (a short ``R1_S1`` run made just before) from
  which the per-sample compute, the effective per-message cost and the shard's apply
  cost are taken, as the run's ``/ranks`` and ``/server`` tables measured them.  The
  compute timing then only gives the contention ratio and the spread: measured here,
  20 timed steps gave 28 and then 100 us per sample one minute apart (the machine's
  load comes in bursts), so a few seconds of real training are the steadier level.
  Measured here too: in training a pull or push of 2 MiB costs 0.7 to 3 ms (a
  replica descheduled inside MPI waits for a time slice), against 0.07 ms in
  ``bench/rma.py`` with the shard idle; the micro-benchmark alone would make the
  simulated replicas 15-40% too fast.  Both are scaled by
  the measured contention (k-process over 1-process compute time), since on shared
  cores the copies and the shard's update wait for the CPU as the kernels do.

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

FIELDS = ("compute_per_sample", "apply_per_param", "latency", "bandwidth")
OPTIONAL = ("first_step", "shard_links")  # read as 0 from files written before them
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
    tick = time.perf_counter()
    model.loss_and_grad(x, y)
    took.append(time.perf_counter() - tick)
print(took[0] - float(np.median(took[1:])))
"""


def first_step_seconds(cfg, n_in: int, n_out: int) -> float:
    """What a fresh process's first step costs over the others (loading the compiled
    kernels; measured 0.6 s against 8 ms here), timed in a fresh interpreter."""
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


def from_run(path: Path, bandwidth: float) -> dict:
    """Effective per-message cost and apply cost measured in a real Downpour run."""
    try:
        with h5py.File(path, "r") as f:
            r = {k: f[f"ranks/{k}"][()] for k in ("rank", "samples", "comm_seconds",
                                                 "compute_seconds")}
            shard_ranks, applied = f["server/shard_rank"][()], f["server/applied"][()]
            n, batch = int(f.attrs["n_params"]), _batch(f.attrs["config"])
    except (OSError, KeyError) as exc:
        raise UserError(f"cannot calibrate from run {path}: {exc}") from None
    replicas = r["samples"] > 0
    steps = r["samples"][replicas] / batch
    comm_step = float(np.mean(r["comm_seconds"][replicas] / steps))
    S = len(shard_ranks)
    latency = (comm_step - 2 * 4 * n / bandwidth) / (2 * S)  # a pull and a push per shard
    busy = r["compute_seconds"][np.isin(r["rank"], shard_ranks)]
    apply = float(np.sum(busy) / np.sum(applied) / (n / S))
    compute = float(np.sum(r["compute_seconds"][replicas]) / np.sum(r["samples"][replicas]))
    return {"run_comm_step_seconds": comm_step, "latency": max(latency, 0.0),
            "compute_per_sample": compute,
            "replica_samples": float(np.mean(r["samples"][replicas])),
            "apply_per_param": apply, "run_file": str(path)}


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
        measured = from_run(Path(run), bandwidth)
        raw.update(measured)
        latency, apply_per_param = measured["latency"], measured["apply_per_param"]
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
                  first)
    return costs, raw


def write(path: Path, costs: Costs, raw: dict) -> None:
    """``path``: the costs as root attributes, raw timings under ``/timings``, stamped."""
    from mpibelief.results import stamp

    path.parent.mkdir(parents=True, exist_ok=True)
    attrs = {name: getattr(costs, name) for name in FIELDS + OPTIONAL}
    attrs.update({k: v for k, v in raw.items() if not isinstance(v, np.ndarray)})
    attrs["loadavg_1min"] = os.getloadavg()[0]
    attrs["cpus"] = os.cpu_count() or 0
    with h5py.File(path, "w") as f:
        stamp(f, attrs)
        for name, value in raw.items():
            if isinstance(value, np.ndarray):
                f.create_dataset(f"timings/{name}", data=value)
        f.create_dataset(SPREAD, data=np.array(costs.spread, np.float64))


def read(path: Path) -> Costs:
    """The costs a calibration file holds (one-line error if it is not one)."""
    try:
        with h5py.File(path, "r") as f:
            spread = tuple(f[SPREAD][()]) if SPREAD in f else ()
            return Costs(*(float(f.attrs[name]) for name in FIELDS), spread=spread,
                         first_step=float(f.attrs.get("first_step", 0.0)),
                         shard_links=bool(f.attrs.get("shard_links", False)))
    except (OSError, KeyError) as exc:
        raise UserError(f"cannot read calibration {path}: {exc}"
                        " (make one with: mpibelief simulate CONFIG --calibrate)") from None
