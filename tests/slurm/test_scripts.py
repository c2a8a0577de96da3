"""The batch scripts as text, and the campaign driver's plan: no Slurm needed.

What must hold for the scripts to run unchanged on any cluster: they pass shellcheck,
state their resources, and name no machine, partition or account.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from tests.conftest import BIN, REPO

SLURM = REPO / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
ENV = {**os.environ, "MPIBELIEF_PYTHON": sys.executable,
       "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    files = [f"slurm/{p.name}" for p in SCRIPTS] + ["slurm/common.sh", "slurm/campaign.sh"]
    result = subprocess.run(["shellcheck", "-x", *files], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_states_its_resources(script):
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", script.read_text(), re.M))
    for key in ("job-name", "nodes", "ntasks", "cpus-per-task", "time", "output"):
        assert key in directives, key
    assert re.search(r"%j|%A_%a", directives["output"]), directives["output"]
    assert not {"partition", "account", "nodelist"} & set(directives)
    assert not re.search(r"^#SBATCH +-[pAw]\b", script.read_text(), re.M)


def test_nothing_names_this_machine():
    host = socket.gethostname()
    for path in SLURM.iterdir():
        text = path.read_text() if path.is_file() else ""
        assert not re.search(rf"\b{re.escape(host)}\b", text), path.name
        assert "/work/" not in text, path.name


@pytest.mark.parametrize("n", [4, 5])
def test_a_simulated_campaign_is_one_task_then_its_figure(n):
    """Checks first, then the warm-up, the bench with the options unchanged, and the
    plot of the file the bench wrote (the submission test comes with bench/figN.py)."""
    text = (SLURM / f"fig{n}.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", text, re.M))
    assert directives["nodes"] == directives["ntasks"] == "1"
    body = [line for line in text.splitlines() if line and not line.startswith("#")]
    steps = ["mb_threads", "if ((ntasks != 1)); then", f'mb_figure_out results/fig{n}.h5 "$@"',
             "mb_warm configs/demo.toml", f'"$PYTHON" bench/fig{n}.py "$@"',
             f'"$PYTHON" -m mpibelief plot fig{n} "$MB_FIG_OUT" --out "${{MB_FIG_OUT%.h5}}.png"']
    found = [body.index(step) if step in body else None for step in steps]
    assert None not in found and found == sorted(found), list(zip(steps, found, strict=True))


def figure_out(*args: str):
    """slurm/common.sh's mb_figure_out in a shell of its own: (exit code, out, stderr)."""
    script = 'source slurm/common.sh; mb_figure_out "$@"; echo "$MB_FIG_OUT"'
    result = subprocess.run(["bash", "-c", script, "bash", *args], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout.strip(), result.stderr.strip()


def test_a_campaign_finds_its_result_file_and_never_replaces_one(tmp_path):
    taken = tmp_path / "taken.h5"
    assert figure_out("results/new_fig.h5", "--quick") == (0, "results/new_fig.h5", "")
    assert figure_out("d.h5", "--out", "x.h5", "--quick")[:2] == (0, "x.h5")
    assert figure_out("d.h5", "--quick", "--out=y.h5")[:2] == (0, "y.h5")
    taken.write_text("someone's")
    assert figure_out(str(taken)) == (2, "", f"mpibelief: error: {taken} exists: pass"
                                            " --overwrite to replace it")
    assert figure_out("d.h5", "--out", str(taken), "--overwrite")[:2] == (0, str(taken))
    assert figure_out("d.h5", "--out") == (2, "", "mpibelief: error: --out needs a file")


def dry_run(*args: str):
    return subprocess.run([str(SLURM / "campaign.sh"), "-d", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=60)


def test_campaign_plans_one_array_per_config_and_a_plot_after_it():
    result = dry_run("-n", "plan", "-s", "layout.replicas=1,2,4", "configs/demo.toml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "sweep dry1_[0-2] configs/demo.toml layout.replicas=1,2,4 (7 tasks each) -> results/plan/",
        "plot dry2 after dry1 -> results/plan/accuracy.png",
    ]
    sweep, plot = result.stderr.splitlines()
    assert "--ntasks=7 --array=0-2" in sweep and "sweep.sbatch --out-dir results/plan" in sweep
    assert "--dependency=afterok:dry1" in plot
    assert plot.endswith(" ".join(f"results/plan/demo-layout.replicas-{r}.h5" for r in (1, 2, 4)))


def test_campaign_gives_each_run_its_world():
    result = dry_run("-n", "plan", "-o", "--requeue", "configs/sgd.toml", "configs/demo.toml@7",
                     "--", "--set", "train.epochs=2.0")
    assert result.returncode == 0, result.stderr
    sgd, demo, plot = result.stderr.splitlines()
    assert "--ntasks=1 " in sgd and "--ntasks=7 " in demo
    assert "--requeue" in sgd and "--requeue" in demo and "--requeue" not in plot
    assert "--set train.epochs=2.0 --out results/plan/demo-7.h5" in demo
    assert "--dependency=afterok:dry1:dry2" in plot


def test_campaign_refuses_a_config_without_a_size():
    result = dry_run("-n", "plan", "configs/demo.toml")  # layout.replicas = 0 fills the world
    assert result.returncode == 2
    assert result.stderr.startswith("mpibelief: error: layout.replicas = 0 fills the world")


def requeued(job: str, *args) -> str:
    """What slurm/resume.py tells a requeued job `job` to do."""
    result = subprocess.run([sys.executable, str(SLURM / "resume.py"), "--job", job, *args],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.split("\t")[0]


def test_a_requeued_job_resumes_starts_over_or_stops_as_its_files_say(tmp_path, monkeypatch):
    import numpy as np

    from mpibelief import checkpoint
    from mpibelief.results import ResultWriter

    out = tmp_path / "r.h5"
    args = ("--out", str(out), "configs/sgd.toml")
    assert requeued("7", *args) == "start"
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    writer = ResultWriter(out, {})  # what job 7's first attempt left: running, no checkpoint
    assert requeued("7", *args) == "overwrite"
    assert requeued("8", *args) == "refuse"  # not its run: the run itself will refuse it
    folder = checkpoint.folder_for(out)
    sha = checkpoint.write_part(folder, 1, 0, {"params": np.zeros(3, np.float32)})
    manifest = checkpoint.write_manifest(folder, 1, {}, [sha])
    assert requeued("7", *args) == "resume"
    # A checkpoint older than the run: an earlier run's, left by --overwrite.
    os.utime(manifest, (manifest.stat().st_mtime - 3600,) * 2)
    assert requeued("7", *args) == "overwrite"
    sha = checkpoint.write_part(folder, 2, 0, {"params": np.zeros(3, np.float32)})
    checkpoint.write_manifest(folder, 2, {}, [sha])
    assert requeued("7", *args) == "resume"
    writer.close("complete")
    assert requeued("7", *args) == "done"
    # Without --out the result file is the config's: results_dir/run.name.h5.
    assert requeued("7", "configs/sgd.toml", f"run.results_dir='{tmp_path}'",
                    "run.name='r'") == "done"
