"""Simulated against real runs made elsewhere: result files from a bigger machine.

:mod:`.validate` runs both sides on this machine.  Real Downpour runs made on a cluster
(``slurm/campaign.sh``, ``slurm/train.sbatch``) are taken as they are: each file's own
config (its ``config`` attribute: model, data, replicas, shards, seeds) is simulated
with the costs calibrated on *that* machine, every rank on a core of its own (a
cluster's; ``--cores``/``--background`` for ranks that shared fewer), evaluated at the
real run's samples, and compared by the same three agreements
(:func:`.validate.compare`).  Files of one config are one case: their means are compared,
simulated run ``j`` with timing seed ``j``.

The calibration comes from the machine the runs came from, made there with::

    mpibelief simulate CONFIG --calibrate --from-run R1_S1.h5 --rma bench_rma.h5 \\
        --calibration cal.h5     # a real one-replica, one-shard run and bench/rma.py's file

Writes ``--out`` in :mod:`.validate`'s layout (``mpibelief plot validation`` draws it),
with the real files named in each case's ``files`` attribute.
Usage: ``python -m mpibelief.simulate.validate_files --calibration CAL.h5 REAL.h5 ...
[--cores N --background B] [--out results/sim_validation_files.h5] [--overwrite]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import tomllib
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np

from mpibelief.errors import UserError
from mpibelief.simulate import validate
from mpibelief.simulate.cores import Machine


def real_config(path: Path):
    """The config a finished real Downpour run ran (one-line error otherwise)."""
    from mpibelief import config as configs

    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as exc:
        raise UserError(f"{path}: not a readable result file ({exc})") from None
    if attrs.get("simulated", False):
        raise UserError(f"{path} is a simulated run; give real runs")
    if not str(attrs.get("status", "")).startswith("complete"):
        raise UserError(f"{path} did not complete (status {attrs.get('status')!r})")
    cfg = configs.from_dict(tomllib.loads(str(attrs["config"])), source=str(path))
    if cfg.run.algorithm != "downpour" or cfg.compression.enabled:
        raise UserError(f"{path}: only uncompressed Downpour runs are validated"
                        f" (this is {cfg.run.algorithm})")
    return cfg


def cases(paths: list[Path]) -> dict[str, tuple]:
    """Real files grouped by config: ``{name: (cfg, [paths])}``, named ``R{r}_S{s}``
    (``_2``, ``_3``, ... for further configs of the same layout)."""
    found: dict[str, tuple] = {}
    for path in paths:
        cfg = real_config(path)
        same = [n for n, (c, _) in found.items() if c.to_toml() == cfg.to_toml()]
        if same:
            found[same[0]][1].append(path)
            continue
        name = base = f"R{cfg.layout.replicas}_S{cfg.layout.shards}"
        k = 1
        while name in found:
            k += 1
            name = f"{base}_{k}"
        found[name] = (cfg, [path])
    return found


def case(cfg, paths: list[Path], calibration: Path, machine: Machine, tmp: Path) -> tuple:
    """Simulate ``cfg`` once per real file; ``(real, sim, cmp)`` as :func:`.validate.case`."""
    from mpibelief.simulate.run import simulate

    reals = [validate.summary(p) for p in paths]
    at = np.unique(np.concatenate([run["samples"] for run in reals]))
    sims = []
    for j in range(len(paths)):
        out = tmp / f"sim{j}.h5"
        simulate(cfg, out, calibration, overwrite=True, machine=machine, sample_at=at, seed=j)
        sims.append(validate.summary(out))
    grid = reals[0]["samples"]
    real, sim = validate.expected(reals, grid), validate.expected(sims, grid)
    found = validate.compare(real, sim)
    found.update({"cores": machine.cores or 0, "runs": len(paths),
                  "background": machine.background, "loadavg_before": float("nan"),
                  "loadavg_after": float("nan"), "files": [str(p) for p in paths]})
    return real, sim, found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="real Downpour result files")
    p.add_argument("--calibration", type=Path, required=True,
                   help="costs calibrated on the machine the runs came from")
    p.add_argument("--cores", type=int, default=None,
                   help="cores the ranks shared (default: a core per rank)")
    p.add_argument("--background", type=float, default=0.0,
                   help="with --cores: other runnable processes on them (mean)")
    p.add_argument("--out", type=Path,
                   default=validate.REPO / "results" / "sim_validation_files.h5")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        p.error(f"{args.out} exists (--overwrite replaces it)")
    try:
        machine = Machine(args.cores, args.background)
        groups = cases(args.files)
        found = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, (cfg, paths) in groups.items():
                folder = Path(tmp) / name
                folder.mkdir()
                found[name] = case(cfg, paths, args.calibration, machine, folder)
    except (UserError, ValueError) as exc:
        print(f"mpibelief: error: {exc}", file=sys.stderr)
        return 2
    with h5py.File(args.calibration, "r") as f:
        calibrated = {k: f.attrs.get(k, 0.0) for k in validate.CALIBRATION_KEPT}
    validate.write(args.out, found, {**calibrated, "file": str(args.calibration)},
                   SimpleNamespace(epochs=float("nan"), config="(each file's own)"))
    validate.report(found)
    print(f"wrote {args.out}")
    return 0 if all(c["step_ok"] and c["staleness_ok"] and c["accuracy_ok"]
                    for _, _, c in found.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
