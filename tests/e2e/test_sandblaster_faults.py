"""Sandblaster under faults (issue 10): a replica lost mid-run, SIGTERM, SIGUSR1, --resume.

Real ``mpibelief train`` jobs under mpiexec (4 ranks: coordinator, one shard, two
replicas), on the small synthetic problem of :mod:`tests.e2e.test_sandblaster`, each
with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time

import h5py
import numpy as np

from mpibelief import checkpoint
from tests.e2e.test_cli import assert_one_line_error, cli
from tests.e2e.test_faults import (
    Job,
    assert_continuous,
    newest_params,
    rank_pid,
    rows,
    status,
    wait_for,
)
from tests.e2e.test_sandblaster import TINY

SB = ["train", "configs/sandblaster.toml", *TINY, "--set", "train.eval_every=0.2"]
ENDLESS = ["--set", "sandblaster.iterations=100000"]
BATCH = 500  # TINY's sandblaster.batch


def table(path) -> dict:
    with h5py.File(path) as f:
        return {name: f["sandblaster"][name][()] for name in f["sandblaster"]}


def test_sandblaster_finishes_without_a_stopped_replica(tmp_path):
    """Replica 1 (rank 3) stops holding work; the coordinator gives up on it after
    ``replica_timeout``, records it, and every batch still sums exactly its size."""
    out = tmp_path / "s.h5"
    result = cli(*SB, *ENDLESS, "--set", "train.max_seconds=8.0", "--set",
                 "faults.stop_replica=1", "--set", "faults.stop_after=1.0", "--set",
                 "faults.replica_timeout=2.0", "--set", "checkpoint.every=2.0",
                 "--out", out, np=4, mpi=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "rank 3 failed (no message for" in result.stdout
    saved = checkpoint.newest_valid(checkpoint.folder_for(out))  # timed, and it verifies
    assert saved["number"] >= 2 and saved["sandblaster"]["next"] > 0
    t = table(out)
    with h5py.File(out) as f:
        assert f.attrs["status"].startswith("complete without 1 failed replica"), \
            f.attrs["status"]
        assert list(f["failures/rank"][()]) == [3]
        assert 2.0 < f["failures/seconds"][0] < 60.0
        assert len(f["ranks/rank"]) == 4  # the stopped replica reported once told to
    assert (t["samples_applied"] == t["evals"] * BATCH).all(), t["samples_applied"]
    assert (t["done_by"].sum(axis=1) == t["evals"] * 8).all()  # 8 portions, once each
    assert t["done_by"][-1, 1] == 0 and t["done_by"][-1, 0] > 0  # the other did it all
    assert (t["iteration"] == np.arange(len(t["iteration"]))).all()


def test_sandblaster_sigterm_checkpoints_and_resume_continues(tmp_path):
    out = tmp_path / "t.h5"
    job = Job(*SB, *ENDLESS, "--out", out, np=4)
    wait_for(lambda: rows(out) >= 3, timeout=120, what="three metrics rows")
    job.signal(signal.SIGTERM)
    code, text, err = job.wait(120)
    assert code == 143, err
    assert status(out).startswith("stopped: SIGTERM") and "wrote checkpoint" in text
    before = len(table(out)["iteration"])
    number, digest = newest_params(checkpoint.folder_for(out))
    job = Job(*SB, *ENDLESS, "--set", "train.max_seconds=1.5", "--out", out, "--resume",
              np=4)
    code, _, err = job.wait(120)
    assert code == 0, err
    with h5py.File(out) as f:
        assert f.attrs["status"] == "complete"
        assert f.attrs["resumed_from"] == number
        assert f.attrs["resume_params_sha256"] == digest  # the very bits checkpointed
    t = table(out)
    assert len(t["iteration"]) > before
    assert (t["iteration"] == np.arange(len(t["iteration"]))).all()  # no gap, no repeat
    assert (t["samples_applied"] == t["evals"] * BATCH).all()
    assert_continuous(out)


def test_sandblaster_resume_repeats_the_same_next_iteration(tmp_path):
    """SIGUSR1 checkpoints a run that then finishes; resuming that checkpoint runs the
    same iterations again from the same bits: the first one's loss at the checkpointed
    parameters on the same batch is the uninterrupted run's (only the order in which
    float32 pushes were summed may differ, so the gradient agrees to float32)."""
    out, ref = tmp_path / "u.h5", tmp_path / "uninterrupted.h5"
    run = [*SB, "--set", "sandblaster.iterations=60", "--out", out]
    job = Job(*run, np=4)
    wait_for(lambda: rows(out) >= 2, timeout=120, what="two metrics rows")
    os.kill(rank_pid(out, 0), signal.SIGUSR1)
    code, text, err = job.wait(180)
    assert code == 0 and "wrote checkpoint 1" in text, err
    shutil.copy(out, ref)
    k = checkpoint.newest_valid(checkpoint.folder_for(out))["sandblaster"]["next"]
    job = Job(*run, "--resume", np=4)
    code, _, err = job.wait(180)
    assert code == 0, err
    a, b = table(ref), table(out)
    assert 0 < k < len(a["iteration"])
    assert (b["iteration"] == np.arange(len(b["iteration"]))).all()
    for name in ("loss_before", "loss", "grad_norm", "step"):  # restored rows: as they were
        np.testing.assert_array_equal(a[name][:k], b[name][:k])
    rel = {n: abs(b[n][k] / a[n][k] - 1) for n in ("loss_before", "grad_norm", "loss")}
    print(f"resumed at iteration {k} of {len(a['iteration'])}: relative differences {rel}")
    np.testing.assert_allclose(b["loss_before"][k], a["loss_before"][k], rtol=1e-9)
    np.testing.assert_allclose(b["grad_norm"][k], a["grad_norm"][k], rtol=1e-4)
    np.testing.assert_allclose(b["loss"][k], a["loss"][k], rtol=1e-4)


def test_a_hung_sandblaster_replica_cannot_hang_the_job(tmp_path):
    out = tmp_path / "h.h5"
    result = cli(*SB, *ENDLESS, "--set", "train.max_seconds=5.0", "--set",
                 "faults.stop_replica=0", "--set", "faults.stop_after=1.0", "--set",
                 "faults.stop_mode='hang'", "--set", "faults.replica_timeout=2.0", "--set",
                 "faults.stall_seconds=3.0", "--out", out, np=4, mpi=True, timeout=240)
    assert_one_line_error(result, "stopped answering")
    with h5py.File(out) as f:
        assert list(f["failures/rank"][()]) == [2]
        assert "ranks" in f and "server" in f
    t = table(out)
    assert (t["samples_applied"] == t["evals"] * BATCH).all()


def test_a_stopped_shard_ends_a_sandblaster_job_naming_it(tmp_path):
    out = tmp_path / "st.h5"
    job = Job(*SB, *ENDLESS, "--set", "faults.stall_seconds=4.0", "--out", out, np=4)
    wait_for(lambda: rows(out) >= 2, timeout=120, what="two metrics rows")
    shard = rank_pid(out, 1)
    os.kill(shard, signal.SIGSTOP)
    try:
        start = time.monotonic()
        code, _, err = job.wait(90)
        assert code != 0 and time.monotonic() - start < 45
        assert "shard rank" in err and "1" in err, err
        assert status(out).startswith("failed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(shard, signal.SIGCONT)


def test_a_replica_given_up_on_that_speaks_again_counts_nothing(tmp_path):
    """Rank 3 is alive but so slow (it sleeps 3000x each portion's compute) that it is
    given up on while holding a portion; when it wakes and answers, it is told to stop:
    its late results never count, and it still reports."""
    out = tmp_path / "w.h5"
    result = cli(*SB, *ENDLESS, "--set", "train.max_seconds=4.0", "--set",
                 "faults.slow_rank=3", "--set", "faults.slow_factor=3000.0", "--set",
                 "faults.replica_timeout=1.0",
                 "--out", out, np=4, mpi=True, timeout=240)
    assert result.returncode == 0, result.stderr
    t = table(out)
    with h5py.File(out) as f:
        assert list(f["failures/rank"][()]) == [3]
        assert len(f["ranks/rank"]) == 4  # it woke, was told to stop, and reported
    assert (t["samples_applied"] == t["evals"] * BATCH).all(), t["samples_applied"]
    assert (t["done_by"].sum(axis=1) == t["evals"] * 8).all()
    assert t["done_by"][:, 1].sum() <= 1  # at most one push before it was given up on
