"""What the parameter server costs a replica: Downpour throughput against training alone.

Runs real training jobs on the FSDD speech frames, each launched as users launch them
(``mpiexec -n W python -m mpibelief train``, or the launcher given), in interleaved
rounds so that load on the machine hits every case alike:

- ``alone``: one process, single-replica SGD with the same optimiser, no server;
- ``R{r}_S{s}``: Downpour, 1 coordinator + ``s`` shards + ``r`` replicas, for every
  ``r`` in ``--replicas`` and ``s`` in ``--shards``; ``n_fetch = n_push = 1``, no
  warmstart.

Samples per second per replica come from each replica's own training-loop time in
the result file's ``/ranks`` table (data loading and JIT excluded); the total is all
replicas' samples over the slowest replica's time.  Each shard's busy fraction (time
applying pushes over time serving, from ``/server/busy_fraction``) shows when the shards
become the bottleneck: near 1, adding replicas no longer adds throughput.  Evaluation is
pushed past the end of the run so the coordinator stays asleep.  Goal (issue 3):
``R1_S1`` keeps at least 85% of ``alone``'s samples per second.

Writes ``results/bench_downpour.h5``: ``/bench/downpour/<case>/{per_replica,total,
busy_fraction}`` (samples/s per repeat; the busiest shard's fraction per repeat) with the
medians and the ratio to ``alone`` as attributes, and the provenance of
:func:`mpibelief.results.stamp`.  The sizes come from the command line, so the same
bench runs unchanged on a bigger machine or inside a Slurm allocation
(``--launcher "srun --mpi=pmi2"``).

Usage: ``python bench/downpour.py [--replicas 1,2] [--shards 1,2] [--repeats 3]
[--epochs 0.3] [--launcher mpiexec] [--out PATH]``
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/jobs.py, beside this file
from jobs import BIN, REPO, counts, launch  # noqa: E402

GOAL = 0.85


def cases(replicas: list[int], shards: list[int]) -> dict:
    """``alone`` and every ``R{r}_S{s}``: ``{name: (replicas, shards) or None}``."""
    found = {"alone": None}
    found.update({f"R{r}_S{s}": (r, s) for r in replicas for s in shards})
    return found


def command(case, epochs: float, out: Path, launcher: list[str]) -> list[str]:
    """The training command for one case; its result file lands at ``out``."""
    common = ["configs/demo.toml", "--out", str(out), "--set", f"train.epochs={epochs}",
              "--set", "train.eval_every=1e9", "--set", "train.max_seconds=0.0",
              "--set", "downpour.warmstart_steps=0", "--set", "downpour.n_fetch=1",
              "--set", "downpour.n_push=1"]
    py = [sys.executable, "-m", "mpibelief", "train", *common]
    if case is None:
        return py + ["--set", "run.algorithm='sgd'", "--set", "layout.shards=0",
                     "--set", "layout.replicas=1"]
    replicas, shards = case
    # A replica trains epochs * R over its 1/R of the data: as many steps as alone.
    world = 1 + shards + replicas
    return [*launcher, "-n", str(world), *py, "--set", f"layout.shards={shards}",
            "--set", f"layout.replicas={replicas}", "--set", f"train.epochs={epochs * replicas}"]



def rates(path: Path) -> tuple[float, float, float]:
    """(samples/s per replica averaged over replicas, total samples/s, busiest shard)."""
    with h5py.File(path) as f:
        samples, seconds = f["ranks/samples"][()], f["ranks/train_seconds"][()]
        busy = f["server/busy_fraction"][()] if "server" in f else np.zeros(1)
        status = f.attrs["status"]
    if status != "complete":
        sys.exit(f"bench/downpour.py: {path} did not complete ({status})")
    trained = samples > 0
    per_replica = float(np.mean(samples[trained] / seconds[trained]))
    return per_replica, float(samples[trained].sum() / seconds[trained].max()), float(busy.max())



def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=counts, default=[1, 2], help="e.g. 1,2,4")
    parser.add_argument("--shards", type=counts, default=[1, 2], help="e.g. 1,2")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (median)")
    parser.add_argument("--epochs", type=float, default=0.3,
                        help="epochs of FSDD per run, in total over the replicas")
    parser.add_argument("--launcher", default=str(BIN / "mpiexec"),
                        help="MPI launcher taking -n (e.g. 'srun --mpi=pmi2')")
    parser.add_argument("--out", default=str(REPO / "results" / "bench_downpour.h5"))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    todo = cases(args.replicas, args.shards)
    launcher = shlex.split(args.launcher)
    found = {case: ([], [], []) for case in todo}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, case in todo.items():
                path = Path(tmp) / f"{name}_{rep}.h5"
                launch("downpour.py", name, command(case, args.epochs, path, launcher))
                for column, value in zip(found[name], rates(path), strict=True):
                    column.append(value)
                per, total, busy = (column[-1] for column in found[name])
                print(f"round {rep + 1}/{args.repeats} {name:>7}: {per:8.0f} samples/s per"
                      f" replica, {total:8.0f} total, busiest shard {busy:5.1%}", flush=True)
    report(found, args)


def report(found: dict, args) -> None:
    from mpibelief.results import stamp

    base = float(np.median(found["alone"][0]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n{'case':>7} {'per replica':>12} {'total':>10} {'vs alone':>9} {'busy shard':>11}")
    with h5py.File(out, "w") as f:
        stamp(f, {"command": " ".join(sys.argv), "repeats": args.repeats,
                  "epochs": args.epochs, "goal_R1_S1_vs_alone": GOAL,
                  "units": "samples per second; busy_fraction: share of serving time"})
        for case, (per, total, busy) in found.items():
            g = f.create_group(f"bench/downpour/{case}")
            g["per_replica"], g["total"], g["busy_fraction"] = per, total, busy
            ratio = float(np.median(per)) / base
            g.attrs.update({"median_per_replica": np.median(per),
                            "median_total": np.median(total), "ratio_vs_alone": ratio,
                            "median_busy_fraction": np.median(busy)})
            print(f"{case:>7} {np.median(per):12.0f} {np.median(total):10.0f} {ratio:9.2f}"
                  f" {np.median(busy):11.1%}")
    if "R1_S1" in found:
        r11 = float(np.median(found["R1_S1"][0])) / base
        verdict = "PASS" if r11 >= GOAL else "FAIL"
        print(f"\n{verdict}: R1_S1 keeps {r11:.0%} of a replica alone (goal >= {GOAL:.0%})")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
