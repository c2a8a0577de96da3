"""Figure 3 measured: time per mini-batch of one replica over P partitions.

For each model family (``configs/<name>.toml``, or any model config's path) and each
``P`` in ``--partitions`` (smallest first: P = 1 is every speed-up's base, and its
one-process job compiles the Numba kernels before P ranks share the cache),
runs ``mpiexec -n P python -m mpibelief.simulate.steptime`` (or the launcher given:
``--launcher "srun --mpi=pmi2"`` inside a Slurm allocation holds any P), in
interleaved rounds so that load on the shared machine hits every case alike.  Each
job times forward plus backward (``loss_and_grad``) with every boundary exchange;
parameter traffic is NOT included (no parameter server, no optimiser update): Figure
3 times the model-parallel step itself.  A step's time is the slowest rank's (all
start together); per partition: compute seconds (wall minus waiting), seconds waiting
for other partitions (the slowest partition's cost to the others), bytes sent, and
peak resident memory, and CPU seconds.  Speed-up is P = 1's median over P's, both
from this run; so is ``cpu_speedup``, from the busiest rank's CPU seconds, which
shows what the partitioning buys when other jobs share the cores out (wall time then
shows the load as much as the work).

A case whose estimated memory (parameters and gradients, float32, plus activations
and about 0.4 GiB per process) exceeds what ``/proc/meminfo`` says is available is
skipped and recorded as not fitting, rather than swapped or killed.  The machine's
MPI latency and bandwidth (:mod:`mpibelief.simulate.pingpong`) are measured in the
same run; then, unless ``--no-model``, the scaling model (:mod:`mpibelief.simulate.
scaling`) is fitted and validated into the same file.

Writes ``results/fig3_measured.h5`` (an existing file only with ``--overwrite``):
``/measured/<model>/P<p>/{seconds (repeats), compute_seconds, wait_seconds,
cpu_seconds, max_rss_bytes (repeats x P), bytes_sent (P)}`` with the medians and the
speed-up as attributes, the model's config file as ``/measured/<model>``'s ``config``;
``/network/local``; stamped with :func:`mpibelief.results.stamp` (inside a Slurm job:
its id, node list and tasks per node).

Usage: ``python bench/model_parallel.py [--models speech,images_80m,my/net.toml]
[--partitions 1,2] [--batch N] [--steps 3] [--repeats 3] [--launcher mpiexec]
[--timeout 1800] [--out PATH] [--overwrite] [--no-model]``
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

for _var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy: tiles are timed on one core

import h5py  # noqa: E402 (after the thread settings)
import numpy as np  # noqa: E402 (after the thread settings)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GOAL = 1.6  # issue 7: P = 2 speed-up of the largest locally connected model that fits
GIB = 2**30


def counts(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want positive integers, e.g. 1,2,4")
    return values


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def needed_bytes(n_params: int, partitions: int) -> int:
    """Parameters and gradients (8 bytes a parameter over all partitions), 15% more
    for activations, windows and the output layer's initialisation copy, and 0.4 GiB
    per process (Python, numpy, Numba, MPI)."""
    return int(8 * n_params * 1.15 + 0.4 * GIB * partitions)


def launch(cmd: list[str], timeout: float) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s: {shlex.join(cmd)}") from None
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {shlex.join(cmd)}\n{done.stderr[-1500:]}")


def run_case(name: str, P: int, args, launcher: list[str], tmp: Path) -> dict:
    """One job: ``{seconds, compute_seconds (P), wait_seconds (P), bytes_sent (P),
    max_rss_bytes (P), batch, n_params}``, medians over its timed steps."""
    out = tmp / f"{name}_P{P}.json"
    sets = ["--set", f"train.batch={args.batch}"] if args.batch else []
    launch([*launcher, "-n", str(P), sys.executable, "-m", "mpibelief.simulate.steptime",
            str(args.configs[name]), *sets, "--steps", str(args.steps), "--out", str(out)],
           args.timeout)
    found = json.loads(out.read_text())
    ranks = found["ranks"]
    wall = np.array([r["seconds"] for r in ranks])  # (P, steps)
    wait = np.array([r["wait_seconds"] for r in ranks])
    cpu = np.array([r["cpu_seconds"] for r in ranks])
    return {"seconds": float(np.median(wall.max(axis=0))),
            "compute_seconds": np.median(wall - wait, axis=1),
            "wait_seconds": np.median(wait, axis=1),
            "cpu_seconds": np.median(cpu, axis=1),
            "bytes_sent": np.array([r["bytes_sent"][0] for r in ranks], np.int64),
            "max_rss_bytes": np.array([r["max_rss_bytes"] for r in ranks], np.int64),
            "batch": found["batch"], "n_params": found["n_params"]}


def fits(name: str, P: int, args) -> tuple[bool, str]:
    from mpibelief.simulate.steptime import build

    sets = [f"train.batch={args.batch}"] if args.batch else []
    n_params = build(str(args.configs[name]), sets)[1].n_params
    need, have = needed_bytes(n_params, P), available_bytes()
    why = f"needs about {need / GIB:.1f} GiB, {have / GIB:.1f} GiB available"
    return need <= have, why


def measure(args, launcher: list[str]) -> tuple[dict, dict]:
    """Interleaved rounds: ``{(model, P): [case per repeat]}`` and the skipped cases."""
    found = {(m, P): [] for m in args.configs for P in args.partitions}
    skipped = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for (name, P), rows in found.items():
                if (name, P) in skipped:
                    continue
                ok, why = fits(name, P, args)
                if not ok:
                    skipped[(name, P)] = f"does not fit this machine's memory: {why}"
                    print(f"skip {name} P={P}: {skipped[(name, P)]}", flush=True)
                    continue
                try:
                    rows.append(run_case(name, P, args, launcher, Path(tmp)))
                except RuntimeError as exc:  # e.g. killed for memory: keep the others
                    skipped[(name, P)] = f"failed: {exc}"
                    print(f"skip {name} P={P}: {exc}", flush=True)
                    continue
                c = rows[-1]
                print(f"round {rep + 1}/{args.repeats} {name:>12} P={P}: {c['seconds']:7.3f} s"
                      f" per mini-batch, compute {_fmt(c['compute_seconds'])}"
                      f" wait {_fmt(c['wait_seconds'])},"
                      f" peak {c['max_rss_bytes'].sum() / GIB:.1f} GiB", flush=True)
    return {k: v for k, v in found.items() if v}, skipped


def _fmt(values) -> str:
    return np.array2string(np.asarray(values), precision=3)


def pingpong(launcher: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pingpong.json"
        launch([*launcher, "-n", "2", sys.executable, "-m", "mpibelief.simulate.pingpong",
                "--out", str(out)], timeout)
        return json.loads(out.read_text())


def write(path: Path, found: dict, skipped: dict, network: dict, args) -> None:
    """The measured cases, speed-ups against P = 1 of the same run, and the network."""
    from mpibelief.results import stamp

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        stamp(f, {"command": " ".join(sys.argv), "repeats": args.repeats,
                  "steps": args.steps, "goal_P2_speedup_largest_lc": GOAL,
                  "parameter_traffic_included": False,
                  "units": "seconds per mini-batch (forward + backward, boundary exchanges"
                           " included, parameter traffic and optimiser update excluded);"
                           " bytes per mini-batch (forward + backward)"})
        net = f.create_group("network/local")
        net.attrs.update({"latency": network["latency"], "bandwidth": network["bandwidth"],
                          "source": "MPI ping-pong between two ranks on this machine"})
        net["sizes"], net["seconds"] = network["sizes"], network["seconds"]
        for (name, P), rows in found.items():
            g = f.create_group(f"measured/{name}/P{P}")
            for key in ("compute_seconds", "wait_seconds", "cpu_seconds", "max_rss_bytes"):
                g[key] = np.stack([r[key] for r in rows])
            g["seconds"] = [r["seconds"] for r in rows]
            g["bytes_sent"] = rows[0]["bytes_sent"]
            g.attrs.update({"partitions": P, "batch": rows[0]["batch"],
                            "n_params": rows[0]["n_params"],
                            "median_seconds": float(np.median(g["seconds"][()])),
                            "median_cpu_seconds": float(np.median(
                                g["cpu_seconds"][()].max(axis=1)))})
        for (name, P), why in skipped.items():
            f.require_group(f"skipped/{name}").attrs[f"P{P}"] = why
        for name in {m for m, _ in found}:
            group = f[f"measured/{name}"]
            config = args.configs[name]
            group.attrs["config"] = str(config.relative_to(REPO)
                                        if config.is_relative_to(REPO) else config)
            if "P1" not in group:
                continue
            base, cpu = (group["P1"].attrs[k] for k in ("median_seconds", "median_cpu_seconds"))
            for g in group.values():
                g.attrs["speedup"] = base / g.attrs["median_seconds"]
                # the busiest partition's CPU seconds: the speed-up without the load
                g.attrs["cpu_speedup"] = cpu / g.attrs["median_cpu_seconds"]


def report(path: Path, skipped: dict) -> None:
    with h5py.File(path, "r") as f:
        net = f["network/local"].attrs
        print(f"\nMPI here: latency {net['latency'] * 1e6:.1f} us, bandwidth"
              f" {net['bandwidth'] / 1e9:.2f} GB/s")
        print(f"{'model':>12} {'P':>3} {'s/batch':>8} {'speed-up':>9} {'CPU s-up':>9}"
              f" {'compute/part':>13}"
              f" {'wait/part':>10} {'MiB sent':>9} {'peak GiB':>9}")
        best = None
        for name, group in f["measured"].items():
            for key in sorted(group, key=lambda k: int(k[1:])):
                g = group[key]
                P, speed = g.attrs["partitions"], g.attrs.get("speedup", np.nan)
                print(f"{name:>12} {P:3d} {g.attrs['median_seconds']:8.3f} {speed:9.2f}"
                      f" {g.attrs.get('cpu_speedup', np.nan):9.2f}"
                      f" {np.median(g['compute_seconds'][()]):13.3f}"
                      f" {np.median(g['wait_seconds'][()]):10.3f}"
                      f" {g['bytes_sent'][()].sum() / 2**20:9.1f}"
                      f" {np.median(g['max_rss_bytes'][()].sum(axis=1)) / GIB:9.2f}")
                if name.startswith("images") and P == 2 and np.isfinite(speed):
                    size = g.attrs["n_params"]
                    best = max(best or (0, "", 0.0), (size, name, speed))
    for (name, P), why in skipped.items():
        print(f"{name:>12} {P:3d} skipped: {why}")
    if best:
        verdict = "PASS" if best[2] >= GOAL else "FAIL"
        print(f"\n{verdict}: P = 2 speed-up {best[2]:.2f} for {best[1]}, the largest locally"
              f" connected model measured at P = 2 (goal >= {GOAL})")
    print(f"wrote {path}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=lambda s: [m for m in s.split(",") if m],
                        default=["speech", "images_80m", "images_330m"],
                        help="config names under configs/ (speech,images_1700m) or model"
                             " config files (my/net.toml)")
    parser.add_argument("--partitions", type=counts, default=[1, 2], help="e.g. 1,2,4")
    parser.add_argument("--batch", type=int, default=0, help="mini-batch (0: each config's)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per job (median)")
    parser.add_argument("--repeats", type=int, default=3, help="jobs per case (median)")
    parser.add_argument("--launcher", default=str(BIN / "mpiexec"),
                        help="MPI launcher taking -n (e.g. 'srun --mpi=pmi2')")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    parser.add_argument("--out", default=str(REPO / "results" / "fig3_measured.h5"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-model", action="store_true",
                        help="measure only; fit the scaling model later with"
                             " python -m mpibelief.simulate.scaling FILE")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    launcher = shlex.split(args.launcher)
    from mpibelief.simulate.scaling import model_config

    named = [model_config(entry) for entry in args.models]
    for entry, (_, config) in zip(args.models, named, strict=True):
        if not config.exists():
            sys.exit(f"bench/model_parallel.py: error: model {entry}: no {config}")
    args.configs = dict(named)
    if len(args.configs) < len(named):
        sys.exit(f"bench/model_parallel.py: error: two models share a name: {args.models}")
    if Path(args.out).exists() and not args.overwrite:
        sys.exit(f"bench/model_parallel.py: error: {args.out} exists: pass --overwrite to"
                 " replace it")
    network = pingpong(launcher, args.timeout)
    found, skipped = measure(args, launcher)
    out = Path(args.out)
    write(out, found, skipped, network, args)
    report(out, skipped)
    if not args.no_model:
        from mpibelief.simulate.scaling import main as scaling

        scaling([str(out)])


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
