"""Shared test helpers: spawning MPI jobs with a timeout, locating the shared data.

Every spawned job has a timeout, so a hung rank fails the test instead of the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FSDD = REPO.parent / "shared" / "data" / "fsdd"
BIN = Path(sys.executable).parent


def mpiexec() -> str:
    """The mpiexec beside this interpreter (the mpich wheel's), else the one on PATH."""
    local = BIN / "mpiexec"
    return str(local) if local.exists() else "mpiexec"


def run_job(args, np: int = 1, timeout: float = 120, cwd=None, env=None, mpi: bool = True,
            guard: bool = True):
    """Run ``python ARGS`` (under ``mpiexec -n np`` when ``mpi``) and return the result.

    With ``guard``, ``python -m mpi4py`` makes an uncaught exception on any rank abort
    the whole job, so a failing test script ends promptly instead of hanging its peers.
    The mpibelief CLI does that itself and is run without it, as users run it.
    """
    cmd = [sys.executable, *(["-m", "mpi4py"] if guard else []), *map(str, args)]
    if mpi:
        cmd = [mpiexec(), "-n", str(np), *cmd]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    full_env.update(env or {})
    try:
        return subprocess.run(
            cmd, cwd=cwd or REPO, env=full_env, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"job timed out after {timeout}s: {' '.join(cmd)}\n{exc.stdout}\n{exc.stderr}")


SPAWNING = ("e2e", "mpi", "slurm")  # test folders whose tests spawn mpiexec jobs


def pytest_collection_modifyitems(items) -> None:
    """Every test that spawns a job carries ``e2e``: ``-m "not e2e"`` is the quick tier."""
    for item in items:
        if Path(item.fspath).parent.name in SPAWNING:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def fsdd_path() -> Path:
    if not (FSDD / "recordings").is_dir():
        pytest.skip(f"FSDD not found at {FSDD}")
    return FSDD
