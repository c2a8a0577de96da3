"""What bench/fig4.py and bench/fig5.py share: arguments, the warmstart, running rows.

Both are campaigns of :class:`~mpibelief.simulate.campaign.Method` rows from one
warmstart on one machine description; they differ in their rows and in where the
target accuracy comes from (Figure 4 chooses it from its own curves, Figure 5 takes
Figure 4's).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/fig45.toml"
CALIBRATION = "results/fig45_calibration.h5"
QUICK = {"epochs": 0.05, "warmstart_steps": 20, "tune_fraction": 0.0, "evals": 2}
HORIZON_OVER_WARMSTART = 12.0  # the paper's runs end at ~120 h, its warmstart at ~10 h


def guarded(main, name: str) -> int:
    """Run ``main``; a user's error is one line (``bench/NAME.py: error: ...``), exit 2."""
    from mpibelief.errors import ConfigError, UserError

    try:
        return main()
    except (UserError, ConfigError) as exc:
        print(f"bench/{name}.py: error: {exc}", file=sys.stderr)
        return 2


def common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes, seconds (tests); default --out results/{name}_quick.h5")
    parser.add_argument("--out", help=f"campaign file (default results/{name}.h5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--config", default=CONFIG, help=f"base config (default {CONFIG})")
    parser.add_argument("--calibration", default=CALIBRATION,
                        help="dedicated-core costs (measured and written there if missing;"
                             f" default {CALIBRATION})")
    parser.add_argument("--network", default="1gbe", help="network preset (the paper's era)")
    parser.add_argument("--methods", default="",
                        help="comma-separated row keys or name fragments to run (default all)")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    parser.add_argument("--horizon", type=float, default=0.0,
                        help="simulated seconds (campaign clock, warmstart included) every"
                             f" row runs to (0: {HORIZON_OVER_WARMSTART:g} x the warmstart's,"
                             " as the paper's 120 h to its 10 h)")
    parser.add_argument("--epochs", type=float, default=40.0,
                        help="at most this many passes over the data per row (real compute:"
                             " a row ends at the horizon or here, default 40)")
    parser.add_argument("--warmstart-steps", type=int, default=100,
                        help="mini-batches of SGD [1] before the rows branch off")
    parser.add_argument("--tune-fraction", type=float, default=0.25,
                        help="each candidate rate's trial runs this fraction of the row's"
                             " horizon and epochs (0: take the first rate)")
    parser.add_argument("--evals", type=int, default=25, help="evaluations per row")
    parser.add_argument("--shards-per-replica", type=float, default=0.5,
                        help="parameter shards per Downpour/Sandblaster replica (default 0.5)")
    parser.add_argument("--reuse", action="append", default=[], metavar="FILE",
                        help="take rows identical to one in this earlier campaign file from"
                             " it instead of running them again (repeatable)")
    parser.add_argument("--keep-runs", metavar="DIR",
                        help="keep every run's own result file there (default: discarded)")


def _quick(args, name: str) -> None:
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.out = Path(args.out or REPO / "results" / f"{name}{'_quick' if args.quick else ''}.h5")


def selected(rows, text: str):
    wanted = [w.strip().lower() for w in text.split(",") if w.strip()]
    return [m for m in rows if not wanted or any(
        w == m.key or w in m.name.lower() for w in wanted)]


