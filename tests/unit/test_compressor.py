"""The compressor as a run uses it: tau policy from the config, one logged row per step."""

from __future__ import annotations

import numpy as np

from mpibelief import config
from mpibelief.compression import AdaptiveTau, FixedTau
from mpibelief.compressor import Compressor, label, policy
from mpibelief.results import COMPRESSION


def test_policy_follows_the_config():
    fixed = config.load(None, ["compression.tau=0.01"]).compression
    assert policy(fixed) == FixedTau(0.01) and label(fixed) == "strom(tau=0.01)"
    warm = config.load(None, ["compression.warmup_stages=2",
                              "compression.warmup_start=0.25"]).compression
    adaptive = policy(warm)
    assert isinstance(adaptive, AdaptiveTau) and label(warm) == "strom(1%+warmup)"
    assert adaptive.schedule(0.5) == 0.25 and adaptive.schedule(2.0) == 0.01
    assert label(config.load(None).compression) == "strom(1%)"


def test_every_step_is_logged_with_what_went_on_the_wire():
    n = 10_000
    comp = Compressor(n, config.load(None, ["compression.fraction=0.01"]).compression, rank=3)
    rng = np.random.default_rng(0)
    packets = []
    for step in range(1500):  # past the log's first capacity: it grows
        packet, row = comp.compress(rng.standard_normal(n).astype(np.float32), step / 100)
        packets.append(packet.size)
        assert row["step"] == step + 1 and row["rank"] == 3
    cols = comp.log.columns()
    assert set(cols) == set(COMPRESSION) and len(cols["step"]) == 1500
    assert list(cols["bytes_compressed"]) == [4 * p + 4 for p in packets]  # words + count
    assert (cols["bytes_dense"] == 4 * n).all() and (cols["ratio"] >= 100).all()
    assert cols["epoch"][-1] == 14.99 and (cols["residual_norm"] > 0).all()
    dense, sparse = comp.log.totals()
    assert dense == 1500 * 4 * n and sparse == sum(4 * p + 4 for p in packets)
