"""Faults and bad input, tried as a user would meet them: nothing lost, nothing hangs.

Each case here failed before the faults work (issue 10) and passes after.  Jobs that
must be signalled run in the background (:class:`Job`), always with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpibelief import checkpoint
from tests.conftest import REPO, mpiexec
from tests.e2e.test_cli import SMALL, assert_one_line_error, cli

DOWNPOUR = ["train", "configs/demo.toml", *SMALL, "--set", "train.eval_every=0.3"]
LONG = ["--set", "train.epochs=500.0"]


class Job:
    """A CLI job in the background (under mpiexec when ``np`` > 1), always reaped."""

    def __init__(self, *args, np: int = 5, env=None):
        cmd = [sys.executable, "-m", "mpibelief", *map(str, args)]
        if np > 1:
            cmd = [mpiexec(), "-n", str(np), *cmd]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            stdin=subprocess.DEVNULL)

    def wait(self, timeout: float = 60):
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"job still running after {timeout}s\n{out}\n{err}")
        return self.proc.returncode, out, err

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)


def rows(path: Path) -> int:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return len(f["metrics/wall_seconds"])
    except (OSError, KeyError):
        return 0


def wait_for(predicate, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what} after {timeout}s")
        time.sleep(0.2)


def names_dead(text: str, rank: int) -> bool:
    """The janitor names the rank that died first, or every rank found dead in the
    same wake-up when the launcher killed the others within microseconds."""
    return bool(re.search(rf"(rank {rank}|one of ranks \[[^\]]*\b{rank}\b[^\]]*\]) died",
                          text))


def status(path: Path) -> str:
    with h5py.File(path, "r", locking=False) as f:
        return str(f.attrs["status"])


def rank_pid(out: Path, rank: int) -> int:
    """The pid of one rank of the job writing ``out`` (from the launcher's PMI_RANK)."""
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmd and f"PMI_RANK={rank}".encode() in env \
                and b"mpibelief" in cmd:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} writing {out}")


# ------------------------------------------------------------------ results never lost


def test_a_second_run_never_replaces_the_first(tmp_path):
    out = tmp_path / "r.h5"
    first = cli("train", "configs/sgd.toml", *SMALL, "--out", out)
    assert first.returncode == 0, first.stderr
    before = rows(out)
    second = cli("train", "configs/sgd.toml", *SMALL, "--set", "train.lr=1e30", "--out", out)
    assert_one_line_error(second, "exists: pass --overwrite")
    assert status(out) == "complete" and rows(out) == before
    folder = checkpoint.folder_for(out)
    folder.mkdir()
    (folder / "1.h5").write_text("the replaced run's checkpoint")
    third = cli("train", "configs/sgd.toml", *SMALL, "--out", out, "--overwrite")
    assert third.returncode == 0, third.stderr
    assert not folder.exists()  # a replaced run's checkpoints cannot be resumed by mistake


