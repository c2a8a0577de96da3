"""How a requeued job continues its run: ``python slurm/resume.py --job ID CONFIG ...``.

Prints one line, ``ACTION<TAB>WHY``, for slurm/common.sh (``mb_resume_args``), which
asks only when Slurm has restarted the job (``SLURM_RESTART_COUNT`` > 0):

- ``resume``: the result file exists and ``<result>.ckpt/`` holds a checkpoint: pass
  ``--resume`` (the run itself verifies the checkpoint, falling back to an older one);
- ``done``: the result file says the run completed (the job was requeued after it
  finished, by a node failure or an operator): launch nothing, the result stands;
- ``overwrite``: the result file exists, there is no checkpoint, and this very job
  wrote the file (its ``slurm_job_id``; the id survives a requeue): the earlier
  attempt died before its first checkpoint, so start over on top of it;
- ``start``: no result file yet: start as on the first attempt;
- ``refuse``: a result file another job wrote, with nothing of ours to resume: launch
  as on the first attempt and let the run refuse to replace it (one line, its own).

The result path is the one the run will use (``--out``, else ``results_dir/run.name.h5``
from the config): it comes from the submit line and the config, never from the job id
or the start time, so every attempt of a job finds the same file.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import h5py

from mpibelief import checkpoint, config
from mpibelief.errors import ConfigError
from mpibelief.train import result_path


def decide(path, job: str) -> tuple[str, str]:
    """(action, why) for the result file ``path`` of job ``job``."""
    folder = checkpoint.folder_for(path)
    if not path.exists():
        return "start", f"no result file {path} yet: starting the run"
    try:
        with h5py.File(path, "r", locking=False) as f:
            status = str(f.attrs.get("status", ""))
            owner = str(f.attrs.get("slurm_job_id", ""))
            started = str(f.attrs.get("start_time", ""))
    except OSError as exc:
        status, owner, started = f"unreadable ({exc})", "", ""
    if status.startswith("complete"):
        return "done", f"{path} says {status!r}: nothing left to run"
    numbers = [n for n in checkpoint.numbers(folder) if _since(folder / f"{n}.h5", started)]
    if numbers:
        return "resume", f"resuming {path} from {folder}/ (newest checkpoint {numbers[-1]})"
    if owner == job:
        return "overwrite", (f"{path} ({status}) has no checkpoint in {folder}/:"
                             " starting this job's run over")
    return "refuse", f"{path} is not this job's run (job {owner or '?'}) and has no checkpoint"


def _since(manifest, started: str) -> bool:
    """Whether a checkpoint was written by the run in the result file, not by an
    earlier run that `--overwrite` replaced (its checkpoints stay in the folder, and
    until the new run writes its first one the newest there is the old run's)."""
    try:
        start = datetime.datetime.fromisoformat(started).timestamp()
    except ValueError:
        return True  # no start time to go by: let the run's own config check decide
    return manifest.stat().st_mtime >= start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="resume.py", description=__doc__.splitlines()[0])
    p.add_argument("--job", required=True, help="this job's SLURM_JOB_ID")
    p.add_argument("--out", help="the run's --out, if it has one")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="TABLE.KEY=VALUE")
    args = p.parse_args(argv)
    try:
        path = result_path(config.load(args.config, args.overrides), args.out)
    except ConfigError as exc:
        print(f"mpibelief: error: {exc}", file=sys.stderr)
        return 2
    print("\t".join(decide(path, args.job)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
