"""What Strom's threshold compression costs and saves: sync SGD, compressed and not.

Runs real training jobs on the FSDD speech frames (``configs/sync.toml``), launched as
users launch them (``mpiexec -n R python -m mpibelief train``, or the launcher given),
in interleaved rounds so that load on the machine hits every case alike:

- ``dense``: synchronous SGD, the replicas' gradients averaged by Allreduce;
- ``f{F}``: the same, Strom-compressed with tau chosen each step to keep a fraction F
  of the entries (``--fractions``, default 10%, 1%, 0.1%), no warm-up;
- ``tau{T}``: the same with a fixed tau (``--taus``, none by default).

Every case trains the same number of epochs; repeat r uses ``run.seed = r`` for every
case (initial model, batch order), so each round compares like with like, and the
rounds show how much of a difference is the seed's.  (A run is deterministic given
its seed: repeats with one seed would only repeat the same accuracy.)  Recorded per
case and repeat: test accuracy, seconds per step (rank 0's training time over its
steps, evaluation and start-up excluded), compression ratio (dense float32 bytes over
the bytes a replica sent, over the whole run and every replica) and the mean fraction
of entries sent.

Acceptance (issue 9): the ``f0.01`` case sends >= 100x fewer bytes than dense float32
and its accuracy is within 1 point of ``dense`` (the median over the rounds of the
paired difference; the worst round is printed too).  The verdict is printed; where
0.1% stands is printed beside it.

Writes ``results/compression.h5`` (stamped with :func:`mpibelief.results.stamp`):
``/bench/compression/<case>/{accuracy, seconds_per_step, ratio, fraction}`` (one value
per repeat) with their medians as attributes (``median_*``), plus ``kept`` (the target
fraction, 1 for dense; 0 for fixed tau) and ``tau``.  ``mpibelief plot compression``
draws it.

Usage: ``python bench/compression.py [--replicas 2] [--fractions 0.1,0.01,0.001]
[--taus 0.01] [--epochs 2] [--repeats 3] [--launcher mpiexec] [--out PATH]``
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
from jobs import BIN, REPO, floats, launch  # noqa: E402

GOAL_RATIO, GOAL_POINTS = 100.0, 0.01


def cases(fractions: list[float], taus: list[float]) -> dict:
    """``{name: [--set overrides]}``, dense first."""
    found = {"dense": ["compression.enabled=false"]}
    for f in fractions:
        found[f"f{f:g}"] = ["compression.enabled=true", "compression.tau=0.0",
                            f"compression.fraction={f}", "compression.warmup_stages=0"]
    for t in taus:
        found[f"tau{t:g}"] = ["compression.enabled=true", f"compression.tau={t}"]
    return found


def command(overrides: list[str], args, out: Path, seed: int) -> list[str]:
    sets = [*overrides, f"run.seed={seed}", f"train.epochs={args.epochs}",
            "train.eval_every=1e9", "train.max_seconds=0.0", f"layout.replicas={args.replicas}"]
    py = [sys.executable, "-m", "mpibelief", "train", "configs/sync.toml", "--out", str(out)]
    for item in sets:
        py += ["--set", item]
    return [*shlex.split(args.launcher), "-n", str(args.replicas), *py]



def figures(path: Path) -> tuple[float, float, float, float]:
    """(test accuracy, seconds per step, compression ratio, mean fraction sent)."""
    with h5py.File(path) as f:
        if f.attrs["status"] != "complete":
            sys.exit(f"bench/compression.py: {path} did not complete ({f.attrs['status']})")
        accuracy = float(f["metrics/test_accuracy"][-1])
        steps = float(f["metrics/updates"][-1])
        per_step = float(f["ranks/train_seconds"][0]) / steps
        if "compression" not in f:
            return accuracy, per_step, 1.0, 1.0
        c = f["compression"]
        ratio = float(c["bytes_dense"][()].sum() / c["bytes_compressed"][()].sum())
        return accuracy, per_step, ratio, float(c["fraction"][()].mean())



def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2, help="replicas (= ranks)")
    parser.add_argument("--fractions", type=floats, default=[0.1, 0.01, 0.001],
                        help="kept fractions for adaptive tau, e.g. 0.1,0.01,0.001")
    parser.add_argument("--taus", type=floats, default=[], help="fixed taus, e.g. 0.01")
    parser.add_argument("--epochs", type=float, default=2.0, help="epochs of FSDD per run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds; round r runs every case with run.seed = r")
    parser.add_argument("--launcher", default=str(BIN / "mpiexec"),
                        help="MPI launcher taking -n (e.g. 'srun --mpi=pmi2')")
    parser.add_argument("--out", default=str(REPO / "results" / "compression.h5"))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    todo = cases(args.fractions, args.taus)
    found = {name: [] for name in todo}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, overrides in todo.items():
                path = Path(tmp) / f"{name}_{rep}.h5"
                launch("compression.py", name, command(overrides, args, path, seed=rep))
                found[name].append(figures(path))
                acc, per_step, ratio, fraction = found[name][-1]
                print(f"round {rep + 1}/{args.repeats} {name:>8}: test acc {acc:.4f},"
                      f" {1e3 * per_step:6.2f} ms/step, ratio {ratio:8.1f}x, sent"
                      f" {fraction:.4%}", flush=True)
    report(found, todo, args)


def report(found: dict, todo: dict, args) -> None:
    from mpibelief.results import stamp

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = float(np.median([row[0] for row in found["dense"]]))
    print(f"\n{'case':>8} {'test acc':>9} {'vs dense':>9} {'ms/step':>8} {'ratio':>9}"
          f" {'sent':>8}")
    with h5py.File(out, "w") as f:
        stamp(f, {"command": " ".join(sys.argv), "repeats": args.repeats,
                  "epochs": args.epochs, "replicas": args.replicas,
                  "goal": f"f0.01: ratio >= {GOAL_RATIO:g}, accuracy within"
                          f" {100 * GOAL_POINTS:g} point of dense",
                  "units": "accuracy: test frames; seconds per step; ratio: dense/sent"})
        for name, rows in found.items():
            acc, per_step, ratio, fraction = (np.array(col) for col in zip(*rows, strict=True))
            g = f.create_group(f"bench/compression/{name}")
            g["accuracy"], g["seconds_per_step"], g["ratio"], g["fraction"] = (
                acc, per_step, ratio, fraction)
            kept = 1.0 if name == "dense" else float(name[1:]) if name[0] == "f" else 0.0
            g.attrs.update({"median_accuracy": np.median(acc),
                            "median_seconds_per_step": np.median(per_step),
                            "median_ratio": np.median(ratio), "median_fraction":
                            np.median(fraction), "kept": kept,
                            "tau": float(name[3:]) if name.startswith("tau") else 0.0})
            print(f"{name:>8} {np.median(acc):9.4f} {100 * (np.median(acc) - base):+8.2f}p"
                  f" {1e3 * np.median(per_step):8.2f} {np.median(ratio):8.1f}x"
                  f" {np.median(fraction):8.4%}")
    verdict(found, base)
    print(f"wrote {out}")


def verdict(found: dict, base: float) -> None:
    dense = np.array([row[0] for row in found["dense"]])
    for name in ("f0.01", "f0.001"):
        if name not in found:
            continue
        acc = np.array([row[0] for row in found[name]])
        diff = acc - dense  # paired: the same seed in each round
        ratio = float(np.min([row[2] for row in found[name]]))
        ok = ratio >= GOAL_RATIO and float(np.median(diff)) >= -GOAL_POINTS
        tag = ("PASS" if ok else "FAIL") if name == "f0.01" else "0.1%"
        print(f"{tag}: {name} sends >= {ratio:.0f}x fewer bytes than dense float32; test"
              f" accuracy minus dense's, same seed: median {100 * np.median(diff):+.2f},"
              f" worst {100 * diff.min():+.2f} points over {len(diff)} seed(s)")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
