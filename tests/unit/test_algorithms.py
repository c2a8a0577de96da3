"""The algorithm registry: lookup, per-algorithm config checks, and a test's own algorithm."""

from __future__ import annotations

import pytest

from mpibelief import algorithms, config
from mpibelief.algorithms import Algorithm, register
from mpibelief.errors import ConfigError
from mpibelief.layout import WORKER


def write(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[run]\nalgorithm = "magic"\n', "run.algorithm = 'magic' is not one of"),
        ('[run]\nalgorithm = "downpour"\n', "needs layout.shards >= 1"),
        ('[run]\nalgorithm = "sgd"\n[layout]\nshards = 2\n', "set layout.shards = 0"),
        ('[run]\nalgorithm = "sync"\n[layout]\npartitions = 2\n', "not built yet"),
        ('[run]\nalgorithm = "sandblaster"\n[layout]\nshards = 0\n',
         "needs layout.shards >= 1"),
    ],
)
def test_bad_algorithm_configs_name_the_key_and_file(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        algorithms.resolve(config.load(path))
    message = str(err.value)
    assert needle in message and str(path) in message
    assert "\n" not in message


def test_builtins_are_registered():
    assert {"sgd", "downpour"} <= set(algorithms.names())
    downpour = algorithms.get("downpour")
    assert set(downpour.roles) == {"coordinator", "shard", "worker"}


def test_a_new_algorithm_registers_from_outside(tmp_path):
    """What a test needs to add an algorithm: the registry and nothing else."""
    seen = []
    register(Algorithm("test-noop", {WORKER: seen.append}))
    cfg = config.load(None, ["run.algorithm='test-noop'"])
    assert algorithms.resolve(cfg).entry(WORKER) is not None
    with pytest.raises(ConfigError, match="has no shard role"):
        algorithms.get("test-noop").entry("shard")

