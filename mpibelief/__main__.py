"""Command line: ``python -m mpibelief {train,info,plot,data} ...``.

Errors the user can fix print one line, ``mpibelief: error: ...``, and end the whole
MPI job: a config or layout error is found identically on every rank, so only rank 0
prints it and every rank exits; any other error may strike one rank alone, so that
rank prints it and calls ``MPI_Abort`` rather than leave its peers waiting forever.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from mpibelief import config as configs
from mpibelief.errors import ConfigError, LayoutError, UserError
from mpibelief.simulate import cli as simulate_cli

EPILOG = """examples:
  python -m mpibelief info --np 5 configs/demo.toml
  mpiexec -n 5 python -m mpibelief train configs/demo.toml
  python -m mpibelief train configs/sgd.toml --set train.epochs=2 --set model.hidden=1024
  python -m mpibelief plot accuracy results/demo.h5 results/sgd.h5 --out results/cmp.png
  mpiexec -n 2 python -m mpibelief train configs/sync_strom.toml
  python -m mpibelief plot compression results/compression.h5
  python -m mpibelief simulate configs/demo.toml --set layout.replicas=8 --calibrate
  python -m mpibelief plot fig3 results/fig3_measured.h5 --out results/fig3.png
  python -m mpibelief plot fig4 results/fig4.h5 --out results/fig4.png
  python -m mpibelief plot validation results/sim_validation.h5
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mpibelief", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="DistBelief (Dean et al., NIPS 2012) on MPI: train, inspect, plot.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help_, description=help_)
        q.add_argument("config", help="experiment TOML file (see configs/)")
        q.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                       help="override one config key, e.g. --set train.lr=0.1 (repeatable)")
        return q

    train = with_config("train", "train as the config says (alone or under mpiexec)")
    train.add_argument("--out", help="result file (default: RESULTS_DIR/RUN_NAME.h5)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an existing result file (never one a live job writes)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in the result file from its newest valid"
                            " checkpoint (RESULT.ckpt/)")
    info = with_config("info", "print the rank/role table and model size for a world size")
    info.add_argument("--np", type=int, required=True, help="the world size to check")
    with_config("data", "build (or check) the feature cache and describe the data")
    simulate_cli.add_parser(sub, with_config)

    plot = sub.add_parser("plot", help="draw figures from result files")
    plot.add_argument("figure", choices=["accuracy", "compression", "fig3", "fig4", "fig5",
                                         "validation"],
                      help="accuracy: result files against time; compression: the"
                           " file bench/compression.py wrote; fig3: the file"
                           " bench/model_parallel.py wrote (default out: fig3.png beside it);"
                           " fig4, fig5: the files bench/fig4.py, bench/fig5.py wrote;"
                           " validation: the file python -m mpibelief.simulate.validate wrote")
    plot.add_argument("runs", nargs="+", help="HDF5 result files")
    plot.add_argument("--out", help="PNG to write (default: beside the first run)")
    return p


def cmd_train(args, cfg) -> int:
    from mpibelief.train import run

    summary = run(cfg, args.out, overwrite=args.overwrite, resume=args.resume)
    stopped = bool(summary) and summary.get("status", "").startswith("stopped")
    return 143 if stopped else 0  # 128 + SIGTERM: the run did not finish


def cmd_info(args, cfg) -> int:
    from mpibelief import algorithms
    from mpibelief.layout import layout_for
    from mpibelief.model import Model

    algorithms.resolve(cfg)
    lay = layout_for(args.np, cfg)
    print(f"config: {args.config}  algorithm: {cfg.run.algorithm}  world: {lay.world} ranks")
    print(f"layout: {lay.shards} shards, {lay.replicas} replicas x {lay.partitions} partitions")
    n_in, n_out = _model_io(cfg)
    n_params = Model.size_of(cfg.model, n_in, n_out)
    if cfg.layout.shards > n_params:
        raise ConfigError(f"layout.shards = {cfg.layout.shards} is more than the model's"
                          f" {n_params} parameters: every shard needs at least one")
    for line in model_lines(cfg, lay.partitions):
        print(line)
    print(lay.table())
    return 0


def model_lines(cfg, partitions: int) -> list[str]:
    """The model's size and, per partition, its parameters and the activations it
    sends per mini-batch (forward; backward sends as many gradients)."""
    from mpibelief.model import Model
    from mpibelief.plan import boundary_bytes
    from mpibelief.train import model_summary

    n_in, n_out = _model_io(cfg)
    model = Model.from_config(cfg.model, n_in, n_out, allocate=False)
    m = cfg.model
    kind = (f"mlp, {m.activation}" if m.kind == "mlp" else
            f"image, {m.units} units/location, {m.rf}x{m.rf} fields, {m.activation}")
    lines = [f"model: {model_summary(model)}; {kind}, {m.output} output;"
             f" {model.n_params:,} parameters ({4 * model.n_params / 2**20:.1f} MiB float32)"]
    lay = model.layout(partitions)
    sent = boundary_bytes(model, partitions, cfg.train.batch).sum(axis=(0, 2))
    for p in range(partitions):
        lo, hi = lay.partition(p)
        lines.append(f"  partition {p}: {hi - lo:,} parameters [{lo:,}, {hi:,}),"
                     f" sends {sent[p] / 2**20:.2f} MiB of activations per mini-batch of"
                     f" {cfg.train.batch}")
    return lines


