"""The private Slurm, started once per session for tests/slurm and always stopped.

Skipped, with the reason in pytest's summary, on a machine without Slurm and munge
(`make test` on a workstation); `.ci/run` installs Debian's slurm-wlm and munge first,
so CI always runs these tests. Root is not needed: the daemons run as the user who
runs the tests (SlurmUser and SlurmdUser), whose jobs are the only ones they start.
"""

from __future__ import annotations

import pytest

from tests.slurm.cluster import PrivateSlurm, missing


@pytest.fixture(scope="session")
def slurm():
    lacking = missing()
    if lacking:
        pytest.skip(f"Slurm is not installed (no {', '.join(lacking)}):"
                    " apt-get install slurm-wlm munge")
    cluster = PrivateSlurm()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
