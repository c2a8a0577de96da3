"""The janitor kills the ranks of its host that outlive their coordinator (real processes)."""

import subprocess
import sys
import time

import h5py

from mpibelief import janitor


def sleeper(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_ranks_left_running_after_the_coordinator_are_killed(tmp_path, capsys):
    path = tmp_path / "r.h5"
    with h5py.File(path, "w") as f:
        f.attrs["status"] = "complete"  # the run ended and said so
    coordinator, finished, orphan = sleeper(0.3), sleeper(0.1), sleeper(60)
    try:
        start = time.monotonic()
        janitor.watch(str(path), {0: coordinator.pid, 1: finished.pid, 2: orphan.pid}, 0,
                      grace=0.5)
        assert orphan.wait(timeout=5) == -9 and time.monotonic() - start < 5
        err = capsys.readouterr().err
        assert "rank(s) [2] still ran 0.5 s after the coordinator ended" in err, err
        with h5py.File(path) as f:
            assert f.attrs["status"] == "complete"  # not the janitor's to change
    finally:
        for p in (coordinator, finished, orphan):
            p.kill()
            p.wait()


def test_nothing_is_killed_when_every_rank_ends_with_the_coordinator(tmp_path, capsys):
    path = tmp_path / "r.h5"
    with h5py.File(path, "w") as f:
        f.attrs["status"] = "complete"
    ranks = [sleeper(0.3), sleeper(0.4)]
    start = time.monotonic()
    janitor.watch(str(path), {0: ranks[0].pid, 1: ranks[1].pid}, 0, grace=5.0)
    assert [p.wait(timeout=5) for p in ranks] == [0, 0]
    assert time.monotonic() - start < 4  # no grace spent on ranks already gone
    assert "killed" not in capsys.readouterr().err


def test_a_rank_gone_before_the_janitor_looked_is_the_one_named(tmp_path, capsys):
    """On a busy machine the janitor may start after a rank has died and been reaped:
    that rank died first, whatever dies after it."""
    path = tmp_path / "r.h5"
    with h5py.File(path, "w") as f:
        f.attrs["status"] = "running"
    dead = sleeper(0)
    dead.wait()  # reaped: no pidfd can be opened on it
    coordinator, other = sleeper(0.3), sleeper(0.2)
    janitor.watch(str(path), {0: coordinator.pid, 1: other.pid, 4: dead.pid}, 0, grace=0.5)
    for p in (coordinator, other):
        p.wait()
    assert "rank 4 died at" in capsys.readouterr().err
    with h5py.File(path) as f:
        assert f.attrs["status"].startswith("failed: rank 4 died at")
