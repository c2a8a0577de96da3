"""Figures 4 and 5's campaigns end to end, at ``--quick`` sizes.

``bench/fig4.py --quick`` measures a dedicated-core calibration, runs the warmstart and
every row (a row the simulator cannot run would be recorded as skipped: none is now),
chooses the target and writes a campaign file; ``bench/fig5.py --quick`` takes that
file's target and reuses its identical rows; both figures draw from the files; and a
second campaign onto an existing file is refused in one line, leaving it untouched.
"""

from __future__ import annotations

import hashlib
import math

import pytest

from mpibelief.simulate import campaign
from tests.conftest import REPO, run_job

pytestmark = pytest.mark.e2e


def bench(*args, timeout: float = 600):
    return run_job([REPO / "bench" / args[0], *map(str, args[1:])], mpi=False, guard=False,
                   timeout=timeout)


@pytest.mark.usefixtures("fsdd_path")
def test_quick_campaigns_write_valid_files_and_both_figures_draw(tmp_path):
    if not (REPO / "results" / "bench_rma.h5").exists():
        pytest.skip("no results/bench_rma.h5 (within-machine MPI): run bench/rma.py first")
    cal, fig4, fig5 = tmp_path / "cal.h5", tmp_path / "fig4.h5", tmp_path / "fig5.h5"
    done = bench("fig4.py", "--quick", "--out", fig4, "--calibration", cal)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote" in done.stdout
    data = campaign.read(fig4)
    attrs = data["attrs"]
    assert attrs["quick"] and attrs["network"] == "1gbe" and attrs["epochs"] == 0.05
    rows = {"sgd_1", "downpour_4", "downpour_4_adagrad", "downpour_8_adagrad",
            "sandblaster_l_bfgs_8", "sync_allreduce_4_adagrad", "sync_4_strom_1_adagrad"}
    assert set(data["runs"]) | set(data["skipped"]) == rows  # every row: run, or why not
    assert {"downpour_4", "downpour_4_adagrad", "downpour_8_adagrad"} <= set(data["runs"])
    best = max(r["metrics"]["test_accuracy"].max() for r in data["runs"].values())
    assert attrs["warmstart_accuracy"] < attrs["target"] <= best
    times = [r["attrs"]["time_to_target"] for r in data["runs"].values()]
    assert any(math.isfinite(t) and t > attrs["warmstart_seconds"] for t in times)
    assert not data["skipped"], data["skipped"]  # every method is simulated
    assert {r["attrs"]["algorithm"] for r in data["runs"].values()} >= {
        "sgd", "downpour", "sandblaster", "sync"}
    assert math.isnan(data["runs"]["sandblaster_l_bfgs_8"]["attrs"]["lr"])  # L-BFGS: no rate

    done = bench("fig5.py", "--quick", "--out", fig5, "--calibration", cal,
                 "--target-from", fig4, "--methods", "downpour_4_adagrad,downpour_8_adagrad,"
                 "downpour_8_adagrad_4_cores_each,downpour_16_adagrad")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reused from" in done.stdout  # Downpour [4] + Adagrad is Figure 4's row
    five = campaign.read(fig5)
    assert five["attrs"]["target"] == attrs["target"]
    assert five["attrs"]["warmstart_sha256"] == attrs["warmstart_sha256"]
    down = [r["attrs"] for r in five["runs"].values() if r["attrs"]["family"] ==
            "Downpour + Adagrad"]
    assert len(down) == 4 and len({(a["machines"], a["cores"]) for a in down}) == 4

    for name, path in (("fig4", fig4), ("fig5", fig5)):
        png = tmp_path / f"{name}.png"
        drawn = run_job(["-m", "mpibelief", "plot", name, path, "--out", png], mpi=False,
                        guard=False, timeout=120)
        assert drawn.returncode == 0, drawn.stderr
        assert png.stat().st_size > 20_000


def test_a_campaign_never_replaces_a_file(tmp_path):
    out = tmp_path / "fig4.h5"
    out.write_bytes(b"an earlier campaign")
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    done = bench("fig4.py", "--quick", "--out", out, timeout=120)
    assert done.returncode == 2, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--overwrite" in lines[0], done.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before
