"""Checkpoint files: written atomically, verified by checksum, the newest valid one found."""

from __future__ import annotations

import numpy as np
import pytest

from mpibelief import checkpoint
from mpibelief.errors import UserError
from mpibelief.optim import Optimizer
from mpibelief.ps.state import GRADIENT, LOAD, ShardState
from mpibelief.ps.vectors import VectorCommands


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


def test_a_shard_part_carries_its_vectors_through_a_checkpoint(tmp_path):
    """Sandblaster's L-BFGS vectors live only on the shards: a part written from one
    shard state and restored into a fresh one gives back every vector, bit for bit."""
    state = ShardState(6, Optimizer("sgd", 1.0), clients=2)
    state.consume(LOAD, np.arange(6, dtype=np.float32))
    ops = VectorCommands(state)
    ops.copy("x", "params")
    ops.lincomb("s0", "x", 0.3, "x")
    ops.scale("s0", 1 / 3)
    arrays, counters = state.snapshot()
    sha = checkpoint.write_part(tmp_path, 1, 0, arrays)
    back, attrs = checkpoint.read_part(tmp_path, 1, 0)
    assert attrs["sha256"] == sha
    fresh = ShardState(6, Optimizer("sgd", 1.0), clients=2)
    fresh.restore(back, counters)
    assert sorted(fresh.vectors) == ["s0", "x"]
    for name, v in state.vectors.items():
        assert fresh.vector(name).tobytes() == v.tobytes()
    np.testing.assert_array_equal(fresh.current, state.current)


def test_an_excluded_client_is_never_summed():
    """A failed Sandblaster replica's late push is refused by the shard."""
    state = ShardState(4, Optimizer("sgd", 1.0), clients=3)
    ops = VectorCommands(state)
    ops.reset_accumulator("grad")
    one = np.ones(4, np.float32)
    state.consume(GRADIENT, one, client=2, samples=5)
    assert ops.exclude(2) == 5  # what it had summed: final from now on
    state.consume(GRADIENT, one, client=2, samples=5)
    state.consume(GRADIENT, one, client=1, samples=7)
    assert ops.samples() == [0, 7, 5]
    np.testing.assert_array_equal(state.vector("grad"), 2 * one)
    assert state.stats.refused == 1
