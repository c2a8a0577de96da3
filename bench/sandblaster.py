"""What backup tasks buy Sandblaster when one replica is a straggler.

Runs real Sandblaster training jobs on the FSDD speech frames, launched as users launch
them (``mpiexec -n W python -m mpibelief train configs/sandblaster.toml``), in
interleaved rounds so that load on the machine hits every case alike:

- ``even_P``: no straggler, backups on (the reference: what a batch costs at full
  speed), for the first portion count only;
- ``off_P``: replica 1 slowed ``--factor`` times (it sleeps ``factor - 1`` times its
  compute), backups off: dynamic load balancing alone;
- ``on_P``: the same straggler, backups on;

for every portion count ``P`` in ``--portions``.  Why several: load balancing already
gives a steady straggler fewer portions, so backups only recover the batch's tail, at
most one straggler portion; the finer the portions, the smaller that tail is against
the batch.  How much there is to recover at all is bounded by the best split of whole
portions between the replicas: with 2 replicas, one 4x slower, no schedule finishes 4
portions sooner than 4 fast portions' time (the fast one does all 4, or 3 while the
straggler does 1), which is what load balancing alone gives; 8 portions: 7 against
about 8 (cut at most 14%); 16: 13 against about 15 (13%).  Only at 2 portions is half
the batch at stake (51%).  ``bench/sandblaster_model.py`` plays the dispatcher around
the real portion book in virtual time and prints these bounds beside what the book
achieves: 48%, 0%, 9%, 7% at 2, 4, 8, 16 portions (``push_every`` 4).

Seconds per batch (one L-BFGS step: its gradient and line-search evaluations) come from
the run's own ``/sandblaster/seconds``; a run's figure is its median over batches, a
case's the median over repeats.  Seconds per evaluation are reported beside them, since
a step's evaluation count can differ between runs.  Goal (issue 8): ``on_P`` at
least 30% below ``off_P``.

Writes ``results/bench_sandblaster.h5``: ``/bench/sandblaster/<case>/{per_batch,
per_eval,backups,wasted}`` (one value per repeat) with medians and ratios as
attributes, and the provenance of :func:`mpibelief.results.stamp`.

Usage: ``python bench/sandblaster.py [--replicas 2] [--shards 1] [--portions 4,8,16]
[--batch 4096] [--iterations 6] [--factor 4] [--repeats 3] [--launcher mpiexec]
[--out PATH]``
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

GOAL = 0.30
KINDS = {"even": (False, True), "off": (True, False), "on": (True, True)}


def cases(portions: list[int]) -> dict:
    """``{name: (slow, backups, portions)}``: the reference, then off/on per count."""
    found = {f"even_{portions[0]}": (*KINDS["even"], portions[0])}
    for p in portions:
        found.update({f"{kind}_{p}": (*KINDS[kind], p) for kind in ("off", "on")})
    return found


def command(case: tuple, args, out: Path) -> list[str]:
    slow, backups, portions = case
    sets = {"layout.shards": args.shards, "layout.replicas": args.replicas,
            "sandblaster.portions": portions, "sandblaster.batch": args.batch,
            "sandblaster.iterations": args.iterations,
            "sandblaster.backups": str(backups).lower(),
            "sandblaster.slow_replica": 1 if slow else -1,
            "sandblaster.slow_factor": args.factor, "train.eval_every": 1e9,
            "train.max_seconds": 0.0}
    world = 1 + args.shards + args.replicas
    cmd = [*shlex.split(args.launcher), "-n", str(world), sys.executable, "-m", "mpibelief",
           "train", "configs/sandblaster.toml", "--out", str(out)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd



def figures(path: Path) -> tuple[float, float, int, int]:
    """(median seconds per batch, median seconds per evaluation, backups, wasted)."""
    with h5py.File(path) as f:
        if f.attrs["status"] != "complete":
            sys.exit(f"bench/sandblaster.py: {path} did not complete ({f.attrs['status']})")
        t = {k: f["sandblaster"][k][()] for k in ("seconds", "evals", "backups_issued",
                                                  "backups_wasted", "samples_applied",
                                                  "batch")}
    if not (t["samples_applied"] == t["evals"] * t["batch"]).all():
        sys.exit(f"bench/sandblaster.py: {path}: portions did not add up to the batch")
    return (float(np.median(t["seconds"])), float(np.median(t["seconds"] / t["evals"])),
            int(t["backups_issued"].sum()), int(t["backups_wasted"].sum()))



def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--portions", type=counts, default=[4, 8, 16],
                        help="portions per batch, e.g. 4,8,16")
    parser.add_argument("--batch", type=int, default=4096, help="samples per batch")
    parser.add_argument("--iterations", type=int, default=6, help="batches per run")
    parser.add_argument("--factor", type=float, default=4.0, help="straggler slowdown")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (median)")
    parser.add_argument("--launcher", default=str(BIN / "mpiexec"),
                        help="MPI launcher taking -n (e.g. 'srun --mpi=pmi2')")
    parser.add_argument("--out", default=str(REPO / "results" / "bench_sandblaster.h5"))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    todo = cases(args.portions)
    found = {case: ([], [], [], []) for case in todo}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for case, spec in todo.items():
                path = Path(tmp) / f"{case}_{rep}.h5"
                launch("sandblaster.py", case, command(spec, args, path))
                for column, value in zip(found[case], figures(path), strict=True):
                    column.append(value)
                batch, per_eval, backups, wasted = (c[-1] for c in found[case])
                print(f"round {rep + 1}/{args.repeats} {case:>8}: {batch:7.3f} s/batch"
                      f" {per_eval:7.3f} s/evaluation, {backups} backups, {wasted} wasted",
                      flush=True)
    report(found, args)


def report(found: dict, args) -> None:
    from mpibelief.results import stamp

    med = {case: float(np.median(v[0])) for case, v in found.items()}
    even = med[f"even_{args.portions[0]}"]
    cuts = {p: 1 - med[f"on_{p}"] / med[f"off_{p}"] for p in args.portions}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w") as f:
        stamp(f, {"command": " ".join(sys.argv), "repeats": args.repeats,
                  "replicas": args.replicas, "shards": args.shards,
                  "portions": args.portions, "batch": args.batch, "factor": args.factor,
                  "goal_cut_on_vs_off": GOAL,
                  "units": "seconds per batch (L-BFGS step); per_eval: per gradient"})
        print(f"\n{'case':>8} {'s/batch':>8} {'s/eval':>8} {'vs even':>8}")
        for case, (per_batch, per_eval, backups, wasted) in found.items():
            g = f.create_group(f"bench/sandblaster/{case}")
            g["per_batch"], g["per_eval"] = per_batch, per_eval
            g["backups"], g["wasted"] = backups, wasted
            g.attrs.update({"median_per_batch": med[case],
                            "median_per_eval": float(np.median(per_eval)),
                            "ratio_vs_even": med[case] / even})
            if case.startswith("on_"):
                g.attrs["cut_vs_off"] = cuts[int(case[3:])]
            print(f"{case:>8} {med[case]:8.3f} {np.median(per_eval):8.3f}"
                  f" {med[case] / even:8.2f}")
    print()
    for p, cut in cuts.items():
        verdict = "PASS" if cut >= GOAL else "FAIL"
        print(f"{verdict}: {p} portions: backups cut the straggler's seconds per batch by"
              f" {cut:.0%} (goal >= {GOAL:.0%})")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