def _model_io(cfg) -> tuple[int, int]:
    """Input and output widths the data will give, without loading it."""
    d = cfg.data
    if d.source == "fsdd":
        return d.n_mels * d.context, 10 * d.states_per_digit
    if d.source == "synthetic":
        from mpibelief.data.synthetic import synthetic_inputs

        return synthetic_inputs(d), d.n_classes
    from mpibelief.data import load_dataset

    data = load_dataset(d)
    return data.n_inputs, data.n_classes


def cmd_data(args, cfg) -> int:
    from mpibelief.data import load_dataset

    data = load_dataset(cfg.data)
    counts = [int((data.y_train == c).sum()) for c in range(data.n_classes)]
    print(f"{data.name}: train {data.x_train.shape}, test {data.x_test.shape},"
          f" {data.n_classes} classes (train frames per class {min(counts)}..{max(counts)})")
    return 0


def cmd_plot(args) -> int:
    if args.figure in ("fig4", "fig5"):
        from mpibelief.plots import fig4, fig5

        draw = fig4.plot_fig4 if args.figure == "fig4" else fig5.plot_fig5
        out = draw(args.runs[0], args.out)
    elif args.figure == "fig3":
        from mpibelief.plots.fig3 import plot_fig3

        out = plot_fig3(args.runs[0], args.out)
    elif args.figure == "validation":
        from mpibelief.plots.validation import plot_validation

        out = plot_validation(args.runs[0], args.out)
    elif args.figure == "compression":
        from mpibelief.plots.compression import plot_compression

        out = plot_compression(args.runs[0], args.out)
    else:
        from mpibelief.plots.accuracy import plot_accuracy

        out = plot_accuracy(args.runs, args.out)
    print(f"wrote {out}")
    return 0


# Seen here: 2 in 15 aborts lost the error line with no pause, none in 40 with it.
ABORT_GRACE_SECONDS = 0.5

# Set by the launchers (MPICH/Hydra, Open MPI, PMIx, Slurm) before MPI is initialised.
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def _world():
    """(rank, size) of this process; never initialises MPI just to find out.

    A config error is raised before MPI starts, so the rank then comes from the
    launcher's environment: that is what keeps N ranks from printing it N times.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        rank = next((os.environ[v] for v in _RANK_VARS if v in os.environ), "0")
        return int(rank) if rank.isdigit() else 0, 1
    return mpi.COMM_WORLD.rank, mpi.COMM_WORLD.size


def _fail(message: str, code: int, everywhere: bool, quiet_off_root: bool = False) -> int:
    """Print the one line (on rank 0 only when every rank finds it) and end the job.

    ``quiet_off_root``: every rank may have met it (Ctrl-C reaches them all), but any
    rank alone might too: only rank 0 prints, yet every rank still aborts.
    """
    rank, size = _world()
    if rank == 0 or not (everywhere or quiet_off_root):
        print(f"mpibelief: error: {message}", file=sys.stderr, flush=True)
    if size > 1 and not everywhere:
        from mpibelief.guard import send_notice

        send_notice("failed", message)  # the coordinator records it in the result file
        # MPI_Abort tears the job down at once, and Hydra drops whatever its proxy has
        # not yet forwarded from our stderr pipe: give it a moment to pass the line on.
        time.sleep(ABORT_GRACE_SECONDS)
        sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)
    return code


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "plot":
            return cmd_plot(args)
        cfg = configs.load(args.config, args.set)
        # Before numpy and numba load: one thread each per rank unless asked otherwise.
        for var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ.setdefault(var, str(cfg.run.threads))
        commands = {"train": cmd_train, "info": cmd_info, "data": cmd_data,
                    "simulate": simulate_cli.cmd_simulate}
        return commands[args.command](args, cfg)
    except (ConfigError, LayoutError) as exc:
        return _fail(str(exc), 2, everywhere=True)
    except UserError as exc:
        return _fail(str(exc), 2, everywhere=False)
    except KeyboardInterrupt:
        return _fail("interrupted (SIGINT)", 130, everywhere=False, quiet_off_root=True)
    except Exception as exc:
        if _world()[1] == 1:
            raise
        traceback.print_exc()
        return _fail(f"{type(exc).__name__}: {exc} (traceback above)", 1, everywhere=False)


if __name__ == "__main__":
    sys.exit(main())
