"""slurm/ under a real (private) Slurm: training jobs, sweeps, campaigns and their errors.

Every job is submitted with sbatch as a user would, runs real MPI ranks started by
srun (or mpiexec inside the allocation) and is waited for with a timeout; the checks
read the result files and the jobs' own output files.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time

import h5py
import pytest

from mpibelief.results import read_metrics
from tests.conftest import BIN, REPO, mpiexec
from tests.e2e.test_cli import SMALL

HOST = socket.gethostname()
# The jobs use this test run's interpreter and mpiexec, as an activated venv would give.
JOB_ENV = {"MPIBELIEF_PYTHON": sys.executable, "MPIBELIEF_MPIEXEC": mpiexec(),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def sbatch(slurm, tmp_path, *args, env=None) -> str:
    """Submit from the checkout, with the job's output file in tmp_path; the job id."""
    result = slurm.run("sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out",
                       *map(str, args), cwd=REPO, env={**JOB_ENV, **(env or {})})
    return result.stdout.strip().split(";")[0]


def finish(slurm, job: str, tmp_path, timeout: float = 300) -> tuple[list[str], str]:
    """Wait for the job; its states and its output file's text."""
    states = slurm.wait(job, timeout)
    return states, output(tmp_path, job)


def output(folder, job: str) -> str:
    return "".join(p.read_text() for p in sorted(folder.glob(f"*-{job}*.out")))


def errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("mpibelief: error:")]


def test_sgd_on_one_task_records_the_job(slurm, tmp_path):
    out = tmp_path / "sgd.h5"
    job = sbatch(slurm, tmp_path, "--ntasks=1", "slurm/train.sbatch", "configs/sgd.toml",
                 *SMALL, "--out", out)
    states, log = finish(slurm, job, tmp_path)
    assert states == ["COMPLETED"], log
    attrs, series = read_metrics(out)
    assert attrs["status"] == "complete" and attrs["world_size"] == 1
    assert attrs["slurm_job_id"] == job
    assert attrs["slurm_nodelist"] == HOST and attrs["slurm_tasks_per_node"] == "1"
    assert attrs["slurm_array_job_id"] == attrs["slurm_array_task_id"] == ""
    assert "threads = 1" in attrs["config"]
    assert series["test_accuracy"][-1] > 0.6, log  # 5 classes: chance is 0.2
    assert "data and Numba cache warm" in log
    assert "mpibelief slurm: launch: srun --mpi=pmi2 --ntasks=1" in log


@pytest.mark.parametrize(("launcher", "ntasks", "launch"), [
    ("srun", 5, "launch: srun --mpi=pmi2 --ntasks=5"),
    ("mpiexec", 4, "/mpiexec -n 4 "),
])
def test_downpour_on_many_tasks(slurm, tmp_path, launcher, ntasks, launch):
    out = tmp_path / "dp.h5"
    job = sbatch(slurm, tmp_path, f"--ntasks={ntasks}", "slurm/train.sbatch",
                 "configs/demo.toml", *SMALL, "--set", "downpour.warmstart_steps=20",
                 "--out", out, env={"MPIBELIEF_LAUNCHER": launcher})
    states, log = finish(slurm, job, tmp_path)
    assert states == ["COMPLETED"], log
    assert "mpibelief slurm: launch:" in log and launch in log
    attrs, series = read_metrics(out)
    assert attrs["status"] == "complete" and attrs["world_size"] == ntasks
    assert attrs["slurm_job_id"] == job and attrs["slurm_nodelist"] == HOST
    assert attrs["hosts"] == f"{HOST} x{ntasks}"
    with h5py.File(out) as f:
        assert (f["server/applied"][()] > 0).all() and f["server/refused"][()].sum() == 0
    assert series["test_accuracy"][-1] > 0.6, log


def test_wrong_task_count_stops_before_launching(slurm, tmp_path):
    job = sbatch(slurm, tmp_path, "--ntasks=3", "slurm/train.sbatch", "configs/sgd.toml",
                 *SMALL, "--out", tmp_path / "x.h5")
    states, log = finish(slurm, job, tmp_path, timeout=60)
    assert states == ["FAILED"], log
    assert errors(log) == ["mpibelief: error: configs/sgd.toml needs 1 ranks, the job has 3"
                           " task(s): submit with --ntasks=1"], log
    assert "launch:" not in log and not (tmp_path / "x.h5").exists()


def test_a_launcher_without_the_right_pmi_is_one_line(slurm, tmp_path):
    """srun --mpi=none gives every rank a world of its own; the probe says so once."""
    job = sbatch(slurm, tmp_path, "slurm/train.sbatch", "configs/demo.toml", *SMALL,
                 "--out", tmp_path / "x.h5", env={"MPIBELIEF_SRUN_MPI": "none"})
    states, log = finish(slurm, job, tmp_path, timeout=90)
    assert states == ["FAILED"], log
    assert len(errors(log)) == 1, log
    assert "started MPI worlds of 1 rank(s), not one of 5" in errors(log)[0]
    assert not (tmp_path / "x.h5").exists()


