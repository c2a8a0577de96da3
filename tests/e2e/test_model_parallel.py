"""Model parallelism end to end: a replica over two ranks trains as one rank does.

SGD is deterministic, so P = 2 must reproduce P = 1's metrics to float32 rounding (an
image network: locally connected, pooling, LCN, logistic outputs).  Downpour is not
(pulls race pushes), so its replicas of two partitions are held to P = 1's accuracy
within a few points, and its sample counts to one count per replica, not per rank.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tests.e2e.test_cli import SMALL, cli

IMAGE = [
    "--set", "data.source='synthetic'", "--set", "data.image_shape=[12, 12, 2]",
    "--set", "data.n_classes=5", "--set", "data.n_train=512", "--set", "data.n_test=128",
    "--set", "model.kind='image'", "--set", "model.input_shape=[12, 12, 2]",
    "--set", "model.units=3", "--set", "model.rf=3", "--set", "model.strides=[1, 1]",
    "--set", "model.pools=[2, 1]", "--set", "model.lcn=3", "--set", "model.output='logistic'",
    "--set", "train.batch=32", "--set", "train.epochs=2.0", "--set", "train.eval_every=0.0",
]


def _metrics(path):
    with h5py.File(path) as f:
        assert f.attrs["status"] == "complete"
        return {k: f[f"metrics/{k}"][()] for k in ("samples", "train_loss", "test_loss",
                                                   "test_accuracy")}, f["ranks/samples"][()]


def test_sgd_on_two_partitions_reproduces_one(tmp_path):
    one = cli("train", "configs/sgd.toml", *IMAGE, "--out", tmp_path / "p1.h5")
    assert one.returncode == 0, one.stderr
    two = cli("train", "configs/sgd.toml", *IMAGE, "--set", "layout.partitions=2",
              "--out", tmp_path / "p2.h5", np=2, mpi=True)
    assert two.returncode == 0, two.stderr
    (m1, ranks1), (m2, ranks2) = _metrics(tmp_path / "p1.h5"), _metrics(tmp_path / "p2.h5")
    assert len(m1["samples"]) == len(m2["samples"]) > 10  # evaluated after every step
    np.testing.assert_array_equal(m1["samples"], m2["samples"])
    for key in ("train_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=2e-4, atol=1e-5, err_msg=key)
    assert m1["train_loss"][-1] < m1["train_loss"][0]  # it learnt something
    assert list(ranks2) == [ranks1[0], ranks1[0]]  # each partition saw every sample


@pytest.mark.parametrize("replicas", [1, 2])
def test_downpour_with_two_partitions_per_replica(tmp_path, replicas):
    args = [*SMALL, "--set", "layout.shards=2", "--set", "downpour.warmstart_steps=0",
            "--set", f"layout.replicas={replicas}", "--set", "train.max_seconds=0.0"]
    base = cli("train", "configs/demo.toml", *args, "--out", tmp_path / "p1.h5",
               np=3 + replicas, mpi=True)
    assert base.returncode == 0, base.stderr
    split = cli("train", "configs/demo.toml", *args, "--set", "layout.partitions=2",
                "--out", tmp_path / "p2.h5", np=3 + 2 * replicas, mpi=True, timeout=180)
    assert split.returncode == 0, split.stderr
    (m1, _), (m2, ranks) = _metrics(tmp_path / "p1.h5"), _metrics(tmp_path / "p2.h5")
    assert m2["samples"][-1] == m1["samples"][-1]  # per replica, not per rank
    assert (ranks[3:] == m1["samples"][-1] // replicas).all()  # every partition, every step
    assert m1["test_accuracy"][-1] > 0.6
    assert abs(m2["test_accuracy"][-1] - m1["test_accuracy"][-1]) < 0.04, (m1, m2)


@pytest.mark.parametrize(("config", "count"), [
    ("speech", "41,777,152"), ("images_80m", "79,279,041"), ("images_330m", "335,560,891"),
    ("images_1700m", "1,687,741,141")])
def test_info_prints_the_paper_sized_models_and_their_split(config, count):
    result = cli("info", "--np", "3", f"configs/{config}.toml", "--set", "layout.partitions=3")
    assert result.returncode == 0, result.stderr
    assert f"{count} parameters" in result.stdout
    split = [line for line in result.stdout.splitlines() if line.strip().startswith("partition")]
    assert len(split) == 3
    sizes = [int(line.split(":")[1].split("parameters")[0].replace(",", "")) for line in split]
    assert sum(sizes) == int(count.replace(",", ""))
    # Balanced to a row of locations: 82 rows in 3 tiles are 28, 27, 27 (3% apart).
    assert max(sizes) - min(sizes) < 0.05 * max(sizes)


@pytest.mark.parametrize("algorithm", ["sgd", "downpour"])
def test_partitions_stop_together_at_the_deadline(tmp_path, algorithm):
    """train.max_seconds ends every partition at the same step (partition 0 decides):
    one that stopped alone would leave its peers waiting for a boundary forever."""
    layout = (["--set", "layout.shards=1", "--set", "downpour.warmstart_steps=0"]
              if algorithm == "downpour" else [])
    result = cli("train", f"configs/{'demo' if algorithm == 'downpour' else 'sgd'}.toml",
                 *SMALL, *layout, "--set", "layout.partitions=2", "--set", "train.epochs=500.0",
                 "--set", "train.max_seconds=3.0", "--out", tmp_path / "x.h5",
                 np=4 if algorithm == "downpour" else 2, mpi=True, timeout=90)
    assert result.returncode == 0, result.stderr
    _, ranks = _metrics(tmp_path / "x.h5")
    workers = ranks[2:] if algorithm == "downpour" else ranks
    assert workers[0] == workers[1] > 0  # the same steps on both partitions