def prepare(args, rows, name: str):
    """Check the output, load data and costs, run the warmstart: ``(campaign, state)``,
    or ``(None, None)`` after ``--list``."""
    from mpibelief import config as configs
    from mpibelief.data import load_dataset
    from mpibelief.simulate import campaign, corecosts
    from mpibelief.simulate.warmstart import warmstart

    _quick(args, name)
    if args.list:
        for m in rows:
            print(f"{m.key:>32}  {m.name:<34} {m.algorithm:<11} R={m.replicas:<5} "
                  f"S={m.shards:<4} P={m.partitions} machines={m.machines:<5} cores={m.cores:<5}"
                  f" rates={m.rates}")
        return None, None
    campaign.refuse_existing(args.out, args.overwrite)
    os.chdir(REPO)  # the config's relative data path, results/bench_rma.h5
    started = time.perf_counter()
    cfg = configs.load(args.config, [f"train.epochs={args.epochs}"])
    data = load_dataset(cfg.data)
    costs, cal_attrs = corecosts.load_or_measure(Path(args.calibration), cfg, data,
                                                 args.network)
    n_params = corecosts.model_size(cfg, data)
    c = costs.costs(1, cfg.train.optimizer)
    warm_every = args.warmstart_steps * cfg.train.batch * c.compute_per_sample / args.evals
    warm = warmstart(configs.load(args.config, ["train.optimizer='sgd'", "train.lr=0.1"]),
                     data, c, args.warmstart_steps, warm_every)
    args.horizon = args.horizon or HORIZON_OVER_WARMSTART * warm.seconds
    common = [f"train.epochs={args.epochs}",
              f"train.max_seconds={args.horizon - warm.seconds:.6g}"]
    print(f"{name}: warmstart {warm.steps} steps of SGD [1] (lr 0.1): {warm.seconds:.2f}"
          f" simulated s, test accuracy {warm.accuracy:.4f}; sha256 {warm.sha256[:12]};"
          f" rows run to {args.horizon:.2f} s or {args.epochs:g} epochs", flush=True)
    work = Path(args.keep_runs) if args.keep_runs else Path(tempfile.mkdtemp(prefix=name))
    work.mkdir(parents=True, exist_ok=True)
    runner = campaign.Campaign(args.config, common, costs, warm.params, len(data.y_train),
                               n_params, work, evals=args.evals,
                               tune_fraction=args.tune_fraction)
    state = {"cfg": cfg, "data": data, "warm": warm, "costs": costs, "cal": cal_attrs,
             "started": started, "n_params": n_params}
    return runner, state


def run_rows(rows, runner, args) -> tuple[dict, dict]:
    """Every selected row in turn: ``(runs, skipped)`` by key, with progress lines."""
    runs, skipped = {}, {}
    for m in rows:
        if m not in selected(rows, args.methods):
            continue
        print(f"--- {m.name}: {m.algorithm}, R={m.replicas} S={m.shards} P={m.partitions}",
              flush=True)
        run, why = runner.run(m)
        if run is None:
            skipped[m.key] = why
            print(f"skipped {m.name}: {why}", flush=True)
            continue
        runs[m.key] = run
        acc = run["metrics"]["test_accuracy"]
        print(f"done {m.name}: lr {run['lr']:g}, test accuracy {acc[-1]:.4f} (best"
              f" {acc.max():.4f}) after {run['metrics']['wall_seconds'][-1]:.2f} simulated s;"
              f" {run['real_seconds']:.0f} s real", flush=True)
    return runs, skipped


def reuse(rows, sources: list, runner, args) -> dict:
    """Runs of earlier campaign files whose signature a selected row has (the same row,
    base config, warmstart, costs, evaluations and tuning): ``{key: run}``."""
    from mpibelief.simulate.campaign import read

    found = {}
    for source in sources:
        for r in read(Path(source))["runs"].values():
            found.setdefault(r["attrs"].get("signature"), (source, r))
    out = {}
    for m in selected(rows, args.methods):
        source, old = found.get(runner.signature(m), (None, None))
        if old is None:
            continue
        keep = {k: v for k, v in old["attrs"].items() if k in RUN_KEYS}
        out[m.key] = {"metrics": old["metrics"], **keep, "reused_from": str(source)}
        print(f"--- {m.name}: reused from {source} (same row, warmstart, costs, tuning)",
              flush=True)
    return out


RUN_KEYS = ("lr", "optimizer", "epochs", "real_seconds", "status", "label",
            "mean_staleness", "max_shard_busy", "tuned_rates", "tuned_accuracy",
            "signature")


