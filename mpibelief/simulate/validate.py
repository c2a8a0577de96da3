"""Simulated against real: the same Downpour configs run both ways on this machine.

For every ``R`` in ``--replicas`` and ``S`` in ``--shards``: calibrate once (in the same
invocation, so the machine's load is the load the real runs meet), then for each case
run it for real (``mpiexec -n 1+S+R python -m mpibelief train``, real MPI and windows)
and simulated (:func:`mpibelief.simulate.run.simulate` with that calibration), and
compare what the issue asks to agree:

=====================  ==================================================  ==========
figure                 measured as                                         agreement
=====================  ==================================================  ==========
seconds per step       mean over replicas of train_seconds / steps          within 25%
                       (``/ranks``: the training loop, startup excluded)
mean staleness         ``/server/staleness`` histogram's mean               within 30%
test accuracy against  ``|acc_sim - acc_real|`` at each real evaluation in   2 points
samples seen           the second half of the common range of samples (the
                       simulated curve, evaluated every 0.1 s, interpolated
                       there), the largest difference
=====================  ==================================================  ==========

Staleness is compared as ``|sim - real| <= 30% of real + 0.05`` updates: with one
replica it is a fraction of an update, where a relative bound alone means nothing.
The comparison skips the first half, where the curve is steepest and where it is
evaluated decides the difference more than training does; the simulated run is
evaluated densely (evaluating costs no simulated time), so only the real points are
sparse, and they are compared as measured, not interpolated (interpolating two sparse
curves measured 6.3 points apart where the final accuracies were 0.3 apart).

Calibration (:mod:`.calibrate`), before each case, so that it meets the load the
case's real run meets: a short real ``R1_S1`` run (``--calibration-epochs``) gives the
per-sample compute and the in-run message and apply costs; the compute timed in ``R``
concurrent processes against one gives the contention of ``R`` replicas on the shared
cores.  So ``R1_S1``'s seconds per step are not a prediction (the same configuration,
shorter, calibrated them); every other case's are.

Writes ``results/sim_validation.h5`` (``/validation/R{r}_S{s}/{real,sim}`` curves and
figures, the comparison and the case's calibration as attributes; stamped) and prints
a table.
Usage: ``python -m mpibelief.simulate.validate [--replicas 1,2] [--shards 1,2]
[--epochs 1] [--config configs/demo.toml] [--out results/sim_validation.h5]
[--calibration-epochs 0.25]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[2]
SIM_EVAL_EVERY = 0.1  # simulated seconds between the simulated run's evaluations
BOUNDS = {"step_seconds": 0.25, "staleness": 0.30, "accuracy_points": 2.0}


def overrides(replicas: int, shards: int, epochs: float, warmstart: int) -> list[str]:
    """The config settings both runs of a case share."""
    return [f"layout.replicas={replicas}", f"layout.shards={shards}",
            f"train.epochs={epochs}", "train.eval_every=1.0", "train.max_seconds=0.0",
            f"downpour.warmstart_steps={warmstart}"]


def run_real(config: str, sets: list[str], out: Path, world: int, timeout: float = 900) -> None:
    """One real run under mpiexec (the venv's), its result at ``out``."""
    cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(world), sys.executable,
           "-m", "mpibelief", "train", config, "--out", str(out), "--overwrite"]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"real run failed ({' '.join(sets)}):\n{done.stderr[-2000:]}")


def summary(path: Path) -> dict:
    """The figures compared, and the accuracy curve, from one result file."""
    with h5py.File(path, "r") as f:
        samples, seconds = f["ranks/samples"][()], f["ranks/train_seconds"][()]
        compute, comm = f["ranks/compute_seconds"][()], f["ranks/comm_seconds"][()]
        hist = f["server/staleness"][()]
        batch = _batch(f.attrs["config"])
        curve = {k: f[f"metrics/{k}"][()] for k in ("samples", "test_accuracy",
                                                     "wall_seconds")}
    trained = samples > 0
    steps = samples[trained] / batch
    return {"step_seconds": float(np.mean(seconds[trained] / steps)),
            "compute_step_seconds": float(np.mean(compute[trained] / steps)),
            "comm_step_seconds": float(np.mean(comm[trained] / steps)),
            "staleness": float((hist * np.arange(len(hist))).sum() / max(hist.sum(), 1)),
            "final_accuracy": float(curve["test_accuracy"][-1]), **curve}


def _batch(toml_text: str) -> int:
    import tomllib

    return int(tomllib.loads(toml_text)["train"]["batch"])


def compare(real: dict, sim: dict) -> dict:
    """The three agreements (see the module docstring), with the verdict of each."""
    step = sim["step_seconds"] / real["step_seconds"] - 1.0
    stale = abs(sim["staleness"] - real["staleness"])
    lo = max(real["samples"].min(), sim["samples"].min())
    hi = min(real["samples"].max(), sim["samples"].max())
    at = (real["samples"] >= lo + (hi - lo) / 2) & (real["samples"] <= hi)
    diff = 100 * np.abs(np.interp(real["samples"][at], sim["samples"], sim["test_accuracy"])
                        - real["test_accuracy"][at])
    found = {"step_seconds_error": step, "staleness_difference": stale,
             "accuracy_max_difference_points": float(diff.max()),
             "accuracy_final_difference_points":
                 100 * abs(sim["final_accuracy"] - real["final_accuracy"])}
    found["step_ok"] = abs(step) <= BOUNDS["step_seconds"]
    found["staleness_ok"] = stale <= BOUNDS["staleness"] * real["staleness"] + 0.05
    found["accuracy_ok"] = found["accuracy_max_difference_points"] <= BOUNDS["accuracy_points"]
    return found


