"""Calibration: the measured costs that drive the simulator, kept in HDF5.

Three measurements, each of the code the simulated phase stands for:

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
from mpibelief.simulate.cluster import Costs

FIELDS = ("compute_per_sample", "apply_per_param", "latency", "bandwidth")


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


def measure(cfg, data, rma: Path, steps: int = 20) -> tuple[Costs, dict]:
    """Calibrate the config's model and optimiser on this machine; ``(costs, raw)``."""
    from mpibelief.model import Model
    from mpibelief.optim import Optimizer

    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    compute = time_compute(model, data, cfg.train.batch, steps, cfg.run.seed)
    apply = time_apply(model.n_params, Optimizer.from_config(cfg.train), steps)
    latency, bandwidth, net = fit_network(Path(rma))
    costs = Costs(float(np.median(compute)) / cfg.train.batch,
                  float(np.median(apply)) / model.n_params, latency, bandwidth)
    raw = {"compute_step_seconds": compute, "apply_seconds": apply,
           "network_sizes": net["sizes"], "network_seconds": net["seconds"],
           "n_params": model.n_params, "batch": cfg.train.batch, "rma_file": str(rma)}
    return costs, raw


def write(path: Path, costs: Costs, raw: dict) -> None:
    """``path``: the costs as root attributes, raw timings under ``/timings``, stamped."""
    from mpibelief.results import stamp

    path.parent.mkdir(parents=True, exist_ok=True)
    attrs = {name: getattr(costs, name) for name in FIELDS}
    attrs.update({k: v for k, v in raw.items() if not isinstance(v, np.ndarray)})
    attrs["loadavg_1min"] = os.getloadavg()[0]
    attrs["cpus"] = os.cpu_count() or 0
    with h5py.File(path, "w") as f:
        stamp(f, attrs)
        for name, value in raw.items():
            if isinstance(value, np.ndarray):
                f.create_dataset(f"timings/{name}", data=value)


def read(path: Path) -> Costs:
    """The costs a calibration file holds (one-line error if it is not one)."""
    try:
        with h5py.File(path, "r") as f:
            return Costs(*(float(f.attrs[name]) for name in FIELDS))
    except (OSError, KeyError) as exc:
        raise UserError(f"cannot read calibration {path}: {exc}"
                        " (make one with: mpibelief simulate CONFIG --calibrate)") from None
