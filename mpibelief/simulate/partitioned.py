"""A simulated replica of ``P`` partitions: its step time and its parameter traffic.

The simulators (:mod:`.cluster`, :mod:`.sync`, Sandblaster's) charge a replica's forward
plus backward as ``batch * compute_per_sample``, calibrated on this machine for a whole
model in one process (P = 1).  For a replica cut into ``P`` partitions
(``layout.partitions``, :mod:`mpibelief.partition`) this module scales that by the
model-parallel scaling model's prediction for *this* model (its own layer shapes, batch
and boundary bytes, not the paper's networks)::

    step(P) = batch * compute_per_sample * ratio
    ratio   = t(P) / t(1),  t from :func:`mpibelief.simulate.scaling.predict` with
              factor f = batch * compute_per_sample / sum_i (fwd_i + bwd_i)(P = 1)
            = compute(P) / compute(1) + comm(P) / (batch * compute_per_sample)

    compute(P)  the slowest partition's tile per layer, forward and backward, summed
                (each distinct tile timed alone on one core, thread CPU seconds:
                :class:`~mpibelief.simulate.compute.LayerTimer`)
    comm(P)     every layer's boundary exchange, both ways (exact bytes,
                :func:`mpibelief.plan.boundary_bytes`), and the loss's three allreduces,
                over the network: by default the calibrated one (``Costs.latency``,
                ``Costs.bandwidth``, what the run's parameter traffic moves over too)

What is assumed, and why:

- The tile timings give the *shape* of the compute (how much of it the slowest
  partition keeps), the calibration its *level*: ``f`` makes the scaling model's P = 1
  equal the calibrated step, so P = 1 is exactly today's simulation (ratio 1, no timing
  at all) and the compute part keeps the calibrated rate's contention, spread and
  kernel efficiency.  Applying the ratio at factor 1 instead (tiles as timed) would
  also scale the network seconds by however much slower the calibrated replica ran than
  its tiles alone (2.6-2.8x for 440-512-512-50 at batch 128 here, calibrated at load
  12: 16.0 ms a step against 5.7-6.2 ms of tiles), which is no property of the network.
- The boundary exchange is not overlapped with compute, as in the scaling model
  (validated against measured Figure 3 runs within 25%, ``results/fig3_measured.h5``),
  so where the bytes are many the prediction errs slow.
- The calibrated spread, stragglers and the first step's kernel loading multiply or
  add to the whole replica step, as they do for P = 1 (partitions run in lock step: one
  slow partition holds up its replica).

Parameter traffic: the shards hold the vector partition-major
(:meth:`~mpibelief.model.Model.layout`): partition ``p`` is one contiguous range, which
it pulls from and pushes to the shards that range meets, on its own, in parallel with
the other partitions.  :func:`shard_pieces` gives each partition's parameters per shard,
so a replica's fetch or push lasts as long as its slowest partition's, not the sum.

The math does not change with ``P``: a partitioned replica computes the whole model's
loss and gradient (to float32 rounding: ``tests/mpi/mpi_partition.py``, run by
``tests/mpi/test_under_mpiexec.py``; and end to end,
``tests/e2e/test_model_parallel.py``: SGD on two partitions reproduces one), so the
simulated replica computes the unpartitioned gradient for real and the shards apply it
in whole-model order; only the clock sees ``P``.  A replica's push therefore reaches
each shard as one piece (a real one reaches it as one piece per partition that meets
it: ``/server`` counts pushes and staleness per replica here).

``python -m mpibelief.simulate.partitioned CONFIG [--set ...] [--calibration FILE]
[--partitions 1,2,4,8] [--networks calibrated,1gbe]`` prints the split for the config's
model and batch on each network (``calibrated``: the calibration file's).

Sandblaster's simulator takes the same two things: ``costs, split = replica_costs(costs,
model, rows, P)`` for the compute of a portion of ``rows`` samples, and
:func:`transfer_seconds` over :func:`shard_pieces` for its pulls and pushes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass

from mpibelief.simulate.network import Network


@dataclass(frozen=True)
class Split:
    """How a replica of ``partitions`` partitions changes the step (see the module).

    Attributes:
        partitions: ``P``.
        ratio: the step's seconds over P = 1's, ``t(P) / t(1)``.
        compute_ratio: the slowest tiles' compute over P = 1's.
        comm_seconds: boundary exchanges and loss allreduces per step.
        step_seconds: the calibrated P = 1 step it scales (``batch * compute_per_sample``).
        batch: samples per step; network: what the partitions exchange over.
    """

    partitions: int
    ratio: float = 1.0
    compute_ratio: float = 1.0
    comm_seconds: float = 0.0
    step_seconds: float = 0.0
    batch: int = 0
    network: Network | None = None

    def attrs(self) -> dict:
        """Root attributes of a result file: P and the predicted ratio, with its parts."""
        net = self.network
        return {"partitions": self.partitions, "partition_ratio": self.ratio,
                "partition_compute_ratio": self.compute_ratio,
                "partition_comm_seconds": self.comm_seconds,
                "partition_network": "" if net is None else
                f"{net.name}: {net.latency:g} s + bytes / {net.bandwidth:g} B/s",
                "partition_model": "scaling model (mpibelief.simulate.partitioned)"}


def split_of(tiles_1: tuple, tiles_p: tuple, bytes_p, net: Network,
             batch: int, step_seconds: float) -> Split:
    """The scaling model's ``t(P) / t(1)`` with its compute matched to ``step_seconds``.

    Args:
        tiles_1, tiles_p: ``(forward, backward)`` per-layer tile seconds at P = 1 and
            at ``P`` (``(layers, 1)`` and ``(layers, P)``).
        bytes_p: ``(layers, P, P)`` forward boundary bytes at ``P``.
        net: the network the partitions exchange over.
        batch: samples per step; step_seconds: the calibrated P = 1 step.
    """
    from mpibelief.simulate.scaling import predict

    P = tiles_p[0].shape[1]
    if P == 1:
        return Split(1, step_seconds=step_seconds, batch=batch, network=net)
    base = float((tiles_1[0] + tiles_1[1]).sum())
    factor = step_seconds / base
    got = predict(*tiles_p, bytes_p, net, batch, factor)
    return Split(P, got["seconds"] / step_seconds, got["compute"] / step_seconds,
                 got["comm"], step_seconds, batch, net)


_TIMERS: dict = {}  # model shape and batch -> LayerTimer: one process, one timing per tile


def tiles(model, batch: int, partitions: int) -> tuple:
    """``(forward, backward)`` tile seconds of ``model`` cut in ``partitions``, timed once
    per distinct tile per process (a campaign's runs of one model share the timings, so
    their ratios differ only where ``P`` does).

    Timed in this process's thread CPU time, so with one BLAS and Numba thread, as
    ``mpibelief simulate`` runs by default (``run.threads = 1``, set before numpy loads):
    with more, the other threads' work goes uncounted (measured here with 2 BLAS
    threads, 440-512-512-50 at batch 128: 0.04 for P = 4 against 0.23-0.28 with one).
    """
    from mpibelief.simulate.compute import LayerTimer

    key = (tuple((type(layer).__name__, layer.in_shape, layer.out_shape,
                  getattr(layer, "rf", 0), getattr(layer, "stride", 0))
                 for layer in model.layers), batch)
    if key not in _TIMERS:
        _TIMERS[key] = LayerTimer(model, batch)
    return _TIMERS[key].times(partitions)


def replica_costs(costs, model, batch: int, partitions: int,
                  net: Network | None = None):
    """``(costs, split)``: ``costs`` with ``compute_per_sample`` scaled to a replica of
    ``partitions`` partitions stepping on ``batch`` samples, and the :class:`Split` that
    says by how much.  P = 1 returns ``costs`` itself (nothing is timed).

    ``net``: what the partitions exchange over (default: the calibrated network)."""
    from mpibelief.plan import boundary_bytes

    net = net or Network("calibrated", costs.latency, costs.bandwidth)
    step = batch * costs.compute_per_sample
    if partitions == 1:
        return costs, Split(1, step_seconds=step, batch=batch, network=net)
    split = split_of(tiles(model, batch, 1), tiles(model, batch, partitions),
                     boundary_bytes(model, partitions, batch), net, batch, step)
    return dataclasses.replace(costs, compute_per_sample=costs.compute_per_sample
                               * split.ratio), split


def shard_pieces(model, partitions: int, slices: list[slice]) -> list[list[tuple[int, int]]]:
    """Per partition, ``[(shard, parameters)]``: how much of its range each shard holds.

    The range is the partition's in the partition-major vector the shards hold
    (``model.layout(partitions)``); ``slices`` are the shards' slices of it
    (:func:`mpibelief.layout.shard_slices`).  With one partition: every shard, whole.
    """
    from mpibelief.layout import overlap

    layout, out = model.layout(partitions), []
    for p in range(partitions):
        mine = slice(*layout.partition(p))
        out.append([(s, common.stop - common.start) for s, piece in enumerate(slices)
                    if (common := overlap(mine, piece)) is not None])
    return out


def transfer_seconds(costs, pieces: list[list[tuple[int, int]]], nbytes: int = 4) -> float:
    """A replica's fetch (or push, without waiting for slots): each partition moves its
    pieces one shard after another, the partitions in parallel; the slowest one's time.
    ``nbytes`` per parameter (0: a refused push, messages only)."""
    return max(sum(costs.transfer(nbytes * size) for _, size in group) for group in pieces)


def main(argv=None) -> int:
    from mpibelief import config as configs
    from mpibelief.data import load_dataset
    from mpibelief.model import Model
    from mpibelief.simulate import calibrate
    from mpibelief.simulate.network import preset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE")
    parser.add_argument("--calibration", default="results/calibration.h5")
    parser.add_argument("--partitions", default="1,2,4,8")
    parser.add_argument("--networks", default="calibrated,1gbe",
                        help="'calibrated' (the calibration file's) or network presets")
    args = parser.parse_args(argv)
    for var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # before numpy loads: see tiles()
    cfg = configs.load(args.config, args.set)
    costs = calibrate.read(args.calibration)
    data = load_dataset(cfg.data)
    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes, allocate=False)
    batch = cfg.train.batch
    print(f"{args.config}: {data.n_inputs}-...-{data.n_classes}, {model.n_params} parameters,"
          f" batch {batch}; calibrated step {batch * costs.compute_per_sample * 1e3:.2f} ms")
    print(f"{'network':>34} {'P':>3} {'t(P)/t(1)':>10} {'compute':>8} {'comm ms':>8}"
          f" {'step ms':>8}")
    for name in args.networks.split(","):
        net = None if name == "calibrated" else preset(name)
        for P in map(int, args.partitions.split(",")):
            scaled, split = replica_costs(costs, model, batch, P, net)
            used, step = split.network, batch * scaled.compute_per_sample
            label = f"{used.name} ({used.latency * 1e6:.1f} us, {used.bandwidth / 1e9:.2f} GB/s)"
            print(f"{label:>34} {P:3d} {split.ratio:10.3f} {split.compute_ratio:8.3f}"
                  f" {split.comm_seconds * 1e3:8.2f} {step * 1e3:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
