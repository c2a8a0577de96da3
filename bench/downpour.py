"""What the parameter server costs a replica: Downpour throughput against training alone.

Runs real training jobs on the FSDD speech frames, each launched as users launch them
(``mpiexec -n W python -m mpibelief train``), in interleaved rounds so that load on
the machine hits every case alike:

- ``alone``: one process, single-replica SGD with the same optimiser, no server;
- ``R{r}_S{s}``: Downpour, 1 coordinator + ``s`` shards + ``r`` replicas,
  ``n_fetch = n_push = 1``, no warmstart.

Samples per second per replica come from each replica's own training-loop time in
the result file's ``/ranks`` table (data loading and JIT excluded); the total is all
replicas' samples over the slowest replica's time.  Evaluation is pushed past the end of
the run so the coordinator stays asleep.  Goal (issue 3): ``R1_S1`` keeps at least 85%
of ``alone``'s samples per second.  Writes ``results/bench_downpour.h5``:
``/bench/downpour/<case>/{per_replica,total}`` (samples/s, one per repeat) with the
medians and the ratio to ``alone`` as attributes.

Usage: ``python bench/downpour.py [--repeats 3] [--epochs 0.3] [--out PATH]``
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CASES = {"alone": None, "R1_S1": (1, 1), "R1_S2": (1, 2), "R2_S1": (2, 1), "R2_S2": (2, 2)}
GOAL = 0.85


def launch(case: str, epochs: float, out: Path) -> None:
    """Train once for ``case``; the result file lands at ``out``."""
    common = ["configs/demo.toml", "--out", str(out), "--set", f"train.epochs={epochs}",
              "--set", "train.eval_every=1e9", "--set", "train.max_seconds=0.0",
              "--set", "downpour.warmstart_steps=0", "--set", "downpour.n_fetch=1",
              "--set", "downpour.n_push=1"]
    py = [sys.executable, "-m", "mpibelief", "train", *common]
    if CASES[case] is None:
        cmd = py + ["--set", "run.algorithm='sgd'", "--set", "layout.shards=0",
                    "--set", "layout.replicas=1"]
    else:
        replicas, shards = CASES[case]
        # A replica trains epochs * R over its 1/R of the data: as many steps as alone.
        world = 1 + shards + replicas
        cmd = [str(BIN / "mpiexec"), "-n", str(world), *py, "--set", f"layout.shards={shards}",
               "--set", f"layout.replicas={replicas}", "--set", f"train.epochs={epochs * replicas}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        sys.exit(f"bench/downpour.py: {case} failed:\n{done.stderr[-2000:]}")


def rates(path: Path) -> tuple[float, float]:
    """(samples/s per replica averaged over replicas, total samples/s) from /ranks."""
    with h5py.File(path) as f:
        samples, seconds = f["ranks/samples"][()], f["ranks/train_seconds"][()]
        status = f.attrs["status"]
    if status != "complete":
        sys.exit(f"bench/downpour.py: {path} did not complete ({status})")
    trained = samples > 0
    per_replica = float(np.mean(samples[trained] / seconds[trained]))
    return per_replica, float(samples[trained].sum() / seconds[trained].max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (median)")
    parser.add_argument("--epochs", type=float, default=0.3,
                        help="epochs of FSDD per run, in total over the replicas")
    parser.add_argument("--out", default=str(REPO / "results" / "bench_downpour.h5"))
    args = parser.parse_args()

    found = {case: ([], []) for case in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for case in CASES:
                path = Path(tmp) / f"{case}_{rep}.h5"
                launch(case, args.epochs, path)
                per, total = rates(path)
                found[case][0].append(per)
                found[case][1].append(total)
                print(f"round {rep + 1}/{args.repeats} {case:>6}: {per:8.0f} samples/s per"
                      f" replica, {total:8.0f} total", flush=True)
    report(found, args)


def report(found: dict, args) -> None:
    base = float(np.median(found["alone"][0]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n{'case':>6} {'per replica':>12} {'total':>10} {'vs alone':>9}")
    with h5py.File(out, "w") as f:
        f.attrs.update({"host": socket.gethostname(), "repeats": args.repeats,
                        "epochs": args.epochs, "goal_R1_S1_vs_alone": GOAL,
                        "date": datetime.datetime.now(datetime.UTC).isoformat()})
        for case, (per, total) in found.items():
            g = f.create_group(f"bench/downpour/{case}")
            g["per_replica"], g["total"] = np.array(per), np.array(total)
            ratio = float(np.median(per)) / base
            g.attrs.update({"median_per_replica": np.median(per),
                            "median_total": np.median(total), "ratio_vs_alone": ratio})
            print(f"{case:>6} {np.median(per):12.0f} {np.median(total):10.0f} {ratio:9.2f}")
    r11 = float(np.median(found["R1_S1"][0])) / base
    verdict = "PASS" if r11 >= GOAL else "FAIL"
    print(f"\n{verdict}: R1_S1 keeps {r11:.0%} of a replica alone (goal >= {GOAL:.0%});"
          f" wrote {out}")


if __name__ == "__main__":
    main()