def test_a_result_path_that_is_an_input_is_refused(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text((REPO / "configs" / "sgd.toml").read_text())
    result = cli("train", config, *SMALL, "--out", config, "--overwrite")
    assert_one_line_error(result, "is the config file")
    assert config.read_text().startswith((REPO / "configs" / "sgd.toml").read_text()[:20])
    data = tmp_path / "d.h5"
    with h5py.File(data, "w") as f:
        f["train/x"], f["train/y"] = np.zeros((64, 3)), np.arange(64) % 2
        f["test/x"], f["test/y"] = np.zeros((8, 3)), np.arange(8) % 2
    result = cli("train", "configs/sgd.toml", "--set", "data.source='hdf5'", "--set",
                 f"data.path='{data}'", "--set", "train.batch=8", "--out", data, "--overwrite")
    assert_one_line_error(result, "is the training data")
    with h5py.File(data) as f:
        assert "train/x" in f


def test_two_runs_racing_for_one_file(tmp_path):
    out = tmp_path / "r.h5"
    jobs = [Job("train", "configs/sgd.toml", *SMALL, "--out", out, np=1) for _ in range(2)]
    results = [job.wait(120) for job in jobs]
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(err for code, _, err in results if code)
    assert "mpibelief: error: result file" in loser and "Traceback" not in loser
    assert status(out) == "complete" and rows(out) >= 3


def test_a_live_run_can_be_plotted(tmp_path):
    out = tmp_path / "live.h5"
    job = Job(*DOWNPOUR, *LONG, "--out", out)
    try:
        wait_for(lambda: rows(out) >= 2, what="two metrics rows")
        plot = cli("plot", "accuracy", out, "--out", tmp_path / "live.png")
        assert plot.returncode == 0, plot.stderr
        assert (tmp_path / "live.png").stat().st_size > 10_000
    finally:
        job.signal(signal.SIGTERM)
        job.wait()


# ------------------------------------------------------------------ no hang, honest state


def test_a_stopped_shard_ends_the_job_naming_it(tmp_path):
    out = tmp_path / "stall.h5"
    job = Job(*DOWNPOUR, *LONG, "--set", "faults.stall_seconds=4.0", "--out", out)
    wait_for(lambda: rows(out) >= 2, what="two metrics rows")
    shard = rank_pid(out, 1)
    os.kill(shard, signal.SIGSTOP)
    try:
        start = time.monotonic()
        code, _, err = job.wait(60)
        assert code != 0 and time.monotonic() - start < 30
        assert "shard rank 1" in err, err
        assert "shard rank 1" in status(out)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(shard, signal.SIGCONT)


def test_an_exception_on_a_replica_is_recorded_in_the_file(tmp_path):
    out = tmp_path / "x.h5"
    job = Job(*DOWNPOUR, *LONG, "--out", out, env={"MPIBELIEF_INJECT_FAULT": "4:30"})
    code, _, err = job.wait(60)
    assert code != 0 and "fault injected on rank 4" in err
    assert status(out).startswith("failed: rank 4: ")
    assert "fault injected on rank 4 at step 30" in status(out)


def test_a_killed_rank_is_named_and_recorded(tmp_path):
    out = tmp_path / "k.h5"
    start = time.monotonic()
    job = Job(*DOWNPOUR, *LONG, "--set", "faults.kill_rank=3", "--set",
              "faults.kill_after=1.0", "--out", out)
    code, _, err = job.wait(60)
    assert code != 0 and time.monotonic() - start < 30 + 1.0  # within 30 s of the kill
    assert "mpibelief: error: " in err and names_dead(err, 3), err
    assert status(out).startswith("failed: ") and names_dead(status(out), 3)


def test_ctrl_c_is_one_line_and_recorded(tmp_path):
    out = tmp_path / "c.h5"
    job = Job(*DOWNPOUR, *LONG, "--out", out)
    wait_for(lambda: rows(out) >= 2, what="two metrics rows")
    job.signal(signal.SIGINT)
    code, _, err = job.wait(60)
    assert code != 0
    assert err.count("mpibelief: error:") == 1, err
    assert "interrupted (SIGINT)" in status(out)


# ------------------------------------------------------------------ checkpoints, resume


def newest_params(folder: Path) -> tuple[int, str]:
    """The newest checkpoint's number and the digest of its whole parameter vector."""
    number = checkpoint.newest_valid(folder)["number"]
    parts, k = [], 0
    while (folder / f"{number}.part{k}.h5").exists():
        parts.append(checkpoint.read_part(folder, number, k)[0]["params"])
        k += 1
    return number, checkpoint.digest({"params": np.concatenate(parts)})


def assert_continuous(out: Path) -> None:
    with h5py.File(out) as f:
        wall, samples = f["metrics/wall_seconds"][()], f["metrics/samples"][()]
    assert np.all(np.diff(wall) > 0), wall  # no repeated rows
    assert np.all(np.diff(samples) >= 0), samples
    assert np.diff(wall).max() < 5.0, wall  # no gap


@pytest.mark.parametrize("np_", [1, 5])
def test_sigterm_checkpoints_and_resume_is_bit_for_bit(tmp_path, np_):
    out = tmp_path / "t.h5"
    args = DOWNPOUR if np_ > 1 else ["train", "configs/sgd.toml", *SMALL]
    job = Job(*args, *LONG, "--out", out, np=np_)
    wait_for(lambda: rows(out) >= 3, what="three metrics rows")
    job.signal(signal.SIGTERM)
    code, outtext, err = job.wait(60)
    assert code == 143, err
    assert status(out).startswith("stopped: SIGTERM") and "wrote checkpoint" in outtext
    number, digest = newest_params(checkpoint.folder_for(out))
    job = Job(*args, "--set", "train.epochs=500.0", "--set", "train.max_seconds=1.5",
              "--out", out, "--resume", np=np_)
    code, _, err = job.wait(60)
    assert code == 0, err
    with h5py.File(out) as f:
        assert f.attrs["status"] == "complete"
        assert f.attrs["resumed_from"] == number
        assert f.attrs["resume_params_sha256"] == digest  # the very bits checkpointed
    assert_continuous(out)


def test_kill_then_resume_has_no_gap_and_no_repeats(tmp_path):
    out = tmp_path / "kr.h5"
    ckpt = ["--set", "checkpoint.every=1.0"]
    start = time.monotonic()
    job = Job(*DOWNPOUR, *LONG, *ckpt, "--set", "faults.kill_rank=4", "--set",
              "faults.kill_after=3.0", "--out", out)
    code, _, err = job.wait(60)
    # The job ends within 30 s of the kill (which comes 3 s into training).
    assert code != 0 and time.monotonic() - start < 30 + 3.0 and names_dead(err, 4), err
    job = Job(*DOWNPOUR, "--set", "train.epochs=500.0", "--set", "train.max_seconds=2.0",
              *ckpt, "--out", out, "--resume")
    code, _, err = job.wait(60)
    assert code == 0, err
    assert status(out) == "complete"
    assert_continuous(out)


def test_resume_refuses_another_config_naming_the_key(tmp_path):
    out = tmp_path / "c.h5"
    job = Job("train", "configs/sgd.toml", *SMALL, *LONG, "--out", out, np=1)
    wait_for(lambda: rows(out) >= 3, what="three metrics rows")
    job.signal(signal.SIGTERM)
    job.wait(60)
    result = cli("train", "configs/sgd.toml", *SMALL, "--set", "model.hidden=64",
                 "--out", out, "--resume")
    assert_one_line_error(result, "model.hidden = 32 in the checkpoint, 64 now")


# ------------------------------------------------------------------ failed replicas


def test_downpour_finishes_without_a_stopped_replica(tmp_path):
    out = tmp_path / "s.h5"
    # Long epochs, bounded by time: a fast machine must not finish before the fault.
    result = cli(*DOWNPOUR, *LONG, "--set", "train.max_seconds=6.0", "--set",
                 "faults.stop_replica=1", "--set", "faults.stop_after=1.0", "--set",
                 "faults.replica_timeout=2.0", "--out", out, np=5, mpi=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["status"].startswith("complete without 1 failed replica")
        assert list(f["failures/rank"][()]) == [4]
        assert 2.0 < f["failures/seconds"][0] < 30.0
        assert len(f["ranks/rank"]) == 5  # it still reported once told to stop


def test_a_hung_replica_cannot_hang_the_job(tmp_path):
    out = tmp_path / "h.h5"
    start = time.monotonic()
    result = cli(*DOWNPOUR, *LONG, "--set", "train.max_seconds=6.0", "--set",
                 "faults.stop_replica=1", "--set", "faults.stop_after=1.0", "--set",
                 "faults.stop_mode='hang'", "--set", "faults.replica_timeout=2.0",
                 "--set", "faults.stall_seconds=3.0", "--out", out, np=5, mpi=True,
                 timeout=120)
    assert result.returncode != 0 and time.monotonic() - start < 90
    assert_one_line_error(result, "stopped answering")
    with h5py.File(out) as f:
        assert list(f["failures/rank"][()]) == [4]
        assert "ranks" in f and "server" in f


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("override", "needle"), [
    ("run.name=''", "run.name = '' must be a plain, non-empty file name"),
    ("run.seed=-1", "run.seed must not be negative"),
    ("model.hidden=10000000", "GiB per rank, and this machine has"),
])
def test_bad_input_is_one_line(tmp_path, override, needle):
    result = cli("train", "configs/sgd.toml", *SMALL, "--set", override,
                 "--set", f"run.results_dir='{tmp_path}'")
    assert_one_line_error(result, needle)


def test_more_shards_than_parameters_is_refused_by_train_and_info(tmp_path):
    tiny = ["--set", "data.n_inputs=2", "--set", "data.n_classes=2", "--set", "model.layers=0",
            "--set", "layout.shards=7"]
    result = cli("info", "--np", "9", "configs/demo.toml", *SMALL, *tiny)
    assert_one_line_error(result, "layout.shards = 7 is more than the model's 6 parameters")
    result = cli("train", "configs/demo.toml", *SMALL, *tiny, "--out", tmp_path / "x.h5",
                 np=9, mpi=True)
    assert_one_line_error(result, "layout.shards = 7 is more than the model's 6 parameters")
    assert result.stderr.count("mpibelief: error:") == 1


def test_plot_of_a_foreign_file_is_one_line(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    assert_one_line_error(cli("plot", "accuracy", other), "not an mpibelief result file")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5 at all")
    assert_one_line_error(cli("plot", "accuracy", text), "cannot read result file")