def attach_times(runs: dict, warm, target: float) -> None:
    from mpibelief.simulate.campaign import time_to_target

    for run in runs.values():
        m = run["metrics"]
        seconds = np.concatenate([warm.metrics["wall_seconds"], warm.seconds + m["wall_seconds"]])
        accuracy = np.concatenate([warm.metrics["test_accuracy"], m["test_accuracy"]])
        run["time_to_target"] = time_to_target(seconds, accuracy, target)


def file_attrs(args, state, name: str, target: float, rule: str) -> dict:
    cfg, costs = state["cfg"], state["costs"]
    return {"campaign": name, "quick": bool(args.quick), "config": cfg.to_toml(),
            "config_file": args.config, "dataset": state["data"].name,
            "n_params": state["n_params"], "network": costs.network.name,
            "latency": costs.network.latency, "bandwidth": costs.network.bandwidth,
            "calibration": str(args.calibration), "target": target, "target_rule": rule,
            "epochs": args.epochs, "horizon": args.horizon,
            "tune_fraction": args.tune_fraction,
            "calibration_loadavg": float(state["cal"].get("loadavg_1min", math.nan)),
            "loadavg_1min": os.getloadavg()[0]}


def save_warmstart(path: Path, warm, overwrite: bool) -> None:
    """The warmstart's vector (2 MB) beside the campaign file, with its curve."""
    from mpibelief.results import stamp

    if path.exists() and not overwrite:
        print(f"kept {path} (exists; --overwrite replaces it)")
        return
    with h5py.File(path, "w") as f:
        stamp(f, {"sha256": warm.sha256, "steps": warm.steps, "seconds": warm.seconds})
        f["params"] = warm.params
        for col, values in warm.metrics.items():
            f[f"metrics/{col}"] = values


def report(runs: dict, skipped: dict, rows, target: float, warm) -> None:
    print(f"\ntarget test accuracy {target:.4f}; warmstart {warm.accuracy:.4f} at"
          f" {warm.seconds:.2f} s")
    print(f"{'method':<36} {'lr':>7} {'final':>7} {'best':>7} {'to target (s)':>14}"
          f" {'machines':>9} {'cores':>6} {'real s':>7}")
    names = {m.key: m for m in rows}
    order = sorted(runs, key=lambda k: (math.isnan(runs[k]["time_to_target"]),
                                        runs[k]["time_to_target"]))
    for key in order:
        run, m = runs[key], names[key]
        acc = run["metrics"]["test_accuracy"]
        t = run["time_to_target"]
        print(f"{m.name:<36} {run['lr']:7.4g} {acc[-1]:7.4f} {acc.max():7.4f}"
              f" {'not reached' if math.isnan(t) else f'{t:.2f}':>14} {m.machines:9d}"
              f" {m.cores:6d} {run['real_seconds']:7.0f}")
    for key, why in skipped.items():
        print(f"{names[key].name:<36} skipped: {why}")


def finish(args, rows, runner, state, name: str) -> int:
    """Figure 4: run the rows, choose the target, write the file, print the table."""
    from mpibelief.simulate import campaign

    done = reuse(rows, args.reuse, runner, args)
    runs, skipped = run_rows([m for m in rows if m.key not in done], runner, args)
    runs.update(done)
    warm = state["warm"]
    if args.target:
        target, rule = args.target, "given on the command line (--target)"
    else:
        if not runs:
            raise SystemExit(f"{name}: no row ran, so no target can be chosen")
        best = max(float(r["metrics"]["test_accuracy"].max()) for r in runs.values())
        target, rule = campaign.choose_target(warm.accuracy, best), campaign.TARGET_RULE
    attach_times(runs, warm, target)
    attrs = file_attrs(args, state, name, target, rule)
    attrs["real_seconds"] = time.perf_counter() - state["started"]
    campaign.write(args.out, attrs, state["costs"], warm, runs,
                   skipped, {m.key: m for m in rows})
    save_warmstart(args.out.with_name(args.out.stem + "_warmstart.h5"), warm, args.overwrite)
    report(runs, skipped, rows, target, warm)
    print(f"wrote {args.out} in {attrs['real_seconds']:.0f} s")
    return 0
