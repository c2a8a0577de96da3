"""Checkpoint files: written atomically, verified by checksum, the newest valid one found."""

from __future__ import annotations

import numpy as np
import pytest

from mpibelief import checkpoint
from mpibelief.errors import UserError


def write(folder, number: int, value: float, keep: int = 3):
    parts = [checkpoint.write_part(folder, number, k, {"params": np.full(5, value + k,
                                                                        np.float32)})
             for k in range(2)]
    checkpoint.write_manifest(folder, number, {"wall_seconds": value}, parts, keep)


def test_round_trip_and_keep(tmp_path):
    for n in range(1, 6):
        write(tmp_path, n, float(n))
    assert checkpoint.numbers(tmp_path) == [3, 4, 5]  # keep = 3
    state = checkpoint.newest_valid(tmp_path)
    assert state["number"] == 5 and state["wall_seconds"] == 5.0
    arrays, _ = checkpoint.read_part(tmp_path, 5, 1)
    np.testing.assert_array_equal(arrays["params"], np.full(5, 6.0, np.float32))
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize(("victim", "needle"), [
    ("5.part1.h5", np.full(5, 6.0, np.float32).tobytes()),  # the parameters themselves
    ("5.h5", b'"wall_seconds": 5.0'),  # the manifest's state
])
def test_flipped_bytes_are_detected_and_the_previous_one_used(tmp_path, victim, needle):
    for n in (4, 5):
        write(tmp_path, n, float(n))
    path = tmp_path / victim
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0
    data[at + len(needle) - 2] ^= 0x01  # one bit, inside the stored values
    path.write_bytes(bytes(data))
    skipped = []
    state = checkpoint.newest_valid(tmp_path, report=skipped.append)
    assert state["number"] == 4 and "skipping checkpoint 5" in skipped[0]


def test_truncated_checkpoint_is_skipped(tmp_path):
    for n in (1, 2):
        write(tmp_path, n, float(n))
    part = tmp_path / "2.part0.h5"
    part.write_bytes(part.read_bytes()[:200])
    assert checkpoint.newest_valid(tmp_path, report=lambda m: None)["number"] == 1


def test_no_valid_checkpoint_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no valid checkpoint"):
        checkpoint.newest_valid(tmp_path)


def test_config_difference_names_the_key():
    old = "[model]\nhidden = 512\n[train]\nepochs = 1.0\n"
    assert checkpoint.config_difference(old, old.replace("1.0", "9.0")) is None
    diff = checkpoint.config_difference(old, old.replace("512", "1024"))
    assert diff == "model.hidden = 512 in the checkpoint, 1024 now"
