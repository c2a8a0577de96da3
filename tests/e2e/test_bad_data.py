"""Bad data through the real command line: one line, no traceback, every rank ended.

The readers' own unit tests cover every case; these prove the message survives the
CLI and ``mpiexec`` intact (and is printed once, not once per rank).
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tests.e2e.test_cli import assert_one_line_error, cli
from tests.unit.test_data import tone, write_wav


@pytest.fixture
def small_fsdd(tmp_path):
    rec = tmp_path / "fsdd" / "recordings"
    rec.mkdir(parents=True)
    for digit in range(10):
        for take in (0, 5):
            write_wav(rec / f"{digit}_bob_{take}.wav", tone(digit, take, 1600))
    return tmp_path / "fsdd"


def user_h5(path, drop=(), y_train=None):
    rng = np.random.default_rng(0)
    arrays = {"train/x": rng.standard_normal((40, 3)), "train/y": np.arange(40) % 4,
              "test/x": rng.standard_normal((8, 3)), "test/y": np.arange(8) % 4}
    if y_train is not None:
        arrays["train/y"] = y_train
    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            if name not in drop:
                f[name] = value
        f.attrs["n_classes"] = 4
    return path


def train(tmp_path, *sets, np_: int = 1):
    args = ["train", "configs/sgd.toml", "--out", tmp_path / "x.h5",
            "--set", f"data.cache_dir='{tmp_path / 'cache'}'"]
    for item in sets:
        args += ["--set", item]
    return cli(*args, np=np_, mpi=np_ > 1)


def test_truncated_wav(tmp_path, small_fsdd):
    bad = small_fsdd / "recordings" / "3_bob_5.wav"
    bad.write_bytes(bad.read_bytes()[:-400])
    result = train(tmp_path, f"data.path='{small_fsdd}'")
    assert_one_line_error(result, "3_bob_5.wav: truncated")


def test_hdf5_without_train_y(tmp_path):
    path = user_h5(tmp_path / "d.h5", drop=("train/y",))
    result = train(tmp_path, "data.source='hdf5'", f"data.path='{path}'")
    assert_one_line_error(result, "/train/y")


def test_labels_out_of_range(tmp_path):
    path = user_h5(tmp_path / "d.h5", y_train=np.r_[np.arange(39) % 4, 9])
    result = train(tmp_path, "data.source='hdf5'", f"data.path='{path}'")
    assert_one_line_error(result, "9")


def test_missing_data_folder_under_mpiexec(tmp_path):
    """A data error on a parameter-server run: one message, and no rank left waiting."""
    result = cli("train", "configs/demo.toml", "--set", f"data.path='{tmp_path}/none'",
                 "--out", tmp_path / "x.h5", np=5, mpi=True, timeout=60)
    assert_one_line_error(result, f"{tmp_path}/none")
    assert result.stderr.count("mpibelief: error:") == 1
