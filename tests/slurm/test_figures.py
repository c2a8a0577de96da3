"""The figure campaigns (slurm/fig*.sbatch) submitted to the private Slurm, at tiny sizes.

Figure 3's campaign runs as on a cluster: the batch script asks bench/model_parallel.py
to start one srun step of P ranks per case inside the allocation, the scaling model is
fitted to what they measured, and the figure is drawn from the file.  Only the sizes
are the test's: a 29k-parameter network (tests/slurm/fig3_tiny.toml), P = 1 and 2 (the
job's 2 tasks), one round of two steps.

Figures 4 and 5 (simulated, one process) run their ``--quick`` campaigns in a
one-task job: the campaign file, stamped with the job, and its figure.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tests.slurm.test_slurm import HOST, errors, finish, sbatch

TINY = "tests/slurm/fig3_tiny.toml"
QUICK = ["--models", TINY, "--repeats", "1", "--steps", "2"]
# The campaign asks for 4 hours, more than the test partition's MaxTime (60 min): such
# a job would pend for ever (reason PartitionTimeLimit), as on a site whose limit is
# lower; --time on the sbatch line is how a user fits it.
SHORT = ["--time=00:10:00"]


@pytest.mark.parametrize(("launcher", "launch"), [
    ("srun", "(srun --mpi=pmi2 --cpus-per-task=1 --kill-on-bad-exit=1 -n P)"),
    ("mpiexec", "/mpiexec -n P)"),
], ids=["srun", "mpiexec"])
def test_fig3_campaign_measures_each_p_fits_the_model_and_draws(slurm, tmp_path, launcher,
                                                                launch):
    out = tmp_path / "fig3.h5"
    job = sbatch(slurm, tmp_path, "--ntasks=2", *SHORT, "slurm/fig3.sbatch", *QUICK,
                 "--out", out, env={"MPIBELIEF_LAUNCHER": launcher})
    # 15-30 s here: 3 jobs (ping-pong, P = 1, P = 2), each starting Python and MPI, the
    # tiles timed (2 s) and the figure drawn.
    states, log = finish(slurm, job, tmp_path, timeout=300)
    assert states == ["COMPLETED"], log
    assert "figure 3: partitions 1,2 (" in log and launch in log, log
    with h5py.File(out) as f:
        assert f.attrs["slurm_job_id"] == job and f.attrs["slurm_nodelist"] == HOST
        assert f.attrs["slurm_tasks_per_node"] == "2"
        measured = f["measured/fig3_tiny"]
        assert measured.attrs["config"] == TINY
        assert sorted(measured) == ["P1", "P2"]
        for P in (1, 2):
            g = measured[f"P{P}"]
            assert g.attrs["partitions"] == P and g.attrs["batch"] == 16
            assert g["seconds"].shape == (1,) and g["seconds"][0] > 0
            assert g["cpu_seconds"].shape == (1, P) and g["bytes_sent"].shape == (P,)
            assert np.isfinite(g.attrs["speedup"]) and np.isfinite(g.attrs["cpu_speedup"])
        assert (measured["P2/bytes_sent"][()] > 0).all()  # the boundary exchanges ran
        assert measured["P1/bytes_sent"][()].sum() == 0
        net = f["network/local"].attrs
        assert net["latency"] > 0 and net["bandwidth"] > 0
        # The scaling model, fitted to the model measured here and to no other.
        model = f["model"]
        validation = model["validation"]
        assert list(validation["model"][()]) == [b"fig3_tiny", b"fig3_tiny"]
        assert sorted(validation["partitions"][()]) == [1, 2]
        assert np.isfinite(validation["predicted"][()]).all()
        curve = model[f"curves/{model.attrs['preset']}"]
        assert list(curve) == ["fig3_tiny"]
        partitions = curve["fig3_tiny/partitions"][()]
        assert partitions[0] == 1 and partitions[-1] == 144
        assert curve["fig3_tiny/speedup"][0] == 1.0
    png = out.with_suffix(".png")
    assert png.stat().st_size > 20_000, log
    assert f"wrote {png}" in log


@pytest.mark.parametrize("figure", [4, 5])
def test_simulated_campaign_runs_in_one_task_and_draws(slurm, tmp_path, figure):
    out = tmp_path / f"fig{figure}.h5"
    # A target given and three rows: every row of both campaigns, --quick, is run by
    # tests/e2e/test_fig45.py; here the job's handling is tested (all rows: 5 minutes
    # for Figure 5, one for Figure 4, whose three rows here take 20 s).
    rows = {4: "sgd_1,downpour_4,downpour_4_adagrad",
            5: "sgd_1_1_cores,sgd_1_2_cores,downpour_2"}[figure]
    alone = ["--target", "0.25", "--methods", rows]
    job = sbatch(slurm, tmp_path, "--ntasks=1", *SHORT, f"slurm/fig{figure}.sbatch", "--quick",
                 "--out", out, "--calibration", tmp_path / "calibration.h5", *alone)
    # About a minute here: the warm-up, a calibration, and the quick campaign's rows.
    states, log = finish(slurm, job, tmp_path, timeout=420)
    assert states == ["COMPLETED"], log
    with h5py.File(out) as f:
        assert f.attrs["slurm_job_id"] == job and f.attrs["slurm_nodelist"] == HOST
        assert f.attrs["quick"] and len(f["runs"]) >= 3, log
    png = out.with_suffix(".png")
    assert png.stat().st_size > 20_000, log


TAKEN = "someone's result"


@pytest.mark.parametrize(("script", "ntasks", "args", "error"), [
    ("fig3", 2, [*QUICK, "--partitions", "1,2,4", "--out", "{new}"],
     "--partitions 1,2,4 needs 4 tasks, the job has 2: submit with --ntasks=4"),
    ("fig3", 1, [*QUICK, "--out={taken}"], "{taken} exists: pass --overwrite to replace it"),
    ("fig4", 2, ["--quick", "--out", "{new}"], "the simulator is one process, the job has 2"
                                               " tasks: submit with --ntasks=1 (more CPUs:"
                                               " --cpus-per-task)"),
    ("fig5", 1, ["--quick", "--out", "{taken}"], "{taken} exists: pass --overwrite to replace it"),
], ids=["fig3-partitions", "fig3-exists", "fig4-tasks", "fig5-exists"])
def test_a_campaign_refuses_before_any_work(slurm, tmp_path, script, ntasks, args, error):
    """More partitions than tasks, tasks a simulator cannot use, a result file that
    exists: one line, nothing launched, nothing written."""
    taken, new = tmp_path / "taken.h5", tmp_path / "new.h5"
    taken.write_text(TAKEN)
    job = sbatch(slurm, tmp_path, f"--ntasks={ntasks}", *SHORT, f"slurm/{script}.sbatch",
                 *[a.format(taken=taken, new=new) for a in args])
    states, log = finish(slurm, job, tmp_path, timeout=60)
    assert states == ["FAILED"], log
    assert errors(log) == [f"mpibelief: error: {error.format(taken=taken)}"], log
    assert "cache warm" not in log and "round 1" not in log, log
    assert taken.read_text() == TAKEN and not new.exists()
