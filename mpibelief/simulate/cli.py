"""The ``simulate`` subcommand: its arguments and what it runs.

Kept apart from ``__main__`` so that the CLI grows by two lines there; nothing heavy is
imported until the command runs (``mpibelief info`` must stay instant).
"""

from __future__ import annotations

from pathlib import Path

from mpibelief.errors import ConfigError

DEFAULT_CALIBRATION = "results/calibration.h5"
DEFAULT_RMA = "results/bench_rma.h5"


def add_parser(sub, with_config) -> None:
    """Add ``simulate`` to the subparsers (``with_config`` adds CONFIG and --set)."""
    q = with_config("simulate", "run the config on a simulated cluster (virtual time)")
    q.add_argument("--out", help="result file (default: RESULTS_DIR/RUN_NAME_sim.h5)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing result file")
    q.add_argument("--calibration", default=DEFAULT_CALIBRATION,
                   help=f"measured costs (HDF5; default {DEFAULT_CALIBRATION})")
    q.add_argument("--calibrate", action="store_true",
                   help="measure the costs on this machine first and write --calibration")
    q.add_argument("--rma", default=DEFAULT_RMA,
                   help=f"bench/rma.py's file for the network fit (default {DEFAULT_RMA})")
    q.add_argument("--concurrency", type=int, default=1, metavar="K",
                   help="--calibrate: time the compute in K processes at once (shared cores)")
    q.add_argument("--from-run", metavar="RESULT",
                   help="--calibrate: take the costs from a real Downpour run (not a"
                        " checkout's first: that one compiles the kernels as it trains)")
    q.add_argument("--straggler", metavar="FRACTION:SLOWDOWN",
                   help="slow that fraction of compute phases by that factor, e.g. 0.05:4")
    q.add_argument("--slow-shard", action="append", default=[], metavar="SHARD:FACTOR",
                   help="multiply a shard's apply time (repeatable), e.g. 0:10")
    q.add_argument("--fail", action="append", default=[], metavar="REPLICA@SECONDS",
                   help="stop a replica at that simulated time (repeatable), e.g. 1@30")
    q.add_argument("--cores", type=int, metavar="N",
                   help="the ranks share N cores (default: a core per rank, a cluster)")
    q.add_argument("--background", type=float, default=0.0, metavar="B",
                   help="with --cores: B other runnable processes share them too")


def faults_of(args, shards: int):
    """The :class:`~mpibelief.simulate.cluster.Faults` the arguments describe."""
    from mpibelief.simulate.cluster import Faults

    try:
        fraction, slowdown = (map(float, args.straggler.split(":")) if args.straggler
                              else (0.0, 1.0))
        slow = [1.0] * shards
        for item in args.slow_shard:
            s, factor = item.split(":")
            slow[int(s)] = float(factor)
        fail = tuple((int(r), float(t)) for r, t in (i.split("@") for i in args.fail))
    except (ValueError, IndexError):
        raise ConfigError("simulate: --straggler F:S, --slow-shard SHARD:FACTOR (shard <"
                          f" {shards}) and --fail R@SECONDS take numbers") from None
    return Faults(fraction, slowdown, tuple(slow), fail)


def machine_of(args):
    """The :class:`~mpibelief.simulate.cores.Machine` of ``--cores`` and ``--background``
    (None without ``--cores``: a core per rank, and any algorithm's simulator)."""
    from mpibelief.simulate.cores import Machine

    if args.cores is None and args.background:
        raise ConfigError("simulate: --background needs --cores")
    if args.cores is None:
        return None
    try:
        return Machine(args.cores, args.background)
    except ValueError as exc:
        raise ConfigError(f"simulate: {exc}") from None


def cmd_simulate(args, cfg) -> int:
    from mpibelief.simulate import calibrate
    from mpibelief.simulate.run import check, simulate

    check(cfg)
    calibration = Path(args.calibration)
    if args.calibrate:
        from mpibelief.data import load_dataset

        costs, raw = calibrate.measure(cfg, load_dataset(cfg.data), Path(args.rma),
                                       concurrency=args.concurrency, run=args.from_run)
        calibrate.write(calibration, costs, raw)
        print(f"mpibelief: calibrated {costs.compute_per_sample * 1e6:.1f} us/sample,"
              f" apply {costs.apply_per_param * 1e9:.2f} ns/parameter, message"
              f" {costs.latency * 1e6:.1f} us + bytes at {costs.bandwidth / 1e9:.1f} GB/s"
              f" -> {calibration}", flush=True)
    out = Path(args.out) if args.out else Path(cfg.run.results_dir) / f"{cfg.run.name}_sim.h5"
    machine = machine_of(args)
    if machine is not None and cfg.run.algorithm != "downpour":
        raise ConfigError("simulate: --cores is modelled for run.algorithm = 'downpour' only")
    row = simulate(cfg, out, calibration, faults_of(args, cfg.layout.shards), args.overwrite,
                   machine=machine)
    print(f"mpibelief: simulated {row['wall_seconds']:.1f} s: test accuracy"
          f" {row['test_accuracy']:.4f} after {int(row['samples'])} samples; wrote {out}",
          flush=True)
    return 0
