"""What simulating synchronous SGD costs in real time, and what its steps cost simulated.

For each replica count R (``--replicas``) and each exchange (``--modes``: ``dense``
allreduce, ``strom`` with the config's ``[compression]`` kept fraction, 1% in
``configs/sync.toml``'s defaults), builds the simulator of :mod:`mpibelief.simulate.sync`
on the config's data and model and times ``--steps`` steps after one warm-up step
(the warm-up pays the first-step cost and fills the codecs' residuals):

- real seconds per simulated step (``perf_counter`` around ``SyncSim.step``: R real
  gradients, R encodes and a decode when compressed, one update), and the same per
  replica gradient, the figure that should stay flat as R grows;
- simulated seconds per step, split into compute (the slowest replica's), network,
  the exchange's arithmetic and the update, on the calibration's network and on each
  preset of :mod:`mpibelief.simulate.network` (``--networks``; only the network part
  changes, computed from the same step's real packet sizes);
- bytes a replica receives per step.

Medians over the timed steps.  The real time is measured on a shared machine: the load
average is printed and stored.

Writes ``--out`` (``results/bench_sim_sync.h5``): ``/bench/sim_sync/<mode>_R<R>/``
with per-step arrays ``real_seconds``, ``compute``, ``network``, ``arithmetic``,
``apply``, ``network_<preset>``, ``received_bytes`` and their medians as attributes,
stamped with :func:`mpibelief.results.stamp`.

Usage: ``python bench/sim_sync.py [--config configs/sync.toml] [--replicas 8,64,200]
[--steps 5] [--modes dense,strom] [--networks 1gbe] [--calibration
results/calibration.h5] [--out PATH]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread, as a replica rank (run.threads = 1)

import h5py  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/jobs.py, beside this file
from jobs import REPO, counts  # noqa: E402

PARTS = ("compute", "network", "arithmetic", "apply")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/sync.toml")
    parser.add_argument("--replicas", type=counts, default=[8, 64, 200], help="e.g. 8,64,200")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--modes", default="dense,strom", help="dense, strom or both")
    parser.add_argument("--networks", default="1gbe", help="presets, e.g. 1gbe,10gbe")
    parser.add_argument("--calibration", default=str(REPO / "results" / "calibration.h5"))
    parser.add_argument("--out", default=str(REPO / "results" / "bench_sim_sync.h5"))
    return parser.parse_args(argv)


def case(cfg, data, costs, calibration: Path, steps: int, networks: list) -> dict:
    """Time ``steps`` steps of one configuration after a warm-up step."""
    from mpibelief.model import Model
    from mpibelief.simulate import exchange_work
    from mpibelief.simulate.sync import SyncSim

    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    work, _ = exchange_work.for_run(calibration, model.n_params, cfg.compression)
    sim = SyncSim(cfg, data, model, costs, work)
    sim.step(1)
    found = {name: [] for name in ("real_seconds", *PARTS, "received_bytes",
                                   *(f"network_{net.name}" for net in networks))}
    for step in range(2, steps + 2):
        tick = time.perf_counter()
        sim.step(step)
        found["real_seconds"].append(time.perf_counter() - tick)
        for part in PARTS:
            found[part].append(sim.last[part])
        for net in networks:
            found[f"network_{net.name}"].append(sim.network_seconds(net.latency, net.bandwidth))
        found["received_bytes"].append(received(sim))
    return {k: np.array(v) for k, v in found.items()}


def received(sim) -> float:
    """Bytes one replica receives in the step's exchange (the busiest receiver)."""
    from mpibelief.simulate import collectives

    if sim.sizes is None:
        return collectives.allreduce_bytes(4 * sim.n, sim.R)
    return float(collectives.allgather_bytes(sim.sizes) + 4 * (sim.R - 1))  # + the counts


def main(argv=None) -> None:
    from mpibelief import config
    from mpibelief.data import load_dataset
    from mpibelief.errors import UserError
    from mpibelief.simulate import calibrate
    from mpibelief.simulate.network import preset

    args = parse_args(argv)
    networks = [preset(name) for name in args.networks.split(",") if name]
    modes = {"dense": ["compression.enabled=false"], "strom": ["compression.enabled=true"]}
    chosen = [m for m in args.modes.split(",") if m]
    try:
        costs = calibrate.read(Path(args.calibration))
    except UserError as exc:
        sys.exit(f"bench/sim_sync.py: {exc}")
    base = config.load(args.config, ["run.algorithm='sync'", "layout.replicas=1"])
    data = load_dataset(base.data)
    load = os.getloadavg()[0]
    print(f"load {load:.1f}; calibration {args.calibration}: {costs.compute_per_sample * 1e6:.1f}"
          f" us/sample, {costs.latency * 1e6:.1f} us + bytes at {costs.bandwidth / 1e9:.1f}"
          f" GB/s", flush=True)
    header = (f"{'case':>11} {'real s/step':>11} {'real ms/grad':>12} {'sim ms/step':>11}"
              f" {'compute':>8} {'network':>8} {'arith':>6} {'apply':>6}"
              + "".join(f" {'ms ' + n.name:>9}" for n in networks) + f" {'KiB in':>8}")
    print(header, flush=True)
    found = {}
    for mode in chosen:
        for R in args.replicas:
            cfg = config.load(args.config, [*modes[mode], f"layout.replicas={R}"])
            got = case(cfg, data, costs, Path(args.calibration), args.steps, networks)
            found[f"{mode}_R{R}"] = got
            med = {k: float(np.median(v)) for k, v in got.items()}
            sim_step = sum(med[p] for p in PARTS)
            other = med["compute"] + med["arithmetic"] + med["apply"]
            print(f"{mode + '_R' + str(R):>11} {med['real_seconds']:11.2f}"
                  f" {1e3 * med['real_seconds'] / R:12.1f} {1e3 * sim_step:11.2f}"
                  + "".join(f" {1e3 * med[p]:{w}.2f}" for p, w in zip(PARTS, (8, 8, 6, 6),
                                                                         strict=True))
                  + "".join(f" {1e3 * (other + med['network_' + n.name]):9.1f}"
                            for n in networks)
                  + f" {med['received_bytes'] / 1024:8.0f}", flush=True)
    write(Path(args.out), found, args, load)


def write(out: Path, found: dict, args, load: float) -> None:
    from mpibelief.results import stamp

    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w") as f:
        stamp(f, {"command": " ".join(sys.argv), "config": args.config, "steps": args.steps,
                  "calibration": args.calibration, "loadavg_1min": load,
                  "units": "seconds; received_bytes: bytes per replica per step"})
        for name, columns in found.items():
            g = f.create_group(f"bench/sim_sync/{name}")
            for key, values in columns.items():
                g[key] = values
                g.attrs[f"median_{key}"] = float(np.median(values))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
