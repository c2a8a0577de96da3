"""Runs every ``tests/mpi/mpi_*.py`` script under ``mpiexec`` and checks it passed.

The scripts are plain programs (assert and exit non-zero on failure) because pytest
itself does not run well on several ranks at once.  Each declares its world sizes in a
first-line comment ``# ranks: 2 4``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_job

HERE = Path(__file__).parent


def _cases():
    for script in sorted(HERE.glob("mpi_*.py")):
        first = script.read_text().splitlines()[0]
        sizes = first.split("ranks:")[1].split() if "ranks:" in first else ["2"]
        for n in sizes:
            yield pytest.param(script, int(n), id=f"{script.stem}-np{n}")


@pytest.mark.mpi
@pytest.mark.parametrize(("script", "np"), list(_cases()))
def test_script(script: Path, np: int):
    result = run_job([script], np=np, timeout=180)
    assert result.returncode == 0, (
        f"{script.name} on {np} ranks failed:\n{result.stdout}\n{result.stderr}")