def rows(path) -> int:
    """Metrics rows in a (live) result file; 0 until it exists."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return len(f["metrics/wall_seconds"])
    except (OSError, KeyError):
        return 0


# Each attempt trains at most RUN_SECONDS; rows every EVAL seconds of training.
RUN_SECONDS, EVAL = 6.0, 0.5
LONG_RUN = ["--set", "train.epochs=10000.0", "--set", f"train.max_seconds={RUN_SECONDS}",
            "--set", f"train.eval_every={EVAL}"]


# Both launchers, both ways a job is requeued (the other two pairings pass as well; one
# case costs 33-42 s here: two attempts' warm-ups and training, and the requeued job's
# wait of CRED_EXPIRE plus a scheduler scan).
@pytest.mark.parametrize(("launcher", "ntasks", "config", "stop", "said"), [
    # --signal=B:USR1@T's path: the script stops the run at a checkpoint, requeues itself.
    ("srun", 1, "configs/sgd.toml", ["scancel", "--batch", "--signal=USR1"],
     "USR1 (time limit near): SIGTERM to every rank"),
    # An operator's or preemption's: Slurm sends every process SIGTERM, then requeues.
    ("mpiexec", 4, "configs/demo.toml", ["scontrol", "requeue"],
     "TERM (the job is ending): SIGTERM to every rank"),
])
def test_a_requeued_job_resumes_from_its_checkpoint(slurm, tmp_path, launcher, ntasks,
                                                    config, stop, said):
    out = tmp_path / "rq.h5"
    job = sbatch(slurm, tmp_path, f"--ntasks={ntasks}", "slurm/train.sbatch", config,
                 *SMALL, *LONG_RUN, "--out", out, env={"MPIBELIEF_LAUNCHER": launcher})
    start = time.monotonic()
    while rows(out) < 3:  # the run is training and has recorded some rows
        assert time.monotonic() - start < 180, output(tmp_path, job)
        assert slurm.states(job) in (["PENDING"], ["RUNNING"]), output(tmp_path, job)
        time.sleep(0.3)
    slurm.run(*stop, job)
    states, log = finish(slurm, job, tmp_path, timeout=300)
    assert states == ["COMPLETED"], log
    assert slurm.jobs(job)[0]["Restarts"] == "1", log
    first, _, second = log.partition(f"restart 1 of job {job}: resuming")
    assert said in first and "stopped: SIGTERM (checkpoint" in first, log
    written = re.findall(r"mpibelief: wrote checkpoint (\d+)", first)
    assert second and written, log
    with h5py.File(out) as f:
        assert f.attrs["status"] == "complete" and f.attrs["slurm_job_id"] == job
        assert f.attrs["resumed_from"] == int(written[-1])  # the one the stop wrote
        wall, samples = f["metrics/wall_seconds"][()], f["metrics/samples"][()]
    # Continuous across the requeue: no repeated rows, nothing undone, no hole (a
    # second attempt whose clock restarted at 0 would repeat the first one's times),
    # and the second attempt's RUN_SECONDS of training on top of the first's rows.
    assert (wall[1:] > wall[:-1]).all() and (samples[1:] >= samples[:-1]).all(), (wall, samples)
    assert (wall[1:] - wall[:-1]).max() < 5 * EVAL, wall
    assert wall[-1] > RUN_SECONDS, wall


def campaign(slurm, tmp_path, *args) -> dict[str, str]:
    """Run slurm/campaign.sh in tmp_path; the job id of each printed line's kind."""
    result = slurm.run(str(REPO / "slurm/campaign.sh"), *map(str, args), cwd=tmp_path,
                       env=JOB_ENV)
    ids = {}
    for line in result.stdout.splitlines():
        kind, job = line.split()[:2]
        ids[kind] = job.split("_")[0]
    return ids


def test_campaign_sweeps_replicas_then_plots(slurm, tmp_path):
    ids = campaign(slurm, tmp_path, "-n", "camp", "-s", "layout.replicas=1,2",
                   REPO / "configs/demo.toml", "--", *SMALL)
    folder = tmp_path / "results/camp"
    # 30-45 s on an idle 2-core machine, 134 s seen while others ran their tests.
    sweep_states = slurm.wait(ids["sweep"], 420)
    plot_states = slurm.wait(ids["plot"], 120)
    log = output(folder, ids["sweep"]) + output(folder, ids["plot"])
    assert sweep_states == ["COMPLETED"] * 2 and plot_states == ["COMPLETED"], log
    for task, world in [(0, 4), (1, 5)]:  # 1 + 2 shards + replicas
        attrs, _ = read_metrics(folder / f"demo-layout.replicas-{task + 1}.h5")
        assert attrs["status"] == "complete" and attrs["world_size"] == world
        assert attrs["slurm_array_job_id"] == ids["sweep"]
        assert attrs["slurm_array_task_id"] == str(task)
    assert "needs 4 of the 5 tasks" in log
    assert (folder / "accuracy.png").stat().st_size > 10_000
    # afterok: the plot started only after the last sweep task had ended.
    ended = max(task["EndTime"] for task in slurm.jobs(ids["sweep"]))
    assert slurm.jobs(ids["plot"])[0]["StartTime"] >= ended


def test_a_failed_run_holds_the_plot_back(slurm, tmp_path):
    ids = campaign(slurm, tmp_path, "-n", "bad", REPO / "configs/sgd.toml", "--", *SMALL,
                   "--set", "train.optimizer='sgd'", "--set", "train.lr=1e30")
    try:
        assert slurm.wait(ids["train"], 90) == ["FAILED"]
        deadline = time.monotonic() + 30
        while slurm.jobs(ids["plot"])[0].get("Reason") != "DependencyNeverSatisfied":
            assert time.monotonic() < deadline, slurm.jobs(ids["plot"])
            time.sleep(0.5)
        assert slurm.states(ids["plot"]) == ["PENDING"]
    finally:
        slurm.query("scancel", ids["plot"])
    assert not (tmp_path / "results/bad/accuracy.png").exists()