def case(config: str, r: int, s: int, args, calibration: Path, tmp: Path) -> tuple:
    """Calibrate for ``r`` replicas, then run the case both ways; ``(real, sim, cmp)``."""
    from mpibelief import config as configs
    from mpibelief.simulate.run import simulate

    sets = overrides(r, s, args.epochs, args.warmstart)
    real_path, sim_path = tmp / f"R{r}_S{s}_real.h5", tmp / f"R{r}_S{s}_sim.h5"
    calibration_run(config, tmp / "calibration_run.h5", args.calibration_epochs)
    calibrate_now(config, calibration, Path(args.rma), r, tmp / "calibration_run.h5")
    run_real(config, sets, real_path, 1 + s + r)
    dense = [*sets, f"train.eval_every={SIM_EVAL_EVERY}"]  # evaluation costs no sim time
    simulate(configs.load(config, dense), sim_path, calibration, overwrite=True)
    real, sim = summary(real_path), summary(sim_path)
    return real, sim, compare(real, sim)


def calibrate_now(config: str, calibration: Path, rma: Path, concurrency: int,
                  run: Path | None) -> None:
    from mpibelief import config as configs
    from mpibelief.data import load_dataset
    from mpibelief.simulate import calibrate

    cfg = configs.load(config)
    costs, raw = calibrate.measure(cfg, load_dataset(cfg.data), rma,
                                   concurrency=concurrency, run=run)
    calibrate.write(calibration, costs, raw)
    print(f"calibrated for {concurrency} replica(s): {costs.compute_per_sample * 1e6:.1f}"
          f" us/sample, apply {costs.apply_per_param * 1e9:.2f} ns/param, message"
          f" {costs.latency * 1e6:.0f} us + bytes / {costs.bandwidth / 1e9:.1f} GB/s,"
          f" contention x{raw['contention']:.2f}", flush=True)


def calibration_run(config: str, path: Path, epochs: float) -> None:
    """A short real R1_S1 run: the in-run message and apply costs (:func:`from_run`)."""
    run_real(config, overrides(1, 1, epochs, 0) + ["train.eval_every=1e9"], path, 3)


def costs_of(calibration: Path) -> dict:
    """The calibration a case used (its file is temporary: the values are kept)."""
    with h5py.File(calibration, "r") as f:
        return {k: f.attrs[k] for k in ("compute_per_sample", "apply_per_param", "latency",
                                        "bandwidth", "concurrency", "contention",
                                        "loadavg_1min")}


def write(path: Path, found: dict, args) -> None:
    from mpibelief.results import stamp

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        stamp(f, {"command": " ".join(sys.argv), "epochs": args.epochs,
                  "config": args.config, **{f"bound_{k}": v for k, v in BOUNDS.items()}})
        for name, (real, sim, cmp) in found.items():
            group = f.create_group(f"validation/{name}")
            cmp = dict(cmp)
            group.attrs.update({f"cost_{k}": v for k, v in cmp.pop("calibration").items()})
            group.attrs.update(cmp)
            for label, run in (("real", real), ("sim", sim)):
                sub = group.create_group(label)
                for k, v in run.items():
                    sub.create_dataset(k, data=v) if isinstance(v, np.ndarray) \
                        else sub.attrs.__setitem__(k, v)


def report(found: dict) -> None:
    print(f"\n{'case':>6} {'s/step real':>11} {'sim':>8} {'err':>6} | {'stale real':>10}"
          f" {'sim':>6} | {'acc diff max':>12} {'final':>6} | verdict")
    for name, (real, sim, c) in found.items():
        ok = c["step_ok"] and c["staleness_ok"] and c["accuracy_ok"]
        print(f"{name:>6} {real['step_seconds']:11.4f} {sim['step_seconds']:8.4f}"
              f" {c['step_seconds_error']:+6.0%} | {real['staleness']:10.3f}"
              f" {sim['staleness']:6.3f} | {c['accuracy_max_difference_points']:12.2f}"
              f" {c['accuracy_final_difference_points']:6.2f} | {'PASS' if ok else 'FAIL'}"
              f" (step {c['step_ok']}, staleness {c['staleness_ok']},"
              f" accuracy {c['accuracy_ok']})", flush=True)


def counts(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.toml")
    p.add_argument("--replicas", type=counts, default=[1, 2])
    p.add_argument("--shards", type=counts, default=[1, 2])
    p.add_argument("--epochs", type=float, default=1.0, help="per replica, over its shard")
    p.add_argument("--warmstart", type=int, default=0)
    p.add_argument("--rma", default=str(REPO / "results" / "bench_rma.h5"))
    p.add_argument("--calibration-epochs", type=float, default=0.25,
                   help="length of the real R1_S1 run the message costs come from")
    p.add_argument("--out", default=str(REPO / "results" / "sim_validation.h5"))
    args = p.parse_args(argv)
    for var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        calibration = Path(tmp) / "calibration.h5"
        for r in args.replicas:
            for s in args.shards:
                found[f"R{r}_S{s}"] = case(args.config, r, s, args, calibration, Path(tmp))
                found[f"R{r}_S{s}"][2]["calibration"] = costs_of(calibration)
                report({f"R{r}_S{s}": found[f"R{r}_S{s}"]})
        write(Path(args.out), found, args)
    report(found)
    print(f"wrote {args.out}")
    return 0 if all(c["step_ok"] and c["staleness_ok"] and c["accuracy_ok"]
                    for _, _, c in found.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
