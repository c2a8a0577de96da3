"""Costs of a cluster of dedicated cores on a stated network: the campaigns' machine.

:mod:`.calibrate` measures this workstation as it is, to check the simulator against
real runs on it: wall-clock medians on shared cores.  The Figure 4 and 5 campaigns
simulate another machine, a cluster on which every rank has a core of its own and the
network is the paper's era's (a preset of :mod:`.network`), so their costs are
measured in a way the shared cores do not bend:

- compute: ``Model.loss_and_grad`` on real mini-batches of the config's data, timed in
  the thread's CPU seconds (``time.thread_time``), median over ``steps`` after warm-up
  steps: what one dedicated core gives.  Measured on this machine at load 4-7 on 2
  cores: 44 us per sample in CPU time against 144 us in wall time (the calibration's
  concurrency-1 wall median), so the wall clock would have made every core 3x slower
  than it is.  With ``P`` partitions of a replica on the cores of one machine
  (model parallelism within a machine, as the paper's replicas used many cores), the
  compute is scaled by the scaling model's step time at ``P`` over ``P = 1``
  (:class:`~.scaling.Scaling`: every partition's tile timed in CPU seconds, the exact
  boundary bytes over this machine's MPI as ``results/bench_rma.h5`` measured it).
- apply: :meth:`ShardState.consume` of a whole gradient with each update rule (SGD,
  Adagrad: a run's shards pay its own rule's), CPU seconds per parameter, as above.
- spread: the same compute steps' *wall* times over their mean: real step times vary
  (here with the machine's other jobs, so wider than a dedicated core's), and replicas
  that all took exactly the median would run in lockstep.
- network: the preset's latency and bandwidth, with ``shard_links``: every shard's
  link is shared by the replicas talking to it (:class:`~.cluster.Costs`).
- codec: Strom's encode (residual, tau, pack) and decode of received packets
  (:func:`.exchange_work.measure_codec`, the config's ``[compression]`` policy with
  its ``fraction``), CPU seconds per entry and per packet word, medians over ``steps``
  after a warm-up call: what a synchronous Strom replica's core spends on the codec.
  A file measured before these existed is completed by :func:`load_or_measure`
  (``codec_*`` root attributes, ``/timings/codec_*``; nothing else in it changes).
- first step: 0.  The replicas are launched, and load their kernels, while the
  warmstart runs, as the paper's waited for theirs.

The file (``results/fig45_calibration.h5``) is a calibration file as
:func:`.calibrate.read` reads it (P = 1, SGD's apply: root attributes, ``/timings``),
plus every ``P``'s compute under ``/partitions/P<p>``, every rule's apply in ``/apply``'s
attributes, the codec's costs (``codec_*``) and the raw timings; :func:`calibration_file`
writes one run's costs as a plain calibration file for :func:`.run.simulate`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from mpibelief.errors import UserError
from mpibelief.simulate import calibrate, exchange_work
from mpibelief.simulate.cluster import Costs
from mpibelief.simulate.network import Network, preset

PARTITIONS = (1, 2, 4, 8)  # partitions of one replica on the cores of one machine
CODEC_CLOCK = "thread CPU time of one core (time.thread_time), median after a warm-up"


def time_steps(model, data, batch: int, steps: int, seed: int = 0):
    """``(cpu, wall)`` seconds of ``steps`` ``loss_and_grad`` calls on real batches,
    after 3 untimed ones (Numba's compile or cache load, first touches of memory)."""
    rng = np.random.default_rng(seed)
    cpu, wall = [], []
    for i in range(steps + 3):
        idx = np.sort(rng.choice(len(data.y_train), batch, replace=False))
        x, y = data.x_train[idx], data.y_train[idx]
        tick, cpu_tick = time.perf_counter(), time.thread_time()
        model.loss_and_grad(x, y)
        if i >= 3:
            cpu.append(time.thread_time() - cpu_tick)
            wall.append(time.perf_counter() - tick)
    return np.array(cpu), np.array(wall)


def time_apply(n_params: int, optimizer, repeats: int) -> np.ndarray:
    """CPU seconds of a shard's apply of an ``n_params`` gradient (the real ShardState)."""
    from mpibelief.ps.state import GRADIENT, ShardState

    optimizer.warm()
    state = ShardState(n_params, optimizer, clients=1)
    grad = np.random.default_rng(0).standard_normal(n_params).astype(np.float32) * 1e-3
    out = []
    for i in range(repeats + 2):
        tick = time.thread_time()
        state.consume(GRADIENT, grad, 0, state.version, 0, 1)
        if i >= 2:
            out.append(time.thread_time() - tick)
    return np.array(out)


def measure(cfg, data, network: str, partitions=PARTITIONS,
            rma: Path = Path("results/bench_rma.h5"),
            steps: int = 30) -> tuple[CoreCosts, dict]:
    """The costs for each ``P`` and update rule, and the raw timings (see the module)."""
    from mpibelief.config import OPTIMIZERS
    from mpibelief.model import Model
    from mpibelief.optim import Optimizer
    from mpibelief.simulate.scaling import Scaling

    one_thread()
    net = preset(network)
    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    batch = cfg.train.batch
    cpu, wall = time_steps(model, data, batch, steps, cfg.run.seed)
    applies = {kind: time_apply(model.n_params, Optimizer(kind, cfg.train.lr), steps)
               for kind in OPTIMIZERS}
    within = Network("local", *calibrate.fit_network(Path(rma))[:2])
    curve = Scaling(model, batch, list(partitions)).curve(within)
    per_sample = float(np.median(cpu)) / batch
    codec, codec_raw = measure_codec(model.n_params, cfg.compression, steps)
    found = CoreCosts(
        compute={int(P): per_sample * float(s / curve["seconds"][0])
                 for P, s in zip(curve["partitions"], curve["seconds"], strict=True)},
        apply={kind: float(np.median(t)) / model.n_params for kind, t in applies.items()},
        network=net, spread=tuple(float(v) for v in np.sort(wall) / np.mean(wall)),
        codec=codec)
    raw = {"cpu_step_seconds": cpu, "wall_step_seconds": wall,
           **{f"apply_seconds_{kind}": t for kind, t in applies.items()},
           "scaling_partitions": curve["partitions"], "scaling_seconds": curve["seconds"],
           "n_params": model.n_params, "batch": batch, "network": net.name,
           "within_machine_latency": within.latency,
           "within_machine_bandwidth": within.bandwidth, "rma_file": str(rma),
           "clock": "thread CPU time (compute, apply); wall time (spread)",
           "wall_over_cpu": float(np.median(wall) / np.median(cpu)),
           "kind": "dedicated cores (mpibelief.simulate.corecosts)", **codec_raw}
    return found, raw


def one_thread() -> None:
    threads = {v: os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    if any(value != "1" for value in threads.values()):
        raise UserError(f"corecosts times one core: set {threads} to 1 before numpy loads"
                        " (thread CPU time would miss the BLAS threads' work)")


def measure_codec(n_params: int, comp, repeats: int) -> tuple[dict[str, float], dict]:
    """The codec's CPU seconds per entry and per word (see the module), and the raw
    timings and their circumstances as ``codec_*`` entries (root attributes of the file,
    arrays under ``/timings``)."""
    codec, raw = exchange_work.measure_codec(n_params, comp, repeats, clock=time.thread_time)
    return codec, {"codec_clock": CODEC_CLOCK, "codec_fraction": float(comp.fraction),
                   "codec_tau": float(comp.tau), "codec_repeats": int(repeats),
                   "codec_loadavg_1min": float(os.getloadavg()[0]),
                   **{f"codec_{k}": v for k, v in raw.items()}}


@dataclass(frozen=True)
class CoreCosts:
    """Compute per sample by partitions, apply per parameter by update rule, a network.

    :meth:`costs` gives the :class:`~.cluster.Costs` of one run."""

    compute: dict[int, float]
    apply: dict[str, float]
    network: Network
    spread: tuple[float, ...]
    codec: dict[str, float] | None = field(default=None)  # Strom's CPU s; None: unmeasured

    def costs(self, partitions: int = 1, optimizer: str = "sgd") -> Costs:
        if partitions not in self.compute:
            raise UserError(f"no compute cost for {partitions} partitions (measured:"
                            f" {sorted(self.compute)})")
        return Costs(self.compute[partitions], self.apply[optimizer], self.network.latency,
                     self.network.bandwidth, self.spread, 0.0, True)


def write(path: Path, found: CoreCosts, raw: dict, optimizer: str = "sgd") -> None:
    """``path``: a calibration file (:func:`.calibrate.read` gives P = 1 with
    ``optimizer``), every P under ``/partitions``, every rule's apply under ``/apply``."""
    calibrate.write(path, found.costs(1, optimizer), raw)
    with h5py.File(path, "r+") as f:
        for P, seconds in found.compute.items():
            f.create_group(f"partitions/P{P}").attrs.update(
                {"partitions": P, "compute_per_sample": seconds})
        f.create_group("apply").attrs.update(found.apply)
    if found.codec is not None:
        add_codec(path, found.codec, {})


def add_codec(path: Path, codec: dict[str, float], raw: dict) -> None:
    """Write the codec's costs into ``path`` (``codec_*`` root attributes, arrays under
    ``/timings``), touching nothing else in it."""
    with h5py.File(path, "r+") as f:
        f.attrs.update(exchange_work.codec_attrs(codec))
        for key, value in raw.items():
            if isinstance(value, np.ndarray):
                f[f"timings/{key}"] = value
            else:
                f.attrs[key] = value


def read(path: Path) -> tuple[CoreCosts, dict]:
    """``(costs, the file's root attributes)``; one-line error if it is not one."""
    base = calibrate.read(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            compute = {int(g.attrs["partitions"]): float(g.attrs["compute_per_sample"])
                       for g in f["partitions"].values()}
            apply = {k: float(v) for k, v in f["apply"].attrs.items()}
    except (OSError, KeyError) as exc:
        raise UserError(f"{path} is not a dedicated-core calibration ({exc}): give another"
                        " --calibration, or a new path to have it measured") from None
    network = Network(str(attrs.get("network", "?")), base.latency, base.bandwidth)
    codec = exchange_work.read_codec(path)
    return CoreCosts(compute, apply, network, base.spread, codec), attrs


def load_or_measure(path: Path, cfg, data, network: str, log=print):
    """Read ``path``, or measure every P of :data:`PARTITIONS` and write it there when
    it does not exist; a file without the codec's costs has them measured and added.
    Returns ``(costs, attrs)``.  A file measured for another model, batch or network is
    refused, never replaced."""
    if not path.exists():
        tick = time.perf_counter()
        found, raw = measure(cfg, data, network)
        write(path, found, raw)
        log(f"calibrated in {time.perf_counter() - tick:.0f} s (load"
            f" {os.getloadavg()[0]:.1f}): {found.compute[1] * 1e6:.1f} us/sample on one"
            f" core (CPU time; wall {raw['wall_over_cpu']:.1f}x), apply"
            + ", ".join(f" {k} {v * 1e9:.2f}" for k, v in found.apply.items())
            + f" ns/parameter, network {network} -> {path}")
    found, attrs = read(path)
    if found.codec is None:
        one_thread()
        n_params = model_size(cfg, data)
        if attrs.get("n_params") == n_params:  # else refused below, file untouched
            codec, raw = measure_codec(n_params, cfg.compression, 30)
            add_codec(path, codec, raw)
            log(f"codec costs added to {path} (load {raw['codec_loadavg_1min']:.1f}): encode"
                f" {codec['encode_per_entry'] * 1e9:.2f} ns/entry, decode"
                f" {codec['decode_per_entry'] * 1e9:.3f} ns/entry +"
                f" {codec['decode_per_word'] * 1e9:.2f} ns/word (CPU time, one core)")
            found, attrs = read(path)
    want = {"network": network, "batch": cfg.train.batch,
            "n_params": model_size(cfg, data)}
    for key, value in want.items():
        if attrs.get(key) != value:
            raise UserError(f"{path} was measured for {key} = {attrs.get(key)}, this"
                            f" campaign has {value}: give another --calibration")
    return found, attrs


def model_size(cfg, data) -> int:
    from mpibelief.model import Model

    return Model.size_of(cfg.model, data.n_inputs, data.n_classes)


def calibration_file(costs: Costs, path: Path, codec: dict[str, float] | None = None) -> Path:
    """One run's costs as a plain calibration file (what :func:`.run.simulate` reads),
    with the codec's (``codec_*``: the sync simulator takes them) if given."""
    extra = {} if codec is None else {**exchange_work.codec_attrs(codec),
                                      "codec_clock": CODEC_CLOCK}
    calibrate.write(path, costs, {"kind": "dedicated cores, one run's costs", **extra})
    return path
