"""`mpibelief plot validation` draws from what the validation writes, and only from it."""

from __future__ import annotations

from argparse import Namespace

import numpy as np
import pytest

from mpibelief.__main__ import main
from mpibelief.errors import UserError
from mpibelief.plots.validation import read_validation
from mpibelief.simulate import validate

SAMPLES = np.linspace(0, 1000, 6)
ACC = 0.02 + 0.0005 * SAMPLES  # straight, so interpolating it is exact


def a_case(step: float, staleness: float, shift: float) -> tuple:
    samples, acc = SAMPLES, ACC
    one = {"step_seconds": step, "compute_step_seconds": 0.8 * step,
           "comm_step_seconds": 0.2 * step, "staleness": staleness, "fresh": 0.1,
           "samples": samples,
           "test_accuracy": acc, "wall_seconds": samples / 100, "final_accuracy": acc[-1]}
    # a second real run evaluated elsewhere: interpolated at the first one's samples
    later = {**one, "samples": samples + 50, "test_accuracy": acc + 0.025 + 0.004}
    real = validate.expected([one, later], samples)
    runs = [{**one, "step_seconds": 1.1 * step, "test_accuracy": acc + 0.002 + shift + d,
             "staleness": staleness + 0.1} for d in (-0.005, 0.005)]
    sim = validate.expected(runs, samples)
    found = validate.compare(real, sim)
    found.update({"cores": 2, "background": 4.0, "loadavg_before": 5.0,
                  "loadavg_after": 6.0, "runs": 2})
    real["runs_background"] = np.array([3.5, 4.5])
    return real, sim, found


def test_expected_and_compare_hold_the_bounds():
    real, sim, found = a_case(0.02, 1.0, 0.01)
    assert sim["step_seconds"] == pytest.approx(0.022)  # the runs' mean
    # the later run at the first one's samples: interpolated, then the two averaged
    np.testing.assert_allclose(real["runs_test_accuracy"][1][1:], ACC[1:] + 0.004)
    np.testing.assert_allclose(real["test_accuracy"][1:], ACC[1:] + 0.002)
    np.testing.assert_allclose(sim["test_accuracy"], ACC + 0.012)
    assert found["step_ok"] and found["staleness_ok"] and found["accuracy_ok"]
    assert found["accuracy_max_difference_points"] == pytest.approx(1.0)
    _, _, off = a_case(0.02, 1.0, 0.025)  # 2.5 points apart over the compared half
    assert not off["accuracy_ok"]


def test_the_validation_plot_reads_what_validate_writes(tmp_path, capsys):
    path = tmp_path / "sim_validation.h5"
    found = {"R1_S1": a_case(0.02, 1.0, 0.01), "R2_S2": a_case(0.03, 2.0, -0.03)}
    args = Namespace(epochs=1.0, config="configs/demo.toml")
    validate.write(path, found, {"background": 3.5, "share": 0.4}, args)
    data = read_validation(path)
    assert list(data["cases"]) == ["R1_S1", "R2_S2"] and data["bounds"]["step_seconds"] == 0.25
    assert data["cases"]["R2_S2"]["sim"]["runs_test_accuracy"].shape == (2, 6)
    assert not data["cases"]["R2_S2"]["found"]["accuracy_ok"]
    out = tmp_path / "v.png"
    assert main(["plot", "validation", str(path), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000 and "wrote" in capsys.readouterr().out
    with pytest.raises(UserError):
        read_validation(tmp_path / "missing.h5")
