"""What the training benchmarks share: launching a real job, and list arguments.

Each benchmark runs ``mpibelief train`` as users do (``mpiexec -n W python -m
mpibelief train ...``, or the launcher given), one job at a time, and reads the result
file it leaves; a failed job ends the benchmark with its error output.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def launch(bench: str, name: str, cmd: list[str], timeout: float = 3600) -> None:
    """Run one training job from the repository root; exit with its stderr if it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        sys.exit(f"bench/{bench}: {name} failed:\n{done.stderr[-2000:]}")


def counts(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``: positive integers for ``--replicas`` and the like."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want integers, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want positive integers, e.g. 1,2,4")
    return values


def floats(text: str) -> list[float]:
    """``"0.1,0.01"`` -> ``[0.1, 0.01]``: positive numbers."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want numbers, e.g. 0.1,0.01") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: want positive numbers")
    return values
