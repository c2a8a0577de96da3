"""``mpibelief plot accuracy`` labels every curve by method and replica count."""

from __future__ import annotations

from pathlib import Path

from mpibelief.plots.accuracy import _label, plot_accuracy
from mpibelief.results import ResultWriter


def run_file(path: Path, algorithm: str, attrs: dict) -> Path:
    with ResultWriter(path, {"config": "", "algorithm": algorithm, "world_size": 5,
                             **attrs}) as w:
        for t, acc in ((0.0, 0.1), (1.0, 0.4), (2.0, 0.6)):
            w.append_metrics({"wall_seconds": t, "test_accuracy": acc, "train_accuracy": acc})
    return path


def test_curves_are_labelled_method_and_replicas(tmp_path):
    sb = run_file(tmp_path / "sb.h5", "sandblaster", {"replicas": 2})
    sgd = run_file(tmp_path / "sgd.h5", "sgd", {"replicas": 1})
    old = run_file(tmp_path / "old.h5", "downpour",
                   {"roles": "rank  role\n3  replica 0, partition 0\n4  replica 1, partition 0"})
    assert _label(sb, {"algorithm": "sandblaster", "replicas": 2,
                       "world_size": 5}) == "sb: sandblaster[2], 5 ranks"
    assert "downpour[2]" in _label(old, {"algorithm": "downpour", "roles": (
        "rank  role\n3  replica 0, partition 0\n4  replica 1, partition 0")})
    png = plot_accuracy([str(sgd), str(sb), str(old)], str(tmp_path / "fig.png"))
    assert png.stat().st_size > 1000
